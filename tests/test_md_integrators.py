"""Integrators: NVE energy conservation (and agreement with ASE), thermostat temperatures,
Maxwell–Boltzmann start, batching and masking."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.lj import LennardJones as AseLJ
from ase.cluster import Icosahedron
from ase.md.verlet import VelocityVerlet

from md.analytic import LennardJones
from md.integrators import compute_forces, conserved_energy, make_integrator
from md.potential import ForceField
from md.state import make_state, maxwell_boltzmann_velocities
from forcefield.units import KB

EPS, SIGMA, RC = 0.0104, 3.4, 8.0   # argon-like LJ (eV, Å, Å)


def lj13(n_replicas=1, temperature=20.0, seed=0, rattle=0.05):
    """``n_replicas`` rattled LJ13 icosahedra with Maxwell–Boltzmann velocities."""
    rng = np.random.default_rng(seed)
    base = Icosahedron("Ar", 2, latticeconstant=SIGMA * 2 ** (1 / 6) * np.sqrt(2)).positions
    pos = [base + rattle * rng.standard_normal(base.shape) for _ in range(n_replicas)]
    state = make_state([np.full(13, 18)] * n_replicas, pos)
    gen = torch.Generator().manual_seed(seed)
    v = maxwell_boltzmann_velocities(state.masses, state.batch, n_replicas, temperature, gen)
    return replace(state, velocities=v)


def run(state, integ, n_steps, every=1, temperature=None):
    state = integ.init(state)
    temps, econs = [], []
    for k in range(n_steps):
        state = integ.step(state)
        if k % every == 0:
            temps.append(state.temperature().numpy())
            econs.append(conserved_energy(state, temperature).numpy())
    return state, np.array(temps), np.array(econs)


def test_nve_energy_conserved_with_second_order_drift():
    ff = ForceField(LennardJones(EPS, SIGMA, RC))
    errors = []
    for dt, n in ((10.0, 300), (5.0, 600)):       # same 3 ps
        state = compute_forces(lj13(temperature=30.0), ff)
        e0 = conserved_energy(state).numpy()
        _, _, e = run(state, make_integrator("nve", ff, dt, 30.0), n)
        errors.append(np.abs(e - e0).max())
        ekin = 1.5 * 13 * KB * 30.0
        assert errors[-1] < 0.005 * ekin, f"dt={dt}: energy error {errors[-1]:.2e} eV vs Ekin {ekin:.2e} eV"
    # velocity Verlet is second order: halving dt cuts the energy error about 4x
    assert 2.5 < errors[0] / errors[1] < 6.0, errors


def test_nve_matches_ase_velocity_verlet():
    """Same LJ cluster, same initial velocities: our float64 NVE == ASE's VelocityVerlet + ASE's LJ."""
    state = lj13(temperature=30.0, seed=3)
    atoms = Atoms("Ar13", positions=state.positions.numpy().copy())
    atoms.set_velocities(state.velocities.numpy() / units.fs)    # Å/fs -> ASE velocity units
    atoms.calc = AseLJ(epsilon=EPS, sigma=SIGMA, rc=RC, smooth=False)
    ff = ForceField(LennardJones(EPS, SIGMA, RC))
    state = compute_forces(state, ff)
    np.testing.assert_allclose(state.forces.numpy(), atoms.get_forces(), atol=1e-10)
    np.testing.assert_allclose(state.energy.numpy()[0], atoms.get_potential_energy(), atol=1e-10)
    dyn = VelocityVerlet(atoms, timestep=5.0 * units.fs)
    integ = make_integrator("nve", ff, 5.0, 30.0)
    state = integ.init(state)
    for _ in range(100):
        state = integ.step(state)
    dyn.run(100)
    np.testing.assert_allclose(state.positions.numpy(), atoms.positions, atol=1e-8)
    np.testing.assert_allclose(state.velocities.numpy(), atoms.get_velocities() * units.fs, atol=1e-10)


def test_maxwell_boltzmann_start():
    n_sys, n = 200, 13
    state = make_state([np.full(n, 18)] * n_sys, [np.zeros((n, 3))] * n_sys)
    v = maxwell_boltzmann_velocities(state.masses, state.batch, n_sys, 500.0, torch.Generator().manual_seed(1))
    state = replace(state, velocities=v)
    p = state.system_sum(state.masses.unsqueeze(1) * v)
    assert p.abs().max() < 1e-12                                      # COM momentum removed
    t = state.temperature().numpy()                                  # dof = 3n - 3
    assert abs(t.mean() - 500.0) < 3 * 500.0 * np.sqrt(2 / 36) / np.sqrt(n_sys)


@pytest.mark.slow
def test_nose_hoover_holds_temperature_and_conserves_extended_energy():
    target, dt = 25.0, 10.0
    ff = ForceField(LennardJones(EPS, SIGMA, RC))
    state = compute_forces(lj13(n_replicas=8, temperature=5.0, seed=1), ff)   # start cold: must heat up
    integ = make_integrator("nose-hoover", ff, dt, target, tau=20 * dt)
    state, temps, econs = run(state, integ, 3000, every=5, temperature=target)
    mean_t = temps[len(temps) // 3:].mean()                           # discard equilibration
    assert abs(mean_t - target) < 0.06 * target, f"mean T {mean_t:.2f} K, target {target} K"
    drift = np.abs(econs - econs[0]).max()
    assert drift < 1e-3, f"NH conserved quantity drifted by {drift:.2e} eV"
    q = state.thermostat["Q"].numpy()
    np.testing.assert_allclose(q, 3 * 13 * KB * target * (20 * dt) ** 2)   # Q = 3 N kT (20 dt)²


def test_langevin_holds_temperature():
    target, dt = 25.0, 10.0
    ff = ForceField(LennardJones(EPS, SIGMA, RC))
    state = lj13(n_replicas=8, temperature=5.0, seed=2)
    state = compute_forces(replace(state, dof=torch.full((8,), 39.0, dtype=torch.float64)), ff)   # 3N: no COM constraint
    integ = make_integrator("langevin", ff, dt, target, friction=0.002, generator=torch.Generator().manual_seed(0))
    _, temps, _ = run(state, integ, 2500, every=5)
    mean_t = temps[len(temps) // 3:].mean()
    assert abs(mean_t - target) < 0.06 * target, f"mean T {mean_t:.2f} K, target {target} K"


def test_nve_does_not_hold_temperature_control():
    """Control for the thermostat tests: without a thermostat a cold start stays far below target."""
    ff = ForceField(LennardJones(EPS, SIGMA, RC))
    state = compute_forces(lj13(n_replicas=8, temperature=5.0, seed=1), ff)
    _, temps, _ = run(state, make_integrator("nve", ff, 10.0, 25.0), 600, every=5)
    assert temps[len(temps) // 3:].mean() < 0.5 * 25.0


@pytest.mark.parametrize("thermostat", ["nose-hoover", "nve"])
def test_batched_replicas_equal_separate_runs(thermostat):
    ff = ForceField(LennardJones(EPS, SIGMA, RC))
    batched = compute_forces(lj13(n_replicas=3, temperature=30.0, seed=4), ff)
    integ = make_integrator(thermostat, ff, 10.0, 30.0)
    out, _, _ = run(batched, integ, 150, temperature=30.0)
    calls = ff.n_calls
    for r in range(3):
        sel = batched.batch == r
        single = make_state([np.full(13, 18)], [batched.positions[sel].numpy()])
        single = compute_forces(replace(single, velocities=batched.velocities[sel].clone()), ff)
        one, _, _ = run(single, make_integrator(thermostat, ff, 10.0, 30.0), 150, temperature=30.0)
        np.testing.assert_allclose(one.positions.numpy(), out.positions[sel].numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(one.velocities.numpy(), out.velocities[sel].numpy(), rtol=0, atol=1e-12)
    assert calls == 1 + 150    # one potential call per step for the whole batch


def test_stopped_replica_is_frozen_and_not_evaluated():
    calls = []

    class Spy(LennardJones):
        def forward(self, numbers, positions, batch, cell=None, pbc=None):
            calls.append(int(batch.max()) + 1)
            return super().forward(numbers, positions, batch, cell, pbc)

    ff = ForceField(Spy(EPS, SIGMA, RC))
    state = compute_forces(lj13(n_replicas=3, temperature=30.0), ff)
    state = replace(state, active=torch.tensor([True, False, True]))
    frozen = state.positions[state.batch == 1].clone()
    integ = make_integrator("langevin", ff, 10.0, 30.0, friction=0.01, generator=torch.Generator().manual_seed(0))
    state = integ.init(state)
    for _ in range(20):
        state = integ.step(state)
    assert torch.equal(state.positions[state.batch == 1], frozen)
    assert calls[1:] == [2] * 20       # only the two active replicas reach the potential
    assert not torch.equal(state.positions[state.batch == 0], lj13(n_replicas=3, temperature=30.0).positions[:13])
