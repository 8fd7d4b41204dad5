"""Runs that add up across fresh clones: the compact state file, accumulated observables, pausing, the model check,
the h(r) sampling floor and the full rMD17 reference."""
import json

import numpy as np
import pytest
import torch

from md import io
from md.analysis import analyze_run, analyze_state
from md.errors import MDInputError
from md.metrics import distance_histogram, hr_mae
from md.observables import Observables, sampling_floor
from md.simulate import run_simulation
from md.testing import synthetic_frames

from test_md_cli import needs_data
from test_md_simulate import config, ethanol_setup


def piecewise(tmp_path, cfg, pot, frames, pieces):
    """Run ``cfg`` in pieces, each in a new run directory (a fresh clone keeps only the state file)."""
    state = tmp_path / "state.pt"
    for k, ps in enumerate(pieces):
        cfg.ps = ps
        out = tmp_path / f"clone{k}"
        run_simulation(cfg, out, potential=pot, frames=(frames, frames), progress=False, state_file=state)
    return out, state


@pytest.mark.parametrize("thermostat", ["nose-hoover", "langevin"])
def test_pieces_on_fresh_clones_equal_one_run(tmp_path, thermostat):
    pot, frames = ethanol_setup()
    straight = run_simulation(config(ps=0.15, thermostat=thermostat), tmp_path / "straight", potential=pot,
                              frames=(frames, frames), progress=False)
    last, state = piecewise(tmp_path, config(thermostat=thermostat), pot, frames, [0.05, 0.1, 0.15])
    a, b = io.load_checkpoint(straight / io.CHECKPOINT), io.load_checkpoint(state)
    for key in ("positions", "velocities", "forces", "energy"):
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["observables"]["max_dev"].tolist() == b["observables"]["max_dev"].tolist()
    np.testing.assert_array_equal(a["observables"]["hr_counts"], b["observables"]["hr_counts"])
    # the last clone's trajectory starts where the state left off; its summary still covers the whole run
    run = json.loads((last / io.RUN_JSON).read_text())
    assert run["trajectory_from_step"] == 200
    assert [x.info["step"] for x in io.read_trajectory(last / "traj_000.extxyz")][0] == 210
    s1, s2 = (json.loads((d / io.SUMMARY_JSON).read_text()) for d in (straight, last))
    for key in ("stability_ps", "hr_mae", "hr_floor"):
        assert s1[key] == s2[key], key
    assert s2["simulated_ps"] == pytest.approx(0.15)
    # and from the state file alone, as the campaign report reads it
    s3 = analyze_state(state, force_frames=0, frames=(frames, frames))
    assert s3["hr_mae"] == s1["hr_mae"] and s3["stability_ps"] == s1["stability_ps"]


def test_pieces_on_a_gpu_are_timed_apart_and_the_report_reads_their_state_on_the_cpu(tmp_path):
    """A run's timing is kept per device type, so a GPU piece's speed does not pass for the CPU's (the campaign's
    steps/s and CPU-h to go are the CPU's); a state whose last piece ran on a GPU is summarised on the CPU."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import campaign
    pot, frames = ethanol_setup()
    _, state = piecewise(tmp_path, config(), pot, frames, [0.05, 0.1])
    ck = io.load_checkpoint(state)
    (cpu_s, cpu_steps), = ck["timed_by_device"].values()
    assert list(ck["timed_by_device"]) == ["cpu"] and cpu_steps == ck["steps_timed"] == 200
    assert cpu_s == pytest.approx(ck["wall_s"])
    ck["config"]["device"] = "cuda"                                  # as a GPU piece (campaign_gpu.py) leaves it
    ck["timed_by_device"]["cuda"] = [1.0, 1000]
    ck["wall_s"], ck["steps_timed"] = ck["wall_s"] + 1.0, ck["steps_timed"] + 1000
    torch.save(ck, state)
    from md.potential import ForceField
    summary = analyze_state(state, forcefield=ForceField(pot), force_frames=5, frames=(frames, frames))   # on the CPU
    assert summary["force_mae_meV_per_A"] is not None
    assert summary["speed_by_device"]["cuda"]["steps_per_s"] == pytest.approx(1000.0)
    assert campaign.md_cpu_speed(summary)["steps_per_s"] == pytest.approx(cpu_steps / cpu_s)
    summary.update(threads=1, requested_ps=300.0)
    left_steps = (300.0 - summary["simulated_ps"]) * 1000.0 / summary["timestep_fs"]
    assert campaign.md_hours_to_go(summary) == pytest.approx(left_steps * cpu_s / cpu_steps / 3600.0)
    # an old state (no per-device timing) counts as its config's device
    del ck["timed_by_device"]
    from md.metrics import timed_by_device
    assert list(timed_by_device(ck)) == ["cuda"]


def test_observables_equal_the_trajectory_replay(tmp_path):
    """What the simulation accumulates is what the trajectory files give (checkpoints without observables)."""
    pot, frames = ethanol_setup()
    out = run_simulation(config(ps=0.1), tmp_path / "r", potential=pot, frames=(frames, frames), progress=False)
    accumulated = json.loads((out / io.SUMMARY_JSON).read_text())
    ckpt = io.load_checkpoint(out / io.CHECKPOINT)
    del ckpt["observables"]
    io.save_checkpoint(out / io.CHECKPOINT, ckpt)
    replayed = analyze_run(out, forcefield=None, frames=(frames, frames), force_frames=0, plots=False)
    assert replayed["stability_ps"] == accumulated["stability_ps"]
    # positions in the files are rounded to 1e-10 Å: the same histogram bins up to that
    assert replayed["hr_mae"]["mean"] == pytest.approx(accumulated["hr_mae"]["mean"], abs=1e-9)


def test_unstable_replica_h_r_stops_at_its_first_unstable_frame():
    obs = Observables(1, threshold=0.5)
    from ase.build import molecule
    a = molecule("CH3CH2OH")
    from md.metrics import find_bonds, bond_lengths
    bonds = find_bonds(a.numbers, a.positions)
    ref = bond_lengths(a.positions[None], bonds)[0]
    stretched = a.positions.copy()
    stretched[3] += 2.0                                                 # the O-H bond torn
    for step, pos in [(0, a.positions), (10, a.positions), (20, stretched), (30, a.positions)]:
        obs.add_frame(0, step, pos, bonds, ref)
    assert obs.first_unstable_step[0] == 20 and obs.hr_frames[0] == 2 and obs.hr_simulated[0] == 1
    expected = distance_histogram(np.stack([a.positions, a.positions]))[1]
    np.testing.assert_allclose(obs.hr(0), expected)
    assert obs.max_dev[0][2] > 1.0
    again = Observables.from_dict(obs.to_dict())
    assert again.steps == obs.steps and np.allclose(again.max_dev, obs.max_dev, rtol=1e-6)


def test_max_minutes_pauses_at_a_checkpoint_and_the_same_call_continues(tmp_path, capsys):
    pot, frames = ethanol_setup()
    cfg = config(ps=0.1, checkpoint_every=50)
    out = run_simulation(cfg, tmp_path / "r", potential=pot, frames=(frames, frames), progress=False,
                         max_minutes=1e-9)
    run = json.loads((out / io.RUN_JSON).read_text())
    assert run["paused"] and not run["completed"] and run["step"] == 50
    assert not (out / io.SUMMARY_JSON).exists() and "paused at 0.025 ps" in capsys.readouterr().out
    run_simulation(cfg, out, potential=pot, frames=(frames, frames), progress=False)
    run = json.loads((out / io.RUN_JSON).read_text())
    assert run["completed"] and not run["paused"] and run["step"] == 200


def test_a_changed_model_file_is_not_continued(tmp_path):
    """The state records the model file's SHA-256: a re-shipped model must not continue another's trajectory."""
    from forcefield.io import save_model
    from helpers import tiny_potential
    from md.config import SimulationConfig
    model = tiny_potential(dtype=torch.float32)
    path = tmp_path / "m.pt"
    save_model(model, path)
    _, frames = ethanol_setup()
    cfg = SimulationConfig(molecule="ethanol", model=str(path), ps=0.005, replicas=1, log_every=5, force_frames=0,
                           analyze=False)
    run_simulation(cfg, tmp_path / "a", frames=(frames, frames), progress=False, state_file=tmp_path / "s.pt")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_model(model, path)
    cfg.ps = 0.01
    with pytest.raises(MDInputError, match="has changed since the run.*SHA-256"):
        run_simulation(cfg, tmp_path / "b", frames=(frames, frames), progress=False, state_file=tmp_path / "s.pt")


def test_sampling_floor_falls_with_frames_and_is_what_two_draws_give():
    ref = synthetic_frames("CH3CH2OH", n_frames=400, noise=0.1, seed=3)
    x = np.stack([ref.frame_positions(f) for f in range(len(ref))])
    few, many = sampling_floor(x, 5), sampling_floor(x, 200)
    assert few > 2 * many > 0
    # draws capped at half the reference, then scaled to n frames against all of it: sqrt((1/n + 1/F) / (2/(F/2)))
    assert sampling_floor(x, 10_000) == pytest.approx(sampling_floor(x, 200) * np.sqrt(
        (1 / 10_000 + 1 / 400) / (1 / 200 + 1 / 400)))
    perm = np.random.default_rng(0).permutation(400)
    direct = hr_mae(distance_histogram(x[perm[:5]])[1], distance_histogram(x[perm[5:]])[1])
    scale = np.sqrt((1 / 5 + 1 / 400) / (1 / 5 + 1 / 395))
    assert sampling_floor(x, 5, seed=0, draws=1) == pytest.approx(direct * scale)
    assert sampling_floor(x[:1], 5) is None


@needs_data
def test_rmd17_reference_is_every_distinct_frame():
    import os
    from forcefield.data import load_rmd17
    rmd17_dir = os.environ["OREO_DATA_DIR"]
    distinct = load_rmd17("ethanol", "distinct", data_dir=rmd17_dir)
    assert len(distinct) == 9633 and len(np.unique(distinct.frame_id)) == 9633
    for k in range(1, 6):
        for part in ("train", "test"):
            assert np.isin(load_rmd17("ethanol", part, k, data_dir=rmd17_dir).frame_id, distinct.frame_id).all()
    from md.config import SimulationConfig
    from md.frames import load_system_frames
    held_out, reference = load_system_frames(SimulationConfig(molecule="ethanol", data_dir=str(rmd17_dir)))
    assert len(reference) == 9633 and len(held_out) == 1000


def test_frame_sample_for_the_dft_check_is_the_same_in_pieces_and_from_the_window(tmp_path, monkeypatch):
    import md.observables
    monkeypatch.setattr(md.observables, "SAMPLE_WINDOW_PS", 0.05)      # the last 100 of 200 steps
    pot, frames = ethanol_setup()
    straight = run_simulation(config(ps=0.1, analyze=False), tmp_path / "straight", potential=pot,
                              frames=(frames, frames), progress=False)
    state, k = tmp_path / "state.pt", 0
    while not io.read_json(tmp_path / f"clone{k}" / io.RUN_JSON)["completed"] if k else True:
        k += 1                                                          # pieces of 50 steps, each on a "fresh clone"
        run_simulation(config(ps=0.1, analyze=False, checkpoint_every=50), tmp_path / f"clone{k}", potential=pot,
                       frames=(frames, frames), progress=False, state_file=state, max_minutes=1e-9)
    assert k == 4
    a = Observables.from_dict(io.load_checkpoint(straight / io.CHECKPOINT)["observables"]).sampled_frames()
    b = Observables.from_dict(io.load_checkpoint(state)["observables"]).sampled_frames()
    assert [(f["replica"], f["step"]) for f in a] == [(f["replica"], f["step"]) for f in b]
    assert all(np.array_equal(x["positions"], y["positions"]) for x, y in zip(a, b))
    # 3 replicas x 11 logged frames in the window (steps 100..200), 24 kept, none before the window
    assert len(a) == 24 and min(f["step"] for f in a) >= 100 and len({f["replica"] for f in a}) == 3


def test_dft_check_of_a_state_file_uses_its_frame_sample_and_saves_each_frame(tmp_path, monkeypatch, capsys):
    import md.dft
    from md.cli import main
    pot, frames = ethanol_setup()
    state = tmp_path / "run.pt"
    run_simulation(config(ps=0.05, analyze=False), tmp_path / "r", potential=pot, frames=(frames, frames),
                   progress=False, state_file=state)
    calls = []

    def fake_dft(numbers, positions, xc, basis, **kw):                  # "DFT" = the model's forces + 10 meV/Å
        calls.append(positions)
        n = len(numbers)
        model = pot(torch.as_tensor(numbers), torch.as_tensor(positions), torch.zeros(n, dtype=torch.long))
        model = model["forces"].detach().numpy()
        return 0.0, model + 0.01

    monkeypatch.setattr(md.dft, "require_pyscf", lambda: None)
    monkeypatch.setattr(md.dft, "dft_forces", fake_dft)
    assert main(["dft-check", str(state), "--frames", "3"]) == 0
    report = json.loads(state.with_suffix(".dft_check.json").read_text())
    assert report["n_frames"] == 3 and report["force_mae_meV_per_A"] == pytest.approx(10.0, abs=1e-6)
    assert len(calls) == 3 and state.with_suffix(".dft_forces.npz").is_file()
    assert main(["dft-check", str(state), "--frames", "3"]) == 0 and len(calls) == 3   # finished frames reused
    assert main(["dft-check", str(state), "--frames", "5", "--max-minutes", "1e-9"]) == 0   # no new frame started
    assert len(calls) == 3 and json.loads(state.with_suffix(".dft_check.json").read_text())["n_frames"] == 3
    assert main(["dft-check", str(state), "--frames", "5"]) == 0 and len(calls) == 5   # the same call continues

    # a frame whose SCF does not converge is recorded, left out of the MAE and not tried again
    from forcefield.reference import SCFNotConverged

    def no_scf(numbers, positions, xc, basis, **kw):
        calls.append(positions)
        raise SCFNotConverged("did not converge")
    monkeypatch.setattr(md.dft, "dft_forces", no_scf)
    assert main(["dft-check", str(state), "--frames", "6"]) == 0 and len(calls) == 6
    report = json.loads(state.with_suffix(".dft_check.json").read_text())
    assert report["n_frames"] == 5 and report["n_failed"] == 1
    assert report["force_mae_meV_per_A"] == pytest.approx(10.0, abs=1e-6)
    assert main(["dft-check", str(state), "--frames", "6"]) == 0 and len(calls) == 6

    # a new run on the same state path (here: started again) drops the old report; and a report whose geometries
    # are not the state's frames is not reused
    old_report = state.with_suffix(".dft_check.json").read_text()
    old_forces = state.with_suffix(".dft_forces.npz").read_bytes()
    run_simulation(config(ps=0.05, analyze=False, seed=7), tmp_path / "r2", potential=pot, frames=(frames, frames),
                   progress=False, state_file=state, overwrite=True)
    assert not state.with_suffix(".dft_check.json").exists() and not state.with_suffix(".dft_forces.npz").exists()
    state.with_suffix(".dft_check.json").write_text(old_report)
    state.with_suffix(".dft_forces.npz").write_bytes(old_forces)
    monkeypatch.setattr(md.dft, "dft_forces", fake_dft)
    assert main(["dft-check", str(state), "--frames", "3"]) == 0 and len(calls) == 6 + 3
    # no frame converged at all: an error, not a report of nothing
    for f in (state.with_suffix(".dft_check.json"), state.with_suffix(".dft_forces.npz")):
        f.unlink()
    monkeypatch.setattr(md.dft, "dft_forces", no_scf)
    assert main(["dft-check", str(state), "--frames", "2"]) == 1
    assert "converged on none of the 2" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_runs_the_export_built_once_and_equal_to_eager(tmp_path):
    from forcefield.io import save_model
    from helpers import tiny_potential
    from md.config import SimulationConfig
    path = tmp_path / "m.pt"
    save_model(tiny_potential(dtype=torch.float32), path)
    _, frames = ethanol_setup()
    runs = {}
    for flag in (False, True):
        cfg = SimulationConfig(molecule="ethanol", model=str(path), ps=0.01, replicas=2, log_every=10,
                               force_frames=0, analyze=False, compile=flag)
        runs[flag] = run_simulation(cfg, tmp_path / str(flag), frames=(frames, frames), progress=False)
    built = list((tmp_path / "True").glob("model-*-float32.pt2"))
    assert len(built) == 1
    a, b = (io.read_trajectory(runs[f] / "traj_000.extxyz") for f in (False, True))
    np.testing.assert_allclose(a[1].get_forces(), b[1].get_forces(), atol=1e-4)     # same function, float32
    mtime = built[0].stat().st_mtime
    cfg.ps = 0.02
    run_simulation(cfg, runs[True], frames=(frames, frames), progress=False)          # the next piece reuses it
    assert built[0].stat().st_mtime == mtime
