"""Readers (QM9 xyz/CSV/db, ANI HDF5, SDF), the EGNN backbone, the corpus sampler and the leakage filter."""
import gzip
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import units

from forcefield.data import load_rmd17
from forcefield.data.ani import forces_unit_factor, load_ani
from forcefield.data.conformations import ConformationSet
from forcefield.data.pcqm import iter_sdf, load_pcqm4mv2
from forcefield.data.qm9 import (QM9_N_MOLECULES, parse_qm9_xyz, qm9_index_of_db_rows, qm9_split_labels,
                                 qm9_uncharacterized, read_qm9)
from forcefield.pretrain.corpus import Corpus, EpochSampler, corpus_config_from_obj
from forcefield.pretrain.leakage import LeakageConfig, apply_leakage_filter, graph_hash, resolve_targets
from tests.helpers import ETHANOL_R, ETHANOL_Z, random_rotation

DATA = Path(os.environ["OREO_DATA_DIR"])
QM9_DB = DATA / "schnetpack_testdata" / "test_qm9.db"
ETHANE_NMS = DATA / "alkane_goodpaster" / "C2H6_DFT+Force_NMS.h5"
have_rmd17 = pytest.mark.skipif(not (DATA / "rmd17" / "rmd17_ethanol_test_01.npz").is_file(),
                                reason="rMD17 reference data not found")

METHANE_XYZ = """5
gdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t-40.47893\t-40.476062\t-40.475117\t-40.498597\t6.469\t
C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689
H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921
H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922
H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923
H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 0.133923
1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078
C\tC\t
InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4
"""
WATER_XYZ = """3
gdb 3\t799.58812\t437.90386\t282.94545\t1.8511\t6.31\t-0.2928\t0.0687\t0.3615\t19.0002\t0.021375\t-76.404702\t-76.401867\t-76.400922\t-76.422349\t6.002\t
O\t-0.0343604951\t 0.9775395708\t 0.0076015923\t-0.589706
H\t 0.0647664923\t 0.0205721989\t 1.2*^-3\t 0.294853
H\t 0.8717903737\t 1.3005462186\t 0.0006935636\t 0.294853
1693.3955\t3801.1761\t3901.2166
O\tO\t
InChI=1S/H2O/h1H2\tInChI=1S/H2O/h1H2
"""
QM9PACK_CSV = ('XYZ_file,Index,Elements,XYZ_Ang,HOMO_au,LUMO_au,HOMO_LUMO_gap_au,InternalEnergy_0K_au\n'
               '"dsgdb9nsd_000001.xyz",1,"[\'C\',\'H\',\'H\',\'H\',\'H\']","[[-0.0126981359,1.0858041578,0.0080009958],'
               '[0.002150416,-0.0060313176,0.0019761204],[1.0117308433,1.4637511618,0.0002765748],'
               '[-0.540815069,1.4475266138,-0.8766437152],[-0.5238136345,1.4379326443,0.9063972942]]",'
               '-0.3877,0.1171,0.5048,-40.47893\n'
               '"dsgdb9nsd_000003.xyz",3,"[\'O\',\'H\',\'H\']","[[-0.0343604951,0.9775395708,0.],'
               '[0.0647664923,0.0205721989,0.0012],[0.8717903737,1.3005462186,0.0006935636]]",'
               '-0.2928,0.0687,0.3615,-76.404702\n')


# ---------------------------------------------------------------------------- QM9
def test_qm9_xyz_parser_reads_mathematica_exponents():
    index, z, r, props = parse_qm9_xyz(WATER_XYZ)
    assert index == 3 and z.tolist() == [8, 1, 1]
    assert r[1, 2] == pytest.approx(1.2e-3)
    assert props[5] == pytest.approx(-0.2928)   # HOMO in Hartree


@pytest.mark.parametrize("form", ["folder", "archive", "csv"])
def test_qm9_forms_agree(tmp_path, form):
    if form == "csv":
        src = tmp_path / "qm9_part1.csv"
        src.write_text(QM9PACK_CSV)
    else:
        folder = tmp_path / "xyz"
        folder.mkdir()
        (folder / "dsgdb9nsd_000001.xyz").write_text(METHANE_XYZ)
        (folder / "dsgdb9nsd_000003.xyz").write_text(WATER_XYZ)
        src = folder
        if form == "archive":
            src = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
            with tarfile.open(src, "w:bz2") as tar:
                for f in sorted(folder.iterdir()):
                    tar.add(f, arcname=f.name)
    d = read_qm9(src, split="all", properties=("homo", "lumo", "gap", "U0"))
    assert d.index.tolist() == [1, 3]
    c = d.conformations
    assert c.n_atoms.tolist() == [5, 3] and bool(c.equilibrium.all())
    np.testing.assert_allclose(d.properties["homo"], np.array([-0.3877, -0.2928]) * units.Hartree)
    np.testing.assert_allclose(d.properties["gap"], np.array([0.5048, 0.3615]) * units.Hartree)
    np.testing.assert_allclose(c.energy, np.array([-40.47893, -76.404702]) * units.Hartree)
    np.testing.assert_allclose(c.frame_positions(0)[0], [-0.0126981359, 1.0858041578, 0.0080009958])
    assert c.frame_positions(1)[1, 2] == pytest.approx(1.2e-3)


def test_qm9_split_is_torchmd_nets_and_fixed():
    idx = np.arange(1, QM9_N_MOLECULES + 1)
    lab = qm9_split_labels(idx)
    counts = {k: int(np.sum(lab == k)) for k in ("train", "val", "test", "none")}
    assert counts == {"train": 110_000, "val": 10_000, "test": 10_831, "none": 3_054}   # TorchMD-Net's ET-QM9 sizes
    bad = qm9_uncharacterized()
    assert len(bad) == 3054 and (lab[bad - 1] == "none").all() and bad[:3].tolist() == [58, 61, 80]
    # TorchMD-Net's train_val_test_split: default_rng(seed=1).permutation over the characterized molecules in order
    members = np.setdiff1d(idx, bad)
    perm = np.random.default_rng(1).permutation(len(members))
    assert (lab[members[perm[:110_000]] - 1] == "train").all() and (lab[members[perm[-10_831:]] - 1] == "test").all()
    assert (qm9_split_labels(idx[::7]) == lab[::7]).all()      # a molecule's split does not depend on the others


def test_qm9_legacy_split_is_kept():
    idx = np.arange(1, QM9_N_MOLECULES + 1)
    lab = qm9_split_labels(idx, "seeded-80-10-10")
    assert float(np.mean(lab == "train")) == pytest.approx(0.8, abs=1e-4) and not (lab == "none").any()
    assert qm9_split_labels([1, 2, 3, 4, 5], "seeded-80-10-10").tolist() == lab[:5].tolist()
    with pytest.raises(ValueError, match="split scheme"):
        qm9_split_labels([1], "80-10-10")


def test_schnetpack_db_without_uncharacterized_rows_maps_to_qm9_indices():
    # SchNetPack's remove_uncharacterized writes the 130,831 characterized molecules one after another
    bad = qm9_uncharacterized()
    n = QM9_N_MOLECULES - len(bad)
    idx = qm9_index_of_db_rows(np.arange(1, n + 1), n)
    assert idx.tolist() == np.setdiff1d(np.arange(1, QM9_N_MOLECULES + 1), bad).tolist()
    assert qm9_index_of_db_rows([57, 58, 59], n).tolist() == [57, 59, 60]      # 58 is the first uncharacterized
    # so its split labels are those of the molecules it holds: no row lands in "none"
    assert not (qm9_split_labels(idx) == "none").any()
    assert qm9_index_of_db_rows([57, 58, 59], QM9_N_MOLECULES).tolist() == [57, 58, 59]   # all molecules: row = index
    assert qm9_index_of_db_rows([58], 20).tolist() == [58]                                  # a hand-made subset
    with pytest.raises(ValueError, match="row ids"):
        qm9_index_of_db_rows([n + 1], n)


@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_qm9_schnetpack_db_and_splits_partition_it():
    parts = [read_qm9(QM9_DB, split=s, properties=("homo",)) for s in ("train", "val", "test")]
    ids = np.concatenate([p.index for p in parts])
    assert sorted(ids.tolist()) == list(range(1, 21))
    full = read_qm9(QM9_DB, split="all", properties=("homo",))
    assert full.properties["homo"][0] == pytest.approx(-0.3877 * units.Hartree)
    assert full.conformations.elements == [1, 6, 7, 8]


# ---------------------------------------------------------------------------- ANI
def test_ani1x_layout_units_and_nan_frames(tmp_path):
    import h5py
    path = tmp_path / "ani1x.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        g = f.create_group("C1H4")
        g["atomic_numbers"] = np.array([6, 1, 1, 1, 1], dtype=np.uint8)
        g["coordinates"] = rng.normal(size=(3, 5, 3))
        g["wb97x_dz.energy"] = np.array([-40.1, np.nan, -40.2])
        g["wb97x_dz.forces"] = np.ones((3, 5, 3)) * 0.01
        g["ccsd(t)_cbs.energy"] = np.array([np.nan, np.nan, -40.3])
    cs = load_ani(path)
    assert len(cs) == 2 and cs.numbers[:5].tolist() == [6, 1, 1, 1, 1]
    np.testing.assert_allclose(cs.energy, np.array([-40.1, -40.2]) * units.Hartree)
    np.testing.assert_allclose(cs.forces, 0.01 * units.Hartree)
    cc = load_ani(path, level="ccsd(t)_cbs")
    assert len(cc) == 1 and cc.forces is None


def test_ani1_layout_needs_a_force_unit(tmp_path):
    import h5py
    path = tmp_path / "ani1.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("gdb11_s01").create_group("gdb11_s01-0")
        g["species"] = np.array([b"O", b"H", b"H"])
        g["coordinates"] = np.zeros((2, 3, 3)) + np.arange(3)[None, :, None]
        g["energies"] = np.array([-76.0, -76.1])
        g["forces"] = np.ones((2, 3, 3))
    with pytest.raises(ValueError, match="forces_unit"):
        load_ani(path)
    cs = load_ani(path, forces_unit="hartree/bohr")
    np.testing.assert_allclose(cs.forces, units.Hartree / units.Bohr)
    assert load_ani(path, forces=False).forces is None
    assert forces_unit_factor("kcal/mol/Å") == pytest.approx(units.kcal / units.mol)


@pytest.mark.skipif(not ETHANE_NMS.is_file(), reason="Goodpaster ethane normal-mode file not found")
def test_ethane_normal_modes_forces_are_minus_energy_gradient():
    cs = load_ani(ETHANE_NMS, forces_unit="hartree/bohr", groups=["gdb11_s02/gdb11_s02-10"])
    R = cs.positions.reshape(len(cs), -1, 3)
    F = cs.forces.reshape(R.shape)
    ratios = []
    for a in range(0, len(cs) - 1, 7):
        d = ((R - R[a]) ** 2).sum((1, 2))
        d[a] = np.inf
        b = int(np.argmin(d))
        pred = -(0.5 * (F[a] + F[b]) * (R[b] - R[a])).sum()
        if abs(pred) > 1e-3:
            ratios.append((cs.energy[b] - cs.energy[a]) / pred)
    assert np.median(ratios) == pytest.approx(1.0, abs=0.05)


# ---------------------------------------------------------------------------- SDF
SDF = """water
  test

  3  2  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.1173 O   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    0.7572   -0.4692 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000   -0.7572   -0.4692 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
M  END
$$$$
ammonia
  test

  0  0  0     0  0            999 V3000
M  V30 BEGIN CTAB
M  V30 COUNTS 2 1 0 0 0
M  V30 BEGIN ATOM
M  V30 1 N 0.0 0.0 0.0 0
M  V30 2 H 1.01 0.0 0.0 0
M  V30 END ATOM
M  V30 END CTAB
M  END
$$$$
"""


@pytest.mark.parametrize("kind", ["sdf", "gz", "tar"])
def test_sdf_reader(tmp_path, kind):
    path = tmp_path / "pcqm4m-v2-train.sdf"
    path.write_text(SDF)
    if kind == "gz":
        gz = tmp_path / "x.sdf.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        path = gz
    elif kind == "tar":
        tgz = tmp_path / "pcqm4m-v2-train.sdf.tar.gz"
        with tarfile.open(tgz, "w:gz") as tar:
            tar.add(path, arcname="pcqm4m-v2-train.sdf")
        path = tgz
    recs = list(iter_sdf(path))
    assert [r[1] for r in recs] == ["water", "ammonia"]
    cs = load_pcqm4mv2(path)
    assert cs.n_atoms.tolist() == [3, 2] and cs.numbers.tolist() == [8, 1, 1, 7, 1]
    assert cs.frame_positions(0)[1, 1] == pytest.approx(0.7572) and bool(cs.equilibrium.all())
    assert len(load_pcqm4mv2(path, max_molecules=1)) == 1


# ---------------------------------------------------------------------------- EGNN
@pytest.mark.parametrize("cutoff", [None, 4.0])
def test_egnn_potential_symmetries_and_torchscript(cutoff):
    from forcefield.potential import Potential
    torch.manual_seed(0)
    pot = Potential({"name": "egnn", "hidden": 16, "num_layers": 2, "cutoff": cutoff}, elements=[1, 6, 8]).double()
    with torch.no_grad():
        for p in pot.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, r = torch.as_tensor(ETHANOL_Z), torch.as_tensor(ETHANOL_R)
    out = pot(z, r)
    rot = random_rotation(4)
    out2 = pot(z, r @ rot.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    assert torch.allclose(out["energy"], out2["energy"], atol=1e-10)
    assert torch.allclose(out["forces"] @ rot.T, out2["forces"], atol=1e-10)
    assert float(out["forces"].detach().abs().max()) > 1e-5
    perm = np.random.default_rng(1).permutation(9)
    out3 = pot(z[perm], r[perm])
    assert torch.allclose(out["forces"][perm], out3["forces"], atol=1e-10)
    scripted = torch.jit.script(pot)
    assert torch.allclose(scripted(z, r)["forces"], out["forces"], atol=1e-12)


# ---------------------------------------------------------------------------- corpus and sampler
def _toy_sets():
    a = ConformationSet.from_arrays(ETHANOL_Z, np.repeat(ETHANOL_R[None], 10, 0), forces=np.zeros((10, 9, 3)),
                                    source="a")
    b = ConformationSet.from_arrays([8, 1, 1], np.zeros((6, 3, 3)) + np.arange(3)[None, :, None],
                                    equilibrium=np.ones(6, bool), source="b")
    return a, b


def test_corpus_marks_forces_and_kinds():
    c = Corpus(list(_toy_sets()), names=["a", "b"])
    assert len(c) == 16 and c.has_forces.tolist() == [True] * 10 + [False] * 6
    batch = c.collate([0, 12])
    assert batch.has_forces.tolist() == [True, False] and batch.equilibrium.tolist() == [False, True]
    assert batch.source.tolist() == [0, 1] and batch.forces.shape == (12, 3)
    sub = batch.select(torch.tensor([False, True]))
    assert sub.num_graphs == 1 and sub.batch.tolist() == [0, 0, 0] and sub.numbers.tolist() == [8, 1, 1]


def test_sampler_shards_disjointly_and_weights_sources():
    c = Corpus(list(_toy_sets()), weights=[1.0, 0.5], names=["a", "b"])
    s0, s1 = EpochSampler(c, 2, seed=3, rank=0, world_size=2), EpochSampler(c, 2, seed=3, rank=1, world_size=2)
    b0, b1 = s0.epoch_batches(0), s1.epoch_batches(0)
    assert len(b0) == len(b1) == len(s0)
    f0, f1 = np.concatenate(b0), np.concatenate(b1)
    assert not set(f0) & set(f1)
    frames = s0.epoch_frames(0)
    assert (frames < 10).sum() == 10 and (frames >= 10).sum() == 3           # weight 0.5 of 6 frames
    assert sorted(np.concatenate([f0, f1]).tolist()) == sorted(frames[:12].tolist())   # 6 batches of 2
    assert all((x == y).all() for x, y in zip(b0, s0.epoch_batches(0)))       # deterministic
    assert not all((x == y).all() for x, y in zip(b0, s0.epoch_batches(1)))   # reshuffled per epoch


def test_corpus_config_rejects_unknown_keys_and_kinds():
    with pytest.raises(ValueError, match="unknown key"):
        corpus_config_from_obj([{"reader": "qm9", "kind": "equilibrium", "bogus": 1}])
    with pytest.raises(ValueError, match="kind"):
        corpus_config_from_obj([{"reader": "qm9", "kind": "eq"}])
    cfg = corpus_config_from_obj({"sources": [{"reader": "rmd17", "kind": "off-equilibrium"}],
                                  "leakage": {"protocol": "paper"}})
    assert cfg.leakage.protocol == "paper" and cfg.sources[0].split_indices == [1]


# ---------------------------------------------------------------------------- leakage
def test_graph_hash_separates_isomers_and_ignores_order_and_pose():
    h = graph_hash(ETHANOL_Z, ETHANOL_R)
    perm = np.random.default_rng(0).permutation(9)
    moved = ETHANOL_R[perm] @ random_rotation(2).numpy().T + 3.0
    assert graph_hash(ETHANOL_Z[perm], moved) == h
    # dimethyl ether C-O-C: same composition, different graph
    dme_z = np.array([6, 8, 6, 1, 1, 1, 1, 1, 1])
    dme_r = np.array([[-1.17, 0.2, 0], [0, -0.55, 0], [1.17, 0.2, 0], [-2.03, -0.47, 0], [-1.21, 0.84, 0.89],
                      [-1.21, 0.84, -0.89], [2.03, -0.47, 0], [1.21, 0.84, 0.89], [1.21, 0.84, -0.89]])
    assert graph_hash(dme_z, dme_r) != h


@have_rmd17
@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_strict_protocol_drops_every_copy_of_a_target_molecule():
    eth = load_rmd17("ethanol", "train", 1).subset(np.arange(10))
    mal = load_rmd17("malonaldehyde", "train", 1).subset(np.arange(5))
    qm9 = read_qm9(QM9_DB, split="all", properties=()).conformations
    cset = ConformationSet.concatenate([eth, mal, qm9])
    cfg = LeakageConfig(protocol="strict", targets=["ethanol"], split_indices=[1])
    keep, report = apply_leakage_filter(cset, cfg, resolve_targets(cfg))
    dropped = np.flatnonzero(~keep)
    assert report["dropped"]["ethanol"] == 11
    assert dropped[:10].tolist() == list(range(10))                   # all rMD17 ethanol frames
    assert cset.frame_id[dropped[10]] == 14                            # and QM9's ethanol (gdb 14) ...
    qm9_c2h6o = [f for f in range(15, len(cset)) if sorted(cset.frame_numbers(f)) == [1] * 6 + [6, 6, 8]]
    assert len(qm9_c2h6o) == 2                                         # ... but not dimethyl ether (gdb 15)
    cfg.match = "composition"
    keep2, _ = apply_leakage_filter(cset, cfg, resolve_targets(cfg))
    assert (~keep2).sum() == 12


@have_rmd17
def test_strict_protocol_leaves_target_molecules_out_of_rmd17_sources_by_name():
    """Under the strict protocol an rMD17 source does not even read a target molecule (its test files hold two
    salicylic-acid frames with a shared proton, whose bond graph is not the molecule's): every split is safe."""
    from forcefield.pretrain.corpus import build_corpus
    said = []
    leakage = {"protocol": "strict", "targets": ["ethanol"], "split_indices": [1]}
    src = {"name": "md", "reader": "rmd17", "kind": "off-equilibrium", "molecules": ["ethanol", "malonaldehyde"],
           "split": "test", "split_indices": [1]}
    corpus = build_corpus({"leakage": leakage, "sources": [src]}, log=said.append)
    assert len(corpus) == len(load_rmd17("malonaldehyde", "test", 1))
    assert corpus.report["sources"][0]["target_molecules_left_out"] == ["ethanol"]
    assert any("left out by name" in line for line in said)
    with pytest.raises(ValueError, match="holds only fine-tuning targets"):
        build_corpus({"leakage": leakage, "sources": [{**src, "molecules": ["ethanol"]}]}, log=said.append)


@have_rmd17
def test_paper_protocol_drops_only_test_frames_wherever_they_come_from():
    train = load_rmd17("ethanol", "train", 1).subset(np.arange(8))
    test = load_rmd17("ethanol", "test", 1).subset(np.arange(5))
    # a copy of the test frames with atoms permuted and rotated, as another data set might hold them
    perm = np.random.default_rng(0).permutation(9)
    rot = random_rotation(6).numpy()
    pos = test.positions.reshape(5, 9, 3)[:, perm] @ rot.T
    copy = ConformationSet.from_arrays(test.frame_numbers(0)[perm], pos, source="copy")
    cset = ConformationSet.concatenate([train, test, copy])
    cfg = LeakageConfig(protocol="paper", targets=["ethanol"], split_indices=[1])
    keep, report = apply_leakage_filter(cset, cfg, resolve_targets(cfg))
    assert keep.tolist() == [True] * 8 + [False] * 10
    assert report["dropped"]["ethanol"] == 10
    keep_none, _ = apply_leakage_filter(cset, LeakageConfig(protocol="none"), [])
    assert keep_none.all()
