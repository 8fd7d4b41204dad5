"""oreo-poly24: sound oligomers for all 24 polymers, reproducible labels, trajectory splits, loaders."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("rdkit")
pytest.importorskip("tblite")

from forcefield.data.poly24 import POLYMERS, canonical_polymer, load_poly24, load_polymer_set  # noqa: E402
from forcefield.data.poly24.build import build_oligomer, geometry_problems, oligomer_mol  # noqa: E402
from forcefield.data.poly24.generate import GenerationConfig, generate, split_of  # noqa: E402
from forcefield.data.paths import DataNotFoundError  # noqa: E402
from forcefield.reference import xtb_energy_forces  # noqa: E402

TINY = dict(temperatures=[300.0], replicas=3, equilibration_steps=4, steps=12, stride=4, relax_steps=3)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("poly24")
    generate(out, GenerationConfig(polymers=["PE", "POM"], **TINY), progress=False, log=lambda *_: None)
    return out


def test_catalog_has_24_polymers_with_valid_units():
    assert len(POLYMERS) == 24
    assert canonical_polymer("nylon-6,6") == "PA66" and canonical_polymer("pvac") == "PVAc"
    with pytest.raises(ValueError, match="PE, PP"):
        canonical_polymer("kevlar")


@pytest.mark.parametrize("name", list(POLYMERS))
def test_every_oligomer_is_chemically_sound(name):
    """Bond lengths in range, no clashes, 30-60 atoms, GFN2-xTB forces of the built structure moderate."""
    p = POLYMERS[name]
    atoms, bonds = build_oligomer(p, seed=3)
    assert 30 <= len(atoms) <= 60
    assert geometry_problems(atoms.numbers, atoms.positions, bonds) == []
    mol = oligomer_mol(p)
    # every atom has its normal valence: no radicals left by the joining/capping
    assert all(a.GetNumRadicalElectrons() == 0 for a in mol.GetAtoms())
    # one connected molecule
    from rdkit import Chem
    assert len(Chem.GetMolFrags(mol)) == 1
    energy, forces = xtb_energy_forces(atoms.numbers, atoms.positions)
    assert np.isfinite(energy) and np.abs(forces).max() < 5.0      # eV/Å: an MMFF minimum is near the xTB one


def test_geometry_check_catches_clashes_and_stretched_bonds():
    atoms, bonds = build_oligomer(POLYMERS["PE"], seed=1)
    pos = atoms.positions.copy()
    i, j = bonds[0]
    pos[j] = pos[i] + (pos[j] - pos[i]) * 2.0
    assert any("bond" in p for p in geometry_problems(atoms.numbers, pos, bonds))
    pos = atoms.positions.copy()
    far = [k for k in range(len(pos)) if k not in bonds[bonds[:, 0] == 0, 1] and k != 0][-1]
    pos[far] = pos[0] + 0.5
    assert any("without a bond" in p for p in geometry_problems(atoms.numbers, pos, bonds))


def test_atom_order_does_not_depend_on_the_seed():
    a, _ = build_oligomer(POLYMERS["PVC"], seed=1)
    b, _ = build_oligomer(POLYMERS["PVC"], seed=2)
    assert np.array_equal(a.numbers, b.numbers) and not np.allclose(a.positions, b.positions)


@pytest.mark.slow
def test_labels_are_reproducible_for_a_seed(tiny_set, tmp_path):
    generate(tmp_path, GenerationConfig(polymers=["PE"], **TINY), progress=False, log=lambda *_: None)
    a = load_poly24("all", root=tiny_set, polymers=["PE"])
    b = load_poly24("all", root=tmp_path)
    np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)
    np.testing.assert_allclose(a.energy, b.energy, atol=1e-8)
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-8)
    # the stored labels are GFN2-xTB's at the stored positions (raw forces, not the MD's centre-of-mass
    # constrained ones; the residual difference is SCF convergence from a restarted vs a fresh guess)
    for k in range(len(a)):
        e, f = xtb_energy_forces(a.frame_numbers(k), a.frame_positions(k))
        assert abs(e - a.energy[k]) < 1e-5 and np.abs(f - a.forces[a.ptr[k]:a.ptr[k + 1]]).max() < 2e-3
        assert np.abs(a.forces[a.ptr[k]:a.ptr[k + 1]].sum(0)).max() < 1e-3        # isolated molecule: no net force


def test_split_is_by_trajectory(tiny_set):
    manifest = json.loads((tiny_set / "manifest.json").read_text())
    by_traj = {}
    for rec in manifest["trajectories"]:
        by_traj.setdefault((rec["polymer"], rec["temperature_K"], rec["replica"]), set()).add(rec["split"])
    assert all(len(s) == 1 for s in by_traj.values())
    assert {r["split"] for r in manifest["trajectories"]} == {"train", "val", "test"}
    ids = {s: set(load_poly24(s, root=tiny_set).frame_id.tolist()) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"]) and not (ids["val"] & ids["test"])
    # the split files hold the same frames as the trajectories
    from ase.io import read
    frames = read(str(tiny_set / "test.extxyz"), index=":")
    assert {a.info["split"] for a in frames} == {"test"}
    assert len(frames) == manifest["counts"]["test"]["frames"] == 2 * (TINY["steps"] // TINY["stride"])
    assert [split_of(r, 4) for r in range(4)] == ["test", "val", "train", "train"]
    assert [split_of(r, 2) for r in range(2)] == ["test", "train"]


def test_manifest_records_the_level_of_theory_and_smiles(tiny_set):
    manifest = json.loads((tiny_set / "manifest.json").read_text())
    assert manifest["level_of_theory"][0].startswith("GFN2-xTB (tblite")
    assert manifest["polymers"]["POM"]["repeat_smiles"] == POLYMERS["POM"].repeat_smiles
    assert manifest["polymers"]["PE"]["oligomer_smiles"] == "CCCCCCCCCCCC"
    assert "not the (unpublished)" in (tiny_set / "MANIFEST.md").read_text()
    cset = load_poly24("train", root=tiny_set)
    assert cset.meta["level_of_theory"].startswith("GFN2-xTB") and cset.energy is not None


@pytest.mark.slow
def test_generation_resumes_and_refuses_other_settings(tmp_path):
    generate(tmp_path, GenerationConfig(polymers=["PE"], **TINY), progress=False, log=lambda *_: None)
    done = tmp_path / "trajectories" / "PE" / "T300_r0.extxyz"
    stamp = os.stat(done).st_mtime_ns
    manifest = generate(tmp_path, GenerationConfig(polymers=["PE", "POM"], **TINY), progress=False,
                        log=lambda *_: None)
    assert os.stat(done).st_mtime_ns == stamp                       # finished trajectories are not redone
    assert set(manifest["polymers"]) == {"PE", "POM"}
    with pytest.raises(ValueError, match="other settings.*stride"):
        generate(tmp_path, GenerationConfig(polymers=["PE"], **{**TINY, "stride": 2}), progress=False)


def test_loaders_round_trip_and_filter(tiny_set):
    test = load_poly24("test", root=tiny_set, polymers=["pom"])
    ext = load_polymer_set(tiny_set / "test.extxyz", polymers=["POM"])
    assert len(test) == len(ext) > 0
    np.testing.assert_allclose(test.positions, ext.positions)
    np.testing.assert_allclose(test.forces, ext.forces)
    np.testing.assert_allclose(test.energy, ext.energy)
    assert len(load_polymer_set(tiny_set / "train.extxyz", split="train")) == len(load_poly24("train", root=tiny_set))
    assert len(load_polymer_set(tiny_set, polymers=["PE"], split="val")) == len(load_poly24("val", root=tiny_set,
                                                                                          polymers=["PE"]))
    with pytest.raises(ValueError, match="not in this set"):
        load_poly24("test", root=tiny_set, polymers=["PS"])
    with pytest.raises(ValueError, match="the set has temperatures"):
        load_poly24("test", root=tiny_set, temperatures=[450])
    with pytest.raises(ValueError, match="the file has"):
        load_polymer_set(tiny_set / "test.extxyz", polymers=["PS"])


def test_frame_ids_of_two_trajectories_cannot_collide(tiny_set, monkeypatch):
    """Frame ids are 10000 x trajectory + frame: a trajectory of 10,000 frames would share ids with the next, so
    neither the generator nor the loader makes one."""
    with pytest.raises(ValueError, match="fewer than 10000; raise the stride"):
        GenerationConfig(polymers=["PE"], steps=20000, stride=2)
    ids = load_poly24("all", root=tiny_set).frame_id
    assert len(np.unique(ids)) == len(ids)
    import forcefield.data.poly24.loader as loader
    real = loader.load_ase
    monkeypatch.setattr(loader, "load_ase", lambda path, **k: real(path, **k).subset(np.zeros(10000, dtype=int)))
    with pytest.raises(ValueError, match="10000 frames; frame ids are"):
        load_poly24("test", root=tiny_set, polymers=["PE"])


def test_missing_set_says_how_to_generate_it(tmp_path):
    with pytest.raises(DataNotFoundError, match="oreo data poly24 --out"):
        load_poly24("train", data_dir=tmp_path)


def test_cli_generates_a_set(tmp_path, capsys):
    from forcefield.cli import main
    rc = main(["data", "poly24", "--out", str(tmp_path), "--polymers", "POM", "--temperatures", "300", "--replicas",
               "2", "--equilibration-steps", "2", "--steps", "4", "--stride", "2", "--no-progress"])
    assert rc == 0
    assert "test 2 frames / 1 trajectories" in capsys.readouterr().out
    assert main(["data", "poly24", "--out", str(tmp_path), "--polymers", "POM", "--stride", "4", "--steps", "4",
                 "--temperatures", "300", "--replicas", "2", "--equilibration-steps", "2", "--no-progress"]) == 2


def test_training_uses_the_trajectory_splits(tiny_set, tmp_path, capsys):
    """`oreo train` with data.dataset = poly24: splits by trajectory, metadata names the set; `oreo evaluate`
    defaults to the model's polymers and the test split."""
    from forcefield.cli import main
    from forcefield.io import load_potential
    from forcefield.train import Trainer, config_from_dict
    from forcefield.train.datasets import build_splits
    cfg = config_from_dict({"data": {"molecule": None, "dataset": "poly24", "path": str(tiny_set), "train_size": None,
                                     "val_size": 3, "test_size": None},
                            "model": {"hidden": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4, "cutoff": 4.0},
                            "optim": {"epochs": 1, "batch_size": 4, "lr_warmup_steps": 1, "threads": 1}})
    splits = build_splits(cfg.data, seed=1)
    assert len(splits.train) == len(load_poly24("train", root=tiny_set)) and len(splits.val) == 3
    assert not set(splits.test.frame_id) & set(splits.train.frame_id)
    Trainer(cfg, tmp_path, progress=False, log=lambda *_: None).fit()
    meta = json.loads(load_potential(tmp_path / "best.pt").metadata_json)
    assert meta["dataset"] == "poly24" and meta["polymers"] == ["PE", "POM"]
    assert meta["level_of_theory"].startswith("GFN2-xTB")
    assert main(["evaluate", str(tmp_path / "best.pt"), "--poly24-dir", str(tiny_set), "--polymers", "POM"]) == 0
    out = capsys.readouterr().out
    assert '"data": "poly24/test"' in out and "forces_mae_meV_per_A" in out
    with pytest.raises(ValueError, match="asked for 999 frames"):
        build_splits(config_from_dict({"data": {"dataset": "poly24", "path": str(tiny_set), "train_size": None,
                                              "val_size": 999}}).data, 1)


def test_pretraining_corpus_reads_poly24_as_off_equilibrium(tiny_set):
    from forcefield.pretrain.corpus import SourceConfig, load_source
    cset = load_source(SourceConfig(reader="poly24", kind="off-equilibrium", path=str(tiny_set), molecules=["POM"]))
    assert len(cset) == len(load_poly24("train", root=tiny_set, polymers=["POM"]))
    assert cset.forces is not None and not cset.equilibrium.any()


def test_dft_labels_replace_the_xtb_ones_and_are_recorded(tmp_path, monkeypatch):
    """--labels dft relabels the kept frames (PySCF is swapped for a stand-in here: a real PBE/def2-SVP
    calculation of a 34-atom oligomer takes minutes) and the manifest names both levels."""
    import forcefield.reference as reference
    calls = []

    def fake_dft(numbers, positions, xc, basis):
        calls.append((xc, basis))
        return -1.0, np.full((len(numbers), 3), 0.5)

    monkeypatch.setattr(reference, "dft_energy_forces", fake_dft)
    monkeypatch.setattr(reference, "dft_level", lambda xc, basis: f"{xc.upper()}/{basis} (PySCF stand-in)")
    cfg = GenerationConfig(polymers=["POM"], labels="dft", dft_frames=2, **TINY)
    manifest = generate(tmp_path, cfg, progress=False, log=lambda *_: None)
    assert len(calls) == 2 * cfg.replicas and calls[0] == ("pbe", "def2-svp")
    assert manifest["level_of_theory"][0].startswith("PBE/def2-svp (PySCF stand-in); sampled by GFN2-xTB")
    cset = load_poly24("all", root=tmp_path)
    assert len(cset) == 2 * cfg.replicas and np.all(cset.energy == -1.0) and np.all(cset.forces == 0.5)
