"""oreo fit: the xTB pool is seeded, FPS spreads out, labels are saved per frame and never recomputed, a killed run
resumes, active learning picks the frames of largest committee spread, and the command ends in a committee file
OreoCalculator loads plus a report. Tiny molecules (water), xTB labels, tiny models; one PySCF test (sto-3g)."""
import json

import numpy as np
import pytest

pytest.importorskip("rdkit")
pytest.importorskip("tblite")

from forcefield.fit import label as fit_label  # noqa: E402
from forcefield.fit.config import FitConfig  # noqa: E402
from forcefield.fit.label import LabelStore, Level  # noqa: E402
from forcefield.fit.pool import PoolSettings, build_pool, conformers_from_smiles, molecule_from_smiles  # noqa: E402
from forcefield.fit.select import (farthest_point_sampling, geometric_descriptors, select_random,  # noqa: E402
                                   select_uncertain, standardise)

TINY_MODEL = ["model.hidden=16", "model.num_layers=2", "model.num_heads=2", "model.num_rbf=8", "model.cutoff=4.0",
              "optim.lr_warmup_steps=0", "optim.ema_decay=0.5"]
#: a whole fit of water in seconds: 12 pool frames... 7 labels (2 held out, 3 first, 2 in round 1), 2 members
TINY_FIT = dict(smiles="O", labels="xtb", dft_frames=7, test_frames=2, initial_frames=3, frames_per_round=2,
                conformers=1, temperatures=[300.0], pool_steps=60, pool_equilibration=10, pool_stride=3,
                pool_relax_steps=5, backbone="scratch", committee=2, epochs=3, lr=5e-3, train_set=TINY_MODEL,
                md_ps=0.02, md_replicas=2, md_stride=5, check_frames=1)
TINY_ARGS = ["--labels", "xtb", "--dft-frames", "7", "--test-frames", "2", "--initial-frames", "3",
             "--frames-per-round", "2", "--conformers", "1", "--temperatures", "300", "--pool-steps", "60",
             "--pool-equilibration", "10", "--pool-stride", "3", "--pool-relax-steps", "5", "--from", "scratch",
             "--committee", "2", "--epochs", "3", "--lr", "5e-3", "--md-ps", "0.02", "--md-replicas", "2",
             "--md-stride", "5", "--check-frames", "1"] + [a for s in TINY_MODEL for a in ("--set", s)]


def quiet(*_):
    pass


class Counter:
    """compute_label that counts its calls (and can fail on the n-th)."""

    def __init__(self, fail_at=None, exc=KeyboardInterrupt):
        self.calls, self.fail_at, self.exc = 0, fail_at, exc
        self.real = fit_label.compute_label

    def __call__(self, level, numbers, positions):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise self.exc("killed")
        return self.real(level, numbers, positions)


def water_frames(n=4, seed=0):
    rng = np.random.default_rng(seed)
    base = np.array([[0.0, 0.0, 0.117], [0.0, 0.757, -0.469], [0.0, -0.757, -0.469]])
    return {k: (np.array([8, 1, 1]), base + 0.03 * rng.standard_normal(base.shape)) for k in range(n)}


# ---------------------------------------------------------------------------- pool
def test_pool_is_seeded(tmp_path):
    settings = PoolSettings(temperatures=[300.0], steps=20, equilibration=2, stride=5, relax_steps=2, seed=4)
    confs = conformers_from_smiles("O", 1, seed=0)
    a = build_pool(tmp_path / "a", confs, settings, quiet)
    b = build_pool(tmp_path / "b", conformers_from_smiles("O", 1, seed=0), settings, quiet)
    other = build_pool(tmp_path / "c", confs, PoolSettings(**{**settings.__dict__, "seed": 5}), quiet)
    assert len(a) == 4 and [f.info["frame_id"] for f in a] == [0, 1, 2, 3]
    pos = np.stack([f.positions for f in a])
    np.testing.assert_array_equal(pos, np.stack([f.positions for f in b]))
    assert np.abs(pos - np.stack([f.positions for f in other])).max() > 1e-3
    # the pool frames carry the xTB labels of their step
    assert np.isfinite(a[0].get_potential_energy()) and a[0].get_forces().shape == (3, 3)


def test_bad_input_errors_name_the_fix(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="cannot parse the SMILES 'C1CC'"):
        molecule_from_smiles("C1CC")
    with pytest.raises(ValueError, match="net charge"):
        molecule_from_smiles("[NH4+]")
    from forcefield.cli import main
    assert main(["fit", "--smiles", "C1CC", "--out", str(tmp_path / "bad"), "--labels", "xtb"]) == 2
    assert "cannot parse the SMILES" in capsys.readouterr().err
    # the bad SMILES left no finished stage: the corrected command starts afresh in the same folder
    assert FitConfig.from_dict(json.loads((tmp_path / "bad" / "fit.json").read_text())["settings"]).smiles == "C1CC"
    from forcefield.fit.state import FitState
    assert FitState.open(tmp_path / "bad", {"smiles": "O", "labels": "xtb"})[1].smiles == "O"
    from ase.build import molecule
    from ase.io import write
    from forcefield.fit.pool import conformers_from_file
    write(str(tmp_path / "w.xyz"), [molecule("H2O"), molecule("H2O")])
    assert len(conformers_from_file(tmp_path / "w.xyz")) == 2
    with pytest.raises(FileNotFoundError, match="--structure"):
        conformers_from_file(tmp_path / "missing.xyz")
    write(str(tmp_path / "oh.xyz"), molecule("OH"))
    with pytest.raises(ValueError, match="odd number of electrons"):
        conformers_from_file(tmp_path / "oh.xyz")
    monkeypatch.setitem(__import__("sys").modules, "pyscf", None)     # PySCF not installed
    with pytest.raises(RuntimeError, match=r"oreo\[dft\]"):
        Level("dft").require()
    with pytest.raises(ValueError, match="--dft-frames 3 is smaller"):
        FitConfig(smiles="O", dft_frames=3, test_frames=1, initial_frames=3).resolve()


# ---------------------------------------------------------------------------- selection
def test_fps_picks_one_frame_from_each_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [40, 5, 5]                       # one big cluster: random picks mostly land in it
    x = np.concatenate([c + 0.3 * rng.standard_normal((n, 2)) for c, n in zip(centres, sizes)])
    cluster = np.repeat(np.arange(3), sizes)
    picks = farthest_point_sampling(x, 3)
    assert sorted(cluster[picks]) == [0, 1, 2]
    # with frames already chosen in clusters 0 and 1, the next pick is in cluster 2
    assert cluster[farthest_point_sampling(x, 1, chosen=[0, 41])[0]] == 2
    assert farthest_point_sampling(x, 2, candidates=[3, 7, 45]) in ([3, 45], [7, 45])


def test_fps_on_pool_frames_is_more_spread_than_consecutive_frames(tmp_path):
    pool = build_pool(tmp_path, conformers_from_smiles("O", 1), PoolSettings(
        temperatures=[300.0, 900.0], steps=60, equilibration=5, stride=3, relax_steps=3), quiet)
    pos = np.stack([a.positions for a in pool])
    d = geometric_descriptors(pool[0].numbers, pos)
    # sorted within the element pair: swapping the two hydrogens changes nothing
    np.testing.assert_allclose(geometric_descriptors(pool[0].numbers, pos[:, [0, 2, 1]]), d)
    x = standardise(d)

    def min_dist(idx):
        sub = x[idx]
        dd = np.linalg.norm(sub[:, None] - sub[None], axis=-1)
        return dd[np.triu_indices(len(idx), 1)].min()
    fps = farthest_point_sampling(x, 5)
    assert len(set(fps)) == 5
    assert min_dist(fps) > 2 * min_dist(list(range(5)))
    assert min_dist(fps) > min_dist(select_random(len(x), 5, np.random.default_rng(1)))


def test_uncertainty_selection_takes_the_largest_spreads():
    spread = [0.1, 0.5, 0.05, 0.9, 0.5, 0.2]
    assert select_uncertain(spread, 3) == [3, 1, 4]
    assert select_uncertain(spread, 10) == [3, 1, 4, 5, 0, 2]
    assert select_random(6, 3, np.random.default_rng(0)) == select_random(6, 3, np.random.default_rng(0))
    # consecutive frames of one replica are near copies: the spread's peak is taken once, then the next replica's
    replica, step = [0, 0, 0, 1, 1, 1], [10, 20, 30, 10, 20, 30]
    spread = [0.5, 0.9, 0.8, 0.1, 0.2, 0.3]
    assert select_uncertain(spread, 2, replica, step, min_gap=10) == [1, 5]
    assert select_uncertain(spread, 5, replica, step, min_gap=10) == [1, 5, 3, 2, 0]   # then the passed-over ones


# ---------------------------------------------------------------------------- labels
def test_labels_are_saved_per_frame_and_never_recomputed(tmp_path, monkeypatch):
    counter = Counter()
    monkeypatch.setattr(fit_label, "compute_label", counter)
    store = LabelStore(tmp_path / "labels", Level("xtb"))
    frames = water_frames(4)
    stats = store.label({k: frames[k] for k in (0, 1)}, log=quiet)
    assert counter.calls == 2 and stats["computed"] == 2 and store.ids() == [0, 1]
    rec = store.load(1)
    assert rec["level_of_theory"].startswith("GFN2-xTB") and rec["forces"].shape == (3, 3)
    np.testing.assert_array_equal(rec["positions"], frames[1][1])
    stats = store.label(frames, log=quiet)                # 0 and 1 saved: only 2 and 3 are computed
    assert counter.calls == 4 and stats == {"computed": 2, "failed": 0, "reused": 2, "seconds": stats["seconds"]}
    store.label(frames, log=quiet)
    assert counter.calls == 4
    moved = {0: (frames[0][0], frames[0][1] + 0.1)}
    with pytest.raises(ValueError, match="another structure"):
        store.label(moved, log=quiet)
    with pytest.raises(ValueError, match="another level"):
        LabelStore(tmp_path / "labels", Level("dft", "pbe", "sto-3g"), "PBE/sto-3g").label({0: frames[0]}, log=quiet)
    # a failed calculation is recorded, counted, and not retried
    failing = Counter(fail_at=1, exc=RuntimeError)
    monkeypatch.setattr(fit_label, "compute_label", failing)
    more = water_frames(6, seed=1)
    stats = store.label({4: more[4], 5: more[5]}, log=quiet)
    assert stats["failed"] == 1 and store.failed(4) and not store.failed(5) and store.ids() == [0, 1, 2, 3, 4, 5]
    store.label({4: more[4]}, log=quiet)
    assert failing.calls == 2


# ---------------------------------------------------------------------------- whole runs
@pytest.mark.slow
def test_killed_run_resumes_without_recomputing(tmp_path, monkeypatch):
    from forcefield.fit.loop import run_fit
    out = tmp_path / "fit"
    killer = Counter(fail_at=4)                              # round 0 labels 5 frames: killed on the 4th
    monkeypatch.setattr(fit_label, "compute_label", killer)
    with pytest.raises(KeyboardInterrupt):
        run_fit(dict(TINY_FIT), out, log=quiet)
    assert len(list((out / "labels").glob("*.npz"))) == 3
    assert json.loads((out / "fit.json").read_text())["stages"]["pool"]["done"]

    # killed again, in the first round's committee MD (after the committee was trained)
    import forcefield.fit.explore as explore_mod
    real_explore = explore_mod.explore

    def broken(*a, **k):
        raise KeyboardInterrupt("killed in MD")
    monkeypatch.setattr(explore_mod, "explore", broken)
    counter = Counter()
    monkeypatch.setattr(fit_label, "compute_label", counter)
    with pytest.raises(KeyboardInterrupt):
        run_fit(dict(TINY_FIT), out, log=quiet)
    assert counter.calls == 2                                # the 2 frames the kill left, no more
    done0 = (out / "rounds" / "r00" / "members" / "m0" / "done.json").stat().st_mtime_ns
    monkeypatch.setattr(explore_mod, "explore", real_explore)
    data = run_fit({}, out, log=quiet)                       # plain `oreo fit --out DIR`
    assert counter.calls == 2 + 2 + 1                        # round 1's 2 frames and 1 check frame
    assert (out / "rounds" / "r00" / "members" / "m0" / "done.json").stat().st_mtime_ns == done0   # not retrained
    assert data["labels_used"] == 7 and data["stop_reason"].startswith("label budget used")
    assert len(list((out / "labels").glob("*.npz"))) == 7
    # finished: a rerun computes nothing; a larger budget continues the active learning
    run_fit({}, out, log=quiet)
    assert counter.calls == 5
    data = run_fit({"dft_frames": 9}, out, log=quiet)
    assert counter.calls == 5 + 2 + 1 and len(data["rounds"]) == 3
    with pytest.raises(ValueError, match="labels: 'xtb' -> 'dft'"):
        run_fit({"labels": "dft"}, out, log=quiet)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """`oreo fit --smiles O --labels xtb` with a tiny budget, through the command line."""
    from forcefield.cli import main
    out = tmp_path_factory.mktemp("fit") / "water"
    assert main(["fit", "--smiles", "O", "--out", str(out), "--name", "water"] + TINY_ARGS) == 0
    return out


@pytest.mark.slow
def test_end_to_end_gives_a_committee_that_loads_and_a_report(fitted):
    from ase.build import molecule
    from forcefield import OreoCalculator
    atoms = molecule("H2O")
    atoms.calc = OreoCalculator(str(fitted / "committee.pt"))
    assert np.all(np.isfinite(atoms.get_forces())) and atoms.calc.results["forces_std_max"] > 0   # 2 members
    meta = atoms.calc.potential.metadata
    assert meta["committee_size"] == 2 and meta["molecule"] == "water"
    assert meta["level_of_theory"].startswith("GFN2-xTB")
    data = json.loads((fitted / "fit.json").read_text())
    assert data["labels_used"] == 7 and [len(r["selected"]) for r in data["rounds"]] == [3, 2]
    assert all(r["test"]["n_frames"] == 2 and np.isfinite(r["test"]["forces_mae_meV_per_A"]) for r in data["rounds"])
    report = (fitted / "report.md").read_text()
    assert "## Rounds" in report and "held-out" in report and "## Wall time" in report
    for png in ("mae.png", "spread.png", "timing.png"):
        assert (fitted / "report" / png).stat().st_size > 1000
    assert (fitted / "check" / "check.json").is_file()


@pytest.mark.slow
def test_active_learning_labels_the_md_frames_of_largest_spread(fitted):
    import torch
    from ase.io import read
    from forcefield.fit.state import md_frame_id
    from forcefield.io import load_potential
    data = json.loads((fitted / "fit.json").read_text())
    cands = read(str(fitted / "rounds" / "r00" / "md" / "candidates.extxyz"), index=":")
    spread = np.array([a.info["forces_std_max"] for a in cands])
    assert len(cands) >= 2 and [a.info["frame_id"] for a in cands] == [md_frame_id(0, k) for k in range(len(cands))]
    from forcefield.fit.loop import PICK_GAP_STRIDES
    top = select_uncertain(spread, 2, [a.info["replica"] for a in cands], [a.info["step"] for a in cands],
                           PICK_GAP_STRIDES * 5)                          # TINY_ARGS: --md-stride 5
    assert data["rounds"][1]["selected"] == [md_frame_id(0, int(k)) for k in top]
    # the spread logged along the MD is the committee's forces_std_max of that frame
    committee = load_potential(fitted / "rounds" / "r00" / "committee.pt")
    a = cands[int(top[0])]
    out = committee.energy_forces_spread(torch.as_tensor(a.numbers), torch.as_tensor(a.positions, dtype=torch.float32))
    assert float(out["forces_std_max"]) == pytest.approx(spread[top[0]], rel=1e-3, abs=1e-5)
    # the labelled frames are exactly those positions
    lab = np.load(fitted / "labels" / f"{md_frame_id(0, int(top[0]))}.npz")
    np.testing.assert_allclose(lab["positions"], a.positions, atol=1e-6)


@pytest.mark.slow
def test_random_selection_uses_the_same_pool_held_out_frames_and_budget(fitted, tmp_path):
    from forcefield.fit.loop import run_fit
    data = run_fit({**TINY_FIT, "select": "random", "check_frames": 0}, tmp_path / "random", log=quiet)
    ref = json.loads((fitted / "fit.json").read_text())
    assert data["test_ids"] == ref["test_ids"] and data["labels_used"] == ref["labels_used"] == 7
    assert data["rounds"][1]["criterion"].startswith("at random")
    assert "selection: random" in (tmp_path / "random" / "report.md").read_text()


# ---------------------------------------------------------------------------- DFT (PySCF)
@pytest.mark.slow
def test_dft_labels_with_pyscf(tmp_path):
    pytest.importorskip("pyscf")
    level = Level("dft", "pbe", "sto-3g")
    store = LabelStore(tmp_path / "labels", level)
    assert store.level_text.startswith("PBE/sto-3g (PySCF")
    frames = water_frames(2)
    store.label(frames, workers=2, log=quiet)                # two worker processes, each frame saved
    assert store.ids() == [0, 1]
    rec = store.load(0)
    assert rec["method"] == "dft" and rec["level_of_theory"] == store.level_text
    np.testing.assert_allclose(rec["forces"].sum(0), 0.0, atol=1e-3)     # no net force on a free molecule
    # forces are -dE/dx: central finite difference of the energy along one coordinate
    numbers, pos = frames[0]
    h = 1e-3
    e = []
    for sign in (1, -1):
        p = pos.copy()
        p[1, 1] += sign * h
        e.append(fit_label.compute_label(level.to_dict(), numbers, p)[0])
    assert rec["forces"][1, 1] == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=2e-3)


# ---------------------------------------------------------------------------- the backbone
def test_backbone_choice_and_its_features(tmp_path):
    import torch
    from helpers import random_rotation, tiny_potential
    from forcefield.fit.select import backbone_descriptors
    from forcefield.fit.training import resolve_backbone
    pot, name = resolve_backbone("auto", [1, 8], quiet)          # water: the shipped backbone knows H and O
    assert name == "pretrained-et-oro" and pot is not None
    notes = []
    assert resolve_backbone("auto", [1, 16], notes.append) == (None, "scratch") and "not on S" in notes[0]
    with pytest.raises(ValueError, match="--from scratch"):
        resolve_backbone("pretrained-et-oro", [1, 16], quiet)
    # mean-pooled per-atom features: one vector per frame, invariant to rotations
    tiny = tiny_potential(dtype=torch.float32)
    numbers, pos = water_frames(1)[0]
    rotated = pos @ random_rotation(3).numpy().T
    d = backbone_descriptors(tiny, numbers, np.stack([pos, rotated, pos + 0.2]))
    assert d.shape == (3, 16)
    np.testing.assert_allclose(d[1], d[0], atol=1e-5)
    assert np.abs(d[2] - d[0]).max() < 1e-5                      # translation
    assert np.abs(backbone_descriptors(tiny, numbers, (pos * 1.2)[None])[0] - d[0]).max() > 1e-4


@pytest.mark.slow
def test_members_fine_tune_a_backbone_and_continue_warm(tmp_path):
    import torch
    from helpers import tiny_potential
    from forcefield.fit.training import train_committee
    from forcefield.io import load_potential
    from forcefield.train.datasets import Splits
    store = LabelStore(tmp_path / "labels", Level("xtb"))
    frames = water_frames(8, seed=3)
    store.label(frames, log=quiet)
    splits = Splits(store.conformation_set([0, 1, 2, 3, 4]), store.conformation_set([5]),
                    store.conformation_set([6, 7]))
    cfg = FitConfig(**{**TINY_FIT, "epochs": 2}).resolve()
    backbone = tiny_potential(dtype=torch.float32, elements=(1, 8), hidden=24)     # scratch would be 16 wide
    path, results = train_committee(tmp_path / "rounds" / "r00", cfg, splits, backbone, None,
                                    {"molecule": "water"}, quiet)
    committee = load_potential(path)
    assert committee.size == 2 and len(results) == 2
    # fine-tuned: the backbone's architecture, each member its own head
    m0, m1 = committee.members
    assert m0.config["backbone"]["hidden"] == m1.config["backbone"]["hidden"] == 24
    assert not torch.equal(next(iter(m0.head.parameters())), next(iter(m1.head.parameters())))
    assert committee.metadata["level_of_theory"].startswith("GFN2-xTB")
    assert m0.metadata["formula"] == m1.metadata["formula"] == "H2O"     # what identifies a file-trained member
    # the next round continues each member from its weights
    path2, _ = train_committee(tmp_path / "rounds" / "r01", cfg, splits, backbone, tmp_path / "rounds" / "r00",
                               {"molecule": "water"}, quiet)
    assert (tmp_path / "rounds" / "r01" / "members" / "m1" / "done.json").is_file()
    assert load_potential(path2).metadata["committee_size"] == 2


@pytest.mark.slow
def test_no_frame_near_a_held_out_one_in_its_trajectory_is_labelled_for_training(fitted):
    """Pool frames a few fs apart are near copies: none within HOLD_OUT_GAP_STRIDES strides of a held-out frame of
    the same trajectory trains the model that is scored on it."""
    from ase.io import read
    from forcefield.fit.loop import HOLD_OUT_GAP_STRIDES
    from forcefield.fit.state import ROUND_ID_BASE
    pool = read(str(fitted / "pool" / "pool.extxyz"), index=":")
    data = json.loads((fitted / "fit.json").read_text())
    gap = HOLD_OUT_GAP_STRIDES * 3                                           # TINY_ARGS: --pool-stride 3
    held = [pool[t] for t in data["test_ids"]]
    trained = [pool[f] for r in data["rounds"] for f in r["selected"] if f < ROUND_ID_BASE]
    assert trained and held
    for a in trained:
        for t in held:
            same = (a.info["temperature_K"], a.info["conformer"]) == (t.info["temperature_K"], t.info["conformer"])
            assert not same or abs(a.info["step"] - t.info["step"]) > gap


def test_a_failed_label_whose_record_is_removed_is_labelled_again(tmp_path, monkeypatch):
    """The log says: remove labels/<id>.failed.json to retry. The next run labels that frame again (it used to
    skip the finished round and then crash on the missing label)."""
    from forcefield.fit.loop import run_fit
    out = tmp_path / "fit"
    flaky = Counter(fail_at=2, exc=RuntimeError)                 # round 0's second label fails (an SCF, say)
    monkeypatch.setattr(fit_label, "compute_label", flaky)
    run_fit(dict(TINY_FIT), out, log=quiet)
    failed = list((out / "labels").glob("*.failed.json"))
    assert len(failed) == 1
    failed[0].unlink()
    counter = Counter()
    monkeypatch.setattr(fit_label, "compute_label", counter)
    run_fit(dict(TINY_FIT), out, log=quiet)
    assert counter.calls >= 1 and (out / "labels" / failed[0].name.replace(".failed.json", ".npz")).is_file()
