"""MD with a committee model: the spread is logged, and replicas whose spread passes --max-force-std stop."""
import numpy as np
import pytest
import torch

from forcefield.committee import Committee
from helpers import tiny_potential
from md import io
from md.config import SimulationConfig
from md.errors import MDInputError
from md.potential import ForceField
from md.simulate import run_simulation
from md.testing import synthetic_frames


def committee(seeds=(0, 1)):
    return Committee([tiny_potential(dtype=torch.float64, seed=s) for s in seeds])


def cfg(**kw):
    base = dict(molecule="ethanol", model="committee", ps=0.01, replicas=2, log_every=5, force_frames=0,
                analyze=False, dtype="float64")
    base.update(kw)
    return SimulationConfig(**base)


def test_forcefield_gives_the_mean_and_the_spread_of_each_system():
    pot = committee()
    frames = synthetic_frames("CH3CH2OH", n_frames=2, noise=0.05)
    b = frames.collate(np.arange(2), dtype=torch.float64)
    ff = ForceField(pot)
    e, f = ff(b.positions, b.numbers, b.batch, 2)
    direct = pot.energy_forces_spread(b.numbers, b.positions, b.batch)
    torch.testing.assert_close(f, direct["forces"].detach())
    torch.testing.assert_close(ff.last_force_std_max, direct["forces_std_max"].detach())
    assert (ff.last_force_std_max > 0).all()
    # an inactive system is not evaluated: no spread for it
    ff(b.positions, b.numbers, b.batch, 2, active=torch.tensor([True, False]))
    assert torch.isfinite(ff.last_force_std_max[0]) and torch.isnan(ff.last_force_std_max[1])
    assert ForceField(tiny_potential()).last_force_std_max is None


def test_spread_is_logged_and_a_replica_past_the_threshold_stops(tmp_path, capsys):
    pot = committee()
    frames = synthetic_frames("CH3CH2OH", n_frames=4, noise=0.05)
    out = run_simulation(cfg(), tmp_path / "logged", potential=pot, frames=(frames, frames), progress=False)
    thermo = io.read_thermo(out / io.THERMO_CSV)
    assert io.SPREAD_COLUMN in thermo and np.all(thermo[io.SPREAD_COLUMN] > 0)
    frame = io.read_trajectory(out / "traj_000.extxyz")[-1]
    assert frame.info["forces_std_max"] > 0
    threshold = 0.5 * float(thermo[io.SPREAD_COLUMN].min())
    run_simulation(cfg(max_force_std=threshold), tmp_path / "stopped", potential=pot, frames=(frames, frames),
                   progress=False)
    run = io.read_json(tmp_path / "stopped" / io.RUN_JSON)
    assert all(not r["active"] and "committee force spread" in r["reason"] for r in run["replicas"])
    assert "extrapolating" in capsys.readouterr().out


def test_max_force_std_needs_a_committee(tmp_path):
    frames = synthetic_frames("CH3CH2OH", n_frames=4, noise=0.05)
    with pytest.raises(MDInputError, match="needs a committee model.*oreo committee"):
        run_simulation(cfg(max_force_std=0.1), tmp_path / "r", potential=tiny_potential(),
                       frames=(frames, frames), progress=False)
