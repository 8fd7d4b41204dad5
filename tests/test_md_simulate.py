"""The simulation driver: outputs, resume after a kill, stopping replicas, periodic systems."""
import json

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read

from forcefield.data.conformations import ConformationSet
from md import io
from md.analytic import BondNetwork, LennardJones
from md.config import SimulationConfig
from md.errors import MDInputError
from md.simulate import run_simulation
from md.testing import lj_crystal, synthetic_frames


def ethanol_setup(n_frames=12, noise=0.02, **pot_kw):
    a = molecule("CH3CH2OH")
    pot = BondNetwork(a.numbers, a.positions, **pot_kw)
    frames = synthetic_frames("CH3CH2OH", n_frames=n_frames, noise=noise, potential=pot)
    return pot, frames


def config(**kw):
    base = dict(molecule="ethanol", model="analytic", ps=0.1, replicas=3, log_every=10, force_frames=5)
    base.update(kw)
    return SimulationConfig(**base)


class Interrupt(Exception):
    pass


def test_outputs_readable_and_summary(tmp_path):
    pot, frames = ethanol_setup()
    out = run_simulation(config(ps=0.05), tmp_path / "run", potential=pot, frames=(frames, frames), progress=False)
    for r in range(3):
        traj = read(out / f"traj_{r:03d}.extxyz", index=":")
        assert len(traj) == 11                                        # t = 0 and every 10 steps of 100
        assert [a.info["step"] for a in traj] == list(range(0, 101, 10))
        assert traj[-1].info["time_ps"] == pytest.approx(0.05)
        assert traj[0].get_forces().shape == (9, 3)
    thermo = io.read_thermo(out / "thermo.csv")
    assert list(thermo) == ["step", "time_ps", "replica", "T", "Epot", "Ekin", "Etot", "Econs"]
    assert len(thermo["step"]) == 33
    np.testing.assert_allclose(thermo["Etot"], thermo["Epot"] + thermo["Ekin"], atol=1e-8)
    # initial frames: seeded draw from the held-out frames, velocities from MB at 500 K
    run = json.loads((out / "run.json").read_text())
    picks = [s["initial_frame"] for s in run["replicas"]]
    assert picks == np.random.default_rng(123).choice(12, 3, replace=False).tolist()
    first = read(out / "traj_000.extxyz", index=0)
    np.testing.assert_allclose(first.positions, frames.frame_positions(picks[0]), atol=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["stability_ps"]["mean"] == pytest.approx(0.05)
    assert summary["force_mae_meV_per_A"] == pytest.approx(0.0, abs=1e-6)   # model == labelling potential
    assert summary["hr_mae"]["n"] == 3 and summary["speed"]["steps_per_s"] > 0
    assert (out / "hr.png").stat().st_size > 1000 and (out / "thermo.png").stat().st_size > 1000


@pytest.mark.parametrize("thermostat", ["nose-hoover", "langevin", "nve"])
def test_resume_after_kill_is_bit_identical(tmp_path, thermostat):
    pot, frames = ethanol_setup()
    cfg = config(thermostat=thermostat, checkpoint_every=50, analyze=False)
    straight = run_simulation(cfg, tmp_path / "straight", potential=pot, frames=(frames, frames), progress=False)

    def kill(state):
        if state.step == 80:          # after the checkpoint at step 50: files hold 3 frames too many
            raise Interrupt

    killed = tmp_path / "killed"
    with pytest.raises(Interrupt):
        run_simulation(cfg, killed, potential=pot, frames=(frames, frames), progress=False, on_log=kill)
    assert int(io.load_checkpoint(killed / "checkpoint.pt")["state"]["step"]) == 50
    assert len(read(killed / "traj_000.extxyz", index=":")) == 9      # frames 0..80
    run_simulation(cfg, killed, potential=pot, frames=(frames, frames), progress=False)   # resumes automatically

    a, b = io.load_checkpoint(straight / "checkpoint.pt"), io.load_checkpoint(killed / "checkpoint.pt")
    assert a["state"]["step"] == b["state"]["step"] == 200
    for key in ("positions", "velocities", "forces", "energy"):
        assert torch.equal(a["state"][key], b["state"][key]), key
    for name in ["thermo.csv"] + [f"traj_{r:03d}.extxyz" for r in range(3)]:
        assert (straight / name).read_bytes() == (killed / name).read_bytes(), name


def test_resume_refuses_changed_settings_and_missing_checkpoint(tmp_path):
    pot, frames = ethanol_setup()
    run_simulation(config(ps=0.02, analyze=False), tmp_path / "r", potential=pot, frames=(frames, frames),
                   progress=False)
    with pytest.raises(MDInputError, match="temperature.*--overwrite"):
        run_simulation(config(ps=0.02, temperature=300.0), tmp_path / "r", potential=pot, frames=(frames, frames))
    with pytest.raises(MDInputError, match="no checkpoint"):
        run_simulation(config(), tmp_path / "empty", potential=pot, frames=(frames, frames), resume=True)
    (tmp_path / "r" / "checkpoint.pt").unlink()
    with pytest.raises(MDInputError, match="--overwrite"):
        run_simulation(config(), tmp_path / "r", potential=pot, frames=(frames, frames))
    # --overwrite starts over; extending --ps of a finished run continues it
    run_simulation(config(ps=0.02, analyze=False), tmp_path / "r", potential=pot, frames=(frames, frames),
                   overwrite=True, progress=False)
    run_simulation(config(ps=0.04, analyze=False), tmp_path / "r", potential=pot, frames=(frames, frames),
                   progress=False)
    assert [a.info["step"] for a in read(tmp_path / "r" / "traj_001.extxyz", index=":")] == list(range(0, 81, 10))


def test_unstable_replica_is_stopped_and_batch_continues(tmp_path, capsys):
    pot, frames = ethanol_setup(n_frames=3, noise=0.005, k=5.0)
    x = frames.positions.reshape(3, 9, 3).copy()
    # O–H of frame 1 stretched by 0.56 Å: still a bond by natural cutoffs (< 1.57 Å), but 0.56 > 0.5 Å off
    x[1, 3] += 0.56 * (x[1, 3] - x[1, 2]) / np.linalg.norm(x[1, 3] - x[1, 2])
    held_out = ConformationSet.from_arrays(frames.numbers[:9], x, energy=frames.energy, forces=frames.forces)
    out = run_simulation(config(replicas=3, ps=0.05), tmp_path / "run", potential=pot,
                         frames=(held_out, frames), progress=False)
    assert "unstable: max bond deviation" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    bad = [s["replica"] for s in run["replicas"] if s["initial_frame"] == 1][0]
    for s in run["replicas"]:
        assert s["active"] == (s["replica"] != bad)
    assert len(read(out / f"traj_{bad:03d}.extxyz", index=":")) == 1
    good = [r for r in range(3) if r != bad]
    assert all(len(read(out / f"traj_{r:03d}.extxyz", index=":")) == 11 for r in good)
    final = io.load_checkpoint(out / "checkpoint.pt")["state"]
    np.testing.assert_allclose(final["positions"][final["batch"] == bad].numpy(), x[1])   # not integrated
    summary = json.loads((out / "summary.json").read_text())
    stab = {r["replica"]: r["stability_ps"] for r in summary["replicas"]}
    assert stab[bad] == 0.0 and all(stab[r] == pytest.approx(0.05) for r in good)
    assert summary["stability_ps"]["mean"] == pytest.approx(0.1 / 3)


def test_temperature_explosion_stops_run(tmp_path, capsys):
    a = molecule("CH3CH2OH")
    pot = BondNetwork(a.numbers, 1.4 * a.positions, k=50.0)         # springs far from their rest lengths
    frames = synthetic_frames("CH3CH2OH", n_frames=4, noise=0.01)
    out = run_simulation(config(temperature=50.0, stop_unstable=False, replicas=2, ps=0.5, force_frames=0),
                         tmp_path / "run", potential=pot, frames=(frames, frames), progress=False)
    assert "exceeds 10 x the target 50 K" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["completed"] and run["step"] < 1000                   # everything stopped early
    for s in run["replicas"]:
        assert not s["active"] and 0 < s["stop_step"] < 10 and "temperature" in s["reason"]
    summary = json.loads((out / "summary.json").read_text())
    for rep in summary["replicas"]:
        assert rep["unstable"] and rep["stability_ps"] == pytest.approx(
            [s for s in run["replicas"] if s["replica"] == rep["replica"]][0]["stop_time_ps"])
    assert summary["force_mae_meV_per_A"] is None                    # force_frames=0 skips it


def test_periodic_system(tmp_path):
    atoms = lj_crystal(repeat=2, rattle=0.05)
    frames = ConformationSet(numbers=atoms.numbers, positions=atoms.positions, ptr=np.array([0, len(atoms)]),
                             cell=atoms.cell.array[None], pbc=atoms.pbc[None])
    pot = LennardJones(0.0104, 3.4, 5.0)
    cfg = SimulationConfig(structure="crystal.xyz", model="lj", ps=0.5, timestep=5.0, temperature=40.0,
                           replicas=2, log_every=10, force_frames=0)
    out = run_simulation(cfg, tmp_path / "pbc", potential=pot, frames=(frames, frames), progress=False)
    traj = read(out / "traj_000.extxyz", index=":")
    assert len(traj) == 11 and traj[-1].pbc.all()
    np.testing.assert_allclose(traj[-1].cell.array, atoms.cell.array)
    for a in traj[1:]:
        frac = a.get_scaled_positions(wrap=False)
        assert frac.min() >= -1e-9 and frac.max() < 1 + 1e-9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stability_ps"]["mean"] == pytest.approx(0.5) and summary["hr_mae"]["n"] == 2


# ------------------------------------------------------------------------------ broken inputs, failed runs, progress
class NaNPotential(torch.nn.Module):
    """A potential that fails on everything: NaN energies and forces."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, numbers, positions, batch, cell=None, pbc=None):
        self.calls += 1
        n = int(batch.max()) + 1
        return {"energy": torch.full((n,), float("nan"), dtype=positions.dtype),
                "forces": torch.full_like(positions, float("nan"))}


def test_overlapping_atoms_in_an_initial_frame_are_refused_before_any_model_call(tmp_path):
    pot, frames = ethanol_setup(n_frames=3)
    x = frames.positions.reshape(3, 9, 3).copy()
    x[1, 5] = x[1, 2] + [0.0, 0.04, 0.0]
    held_out = ConformationSet.from_arrays(frames.numbers[:9], x, energy=frames.energy, forces=frames.forces)
    calls = NaNPotential()
    with pytest.raises(MDInputError, match=r"initial frame 1 of .*atoms 2 and 5 are 0\.040 Å apart.*duplicated atom"):
        run_simulation(config(replicas=3), tmp_path / "run", potential=calls, frames=(held_out, frames))
    assert calls.calls == 0


def test_forcefield_stops_only_the_collapsed_replica(tmp_path, capsys):
    """Mid-run, oreo potentials refuse overlapping atoms for the whole batch: the force field then evaluates the
    other replicas and gives the collapsed one NaN, which stops it with the atoms named."""
    from md.integrators import compute_forces
    from md.potential import ForceField
    from md.simulate import _Run
    from md.state import make_state
    from tests.helpers import tiny_potential

    a = molecule("CH3CH2OH")
    bad = a.positions.copy()
    bad[5] = bad[2]
    ff = ForceField(tiny_potential())
    state = compute_forces(make_state([a.numbers] * 3, [a.positions, bad, a.positions + 0.01]), ff)
    alone = compute_forces(make_state([a.numbers], [a.positions]), ff)
    assert torch.isnan(state.energy[1]) and bool(torch.isnan(state.forces[9:18]).all())
    assert float(state.energy[0]) == pytest.approx(float(alone.energy[0]), abs=1e-10)
    assert torch.isfinite(state.energy[2]) and torch.isfinite(state.forces[18:]).all()
    run = _Run(config(replicas=3), tmp_path, ff, None, None, None)
    run.status = [{"replica": r, "active": True} for r in range(3)]
    state = run.check_step(state)
    assert state.active.tolist() == [True, False, True]
    assert run.status[1]["non_finite"] and "atoms 2 and 5 are 0.000 Å apart" in run.status[1]["reason"]
    assert "collapsed" in capsys.readouterr().out


def test_run_whose_replicas_all_went_non_finite_reports_no_made_up_numbers(tmp_path):
    _, frames = ethanol_setup()
    out = run_simulation(config(replicas=2, ps=0.01, force_frames=0), tmp_path / "run", potential=NaNPotential(),
                         frames=(frames, frames), progress=False)
    run = json.loads((out / "run.json").read_text())
    assert all(s["non_finite"] and s["stop_step"] == 0 for s in run["replicas"])
    summary = json.loads((out / "summary.json").read_text())
    # the only frame is the dataset's own (t = 0): no h(r) of the simulation, not a perfect 0.000
    assert [r["hr_mae"] for r in summary["replicas"]] == [None, None] and summary["hr_mae"]["mean"] is None
    assert summary["speed"]["steps_per_s"] is None and summary["speed"]["timed_steps"] == 0
    assert summary["stability_ps"]["mean"] == 0.0


def test_progress_estimate_and_plain_progress_lines(tmp_path, capsys, monkeypatch):
    """The wall-time estimate after the first steps, and a progress line on stderr without a progress bar."""
    import md.simulate as simulate
    monkeypatch.setattr(simulate, "ESTIMATE_AFTER_STEPS", 5)
    monkeypatch.setattr(simulate, "PROGRESS_EVERY_S", 0.0)
    pot, frames = ethanol_setup()
    run_simulation(config(ps=0.05, analyze=False), tmp_path / "run", potential=pot, frames=(frames, frames),
                   progress=False)
    err = capsys.readouterr().err
    assert err.count("steps/s over the first 5 steps: the remaining 0.0475 ps of 0.05 ps (95 steps) will take "
                     "about") == 1
    lines = [line for line in err.splitlines() if line.startswith("MD ethanol: ")]
    assert len(lines) == 99 and "steps/s" in lines[0] and "ETA" in lines[0] and "3/3 replicas running" in lines[0]
    assert lines[-1].startswith("MD ethanol: 0.0495/0.05 ps (99.0%), ")
    assert "--compile is faster" not in err                      # a run of seconds is not told about --compile
    monkeypatch.setattr(simulate, "COMPILE_HINT_AFTER_S", 0.0)   # one estimated longer than the threshold is
    run_simulation(config(ps=0.05, analyze=False), tmp_path / "run2", potential=pot, frames=(frames, frames),
                   progress=False)
    assert capsys.readouterr().err.count("--compile is faster") == 1


def test_format_duration():
    from md.simulate import format_duration
    assert [format_duration(s) for s in (45, 720, 3 * 3600, 2.5 * 86400)] == ["45 s", "12 min", "3.0 h", "2.5 days"]
