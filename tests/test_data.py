"""Tests of forcefield.data against the real reference data in $OREO_DATA_DIR (../shared/data)."""
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from forcefield.data import (
    Batch, ConformationSet, DataNotFoundError, RMD17_MOLECULES, load_ase, load_md17, load_rmd17,
    random_split, resolve_data_dir, select_by_frame_id,
)
from forcefield.data import registry
from forcefield.units import KCAL_PER_MOL

DATA = Path(os.environ["OREO_DATA_DIR"])
RMD17 = DATA / "rmd17"
BOTNET_3BPA = DATA / "botnet" / "dataset_3BPA" / "train_300K.xyz"
ETH_METH = DATA / "botnet" / "dataset_ethanol" / "train_eth_meth.xyz"
SCHNETPACK_DB = DATA / "schnetpack_testdata" / "test_ethanol.db"

pytestmark = pytest.mark.skipif(not (RMD17 / "rmd17_aspirin_train_01.npz").is_file(),
                                reason=f"reference data not found under {DATA}")


def raw(name):
    with np.load(RMD17 / name) as d:
        return {k: d[k] for k in d.files}


# ---------------------------------------------------------------------------- rMD17
def test_kcal_factor():
    assert KCAL_PER_MOL == pytest.approx(0.0433641, rel=1e-5)


def test_rmd17_aspirin_train_01():
    cs = load_rmd17("aspirin", "train", 1)
    r = raw("rmd17_aspirin_train_01.npz")
    assert len(cs) == 1000
    assert np.all(cs.n_atoms == 21) and cs.n_atoms_total == 21000
    np.testing.assert_array_equal(cs.frame_numbers(0), r["nuclear_charges"])
    np.testing.assert_array_equal(cs.frame_id, r["old_indices"])
    np.testing.assert_array_equal(cs.positions.reshape(1000, 21, 3), r["coords"])
    assert cs.energy[7] == pytest.approx(r["energies"][7] * 0.0433641, rel=1e-6)
    np.testing.assert_allclose(cs.energy, r["energies"] * KCAL_PER_MOL, rtol=1e-15)
    np.testing.assert_allclose(cs.forces.reshape(1000, 21, 3), r["forces"] * KCAL_PER_MOL, rtol=1e-15)
    assert cs.cell is None and not cs.equilibrium.any()
    m = cs.meta
    assert (m["molecule"], m["split"], m["split_index"], m["labels"]) == ("aspirin", "train", 1, "revised")
    assert m["level_of_theory"] == "PBE/def2-SVP" and m["path"].endswith("rmd17_aspirin_train_01.npz")
    assert cs.formula == "C9H8O4" and cs.subset([3, 5]).formula == "C9H8O4"


def test_rmd17_original_labels_and_aliases():
    cs = load_rmd17("Salicylic Acid", split="test", split_index=2, labels="original")
    r = raw("rmd17_salicylic_test_02.npz")
    np.testing.assert_allclose(cs.energy, r["old_energies"] * KCAL_PER_MOL, rtol=1e-15)
    np.testing.assert_allclose(cs.forces.reshape(r["old_forces"].shape), r["old_forces"] * KCAL_PER_MOL, rtol=1e-15)
    assert cs.meta["molecule"] == "salicylic" and cs.meta["labels"] == "original"
    assert len(load_rmd17("salicylic_acid", split="test", split_index=2)) == 1000


def test_rmd17_split_all_is_union_of_train_and_test():
    cs = load_rmd17("ethanol", split="all")
    ids = np.concatenate([raw("rmd17_ethanol_train_01.npz")["old_indices"],
                          raw("rmd17_ethanol_test_01.npz")["old_indices"]])
    assert len(np.unique(cs.frame_id)) == len(cs) == len(np.unique(ids))
    assert set(cs.frame_id.tolist()) == set(ids.tolist())
    np.testing.assert_array_equal(cs.frame_id[:1000], ids[:1000])  # train first


def test_rmd17_data_dir_may_be_the_rmd17_folder():
    a = load_rmd17("uracil", data_dir=RMD17)
    b = load_rmd17("uracil", data_dir=DATA)
    np.testing.assert_array_equal(a.energy, b.energy)


def test_rmd17_cache_returns_independent_copies():
    a = load_rmd17("benzene")
    a.positions[:] = 0.0
    a.energy[:] = 0.0
    b = load_rmd17("benzene")
    assert np.abs(b.positions).sum() > 0 and np.all(b.energy < 0)


def test_rmd17_unknown_molecule_and_bad_arguments():
    with pytest.raises(ValueError) as err:
        load_rmd17("caffeine")
    for mol in RMD17_MOLECULES:
        assert mol in str(err.value)
    with pytest.raises(ValueError):
        load_rmd17("aspirin", split="valid")
    with pytest.raises(ValueError):
        load_rmd17("aspirin", split_index=6)
    with pytest.raises(ValueError):
        load_rmd17("aspirin", labels="ccsd")


def test_missing_file_error_says_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_rmd17("aspirin", data_dir=tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "rmd17" / "rmd17_aspirin_train_01.npz") in msg
    assert str(tmp_path / "rmd17" / "npz_data" / "rmd17_aspirin.npz") in msg
    assert f"oreo data download rmd17 --data-dir {tmp_path}" in msg
    assert "OREO_DATA_DIR" in msg
    with pytest.raises(DataNotFoundError, match="oreo data download md17"):
        load_md17("aspirin", data_dir=tmp_path)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("OREO_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("OREO_DATA_DIR")
    assert resolve_data_dir() == Path.home() / ".cache" / "oreo" / "data"


def _write_upstream_layout(root, mol, perm_seed=0):
    """rmd17/npz_data/rmd17_<mol>.npz holding train_01+test_01 (shuffled) and matching splits/*.csv."""
    tr, te = raw(f"rmd17_{mol}_train_01.npz"), raw(f"rmd17_{mol}_test_01.npz")
    n_tr, n = len(tr["energies"]), len(tr["energies"]) + len(te["energies"])
    perm = np.random.default_rng(perm_seed).permutation(n)  # row of frame k is where(perm == k)
    full = {"nuclear_charges": tr["nuclear_charges"]}
    for k in ("coords", "energies", "forces", "old_indices", "old_energies", "old_forces"):
        full[k] = np.concatenate([tr[k], te[k]])[perm]
    rows = np.argsort(perm)
    (root / "rmd17" / "npz_data").mkdir(parents=True)
    (root / "rmd17" / "splits").mkdir(parents=True)
    np.savez(root / "rmd17" / "npz_data" / f"rmd17_{mol}.npz", **full)
    np.savetxt(root / "rmd17" / "splits" / "index_train_01.csv", rows[:n_tr], fmt="%d")
    np.savetxt(root / "rmd17" / "splits" / "index_test_01.csv", rows[n_tr:], fmt="%d")


def test_rmd17_upstream_layout_gives_identical_arrays(tmp_path):
    _write_upstream_layout(tmp_path, "aspirin")
    for split in ("train", "test", "all"):
        for labels in ("revised", "original"):
            up = load_rmd17("aspirin", split, 1, data_dir=tmp_path, labels=labels)
            ref = load_rmd17("aspirin", split, 1, labels=labels)
            assert up.meta["layout"] == "upstream" and ref.meta["layout"] == "per-split"
            for attr in ("numbers", "positions", "ptr", "energy", "forces", "frame_id"):
                np.testing.assert_array_equal(getattr(up, attr), getattr(ref, attr), err_msg=f"{split} {attr}")
    with pytest.raises(DataNotFoundError):  # split 2 index files were not written
        load_rmd17("aspirin", "train", 2, data_dir=tmp_path)


# ---------------------------------------------------------------------------- MD17
def test_md17_loader_from_name_and_path(tmp_path):
    r = raw("rmd17_ethanol_test_01.npz")
    (tmp_path / "md17").mkdir()
    path = tmp_path / "md17" / "md17_ethanol.npz"
    np.savez(path, R=r["coords"], z=r["nuclear_charges"], E=r["old_energies"][:, None], F=r["old_forces"],
             name=np.array("ethanol"), theory=np.array("PBE+vdW-TS"))
    by_name, by_path = load_md17("ethanol", data_dir=tmp_path), load_md17(path)
    np.testing.assert_array_equal(by_name.energy, by_path.energy)
    np.testing.assert_allclose(by_name.energy, r["old_energies"] * KCAL_PER_MOL, rtol=1e-15)
    np.testing.assert_allclose(by_name.forces.reshape(r["old_forces"].shape), r["old_forces"] * KCAL_PER_MOL)
    np.testing.assert_array_equal(by_name.frame_id, np.arange(1000))
    assert by_path.meta["molecule"] == "ethanol"
    # the same geometries with original labels from rMD17 agree with the MD17 file
    orig = load_rmd17("ethanol", "test", labels="original")
    np.testing.assert_array_equal(orig.energy, by_name.energy)


# ---------------------------------------------------------------------------- ASE
def test_ase_botnet_3bpa_extxyz():
    cs = load_ase(BOTNET_3BPA)
    assert len(cs) == 500 and np.all(cs.n_atoms == 27)
    assert cs.forces is not None and cs.forces.shape == (500 * 27, 3)
    assert cs.cell is None and cs.pbc is None  # pbc="F F F": the 50 Å box is dropped
    first = BOTNET_3BPA.read_text().splitlines()[1]
    assert cs.energy[0] == pytest.approx(float(first.split("energy=")[1].split()[0]), rel=1e-15)
    np.testing.assert_array_equal(cs.frame_id, np.arange(500))
    assert sorted(cs.elements) == [1, 6, 7, 8]


def test_ase_schnetpack_db_kcal_per_mol():
    import ase.db
    cs = load_ase(SCHNETPACK_DB, energy_unit="kcal/mol")
    assert len(cs) == 20 and np.all(cs.n_atoms == 9)
    with ase.db.connect(SCHNETPACK_DB) as db:
        row = db.get(id=int(cs.frame_id[3]))
        assert cs.energy[3] == pytest.approx(float(row.data["energy"][0]) * KCAL_PER_MOL, rel=1e-14)
        np.testing.assert_allclose(cs.forces[cs.ptr[3]:cs.ptr[4]], row.data["forces"] * KCAL_PER_MOL)
    sub = load_ase(SCHNETPACK_DB, index="5:8", energy_unit="kcal/mol")
    np.testing.assert_array_equal(sub.energy, cs.energy[5:8])


def test_ase_mixed_atom_counts_and_slicing():
    cs = load_ase(ETH_METH, index="295:305")  # 300 methanol (6 atoms), then ethanol (9)
    assert len(cs) == 10
    assert sorted(set(cs.n_atoms.tolist())) == [6, 9]
    np.testing.assert_array_equal(cs.ptr, np.concatenate([[0], np.cumsum(cs.n_atoms)]))
    np.testing.assert_array_equal(cs.frame_id, np.arange(295, 305))
    assert cs.n_atoms.tolist() == [6] * 5 + [9] * 5
    assert cs.formula is None and cs.subset([0, 1]).formula == "CH4O" and cs.subset([5]).formula == "C2H6O"


def _write_xyz(path, frames):
    from ase.io import write
    write(path, frames, format="extxyz")


def _frame(n, with_forces=True, energy=-1.0, pbc=False):
    from ase import Atoms
    atoms = Atoms(numbers=[1] * n, positions=np.arange(3 * n, dtype=float).reshape(n, 3), pbc=pbc,
                  cell=np.eye(3) * 10 if pbc else None)
    atoms.info["REF_energy"] = energy
    if with_forces:
        atoms.arrays["REF_forces"] = np.ones((n, 3))
    return atoms


def test_ase_forces_missing_in_some_frames_is_an_error(tmp_path):
    path = tmp_path / "partial.xyz"
    _write_xyz(path, [_frame(2), _frame(3, with_forces=False), _frame(2)])
    with pytest.raises(ValueError, match=r"frame id\(s\) 1"):
        load_ase(path, energy_key="REF_energy", forces_key="REF_forces")
    none = tmp_path / "none.xyz"
    _write_xyz(none, [_frame(2, with_forces=False), _frame(3, with_forces=False)])
    cs = load_ase(none, energy_key="REF_energy", forces_key="REF_forces")
    assert cs.forces is None and len(cs) == 2


def test_ase_units_and_pbc(tmp_path):
    from ase import units
    path = tmp_path / "periodic.xyz"
    _write_xyz(path, [_frame(2, energy=-0.5), _frame(2, energy=-0.25, pbc=True)])
    cs = load_ase(path, energy_key="REF_energy", forces_key="REF_forces", energy_unit="Hartree",
                  length_unit="Bohr", equilibrium=[True, False], source="toy")
    np.testing.assert_allclose(cs.energy, np.array([-0.5, -0.25]) * units.Hartree)
    np.testing.assert_allclose(cs.forces, units.Hartree / units.Bohr)
    np.testing.assert_allclose(cs.positions[1], np.array([3.0, 4.0, 5.0]) * units.Bohr)
    assert cs.pbc.tolist() == [[False] * 3, [True] * 3]
    np.testing.assert_allclose(cs.cell[1], np.eye(3) * 10 * units.Bohr)
    assert cs.equilibrium.tolist() == [True, False] and cs.source == "toy"
    with pytest.raises(ValueError, match="unknown energy unit"):
        load_ase(path, energy_unit="furlong")


def test_ase_missing_or_unreadable_file(tmp_path):
    with pytest.raises(DataNotFoundError, match="nope.xyz"):
        load_ase(tmp_path / "nope.xyz")
    bad = tmp_path / "bad.xyz"
    bad.write_text("this is not\nan xyz file\n")
    with pytest.raises(ValueError, match="bad.xyz"):
        load_ase(bad)


# ---------------------------------------------------------------------------- registry
def test_registry_verifies_shared_rmd17_files():
    results = registry.verify(DATA, names=["rmd17"])
    assert len(results) == 102  # 100 npz + README.md + LICENSE
    assert all(r.status == "ok" for r in results), [str(r) for r in results if r.status != "ok"]
    entry = registry.DATASETS["rmd17"]
    assert all(registry.RMD17_NPZ_COMMIT in f.url for f in entry.files)
    assert registry.DATASETS["rmd17-figshare"].files[0].url == "https://figshare.com/ndownloader/files/23950376"
    missing = registry.verify(DATA, names=["md17"])
    assert {r.status for r in missing} == {"missing"}


def test_data_verify_of_a_named_set_reports_its_missing_files(tmp_path, capsys):
    from forcefield.cli import main
    assert main(["data", "verify", "rmd17", "--data-dir", str(tmp_path)]) == 1
    assert "102 bad" in capsys.readouterr().out
    assert main(["data", "verify", "rmd17", "--data-dir", str(DATA)]) == 0


def test_a_truncated_or_pointer_npz_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "rmd17").mkdir()
    bad = tmp_path / "rmd17" / "rmd17_ethanol_train_01.npz"
    bad.write_bytes((RMD17 / bad.name).read_bytes()[:5000])                       # a download cut short
    with pytest.raises(ValueError, match=r"rmd17_ethanol_train_01.npz is unreadable.*oreo data download rmd17"):
        load_rmd17("ethanol", "train", 1, data_dir=tmp_path)
    bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1537803\n")
    with pytest.raises(ValueError, match=r"Git LFS pointer.*oreo data download rmd17"):
        load_rmd17("ethanol", "train", 1, data_dir=tmp_path)


def test_fetch_verifies_and_renames_atomically(tmp_path):
    src = RMD17 / "rmd17_ethanol_train_01.npz"
    good = next(f for f in registry.DATASETS["rmd17"].files if f.path.endswith(src.name))
    local = registry.RemoteFile(path=good.path, url=src.as_uri(), sha256=good.sha256, size=good.size)
    path = registry.fetch(local, tmp_path, progress=False)
    assert path == tmp_path / "rmd17" / src.name and registry.sha256sum(path) == good.sha256
    assert load_rmd17("ethanol", data_dir=tmp_path).energy.shape == (1000,)

    wrong = registry.RemoteFile(path="x/bad.npz", url=src.as_uri(), sha256="0" * 64)
    with pytest.raises(registry.ChecksumError):
        registry.fetch(wrong, tmp_path, progress=False)
    assert list((tmp_path / "x").iterdir()) == []  # no partial or wrong file left behind

    unknown = registry.RemoteFile(path="y/first.npz", url=src.as_uri(), sha256=None)
    registry.fetch(unknown, tmp_path, progress=False)
    assert (tmp_path / "y" / "first.npz.sha256").read_text().split()[0] == good.sha256
    (tmp_path / "y" / "first.npz").write_bytes(b"corrupted")  # differs from the recorded SHA-256
    registry.fetch(unknown, tmp_path, progress=False)  # so it is fetched again
    assert registry.sha256sum(tmp_path / "y" / "first.npz") == good.sha256


def test_download_offline_gives_clear_error(tmp_path):
    offline = registry.RemoteFile(path="z/file.npz", url="http://127.0.0.1:9/file.npz", sha256=None)
    with pytest.raises(registry.DownloadError, match="offline"):
        registry.fetch(offline, tmp_path, progress=False, timeout=5)
    assert not (tmp_path / "z" / "file.npz").exists()
    with pytest.raises(ValueError, match="registered"):
        registry.download("qm9000", tmp_path)
    with pytest.raises(ValueError, match="valid"):
        registry.download("rmd17", tmp_path, molecules=["caffeine"])


def test_download_extracts_tarball_selected_molecules(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _write_upstream_layout(src, "ethanol")
    (src / "rmd17" / "npz_data" / "rmd17_benzene.npz").write_bytes(b"not wanted")
    tar_path = tmp_path / "rmd17.tar.bz2"
    with tarfile.open(tar_path, "w:bz2") as tar:
        tar.add(src / "rmd17", arcname="rmd17")
    remote = registry.RemoteFile(path="rmd17.tar.bz2", url=tar_path.as_uri(), sha256=registry.sha256sum(tar_path),
                                 archive_members="rmd17/npz_data/rmd17_{molecule}.npz")
    entry = registry.DatasetEntry(name="test-tar", description="", files=(remote,), molecules=RMD17_MOLECULES,
                                  homepage="", license=None, citation="")
    monkeypatch.setitem(registry.DATASETS, "test-tar", entry)
    dest = tmp_path / "data"
    paths = registry.download("test-tar", dest, molecules=["ethanol"], progress=False, keep_archive=False)
    assert dest / "rmd17" / "npz_data" / "rmd17_ethanol.npz" in paths
    assert not (dest / "rmd17" / "npz_data" / "rmd17_benzene.npz").exists()
    assert not (dest / "rmd17.tar.bz2").exists()
    assert not any(p.name.startswith(".oreo-extract") for p in dest.iterdir())
    up = load_rmd17("ethanol", "test", data_dir=dest)
    np.testing.assert_array_equal(up.energy, load_rmd17("ethanol", "test").energy)


# ---------------------------------------------------------------------------- splits
def test_random_split_is_disjoint_and_seeded():
    s = random_split(1000, {"train": 800, "valid": 100, "test": 50}, seed=7)
    assert {k: len(v) for k, v in s.items()} == {"train": 800, "valid": 100, "test": 50}
    union = np.concatenate(list(s.values()))
    assert len(np.unique(union)) == 950 and union.min() >= 0 and union.max() < 1000
    again = random_split(1000, {"train": 800, "valid": 100, "test": 50}, seed=7)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = random_split(1000, {"train": 800, "valid": 100, "test": 50}, seed=8)
    assert not np.array_equal(s["train"], other["train"])
    with pytest.raises(ValueError, match="more than"):
        random_split(10, {"train": 8, "test": 3}, seed=0)


def test_select_by_frame_id_round_trip():
    cs = load_rmd17("toluene")
    split = random_split(len(cs), {"train": 100}, seed=1)["train"]
    part = cs.subset(split)
    rebuilt = select_by_frame_id(cs, part.frame_id)
    for attr in ("numbers", "positions", "ptr", "energy", "forces", "frame_id"):
        np.testing.assert_array_equal(getattr(rebuilt, attr), getattr(part, attr))
    shuffled = part.frame_id[::-1]
    np.testing.assert_array_equal(select_by_frame_id(cs, shuffled).frame_id, shuffled)
    with pytest.raises(ValueError, match="-5"):
        select_by_frame_id(cs, [int(cs.frame_id[0]), -5])
    doubled = ConformationSet.concatenate([cs.subset([0]), cs.subset([0])])
    with pytest.raises(ValueError, match="more than once"):
        select_by_frame_id(doubled, [int(cs.frame_id[0])])


# ---------------------------------------------------------------------------- mixed molecules
def test_subset_collate_concatenate_mixed_molecules():
    eth, asp = load_rmd17("ethanol"), load_rmd17("aspirin")
    both = ConformationSet.concatenate([eth.subset(np.arange(5)), asp.subset(np.arange(4))])
    assert len(both) == 9 and both.n_atoms.tolist() == [9] * 5 + [21] * 4
    np.testing.assert_array_equal(both.ptr, np.concatenate([[0], np.cumsum(both.n_atoms)]))
    np.testing.assert_array_equal(both.frame_positions(6), asp.frame_positions(1))
    np.testing.assert_array_equal(both.forces[both.ptr[6]:both.ptr[7]], asp.forces[asp.ptr[1]:asp.ptr[2]])

    pick = np.array([7, 0, 5, 2])
    sub = both.subset(pick)
    assert sub.n_atoms.tolist() == [21, 9, 21, 9]
    np.testing.assert_array_equal(sub.ptr, [0, 21, 30, 51, 60])
    np.testing.assert_array_equal(sub.energy, both.energy[pick])
    np.testing.assert_array_equal(sub.frame_positions(2), both.frame_positions(5))

    batch = both.collate(pick, dtype=torch.float64)
    assert isinstance(batch, Batch) and batch.num_graphs == 4
    assert torch.bincount(batch.batch).tolist() == [21, 9, 21, 9]
    np.testing.assert_array_equal(batch.positions.numpy(), sub.positions)
    np.testing.assert_array_equal(batch.numbers.numpy(), sub.numbers)
    np.testing.assert_array_equal(batch.forces.numpy(), sub.forces)
    np.testing.assert_array_equal(batch.energy.numpy(), sub.energy)
    np.testing.assert_array_equal(batch.frame_id.numpy(), sub.frame_id)
