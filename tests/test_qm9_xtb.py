"""oreo-qm9-xtb: seeded GFN2-xTB MD frames of QM9 molecules, resumable shards, targets skipped, corpus source."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tblite")

from forcefield.cli import main  # noqa: E402
from forcefield.pretrain import qm9xtb  # noqa: E402
from forcefield.pretrain.corpus import build_corpus  # noqa: E402
from forcefield.pretrain.qm9xtb import generate_qm9_xtb, load_qm9_xtb  # noqa: E402
from forcefield.reference import xtb_energy_forces, xtb_level  # noqa: E402

DATA = Path(os.environ["OREO_DATA_DIR"])
QM9_DB = DATA / "schnetpack_testdata" / "test_qm9.db"      # 20 QM9 molecules, 19 of them in the train split
HAVE_RMD17 = (DATA / "rmd17" / "rmd17_ethanol_test_01.npz").is_file()   # the targets' reference geometries
pytestmark = pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")

# positions 13..17 of the fixed order in this database: CH3CN, HCN, CH2O, NH3 and ethanol (QM9 gdb 14, a target)
RANGE = dict(start=13, molecules=5)
TINY = dict(frames_per_molecule=3, stride=5, equilibration_steps=10, shard_size=2, qm9=str(QM9_DB),
            targets=["ethanol"] if HAVE_RMD17 else [])
quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("qm9xtb")
    generate_qm9_xtb(out, **RANGE, **TINY, **quiet)
    return out


def _same(a, b):
    for name in ("numbers", "positions", "forces", "energy", "frame_id", "ptr"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_frames_are_labelled_sharded_and_recorded(tiny_set):
    m = json.loads((tiny_set / "manifest.json").read_text())
    assert m["level_of_theory"] == [xtb_level()]
    assert m["counts"]["molecules"] == 5 and m["counts"]["failed"] == 0 and m["pending_molecules"] == []
    assert m["counts"]["frames"] == 3 * m["counts"]["sampled"] - m["counts"]["frames_dropped"]
    # blocks of 2 positions: 6 (13 only: incomplete), 7 (14, 15), 8 (16, 17)
    assert [(s["block"], s["molecules"], s["complete"]) for s in m["shards"]] == [(6, 1, False), (7, 2, True),
                                                                                 (8, 2, True)]
    cset = load_qm9_xtb(tiny_set)
    assert len(cset) == m["counts"]["frames"] and len(np.unique(cset.frame_id)) == len(cset)
    assert not cset.equilibrium.any() and np.isfinite(cset.forces).all()
    shard = np.load(tiny_set / m["shards"][1]["file"])
    assert shard["level"].tolist() == [xtb_level()] * int(shard["mol_frames"].sum())     # per frame
    assert (shard["mol_seed"] == [qm9xtb.molecule_seed(0, i) for i in shard["mol_index"]]).all()


def test_seeded_determinism(tiny_set, tmp_path):
    generate_qm9_xtb(tmp_path / "again", **RANGE, **TINY, **quiet)
    _same(load_qm9_xtb(tiny_set), load_qm9_xtb(tmp_path / "again"))
    generate_qm9_xtb(tmp_path / "s1", start=15, molecules=1, **{**TINY, "seed": 1}, **quiet)
    other = load_qm9_xtb(tmp_path / "s1")
    mine = load_qm9_xtb(tiny_set)
    same_molecule = mine.subset(np.flatnonzero(np.isin(mine.frame_id, other.frame_id)))
    assert len(same_molecule) == len(other) and not np.allclose(same_molecule.positions, other.positions)


@pytest.mark.slow
def test_workers_give_the_same_frames(tiny_set, tmp_path):
    generate_qm9_xtb(tmp_path, **RANGE, **TINY, workers=2, **quiet)     # two spawned processes
    _same(load_qm9_xtb(tiny_set), load_qm9_xtb(tmp_path))


def test_resume_after_interruption_redoes_no_finished_molecule(tiny_set, tmp_path, monkeypatch, capsys):
    calls, real = [], qm9xtb.sample_molecule

    def killed_on_third(task):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(task[1])
        return real(task)
    monkeypatch.setattr(qm9xtb, "sample_molecule", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate_qm9_xtb(tmp_path, **RANGE, **TINY, **quiet)
    first = list(calls)
    assert len(list((tmp_path / "pending").glob("*/*.npz"))) >= 2      # finished molecules are on disk
    calls.clear()

    def counting(task):
        calls.append(task[1])
        return real(task)
    monkeypatch.setattr(qm9xtb, "sample_molecule", counting)
    # continue with the command and no recipe options: the folder's recipe is used
    assert main(["data", "qm9-xtb", "--out", str(tmp_path), "--start", "13", "--molecules", "5"]) == 0
    assert "oreo-qm9-xtb in" in capsys.readouterr().out
    assert not set(calls) & set(first) and len(first) + len(calls) == 4    # ethanol is never sampled
    _same(load_qm9_xtb(tiny_set), load_qm9_xtb(tmp_path))                 # same frames as one run
    assert not list((tmp_path / "pending").glob("*/*.npz"))
    calls.clear()
    generate_qm9_xtb(tmp_path, **RANGE, **quiet)                          # all done: nothing sampled
    assert calls == []
    # extending the range into the unfinished block 6 (position 13 only) rewrites its shard with both molecules
    generate_qm9_xtb(tmp_path, start=12, molecules=1, **quiet)
    shard = np.load(tmp_path / "shards" / qm9xtb.shard_name(6))
    assert shard["mol_position"].tolist() == [12, 13] and len(calls) == 1
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"][0]["complete"]
    before, after = load_qm9_xtb(tiny_set), load_qm9_xtb(tmp_path)
    _same(before, after.subset(np.flatnonzero(np.isin(after.frame_id, before.frame_id))))
    with pytest.raises(ValueError, match="temperature: 800.0 -> 500.0"):
        generate_qm9_xtb(tmp_path, **RANGE, temperature=500.0, **quiet)
    # a write a killed run left unfinished does not stop the block's shard from being written later
    pending = tmp_path / "pending" / f"{7:05d}"
    pending.mkdir(parents=True)
    (pending / "16.npz").write_bytes((tmp_path / "shards" / qm9xtb.shard_name(7)).read_bytes())
    (pending / ".17.npz.abc.tmp").write_bytes(b"half")
    qm9xtb._flush_block(tmp_path, 7)
    assert not pending.exists()
    # a set begun before the recipe named its QM9 split scheme is not continued (its molecules may be test ones)
    gen = json.loads((tmp_path / "generation.json").read_text())
    del gen["recipe"]["split_scheme"]
    (tmp_path / "generation.json").write_text(json.dumps(gen))
    with pytest.raises(ValueError, match="split scheme"):
        generate_qm9_xtb(tmp_path, **RANGE, **quiet)


def test_equilibration_brings_the_frames_to_their_temperature():
    """The recipe equilibrates with a stronger friction (0.1/fs) than production (0.02/fs), and the sampler
    switches to the production friction when equilibration ends."""
    from ase.md.langevin import Langevin
    from forcefield.data.poly24.sampling import SamplingSettings, sample_trajectory
    settings = qm9xtb.QM9XTBConfig().sampling()
    assert settings.equilibration_friction == 0.1 and settings.friction == 0.02
    seen = []
    real = Langevin.run

    def run(self, steps):
        from ase import units
        seen.append(round(self.fr * units.fs, 6))
        return real(self, steps)
    from ase.build import molecule
    from ase.calculators.emt import EMT
    mp = pytest.MonkeyPatch()
    mp.setattr(Langevin, "run", run)
    try:
        sample_trajectory(molecule("N2"), SamplingSettings(temperature=300, relax_steps=0, equilibration_steps=3,
                                                           steps=2, stride=1, equilibration_friction=0.1),
                          seed=1, calculator=EMT())
    finally:
        mp.undo()
    assert seen == [0.1, 0.1, 0.1, 0.02, 0.02]


@pytest.mark.skipif(not HAVE_RMD17, reason="rMD17 reference data not found (the targets' geometries)")
def test_target_molecules_are_skipped_and_recorded(tiny_set):
    m = json.loads((tiny_set / "manifest.json").read_text())
    assert m["counts"]["skipped"] == 1
    assert m["skipped"] == [{"qm9_index": 14, "reason": "leakage: bond graph of ethanol"}]
    assert 14 not in (load_qm9_xtb(tiny_set).frame_id // qm9xtb.MAX_FRAMES).tolist()


def test_stored_labels_equal_a_fresh_tblite_call(tiny_set):
    cset = load_qm9_xtb(tiny_set)
    for f in (0, len(cset) - 1):
        energy, forces = xtb_energy_forces(cset.frame_numbers(f), cset.frame_positions(f))
        assert abs(energy - cset.energy[f]) < 1e-5                        # eV (SCF started from another guess)
        # eV/Å; the MD's SCF started from the previous step's solution: differences of a few 1e-4 eV/Å
        np.testing.assert_allclose(cset.forces[cset.ptr[f]:cset.ptr[f + 1]], forces, atol=1e-3)
        assert np.abs(forces).max() > 0.1                                 # off equilibrium


def test_corpus_reads_the_shards_with_their_level_of_theory(tiny_set):
    cset = load_qm9_xtb(tiny_set, energy="relative")
    assert cset.meta["level_of_theory"] == [xtb_level()] and cset.meta["qm9_split"] == "train"
    assert np.all(np.abs(cset.energy) < 5.0)           # eV above/below the xTB energy at the QM9 geometry
    assert len(load_qm9_xtb(tiny_set, level="GFN2-xTB")) == len(cset)
    assert len(load_qm9_xtb(tiny_set, level="PBE")) == 0
    leakage = {"protocol": "strict", "targets": ["ethanol"], "split_indices": [1]} if HAVE_RMD17 else \
        {"protocol": "none"}
    corpus = build_corpus({"leakage": leakage,
                           "sources": [{"name": "qm9-xtb", "reader": "qm9-xtb", "kind": "off-equilibrium",
                                        "path": str(tiny_set)}]}, log=lambda *_: None)
    assert len(corpus) == len(cset) and corpus.has_forces.all() and not corpus.frames.equilibrium.any()
    assert corpus.frames.energy is None                # energies of every source are dropped
    assert corpus.report["sources"][0]["dropped"] == ({"ethanol": 0} if HAVE_RMD17 else {})
    with pytest.raises(FileNotFoundError, match="oreo data qm9-xtb"):
        load_qm9_xtb(tiny_set / "nothing")


@pytest.mark.skipif(not HAVE_RMD17, reason="rMD17 reference data not found (the targets' geometries)")
def test_corpus_refuses_a_set_made_from_qm9_test_molecules(tmp_path):
    generate_qm9_xtb(tmp_path, start=0, molecules=1, **{**TINY, "split": "all", "frames_per_molecule": 1}, **quiet)
    src = [{"reader": "qm9-xtb", "kind": "off-equilibrium", "path": str(tmp_path)}]
    with pytest.raises(ValueError, match="QM9 split 'all'"):
        build_corpus({"leakage": {"protocol": "strict", "targets": ["ethanol"], "split_indices": [1]},
                      "sources": src}, log=lambda *_: None)
    assert len(build_corpus({"leakage": {"protocol": "none"}, "sources": src}, log=lambda *_: None)) == 1


def test_a_broken_or_new_bond_is_detected_but_vibration_is_not():
    z = np.array([8, 1, 1])
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    assert qm9xtb.bonds_intact(z, water, water)
    assert qm9xtb.bonds_intact(z, water, water * 1.2)                      # O-H 1.15 Å: stretched, not broken
    broken = water.copy()
    broken[1, 0] = 1.6                                                     # O-H past 1.5 x covalent sum
    assert not qm9xtb.bonds_intact(z, water, broken)
    formed = water.copy()
    formed[2] = formed[1] + [0.0, 0.55, 0.0]                               # H-H at 0.55 Å: a new bond
    assert not qm9xtb.bonds_intact(z, water, formed)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RMD17, reason="rMD17 files not found")
def test_the_study_pretrains_two_arms_that_differ_only_in_the_qm9_xtb_source(tiny_set, tmp_path):
    """benchmarks/qm9_xtb_study.py: the same pretraining and fine-tuning in both arms, the corpus the only
    difference; the comparison pairs the arms seed by seed."""
    import sys
    import yaml
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import qm9_xtb_study
    corpus = tmp_path / "corpus.yaml"
    corpus.write_text(yaml.safe_dump({
        "leakage": {"protocol": "strict", "targets": ["ethanol"], "split_indices": [1]},
        "sources": [{"name": "rmd17", "reader": "rmd17", "kind": "off-equilibrium", "molecules": ["malonaldehyde"],
                     "max_frames": 16}]}))
    out = tmp_path / "study"
    argv = ["--out", str(out), "--results", str(tmp_path / "results"), "--corpus", str(corpus), "--xtb-dir",
            str(tiny_set), "--pretrain-steps", "2", "--pretrain-batch-size", "4", "--hidden", "16", "--layers", "2",
            "--finetune-molecules", "ethanol", "--size", "8", "--seeds", "2", "--finetune-steps", "2"]
    assert qm9_xtb_study.main(argv) == 0
    arms = {arm: yaml.safe_load((out / f"corpus-{qm9_xtb_study.arm_folder(arm)}.yaml").read_text())
            for arm in qm9_xtb_study.ARMS}
    assert arms["+qm9-xtb"]["sources"][:-1] == arms["base"]["sources"]
    assert arms["+qm9-xtb"]["sources"][-1]["reader"] == "qm9-xtb"
    # each arm pretrained on its own corpus for the same steps: the qm9-xtb frames are in one only
    import torch
    seen = {}
    for arm in qm9_xtb_study.ARMS:
        ck = torch.load(out / qm9_xtb_study.arm_folder(arm) / "pretrain" / "et-oro" / "last.pt", map_location="cpu",
                        weights_only=False)
        seen[arm] = ck["step"]
    assert seen["base"] == seen["+qm9-xtb"] == 2
    drawn = {arm: [s["name"] for s in json.loads((out / qm9_xtb_study.arm_folder(arm) / "pretrain" / "et-oro" /
                                                   "corpus_report.json").read_text())["summary"]]
             for arm in qm9_xtb_study.ARMS}
    assert drawn == {"base": ["rmd17"], "+qm9-xtb": ["rmd17", "qm9-xtb"]}
    result = json.loads((tmp_path / "results" / "comparison.json").read_text())
    row = result["rows"][0]
    assert row["molecule"] == "ethanol" and row["seeds"] == [1, 2] and len(row["plus_qm9_xtb"]) == 2
    assert row["ratio"] == pytest.approx(np.mean(row["plus_qm9_xtb"]) / np.mean(row["base"]))
    assert "| ethanol | 2 |" in (tmp_path / "results" / "comparison.md").read_text()


@pytest.mark.skipif(not HAVE_RMD17, reason="rMD17 reference data not found (the targets' geometries)")
def test_corpus_refuses_a_set_drawn_from_another_qm9_split_scheme(tiny_set, tmp_path):
    """A set generated from the train part of an older split scheme holds molecules of today's QM9 test split: the
    strict protocol refuses it (the scheme is read from the set's recipe)."""
    import shutil
    other = tmp_path / "set"
    shutil.copytree(tiny_set, other)
    gen = json.loads((other / "generation.json").read_text())
    gen["recipe"]["split_scheme"] = "seeded-80-10-10"
    (other / "generation.json").write_text(json.dumps(gen))
    src = [{"reader": "qm9-xtb", "kind": "off-equilibrium", "path": str(other)}]
    with pytest.raises(ValueError, match="QM9 split scheme 'seeded-80-10-10'"):
        build_corpus({"leakage": {"protocol": "strict", "targets": ["ethanol"], "split_indices": [1]},
                      "sources": src}, log=lambda *_: None)
    assert load_qm9_xtb(tiny_set).meta["qm9_split_scheme"] == "torchmd-net"


def test_a_study_folder_of_other_settings_or_in_use_is_refused(tmp_path):
    """qm9_xtb_study.py names its backbones and runs by method and cell only: a folder begun with other arguments
    or another qm9-xtb set is refused (before any labelling, for the arguments), and so is a folder another study
    process is using; a lock left by a process that is gone is taken over."""
    import argparse
    import subprocess
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import qm9_xtb_study as study
    args = argparse.Namespace(**{k: 1 for k in study.DEFINING})
    manifest = {"counts": {"frames": 8}, "recipe": {"temperature": 800}}
    study.claim_study_folder(tmp_path, args, None)                  # nothing there yet: nothing to check
    assert not (tmp_path / "study.json").exists()
    study.claim_study_folder(tmp_path, args, manifest)
    study.claim_study_folder(tmp_path, args, manifest)              # the same study continues
    with pytest.raises(SystemExit, match="pretrain_steps"):
        study.claim_study_folder(tmp_path, argparse.Namespace(**{**vars(args), "pretrain_steps": 2}), None)
    with pytest.raises(SystemExit, match="the qm9-xtb set"):
        study.claim_study_folder(tmp_path, args, {**manifest, "counts": {"frames": 16}})
    (tmp_path / "study.lock").write_text("1\n")                     # pid 1 is alive
    with pytest.raises(SystemExit, match="in use by process 1"):
        study.lock_study_folder(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "study.lock").write_text(f"{gone.pid}\n")
    study.lock_study_folder(tmp_path)
    assert (tmp_path / "study.lock").read_text().strip() == str(os.getpid())
