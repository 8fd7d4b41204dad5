"""Observables: bonds, stability detection, h(r), force MAE; periodic cells (wrapping, minimum image)."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.lj import LennardJones as AseLJ
from ase.geometry import wrap_positions as ase_wrap
from ase.md.verlet import VelocityVerlet
from scipy.spatial.distance import pdist

from md.analysis import analyze_replica
from md.analytic import BondNetwork, LennardJones
from md.integrators import compute_forces, conserved_energy, make_integrator
from md.metrics import (bond_lengths, distance_histogram, find_bonds, first_unstable_frame, force_errors, hr_mae,
                        max_bond_deviation)
from md.potential import ForceField
from md.state import make_state, maxwell_boltzmann_velocities, wrap_positions
from md.testing import lj_crystal, synthetic_frames


def ethanol():
    return molecule("CH3CH2OH")


def test_bonds_from_natural_cutoffs():
    a = ethanol()
    bonds = find_bonds(a.numbers, a.positions)
    sym = a.get_chemical_symbols()
    names = sorted("".join(sorted(sym[i] + sym[j])) for i, j in bonds)
    assert names == sorted(["CC", "CO", "HO"] + ["CH"] * 5)          # 8 covalent bonds, no 1-3 pairs
    assert np.all(bonds[:, 0] < bonds[:, 1])


def stretched_trajectory(n=30, start=12, rate=0.05):
    """Ethanol frames with small noise; from frame ``start`` the O–H bond stretches by ``rate`` Å per frame."""
    a = ethanol()
    rng = np.random.default_rng(0)
    traj = a.positions[None] + 0.01 * rng.standard_normal((n, len(a), 3))
    o, h = 2, 3                                                     # O and its H in ase's ethanol
    u = (a.positions[h] - a.positions[o]) / np.linalg.norm(a.positions[h] - a.positions[o])
    for k in range(start, n):
        traj[k, h] += rate * (k - start + 1) * u
    return a, traj


def test_stability_detects_stretched_bond():
    a, traj = stretched_trajectory()
    bonds = find_bonds(a.numbers, traj[0])
    ref = bond_lengths(traj[:10], bonds).mean(axis=0)
    dev = max_bond_deviation(traj, bonds, ref)
    assert dev[:12].max() < 0.1
    k = first_unstable_frame(traj, bonds, ref, threshold=0.5)
    # stretch 0.05 Å/frame from frame 12: > 0.5 Å first when 0.05 (k - 11) > 0.5 (+ noise) -> k = 22 or 21
    assert k in (21, 22) and dev[k] > 0.5 and dev[k - 1] <= 0.5
    assert first_unstable_frame(traj[:12], bonds, ref) is None
    bad = traj.copy()
    bad[5, 0] = np.nan                                               # NaN positions count as unstable
    assert first_unstable_frame(bad, bonds, ref) == 5


def test_analyze_replica_stability_time_and_stable_hr():
    a, traj = stretched_trajectory()
    frames = [Atoms(a.numbers, positions=x, info={"time_ps": 0.05 * k, "step": 100 * k}) for k, x in enumerate(traj)]
    reference = synthetic_frames("CH3CH2OH", n_frames=10, noise=0.01, seed=1)
    status = {"replica": 0, "reason": None, "stop_time_ps": None}
    r, h_ref = distance_histogram(np.stack([reference.frame_positions(f) for f in range(10)]))
    res = analyze_replica(frames, reference, status, 0.5, h_ref)
    k = res["n_stable_frames"]
    assert res["unstable"] and k in (21, 22)
    assert res["stability_ps"] == pytest.approx(0.05 * k)
    assert res["hr_mae"] == pytest.approx(hr_mae(distance_histogram(traj[:k])[1], h_ref))
    # never unstable -> the full length
    res = analyze_replica(frames[:12], reference, status, 0.5, h_ref)
    assert not res["unstable"] and res["stability_ps"] == pytest.approx(0.55)


def test_hr_matches_scipy_pdist():
    rng = np.random.default_rng(0)
    traj = rng.uniform(0, 9.0, size=(6, 12, 3))                     # some pairs beyond 10 Å
    r, h = distance_histogram(traj)
    d = np.concatenate([pdist(x) for x in traj])
    assert (d > 10).any()
    edges = np.linspace(0, 10, 501)
    expected, _ = np.histogram(d[d <= 10], bins=edges, density=True)
    np.testing.assert_allclose(h, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r, 0.5 * (edges[1:] + edges[:-1]))
    assert np.sum(h) * 0.02 == pytest.approx(1.0)


def test_hr_mae_definition():
    h1, h2 = np.zeros(500), np.zeros(500)
    h2[:50] = 0.3
    assert hr_mae(h1, h2) == pytest.approx(np.abs(h1 - h2).mean() * 10) == pytest.approx(0.3)


def test_force_mae_against_numpy():
    a = ethanol()
    truth = BondNetwork(a.numbers, a.positions, k=20.0)
    model = BondNetwork(a.numbers, a.positions, k=25.0)
    frames = synthetic_frames("CH3CH2OH", n_frames=7, noise=0.05, potential=truth)
    res = force_errors(ForceField(model), frames, batch_size=3)
    pred = model(torch.as_tensor(frames.numbers), torch.as_tensor(frames.positions),
                 torch.arange(7).repeat_interleave(len(a)))["forces"].detach().numpy()
    assert res["force_mae_meV_per_A"] == pytest.approx(1000 * np.abs(pred - frames.forces).mean(), rel=1e-10)
    assert res["force_mae_meV_per_A"] > 1.0
    assert force_errors(ForceField(truth), frames)["force_mae_meV_per_A"] < 1e-9


# ------------------------------------------------------------------------------------------- periodic
def test_wrap_positions_matches_ase():
    rng = np.random.default_rng(1)
    cell = np.array([[5.0, 0.0, 0.0], [1.0, 6.0, 0.0], [0.5, 0.7, 7.0]])
    pbc = np.array([True, True, False])
    pos = rng.uniform(-12, 12, size=(20, 3))
    ours = wrap_positions(torch.as_tensor(pos), torch.zeros(20, dtype=torch.long),
                          torch.as_tensor(cell)[None], torch.as_tensor(pbc)[None]).numpy()
    np.testing.assert_allclose(ours, ase_wrap(pos, cell, pbc, eps=0.0), atol=1e-10)


def test_periodic_lj_matches_ase_and_nve_wraps():
    atoms = lj_crystal(repeat=2, rattle=0.1)
    rc = 5.0                                                          # < half the 10.5 Å box
    calc = AseLJ(epsilon=0.0104, sigma=3.4, rc=rc, smooth=False)
    atoms.calc = calc
    ff = ForceField(LennardJones(0.0104, 3.4, rc))
    state = make_state([atoms.numbers], [atoms.positions], [atoms.cell.array], [atoms.pbc])
    state = compute_forces(state, ff)
    np.testing.assert_allclose(state.forces.numpy(), atoms.get_forces(), atol=1e-10)
    assert float(state.energy[0]) == pytest.approx(atoms.get_potential_energy(), abs=1e-10)

    v = maxwell_boltzmann_velocities(state.masses, state.batch, 1, 60.0, torch.Generator().manual_seed(0))
    state = replace(state, velocities=v)
    atoms.set_velocities(v.numpy() / units.fs)
    integ = make_integrator("nve", ff, 5.0, 60.0)
    state = integ.init(state)
    e0 = conserved_energy(state)
    crossed = False
    for _ in range(200):
        state = integ.step(state)
        frac = np.linalg.solve(atoms.cell.array.T, state.positions.numpy().T).T
        assert frac.min() >= 0 and frac.max() < 1                    # wrapped into the cell every step
    VelocityVerlet(atoms, timestep=5.0 * units.fs).run(200)           # ASE does not wrap
    crossed = not np.allclose(atoms.positions, atoms.get_positions(wrap=True))
    assert crossed, "test needs atoms that leave the cell"
    np.testing.assert_allclose(state.positions.numpy(), atoms.get_positions(wrap=True), atol=1e-7)
    assert abs(float(conserved_energy(state) - e0)) < 1e-3
