"""Small pieces of the benchmark scripts that decide what gets reported."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pretrain_finetune  # noqa: E402
import speed_contenders  # noqa: E402
import speed_harness  # noqa: E402


def test_merge_fills_only_missing_cells(tmp_path):
    old = {"forcefield": [{"molecule": "aspirin", "size": 50, "method": "scratch", "forces_mae_meV_per_A": 1.0},
                          {"molecule": "ethanol", "size": 50, "method": "scratch", "forces_mae_meV_per_A": 2.0}],
           "qm9": [{"property": "gap", "method": "scratch", "test_mae": 3.0}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    new = [{"molecule": "ethanol", "size": 50, "method": "scratch", "forces_mae_meV_per_A": 9.0}]
    rows, qm9 = pretrain_finetune.merged_results(path, new, [])
    got = {(r["molecule"], r["size"], r["method"]): r["forces_mae_meV_per_A"] for r in rows}
    assert got == {("aspirin", 50, "scratch"): 1.0, ("ethanol", 50, "scratch"): 9.0}  # this run's row wins
    assert qm9 == old["qm9"]
    with pytest.raises(FileNotFoundError, match="--merge"):
        pretrain_finetune.merged_results(tmp_path / "missing.json", new, [])
    # seeds are cells of their own: an invocation that ran seed 1 again keeps the earlier seeds 2 and 3
    old = {"forcefield": [{"molecule": "ethanol", "size": 50, "method": "scratch", "seed": s,
                           "forces_mae_meV_per_A": float(s)} for s in (1, 2, 3)], "qm9": []}
    path.write_text(json.dumps(old))
    rows, _ = pretrain_finetune.merged_results(path, [{**old["forcefield"][0], "forces_mae_meV_per_A": 9.0}], [])
    assert sorted((r["seed"], r["forces_mae_meV_per_A"]) for r in rows) == [(1, 9.0), (2, 2.0), (3, 3.0)]


def test_speed_benchmark_refuses_exploded_md():
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    speed_harness.check_not_exploded("ok", x0 + 0.01, x0)
    with pytest.raises(RuntimeError, match="not physical"):
        speed_harness.check_not_exploded("broken", x0 + torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), x0)
    with pytest.raises(RuntimeError, match="not physical"):
        speed_harness.check_not_exploded("nan", x0 * float("nan"), x0)


def test_speed_benchmark_batched_md_is_physical():
    """The batched workload integrates with md's Langevin in Å/fs (a carbon atom at 300 K moves ~0.005 Å/fs; the
    old Å/ps constant gave 1000x that): a few steps of a harmonic model move no atom far."""
    from forcefield.units import KB, MVV2E
    v = (KB * 300.0 / (12.011 * MVV2E)) ** 0.5
    assert 3e-3 < v < 8e-3
    z, r, e, f = speed_harness.aspirin(n_frames=4)
    r0 = torch.as_tensor(np.concatenate([r[k % len(r)] for k in range(2)]))
    spring = speed_contenders.Contender("spring", None, lambda pos, batch: -10.0 * (pos - r0), None, None)
    times = speed_harness.bench_batched([spring], (z, r, e, f, 2), rounds=1, replicas=2, per_block=3)
    assert len(times["spring"]) == 1 and times["spring"][0] > 0


def test_grid_cells_are_kept_in_a_state_file_and_seeds_are_reported_as_mean_and_spread(tmp_path):
    assert pretrain_finetune.mean_std([12.34]) == "12.3"
    assert pretrain_finetune.mean_std([1.0, 2.0, 3.0], bold=True) == "**2.0 ± 1.0 (3)**"
    settings = {"backbones": {"et-oro": "abc"}, "finetune": {"cpu_minutes": 15.0}}
    grid = pretrain_finetune.GridState(tmp_path / "grid.json", settings)
    key = {"molecule": "ethanol", "size": 50, "method": "et-oro", "seed": 2}
    assert grid.row("forcefield", key) is None
    grid.add("forcefield", {**key, "forces_mae_meV_per_A": 30.0})
    again = pretrain_finetune.GridState(tmp_path / "grid.json", settings)      # a later invocation, a fresh clone
    assert again.row("forcefield", key)["forces_mae_meV_per_A"] == 30.0
    assert again.row("forcefield", {**key, "seed": 1}) is None
    with pytest.raises(SystemExit, match="other settings"):
        pretrain_finetune.GridState(tmp_path / "grid.json", {**settings, "backbones": {"et-oro": "other"}})
    rows = [{"molecule": "ethanol", "size": 50, "method": m, "seed": s, "forces_mae_meV_per_A": v}
            for m, s, v in (("scratch", 1, 40.0), ("scratch", 2, 44.0), ("et-oro", 1, 30.0), ("et-oro", 2, 32.0))]
    pretrain_finetune.write_report(tmp_path, rows, [], ["scratch", "et-oro"])
    text = (tmp_path / "results.md").read_text()
    assert "| ethanol | 50 | 42.0 ± 2.8 (2) | **31.0 ± 1.4 (2)** |" in text


@pytest.mark.slow
def test_the_fine_tune_grid_adds_up_across_invocations(tmp_path, monkeypatch):
    """A grid piece records its finished cells in the state file; the next piece, in a fresh folder (a fresh clone),
    runs none of them again; a piece without time runs nothing and says how many runs are left."""
    common = ["--smoke", "--methods", "scratch", "et-oro", "--seeds", "8:2", "--properties", "--no-progress",
              "--state", str(tmp_path / "grid.json")]
    assert pretrain_finetune.main(common + ["--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "grid.json").read_text())
    assert first["complete"] and {(r["size"], r["method"], r["seed"]) for r in first["forcefield"]} == \
        {(8, "scratch", 1), (8, "scratch", 2), (8, "et-oro", 1), (8, "et-oro", 2), (16, "scratch", 1), (16, "et-oro", 1)}
    assert first["qm9"] and first["qm9"][0]["curve"] and (tmp_path / "a" / "qm9_curves.png").is_file()
    monkeypatch.setattr(pretrain_finetune, "run_finetune", lambda *a, **k: pytest.fail("a finished cell ran again"))
    monkeypatch.setattr(pretrain_finetune, "run_property", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert pretrain_finetune.main(common + ["--out", str(tmp_path / "b")]) == 0
    assert "± " in (tmp_path / "b" / "results.md").read_text()
    assert json.loads((tmp_path / "grid.json").read_text())["forcefield"] == first["forcefield"]


def test_workers_share_one_grid_state_and_a_claimed_run_is_left_to_its_worker(tmp_path, monkeypatch, capsys):
    """Processes with the same --state and --out share a grid (a campaign job's workers): a run another live
    process has claimed is skipped (and the grid is not complete), its claim is taken over once that process has
    ended, and rows two processes record both land in the state with both CPU times."""
    ran = []

    def fake_finetune(mol, size, method, pretrained, args, smoke, log, seed=1):
        ran.append((size, method))
        return {"forces_mae_meV_per_A": float(size), "stop_reason": "all epochs done"}
    monkeypatch.setattr(pretrain_finetune, "run_finetune", fake_finetune)
    common = ["--methods", "scratch", "--molecules", "ethanol", "--sizes", "50", "950", "--properties",
              "--no-progress", "--finetune-steps", "100", "--hidden", "16", "--layers", "2",
              "--out", str(tmp_path / "out"), "--state", str(tmp_path / "grid.json")]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim = tmp_path / "out" / "workers" / "forcefield-ethanol-50-scratch-1.claim"
        claim.parent.mkdir(parents=True)
        claim.write_text(pretrain_finetune.process_tag(other.pid) + "\n")
        assert pretrain_finetune.main(common) == 0
        assert ran == [(950, "scratch")] and "1 run(s) in progress in another worker" in capsys.readouterr().out
        assert not json.loads((tmp_path / "grid.json").read_text())["complete"]
    finally:
        other.kill()
        other.wait()
    assert pretrain_finetune.process_tag(other.pid) is None
    assert pretrain_finetune.main(common) == 0                       # the stale claim is taken over
    state = json.loads((tmp_path / "grid.json").read_text())
    assert ran == [(950, "scratch"), (50, "scratch")] and state["complete"] and not list(claim.parent.glob("*.claim"))

    # two GridStates on one file (two processes): each records its row into what the other wrote
    settings = {"s": 1}
    a, b = (pretrain_finetune.GridState(tmp_path / "two.json", settings, workers=tmp_path / "w") for _ in range(2))
    a.add("forcefield", {"molecule": "x", "seed": 1}, cpu_seconds=3600)
    assert b.claim("forcefield", {"molecule": "x", "seed": 1}) == "done"
    assert b.claim("forcefield", {"molecule": "x", "seed": 2}) == "mine"
    assert a.claim("forcefield", {"molecule": "x", "seed": 2}) == "mine"          # the same process: its own claim
    b.add("forcefield", {"molecule": "x", "seed": 2}, cpu_seconds=1800)
    both = json.loads((tmp_path / "two.json").read_text())
    assert [r["seed"] for r in both["forcefield"]] == [1, 2] and both["cpu_hours"] == pytest.approx(1.5)
    assert a.row("forcefield", {"molecule": "x", "seed": 2}) is not None
    assert a.finish({"forcefield": [{"molecule": "x", "seed": 1}, {"molecule": "x", "seed": 2}]})
    assert not a.finish(None) and not a.finish({"forcefield": [{"molecule": "x", "seed": 3}]})


def test_two_worker_processes_side_by_side_do_each_run_once(tmp_path):
    """Two processes of one grid at once (a campaign job's workers): every run is recorded once, by one of them,
    and the state holds all of them (runs faked: each sleeps a little, so the two overlap)."""
    script = tmp_path / "worker.py"
    script.write_text(f"""
import os, sys, time
sys.path.insert(0, {str(Path(pretrain_finetune.__file__).parent)!r})
import pretrain_finetune
def fake(mol, size, method, pretrained, args, smoke, log, seed=1):
    time.sleep(0.3)
    return {{"forces_mae_meV_per_A": 1.0, "stop_reason": "all epochs done", "worker": os.getpid()}}
pretrain_finetune.run_finetune = fake
sys.exit(pretrain_finetune.main(sys.argv[1:]))
""")
    args = ["--methods", "scratch", "--molecules", "ethanol", "aspirin", "--sizes", "50", "200", "--seeds", "50:3",
            "--properties", "--no-progress", "--finetune-steps", "100", "--hidden", "16", "--layers", "2",
            "--out", str(tmp_path / "out"), "--state", str(tmp_path / "grid.json")]
    procs = [subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    state = json.loads((tmp_path / "grid.json").read_text())
    keys = [(r["molecule"], r["size"], r["seed"]) for r in state["forcefield"]]
    assert len(keys) == len(set(keys)) == 8 and state["complete"]
    assert len({r["worker"] for r in state["forcefield"]}) == 2          # both did some


def test_the_qm9_report_gives_each_backbone_over_scratch_per_property(tmp_path):
    """The QM9 table is followed by test MAE ratios (pretrained over scratch, ET-OREO over ET-ORO) once a pair has a
    property, with the geometric mean over properties; no ratio table before that."""
    q = [{"property": "homo", "method": "scratch", "test_mae": 70.0},
         {"property": "homo", "method": "et-oro", "test_mae": 56.0},
         {"property": "lumo", "method": "scratch", "test_mae": 80.0},
         {"property": "lumo", "method": "et-oro", "test_mae": 60.0},
         {"property": "lumo", "method": "et-oreo", "test_mae": 40.0},
         {"property": "gap", "method": "scratch", "failed": "diverged"}]
    methods = ["scratch", "et-oro", "et-oreo"]
    pretrain_finetune.write_report(tmp_path, [], q, methods)
    text = (tmp_path / "results.md").read_text()
    assert "| homo | 0.80 | – | – |" in text and "| lumo | 0.75 | 0.50 | 0.67 |" in text
    assert "| geometric mean (properties) | 0.77 (2) | 0.50 (1) | 0.67 (1) |" in text
    assert "gap scratch: diverged" in text
    pretrain_finetune.write_report(tmp_path, [], q[:1], methods)
    assert "ratios" not in (tmp_path / "results.md").read_text()


def test_the_qm9_report_shows_how_much_each_runs_curve_still_wobbles(tmp_path):
    """Each QM9 run's validation MAE at its end and the scatter of its last five validations about their trend:
    the noise a difference between methods must beat; a curve falling on a straight line has none, a zigzag's is
    its amplitude; no entry for a run with fewer validations."""
    assert pretrain_finetune.curve_scatter([70.0, 68.0, 66.0, 64.0, 62.0]) == pytest.approx(0.0, abs=1e-9)
    # no trend (slope 0): residuals about the mean 70.4, 3 x 1.6^2 + 2 x 2.4^2 = 19.2, over 5 - 2 degrees of freedom
    assert pretrain_finetune.curve_scatter([72.0, 68.0, 72.0, 68.0, 72.0]) == pytest.approx(np.sqrt(19.2 / 3))
    curve = [[float(k), y] for k, y in enumerate([200.0, 120.0, 90.0, 84.0, 79.5, 82.0, 78.25])]
    q = [{"property": "gap", "method": "scratch", "test_mae": 80.0, "curve": curve},
         {"property": "gap", "method": "et-oro", "test_mae": 75.0, "curve": curve[:4]}]
    pretrain_finetune.write_report(tmp_path, [], q, ["scratch", "et-oro"])
    text = (tmp_path / "results.md").read_text()
    scatter = pretrain_finetune.curve_scatter([90.0, 84.0, 79.5, 82.0, 78.25])
    assert "scatter of its last 5 validations" in text and f"| gap | 78.2 ± {scatter:.1f} | – |" in text
    pretrain_finetune.write_report(tmp_path, [], q[1:], ["scratch", "et-oro"])
    assert "scatter of its last" not in (tmp_path / "results.md").read_text()


def test_qm9_seeds_add_runs_to_a_grid_whose_rows_from_before_count_as_seed_one(tmp_path, monkeypatch, capsys):
    """--qm9-seeds gap:2 on a grid recorded before the option (rows without a seed): those rows are seed 1 and never
    run again; only seed 2 runs, with the seed in its run, folder and run-state name; the grid's runs and whether
    its state holds them all are the same for the campaign (grid_runs_of) as for the grid; bad specs are errors."""
    p = pretrain_finetune
    ran = []

    def fake(prop, method, pretrained, args, smoke, log, seed=1):
        ran.append((prop, method, seed))
        return {"test_mae": 10.0 * seed, "curve": []}
    monkeypatch.setattr(p, "run_property", fake)
    state = tmp_path / "q.json"
    common = ["--methods", "scratch", "--molecules", "--properties", "homo", "gap", "--no-progress", "--hidden",
              "16", "--layers", "2", "--qm9-steps", "2000", "--state", str(state), "--out", str(tmp_path / "runs")]
    assert p.main(common) == 0 and ran == [("homo", "scratch", 1), ("gap", "scratch", 1)]
    old = json.loads(state.read_text())
    for row in old["qm9"]:
        del row["seed"]                                       # as a grid from before --qm9-seeds recorded it
    state.write_text(json.dumps(old))
    seeded = common + ["--qm9-seeds", "gap:2"]
    assert not p.all_recorded(old, p.grid_runs_of(seeded)) and p.all_recorded(old, p.grid_runs_of(common))
    assert p.main(seeded) == 0 and ran[2:] == [("gap", "scratch", 2)]
    new = json.loads(state.read_text())
    assert new["complete"] and p.all_recorded(new, p.grid_runs_of(seeded))
    assert "| gap | 15.0 ± 7.1 (2) |" in (tmp_path / "runs" / "results.md").read_text()
    args = p.argparse.Namespace(state=str(state), qm9_steps=2000)
    assert p.qm9_run_state(args, "gap", "et-oro", 2).name == "qm9-gap-et-oro-s2.pt"
    assert p.qm9_run_state(args, "gap", "et-oro").name == "qm9-gap-et-oro.pt"      # seed 1's name is the old one
    assert p.qm9_dir("gap", "et-oro", 2) == "gap/et-oro-s2" and p.qm9_dir("gap", "et-oro") == "gap/et-oro"
    for bad, why in ((["--qm9-seeds", "lumo:2"], "not one of --properties"), (["--qm9-seeds", "gap"], "PROPERTY:N")):
        with pytest.raises(SystemExit):
            p.grid_runs_of(common + bad)
        assert why in capsys.readouterr().err


def test_a_qm9_run_of_another_seed_trains_with_that_seed_in_its_own_folder(tmp_path, monkeypatch):
    """The seed reaches the property run (initialisation and batch order), whose folder is <method>-s<seed>."""
    p = pretrain_finetune
    seen = {}
    monkeypatch.setattr(p, "finetune_property",
                        lambda pre, cfg, out, **k: seen.update({out.name: cfg.seed}) or {"test_mae": 1.0})
    monkeypatch.setattr(p, "validation_curve", lambda out: [])
    args = p.argparse.Namespace(out=str(tmp_path), layer_decay=None, qm9_steps=2000, qm9_epoch_steps=1000,
                                qm9_schedule="cosine", qm9_train_size=None, data_dir=None, threads=1, hidden=16,
                                layers=2, heads=None, no_progress=True, cell_deadline_minutes=None)
    for seed in (1, 2):
        p.run_property("gap", "scratch", None, args, None, lambda *a: None, seed)
    assert seen == {"scratch": 1, "scratch-s2": 2}


def test_the_qm9_report_with_seeds_pairs_them_and_labels_each_runs_settling(tmp_path):
    """Two seeds of a property: mean ± std per method (the best bold), ratios of the seed-paired means with the seeds
    the first method won, a settling row per seed, and a plot line per run."""
    curve = [[float(k), 60.0 - 0.1 * k] for k in range(6)]
    q = [{"property": "lumo", "method": m, "test_mae": mae, "curve": curve, **({"seed": s} if s > 1 else {})}
         for m, s, mae in (("scratch", 1, 58.0), ("et-oreo", 1, 53.0), ("scratch", 2, 56.0), ("et-oreo", 2, 57.0))]
    pretrain_finetune.write_report(tmp_path, [], q, ["scratch", "et-oreo"])
    text = (tmp_path / "results.md").read_text()
    assert "| lumo | 57.0 ± 1.4 (2) | **55.0 ± 2.8 (2)** |" in text
    assert f"| lumo | {55.0 / 57.0:.2f} (1/2) |" in text and "seeds the first won" in text
    assert "| lumo | 59.5 ± 0.0 | 59.5 ± 0.0 |" in text and "| lumo (seed 2) | 59.5 ± 0.0 | 59.5 ± 0.0 |" in text
    assert (tmp_path / "qm9_curves.png").stat().st_size > 0


def test_the_grid_runs_seed_by_seed_when_asked_and_the_runs_are_the_same_either_way():
    """--order seeds: every molecule's first seed, sizes in the order given, before any second seed; the same runs
    as molecule by molecule (so a state recorded in one order is complete in the other)."""
    mols, sizes, methods, seeds = ["aspirin", "ethanol"], [50, 950, 200], ["scratch", "et-oro"], {50: 3, 200: 2}
    by_mol = pretrain_finetune.finetune_runs(mols, sizes, methods, seeds, "molecules")
    by_seed = pretrain_finetune.finetune_runs(mols, sizes, methods, seeds, "seeds")
    def key(r):
        return r["molecule"], r["size"], r["method"], r["seed"]
    assert len(by_seed) == len(by_mol) == 2 * 2 * (3 + 1 + 2)
    assert sorted(map(key, by_seed)) == sorted(map(key, by_mol))
    assert [key(r) for r in by_mol[:4]] == [("aspirin", 50, "scratch", 1), ("aspirin", 50, "scratch", 2),
                                            ("aspirin", 50, "scratch", 3), ("aspirin", 50, "et-oro", 1)]
    assert [(r["seed"], r["size"]) for r in by_seed[:12]] == [(1, 50)] * 4 + [(1, 950)] * 4 + [(1, 200)] * 4
    assert [key(r) for r in by_seed[:4]] == [("aspirin", 50, "scratch", 1), ("aspirin", 50, "et-oro", 1),
                                             ("ethanol", 50, "scratch", 1), ("ethanol", 50, "et-oro", 1)]
    assert [(r["seed"], r["size"]) for r in by_seed[12:]] == [(2, 50)] * 4 + [(2, 200)] * 4 + [(3, 50)] * 4
    with pytest.raises(ValueError, match="run order"):
        pretrain_finetune.finetune_runs(mols, sizes, methods, seeds, "sizes")


def test_grid_shards_merge_into_one_state_and_a_run_cut_by_the_deadline_is_not_a_cell(tmp_path, monkeypatch):
    """--shard I/K runs every K-th cell (K processes side by side on one GPU); their states merge into the grid's
    with each cell once and each shard's CPU-hours; with a step budget, a run the invocation's end cut short is not
    recorded (it runs again later) and the grid is not complete."""
    calls = []

    def fake_finetune(mol, size, method, pretrained, args, smoke, log, seed=1):
        calls.append((size, method, seed))
        cfg = pretrain_finetune.finetune_config(mol, size, args, smoke, {}, seed)
        return {"forces_mae_meV_per_A": float(size), "epochs": cfg["optim"]["epochs"], "device": cfg["optim"]["device"],
                "stop_reason": "all epochs done"}
    monkeypatch.setattr(pretrain_finetune, "run_finetune", fake_finetune)
    backbone = tmp_path / "b.pt"
    backbone.write_bytes(b"weights")
    common = ["--methods", "scratch", "et-oro", "--backbone", f"et-oro={backbone}", "--molecules", "ethanol",
              "--sizes", "50", "950", "--seeds", "50:2", "--properties", "--no-progress", "--finetune-steps", "100",
              "--hidden", "16", "--layers", "2"]
    shards = []
    for i in range(2):
        state = tmp_path / f"s{i}.json"
        assert pretrain_finetune.main(common + ["--shard", f"{i}/2", "--out", str(tmp_path / f"o{i}"),
                                                "--state", str(state)]) == 0
        shards.append(json.loads(state.read_text()))
    assert sorted(calls) == [(50, "et-oro", 1), (50, "et-oro", 2), (50, "scratch", 1), (50, "scratch", 2),
                             (950, "et-oro", 1), (950, "scratch", 1)]                  # each cell by one shard
    assert {len(s["forcefield"]) for s in shards} == {3} and not any(s["complete"] for s in shards)
    rows = {(r["size"], r["method"], r["seed"]): r for r in shards[0]["forcefield"] + shards[1]["forcefield"]}
    assert rows[(50, "scratch", 1)]["epochs"] == 15 and rows[(950, "scratch", 1)]["epochs"] == 1   # 100 steps of 8
    base = {"settings": shards[0]["settings"], "forcefield": [], "qm9": [], "cpu_hours": 0.5, "complete": False}
    for s in shards:
        s["cpu_hours"] += 0.5
    merged = pretrain_finetune.merge_grid_states(base, shards, base_cpu_hours=0.5)
    assert len(merged["forcefield"]) == 6 and not merged["complete"]
    assert merged["cpu_hours"] == pytest.approx(0.5 + sum(s["cpu_hours"] - 0.5 for s in shards))
    assert len(pretrain_finetune.merge_grid_states(merged, shards, 0.5)["forcefield"]) == 6      # idempotent in cells
    with pytest.raises(ValueError, match="other settings"):
        pretrain_finetune.merge_grid_states(base, [{**shards[0], "settings": {}}], 0.5)

    # the invocation's deadline pauses a step-budgeted run; one it paused is left for later, not recorded
    deadlines = []

    def cut_finetune(mol, size, method, pretrained, args, smoke, log, seed=1):
        deadlines.append(args.cell_deadline_minutes)
        return {"paused": True, "stop_reason": "paused at this invocation's deadline of 3 min (continue with --resume)",
                "epochs": 2, "steps": 14}
    monkeypatch.setattr(pretrain_finetune, "run_finetune", cut_finetune)
    state = tmp_path / "cut.json"
    assert pretrain_finetune.main(common + ["--out", str(tmp_path / "cut"), "--state", str(state),
                                            "--max-minutes", "60"]) == 0
    cut = json.loads(state.read_text())
    assert cut["forcefield"] == [] and not cut["complete"] and deadlines and all(0 < d < 60 for d in deadlines)

    # so does the MD of a fine-tuned model: paused at the piece's end (run_one gives None), the run is not recorded
    monkeypatch.setattr(pretrain_finetune, "run_finetune", fake_finetune)
    import md17_simulation
    seen = []
    monkeypatch.setattr(md17_simulation, "run_one", lambda mol, model, a: seen.append(a.max_minutes) or None)
    assert pretrain_finetune.main(common + ["--out", str(tmp_path / "md"), "--state", str(tmp_path / "md.json"),
                                            "--max-minutes", "60", "--md-ps", "1", "--md-minutes-per-ps", "1"]) == 0
    assert json.loads((tmp_path / "md.json").read_text())["forcefield"] == [] and 0 < seen[0] <= 60
    monkeypatch.setattr(md17_simulation, "run_one", lambda mol, model, a: {"stability_ps": {"mean": 1.0},
                                                                            "hr_mae": {"mean": 0.1}})
    assert pretrain_finetune.main(common + ["--out", str(tmp_path / "md"), "--state", str(tmp_path / "md.json"),
                                            "--max-minutes", "60", "--md-ps", "1", "--md-minutes-per-ps", "1"]) == 0
    rows = json.loads((tmp_path / "md.json").read_text())["forcefield"]
    assert len(rows) == 6 and all(r["stability_ps"] == 1.0 for r in rows)


def test_the_grids_compile_flag_runs_md_through_the_export_and_falls_back_to_eager(tmp_path, monkeypatch):
    """--compile on a CPU: each fine-tuned model's MD asks for its AOTInductor export; when that build fails (an
    MDInputError that names --compile), the same MD runs on the eager model and the run is recorded, not lost."""
    import md17_simulation
    from md.errors import MDInputError
    monkeypatch.setattr(pretrain_finetune, "run_finetune", lambda *a, **k: {"forces_mae_meV_per_A": 1.0,
                                                                            "stop_reason": "all epochs done"})
    asked = []

    def run_one(mol, model, a):
        asked.append(a.compile)
        if a.compile and mol == "ethanol":
            raise MDInputError("--compile: could not build the export of 'best.pt' (x); drop --compile to run eager")
        return {"stability_ps": {"mean": 1.0}, "hr_mae": {"mean": 0.1}}
    monkeypatch.setattr(md17_simulation, "run_one", run_one)
    common = ["--methods", "scratch", "--sizes", "50", "--properties", "--no-progress", "--finetune-steps", "100",
              "--hidden", "16", "--layers", "2", "--md-ps", "1"]
    for compile_flag, mols, expect in [(["--compile"], ["aspirin", "ethanol"], [True, True, False]),
                                       ([], ["aspirin"], [False])]:
        asked.clear()
        state = tmp_path / f"grid{len(compile_flag)}.json"
        assert pretrain_finetune.main(common + compile_flag + ["--molecules", *mols, "--out", str(tmp_path / "o"),
                                                               "--state", str(state)]) == 0
        assert asked == expect
        assert [r["stability_ps"] for r in json.loads(state.read_text())["forcefield"]] == [1.0] * len(mols)


def test_the_grids_compile_flag_compiles_et_runs_only_and_leaves_the_cells_comparable():
    """--compile is a speed setting: ET fine-tunes (scratch and ET backbones) get optim.compile, EGNN ones stay eager,
    and the grid's settings (what decides whether cells of two invocations compare) do not change, so CPU pieces
    (compiled) and GPU pieces (eager) add up in one grid."""
    p = pretrain_finetune
    args = {c: p.argparse.Namespace(compile=c, finetune_minutes=None, finetune_cpu_minutes=None, finetune_epochs=None,
                                    finetune_steps=100, cell_deadline_minutes=None, device="cpu", data_dir=None,
                                    threads=1, hidden=16, layers=2, heads=None, layer_decay=None, qm9_epochs=300,
                                    qm9_cpu_minutes=None, qm9_train_size=None, qm9_steps=None, qm9_schedule="plateau",
                                    md_ps=0.0, md_replicas=1)
            for c in (False, True)}
    methods = ("scratch", "et-oro", "et-oreo", "3d-emgp", "denoise", "scratch-egnn", "3d-emgp-egnn")
    compiled = {m: p.finetune_config("ethanol", 50, args[True], None, {}, 1, m)["optim"].get("compile", False)
                for m in methods}
    assert compiled == {"scratch": True, "et-oro": True, "et-oreo": True, "3d-emgp": True, "denoise": True,
                        "scratch-egnn": False, "3d-emgp-egnn": False}
    assert not any(p.finetune_config("ethanol", 50, args[False], None, {}, 1, m)["optim"].get("compile")
                   for m in methods)
    assert p.grid_settings(args[True], {}) == p.grid_settings(args[False], {})
    assert "compile" not in p.FINETUNE_OPTIM


def test_a_qm9_run_starts_only_with_its_budget_left_in_the_piece(tmp_path, monkeypatch, capsys):
    """A QM9 cell budgeted in CPU minutes needs at least that many wall minutes (one thread): a piece with less
    time left leaves it for later instead of starting it and running past its end."""
    monkeypatch.setattr(pretrain_finetune, "run_property", lambda *a, **k: pytest.fail("started too late"))
    common = ["--methods", "scratch", "--molecules", "--properties", "gap", "--no-progress", "--hidden", "16",
              "--layers", "2", "--qm9-cpu-minutes", "60", "--state", str(tmp_path / "q.json")]
    assert pretrain_finetune.main(common + ["--out", str(tmp_path / "a"), "--max-minutes", "30"]) == 0
    assert "1 run(s) left" in capsys.readouterr().out
    monkeypatch.setattr(pretrain_finetune, "run_property", lambda *a, **k: {"test_mae": 1.0, "curve": []})
    assert pretrain_finetune.main(common + ["--out", str(tmp_path / "b"), "--max-minutes", "90"]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["qm9"][0]["test_mae"] == 1.0


def test_a_step_budgeted_run_starts_only_if_one_like_it_fitted_in_the_time_left(tmp_path, monkeypatch, capsys):
    """With a step budget the time a run takes is not known beforehand: once one run of a molecule and size has
    taken T minutes in this invocation, the next starts only with T minutes left (else it would be cut short)."""
    clock = [1000.0]
    monkeypatch.setattr(pretrain_finetune.time, "time", lambda: clock[0])

    def fake_finetune(mol, size, method, pretrained, args, smoke, log, seed=1):
        clock[0] += 30 * 60.0                                        # every run takes 30 minutes
        return {"forces_mae_meV_per_A": 1.0, "stop_reason": "all epochs done"}
    monkeypatch.setattr(pretrain_finetune, "run_finetune", fake_finetune)
    assert pretrain_finetune.main(["--methods", "scratch", "--molecules", "ethanol", "--sizes", "50", "--seeds",
                                   "50:3", "--properties", "--no-progress", "--finetune-steps", "100", "--hidden",
                                   "16", "--layers", "2", "--out", str(tmp_path), "--state", str(tmp_path / "s.json"),
                                   "--max-minutes", "50"]) == 0
    assert len(json.loads((tmp_path / "s.json").read_text())["forcefield"]) == 1
    assert "2 run(s) left" in capsys.readouterr().out


def test_a_resumed_qm9_run_gets_what_is_left_of_its_budget(tmp_path, monkeypatch):
    """A QM9 run's CPU budget is the run's: resumed after a kill, it gets the budget minus what its checkpoint
    used, not a fresh one (the methods would otherwise get unequal compute)."""
    seen = {}
    monkeypatch.setattr(pretrain_finetune, "finetune_property",
                        lambda pre, cfg, out, **k: seen.update(cpu=cfg.max_cpu_minutes) or {"test_mae": 1.0})
    monkeypatch.setattr(pretrain_finetune, "validation_curve", lambda out: [])
    out = tmp_path / "qm9" / "gap" / "scratch"
    out.mkdir(parents=True)
    torch.save({"elapsed": 900.0, "cpu_seconds": 1200.0}, out / "last.pt")          # 20 CPU-minutes used
    args = pretrain_finetune.argparse.Namespace(out=str(tmp_path), layer_decay=None, qm9_epochs=10, qm9_minutes=None,
                                                finetune_minutes=None, qm9_cpu_minutes=60.0, finetune_cpu_minutes=None,
                                                data_dir=None, threads=1, qm9_train_size=None, hidden=16, layers=2,
                                                heads=None, no_progress=True, cell_deadline_minutes=None,
                                                qm9_schedule="plateau")
    pretrain_finetune.run_property("gap", "scratch", None, args, None, lambda *a: None)
    assert seen["cpu"] == pytest.approx(40.0)


def test_compile_reaches_the_et_property_runs_only(tmp_path, monkeypatch):
    """--compile trains ET QM9 property models with the compiled step (a speed setting); EGNN ones stay eager."""
    seen = {}
    monkeypatch.setattr(pretrain_finetune, "finetune_property",
                        lambda pre, cfg, out, **k: seen.update({out.name: cfg.compile}) or {"test_mae": 1.0})
    monkeypatch.setattr(pretrain_finetune, "validation_curve", lambda out: [])
    for flag in (True, False):
        args = pretrain_finetune.argparse.Namespace(
            out=str(tmp_path / str(flag)), layer_decay=None, qm9_epochs=10, qm9_minutes=None, finetune_minutes=None,
            qm9_cpu_minutes=60.0, finetune_cpu_minutes=None, data_dir=None, threads=1, qm9_train_size=None, hidden=16,
            layers=2, heads=None, no_progress=True, cell_deadline_minutes=None, compile=flag, qm9_schedule="plateau")
        for method in ("scratch", "scratch-egnn"):
            pretrain_finetune.run_property("gap", method, None, args, None, lambda *a: None)
        assert seen == {"scratch": flag, "scratch-egnn": False}


def test_the_qm9_schedule_reaches_the_runs_and_the_grid_settings_name_it_only_when_cosine(tmp_path, monkeypatch):
    """--qm9-schedule cosine trains every QM9 run with the cosine schedule and is part of the grid's settings (a
    grid of plateau runs is another grid); the default adds nothing, so grids from before the option match."""
    p = pretrain_finetune
    seen = {}
    monkeypatch.setattr(p, "finetune_property",
                        lambda pre, cfg, out, **k: seen.update({out.parents[2].name: cfg.lr_schedule})
                        or {"test_mae": 1.0})
    monkeypatch.setattr(p, "validation_curve", lambda out: [])
    settings = {}
    for schedule in ("plateau", "cosine"):
        args = p.argparse.Namespace(
            out=str(tmp_path / schedule), layer_decay=None, qm9_steps=3000, qm9_epoch_steps=1000,
            qm9_schedule=schedule, qm9_train_size=None, data_dir=None, threads=1, hidden=16, layers=2, heads=None,
            no_progress=True, cell_deadline_minutes=None, finetune_minutes=None, finetune_cpu_minutes=None,
            finetune_epochs=None, finetune_steps=None, md_ps=0.0, md_replicas=1)
        p.run_property("gap", "scratch", None, args, None, lambda *a: None)
        settings[schedule] = p.grid_settings(args, {})
    assert seen == {"plateau": "plateau", "cosine": "cosine"}
    assert "schedule" not in settings["plateau"]["qm9"] and settings["cosine"]["qm9"]["schedule"] == "cosine"


def test_a_step_budget_gives_every_training_set_size_one_schedule_in_steps():
    """--finetune-steps is equal compute: each run takes all its steps (whole epochs, no early stop, a learning-rate
    floor it cannot reach), with the plateau patience counted in steps, whatever the epoch length."""
    p = pretrain_finetune
    args = p.argparse.Namespace(compile=False, finetune_minutes=None, finetune_cpu_minutes=None, finetune_epochs=None,
                                finetune_steps=5000, cell_deadline_minutes=None, device="cpu", data_dir=None,
                                threads=1)
    o = p.FINETUNE_OPTIM
    for size in (50, 200, 950):
        optim = p.finetune_config("ethanol", size, args, None, {}, 1)["optim"]
        per_epoch = -(-size // optim["batch_size"])
        steps = optim["epochs"] * per_epoch
        assert 5000 <= steps < 5000 + per_epoch and optim["early_stop_patience"] > optim["epochs"]
        between = optim["val_every"] * per_epoch                  # steps between two validations
        assert abs(between - p.STEP_SCHEDULE["val_every_steps"]) <= per_epoch / 2 or optim["val_every"] == 1
        assert abs(optim["lr_patience"] * between - p.STEP_SCHEDULE["lr_patience_steps"]) <= between / 2
        # the most cuts the plateau rule can make in those steps leave the lr above its floor
        cuts = (steps - o["lr_warmup_steps"]) // ((optim["lr_patience"] + 1) * between)
        assert o["lr"] * o["lr_factor"] ** cuts > optim["lr_min"], size


def test_the_grid_report_survives_md_without_h_r_and_failed_cells(tmp_path):
    rows = [{"molecule": "ethanol", "size": 50, "method": "scratch", "seed": s, "forces_mae_meV_per_A": 40.0,
             "stability_ps": st, "hr_mae": hr} for s, st, hr in ((1, 0.0, None), (2, 10.0, 0.2))]
    rows.append({"molecule": "ethanol", "size": 50, "method": "et-oro", "seed": 1, "failed": "validation loss is nan"})
    rows.append({"molecule": "ethanol", "size": 200, "method": "et-oro", "seed": 1, "forces_mae_meV_per_A": 20.0,
                 "stability_ps": 0.0, "hr_mae": None})
    qm9 = [{"property": "gap", "method": "scratch", "test_mae": 120.0, "curve": []},
           {"property": "gap", "method": "et-oro", "failed": "validation loss is nan"}]
    pretrain_finetune.write_report(tmp_path, rows, qm9, ["scratch", "et-oro"])
    text = (tmp_path / "results.md").read_text()
    assert "| ethanol | 50 | 5.0 / 0.200 (2) | – |" in text and "| ethanol | 200 | – | 0.0 / – |" in text
    assert "failed (recorded, not run again): ethanol n=50 et-oro seed 1: validation loss is nan" in text
    assert "| gap | 120.0 | – |" in text and "QM9 runs that failed (recorded, not run again): gap et-oro" in text


def test_grid_cells_start_only_with_the_time_their_molecule_took_and_a_diverged_one_is_recorded(tmp_path,
                                                                                                  monkeypatch, capsys):
    """How long a step-budgeted cell takes comes from the state's rows (a fresh clone remembers it); before any,
    a first guess. A diverged fine-tune is recorded as failed instead of being retried every piece."""
    p = pretrain_finetune
    backbone = tmp_path / "b.pt"
    backbone.write_bytes(b"weights")
    common = ["--methods", "scratch", "--molecules", "ethanol", "--sizes", "50", "--properties", "--no-progress",
              "--finetune-steps", "100", "--hidden", "16", "--layers", "2", "--state", str(tmp_path / "g.json")]

    def diverges(*a, **k):
        raise FloatingPointError("validation loss is nan after epoch 3: the model diverged; lower the learning rate")
    monkeypatch.setattr(p, "run_finetune", lambda *a, **k: pytest.fail("started without the time it needs"))
    assert p.main(common + ["--out", str(tmp_path / "a"), "--max-minutes", "14"]) == 0      # first guess: 15
    assert "1 run(s) left" in capsys.readouterr().out
    monkeypatch.setattr(p, "run_finetune", diverges)
    assert p.main(common + ["--out", str(tmp_path / "a"), "--max-minutes", "16"]) == 0
    row = json.loads((tmp_path / "g.json").read_text())["forcefield"][0]
    assert row["failed"].startswith("validation loss is nan") and row["device"] == "cpu" and "wall_minutes" in row
    # a recorded time of 40 min for ethanol on this device: a piece of 30 min starts no ethanol cell
    state = json.loads((tmp_path / "g.json").read_text())
    state["forcefield"][0].update(wall_minutes=40.0, size=200)
    (tmp_path / "g.json").write_text(json.dumps(state))
    monkeypatch.setattr(p, "run_finetune", lambda *a, **k: pytest.fail("started without the time it needs"))
    assert p.main(common + ["--out", str(tmp_path / "a"), "--max-minutes", "30"]) == 0


def test_a_cell_folder_of_other_grid_settings_is_moved_aside_not_reused(tmp_path):
    p = pretrain_finetune
    out = tmp_path / "finetune" / "ethanol" / "50" / "et-oro"
    md = tmp_path / "md" / "ethanol" / "50" / "et-oro"
    out.mkdir(parents=True)
    md.mkdir(parents=True)
    (out / "test_metrics.json").write_text('{"forces_mae_meV_per_A": 1.0}')
    (out / "grid_settings.sha256").write_text("old\n")                             # from an older backbone
    args = p.argparse.Namespace(settings_stamp="new")
    p.claim_cell_folder(out, args, log=lambda s: None, along=[md])
    assert not p._done(out) and (out / "grid_settings.sha256").read_text().strip() == "new" and not md.exists()
    assert (out.parent / "et-oro.other-settings-1" / "test_metrics.json").is_file()        # nothing deleted
    assert (md.parent / "et-oro.other-settings-1").is_dir()                                # its MD went with it
    (out / "test_metrics.json").write_text("{}")
    p.claim_cell_folder(out, args, log=lambda s: None)                                    # its own: kept
    assert p._done(out)
    # a folder from before the stamps is taken as this grid's, as it always was
    legacy = tmp_path / "finetune" / "ethanol" / "50" / "scratch"
    legacy.mkdir()
    (legacy / "test_metrics.json").write_text("{}")
    p.claim_cell_folder(legacy, args, log=lambda s: None)
    assert p._done(legacy) and (legacy / "grid_settings.sha256").read_text().strip() == "new"


def test_a_qm9_run_cut_by_the_pieces_end_is_not_recorded_and_a_resumed_one_needs_only_its_rest(tmp_path, monkeypatch,
                                                                                               capsys):
    p = pretrain_finetune
    seen = {}

    def cut(pretrained, cfg, out, pause_minutes=None, **k):
        seen.update(max_cpu_minutes=cfg.max_cpu_minutes, pause_minutes=pause_minutes)
        return {"paused": True, "epochs": 1, "steps": 1000,
                "stop_reason": "paused at this invocation's deadline of 20 min (continue with --resume)"}
    monkeypatch.setattr(p, "finetune_property", cut)
    common = ["--methods", "scratch", "--molecules", "--properties", "gap", "--no-progress", "--hidden", "16",
              "--layers", "2", "--qm9-cpu-minutes", "60", "--state", str(tmp_path / "q.json"), "--out", str(tmp_path)]
    assert p.main(common + ["--max-minutes", "90"]) == 0
    # the run's own budget is its 60 CPU minutes; the piece's end is a deadline that pauses it
    assert seen["max_cpu_minutes"] == 60 and 0 < seen["pause_minutes"] <= 90 - p.QM9_TEST_MINUTES
    assert json.loads((tmp_path / "q.json").read_text())["qm9"] == [] and not (tmp_path / "qm9" / "gap" / "scratch"
                                                                               / "test_metrics.json").exists()
    # it used 50 of its 60 CPU minutes: 10 + the test's minutes are enough to start it again
    torch.save({"cpu_seconds": 50 * 60.0}, tmp_path / "qm9" / "gap" / "scratch" / "last.pt")
    assert p.budget_used_minutes(tmp_path / "qm9" / "gap" / "scratch")["max_cpu_minutes"] == pytest.approx(50.0)
    monkeypatch.setattr(p, "run_property", lambda *a, **k: {"test_mae": 2.0, "curve": []})
    assert p.main(common + ["--max-minutes", "20"]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["qm9"][0]["test_mae"] == 2.0


def test_a_resumed_qm9_run_that_spends_its_own_wall_budget_is_recorded(tmp_path, monkeypatch):
    """--qm9-minutes 60 with 50 used: the run gets its 10 minutes, and stopping on them is its end, not a cut."""
    p = pretrain_finetune
    seen = {}

    def ends(pretrained, cfg, out, pause_minutes=None, **k):
        seen.update(max_minutes=cfg.max_minutes, pause_minutes=pause_minutes)
        return {"test_mae": 3.0, "stop_reason": "time budget of 10 min reached (continue with --resume)"}
    monkeypatch.setattr(p, "finetune_property", ends)
    monkeypatch.setattr(p, "validation_curve", lambda out: [])
    out = tmp_path / "qm9" / "gap" / "scratch"
    out.mkdir(parents=True)
    torch.save({"elapsed": 50 * 60.0, "cpu_seconds": 50 * 60.0}, out / "last.pt")
    args = p.argparse.Namespace(out=str(tmp_path), layer_decay=None, qm9_epochs=10, qm9_minutes=60.0,
                                finetune_minutes=None, qm9_cpu_minutes=None, finetune_cpu_minutes=None, data_dir=None,
                                threads=1, qm9_train_size=None, hidden=16, layers=2, heads=None, no_progress=True,
                                cell_deadline_minutes=25.0, qm9_schedule="plateau")
    assert p.run_property("gap", "scratch", None, args, None, lambda *a: None)["test_mae"] == 3.0
    assert seen["max_minutes"] == pytest.approx(10.0) and seen["pause_minutes"] == 25.0


def test_qm9_runs_with_a_step_budget_go_on_from_their_committed_state_in_later_pieces(tmp_path, monkeypatch):
    """--qm9-steps: every run takes all its steps (whole epochs of --qm9-epoch-steps, no early stop). With --state its
    compact run state lives beside the grid's JSON: a piece shorter than a whole run still starts it, a run the
    piece's end cuts is not recorded and its state stays (committed) for the next piece, which resumes from it;
    once recorded, the state is removed."""
    p = pretrain_finetune
    calls = []
    monkeypatch.setattr(p, "validation_curve", lambda out: [[1.0, 5.0]])

    def train(pretrained, cfg, out, resume=False, state_file=None, pause_minutes=None, **k):
        calls.append({"epochs": cfg.epochs, "epoch_steps": cfg.epoch_steps, "patience": cfg.early_stop_patience,
                      "resume": resume, "state_file": state_file, "max_minutes": cfg.max_minutes,
                      "cpu": cfg.max_cpu_minutes, "pause": pause_minutes})
        Path(state_file).parent.mkdir(parents=True, exist_ok=True)
        if len(calls) == 1:                                   # the first piece pauses at step 1,000 of 2,500
            torch.save({"step": 1000}, state_file)
            return {"paused": True, "stop_reason": "paused at this invocation's deadline of 14 min (continue with "
                                                   "--resume)", "epochs": 1, "steps": 1000}
        return {"test_mae": 4.0, "stop_reason": "all 3 epochs done", "train_minutes": 50.0}
    monkeypatch.setattr(p, "finetune_property", train)
    state = tmp_path / "q.json"
    common = ["--methods", "scratch", "--molecules", "--properties", "gap", "--no-progress", "--hidden", "16",
              "--layers", "2", "--qm9-steps", "2500", "--qm9-epoch-steps", "1000", "--state", str(state),
              "--out", str(tmp_path / "runs")]
    # 21 minutes: less than a whole run's first guess, enough for a piece of one
    assert p.QM9_MIN_PIECE_MINUTES + p.QM9_TEST_MINUTES < 21 < p.QM9_FIRST_RUN_MINUTES
    assert p.main(common + ["--max-minutes", "21"]) == 0
    run_state = tmp_path / "q.runs" / "qm9-gap-scratch.pt"
    assert calls[0]["state_file"] == run_state and run_state.is_file()
    assert calls[0]["epochs"] == 3 and calls[0]["epoch_steps"] == 1000 and calls[0]["patience"] == 4
    assert calls[0]["cpu"] is None and calls[0]["max_minutes"] is None
    assert calls[0]["pause"] <= 21 - p.QM9_TEST_MINUTES                     # a deadline, not the run's budget
    assert json.loads(state.read_text())["qm9"] == []                       # cut: not recorded
    assert json.loads(state.read_text())["settings"]["qm9"] == {"train_size": None, "steps": 2500,
                                                                "epoch_steps": 1000}
    assert p.qm9_steps_done(tmp_path / "runs" / "qm9" / "gap" / "scratch", run_state) == 1000
    assert p.main(common + ["--max-minutes", "21"]) == 0                   # a fresh clone: only the state is there
    assert calls[1]["resume"] and calls[1]["state_file"] == run_state
    assert json.loads(state.read_text())["qm9"][0]["test_mae"] == 4.0 and not run_state.exists()


def test_a_pretraining_folder_of_other_settings_is_not_taken_as_done(tmp_path, monkeypatch):
    """A backbone pretrained with other steps (or corpus, batch, model) in the same --out is moved aside and
    pretrained anew, not fine-tuned from as if it were this grid's."""
    p = pretrain_finetune
    started = []

    class FakePretrainer:
        def __init__(self, cfg, out, **k):
            self.cfg, self.out = cfg, Path(out)

        def fit(self, resume=False):
            started.append((self.cfg.optim.max_steps, resume))
            torch.save({"step": self.cfg.optim.max_steps, "total_steps": self.cfg.optim.max_steps, "elapsed": 1.0},
                       self.out / "last.pt")
    monkeypatch.setattr(p, "Pretrainer", FakePretrainer)
    args = p.argparse.Namespace(out=str(tmp_path), corpus=str(p.CONFIGS / "pretrain_corpus.yaml"), hidden=16,
                                layers=2, heads=None, pretrain_lr=None, pretrain_steps=100, threads=1,
                                pretrain_batch_size=8, budget="steps", pretrain_minutes=1.0, no_progress=True,
                                data_dir=None, compile=False)
    p.run_pretrain("et-oro", args, None, log=lambda s: None)
    p.run_pretrain("et-oro", p.argparse.Namespace(**{**vars(args), "threads": 2, "compile": True}), None,
                   log=lambda s: None)
    assert started == [(100, False)]                          # done; threads and the compiled path are speed settings
    p.run_pretrain("et-oro", p.argparse.Namespace(**{**vars(args), "pretrain_steps": 500}), None, log=lambda s: None)
    assert started == [(100, False), (500, False)]
    assert (tmp_path / "pretrain" / "et-oro.other-settings-1" / "last.pt").is_file()
    # and the grid's cells: other pretraining settings are another grid (its state refuses them)
    monkeypatch.setattr(p, "run_finetune", lambda *a, **k: {"forces_mae_meV_per_A": 1.0, "stop_reason": "done"})
    argv = ["--methods", "et-oro", "--molecules", "ethanol", "--sizes", "50", "--properties", "--no-progress",
            "--hidden", "16", "--layers", "2", "--pretrain-batch-size", "8", "--out", str(tmp_path / "g"),
            "--state", str(tmp_path / "g.json")]
    assert p.main(argv + ["--pretrain-steps", "100"]) == 0
    with pytest.raises(SystemExit, match="other settings"):
        p.main(argv + ["--pretrain-steps", "500"])


def test_a_gpu_piece_of_the_grid_starts_its_first_cells(tmp_path, monkeypatch):
    """A GPU piece (campaign_gpu.py: 8 minutes, 0.5 min a simulated ps, a 2-minute first guess) must be able to
    start a molecule's first cell, which no recorded run on the GPU has timed yet."""
    p = pretrain_finetune
    monkeypatch.setattr(p, "run_finetune", lambda *a, **k: {"forces_mae_meV_per_A": 1.0, "stop_reason": "all done"})
    import md17_simulation
    monkeypatch.setattr(md17_simulation, "run_one", lambda mol, model, a: {"stability_ps": {"mean": 10.0},
                                                                            "hr_mae": {"mean": 0.1}})
    argv = ["--methods", "scratch", "--molecules", "ethanol", "--sizes", "50", "--properties", "--no-progress",
            "--finetune-steps", "5000", "--hidden", "16", "--layers", "2", "--md-ps", "10", "--md-replicas", "1",
            "--state", str(tmp_path / "g.json"), "--out", str(tmp_path), "--device", "cuda", "--max-minutes", "8",
            "--md-minutes-per-ps", "0.5", "--first-cell-minutes", "2"]
    assert p.main(argv) == 0
    assert len(json.loads((tmp_path / "g.json").read_text())["forcefield"]) == 1


def test_a_grid_run_started_near_the_pieces_end_gets_the_training_time_its_records_promise(tmp_path, monkeypatch):
    """A piece with 12 minutes left starts an ethanol run that took 9.8 (5 of training, the rest test and MD). Its
    training's deadline keeps back what recorded runs needed after training, not the MD guess (2 min a ps x 10 ps):
    that left a negative deadline, and every run left in the piece was started and cut after one epoch."""
    p = pretrain_finetune
    deadlines = []

    def finetune(*a, **k):
        deadlines.append(a[4].cell_deadline_minutes)
        return {"forces_mae_meV_per_A": 1.0, "stop_reason": "all done", "train_minutes": 5.0}
    monkeypatch.setattr(p, "run_finetune", finetune)
    import md17_simulation
    monkeypatch.setattr(md17_simulation, "run_one", lambda mol, model, a: {"stability_ps": {"mean": 10.0},
                                                                            "hr_mae": {"mean": 0.1}})
    argv = ["--methods", "scratch", "--molecules", "ethanol", "--sizes", "50", "--seeds", "50:2", "--properties",
            "--no-progress", "--finetune-steps", "5000", "--hidden", "16", "--layers", "2", "--md-ps", "10",
            "--md-replicas", "1", "--state", str(tmp_path / "g.json"), "--out", str(tmp_path)]
    assert p.main(argv + ["--max-minutes", "100"]) == 0 and len(deadlines) == 2
    state = json.loads((tmp_path / "g.json").read_text())
    state["forcefield"] = [{**state["forcefield"][0], "wall_minutes": 9.8, "train_minutes": 5.0}]   # seed 2 to do
    (tmp_path / "g.json").write_text(json.dumps(state))
    assert p.main(argv + ["--max-minutes", "12"]) == 0
    assert deadlines[2] == pytest.approx(12 - 4.8, abs=0.1)


def test_the_grid_report_gives_seed_paired_ratios_against_scratch_and_et_oro_with_the_goal():
    """The question of issue 13 in numbers: each backbone's test error over scratch's (and ET-OREO's over
    ET-ORO's), the means over the seeds both ran, how many seeds it won, the geometric mean over molecules beside
    the goal (≤ 0.5 at 50 frames, ≤ 0.75 at 950)."""
    rows = [{"molecule": mol, "size": 50, "method": m, "seed": s, "forces_mae_meV_per_A": v}
            for mol, m, s, v in (("ethanol", "scratch", 1, 40.0), ("ethanol", "scratch", 2, 44.0),
                                 ("ethanol", "et-oro", 1, 30.0), ("ethanol", "et-oro", 2, 46.0),
                                 ("ethanol", "et-oreo", 1, 20.0), ("aspirin", "scratch", 1, 100.0),
                                 ("aspirin", "et-oro", 1, 50.0), ("aspirin", "et-oreo", 1, 40.0))]
    rows.append({"molecule": "aspirin", "size": 950, "method": "et-oro", "seed": 1, "failed": "diverged"})
    text = "\n".join(pretrain_finetune.ratio_lines(rows, ["scratch", "et-oro", "et-oreo"]))
    # ethanol et-oro: (30 + 46) / (40 + 44) = 0.90 over 2 seeds, 1 won; aspirin 0.50; geometric mean sqrt(0.45)
    assert "## et-oro / scratch" in text and "| 50 | 0.50 | 0.90 (1/2) | 0.67 (goal ≤ 0.5) |" in text
    # et-oreo has seed 1 only: paired with scratch's seed 1 (40), not the mean of both
    assert "| 50 | 0.40 | 0.50 | 0.45 (goal ≤ 0.5) |" in text
    assert "## et-oreo / et-oro" in text and "| 50 | 0.80 | 0.67 | 0.73 |" in text
    assert pretrain_finetune.ratio_lines(rows, ["et-oro"]) == []          # nothing to compare with


def test_compile_pretrains_et_oreo_and_et_oro_through_the_compiled_graph_and_is_no_setting_of_the_cell():
    """--compile takes the pretraining steps of ET-OREO/ET-ORO with their compiled objectives (the same math), so a
    folder pretrained eagerly keeps its stamp and resumes compiled; 3D-EMGP reads the backbone's features, which
    the compiled graph does not return, so it stays eager."""
    import types
    args = types.SimpleNamespace(corpus=str(pretrain_finetune.CONFIGS / "pretrain_corpus.yaml"), hidden=32, layers=2,
                                 heads=None, pretrain_lr=None, pretrain_steps=100, threads=1, compile=True,
                                 pretrain_batch_size=8, budget="steps", pretrain_minutes=None)
    for method in ("et-oreo", "et-oro"):
        d = pretrain_finetune.pretrain_config(method, args, None)
        assert d["optim"]["compile"] is True
        assert pretrain_finetune.pretrain_config_from_dict(d).optim.compile
        stamp = pretrain_finetune.pretrain_stamp(method, args, None)
        assert stamp == pretrain_finetune.pretrain_stamp(method, types.SimpleNamespace(**{**vars(args),
                                                                                          "compile": False}), None)
    assert "compile" not in pretrain_finetune.pretrain_config("3d-emgp", args, None)["optim"]
