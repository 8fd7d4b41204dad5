"""torch-sim adapter (forcefield/torchsim.py): the same energies and forces as oreo, batched, periodic, MD runs and
conserves energy, clear errors for stress and for a missing torch-sim."""
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ts = pytest.importorskip("torch_sim")

from forcefield import OreoCalculator  # noqa: E402
from forcefield.data import load_rmd17  # noqa: E402
from forcefield.io import load_potential  # noqa: E402
from forcefield.torchsim import NoStressError, OreoModel  # noqa: E402

RMD17 = Path(os.environ["OREO_DATA_DIR"]) / "rmd17"
pytestmark = pytest.mark.skipif(not all((RMD17 / f"rmd17_{m}_test_01.npz").is_file() for m in ("ethanol", "aspirin")),
                                reason=f"rMD17 ethanol/aspirin test files not found under {RMD17}")


def frames(molecule, n):
    cs = load_rmd17(molecule, "test", 1)
    return [cs.to_atoms(f) for f in range(n)]


@pytest.fixture(scope="module")
def ethanol64():
    return OreoModel("ethanol", dtype=torch.float64)


def test_energies_and_forces_equal_oreos_own(ethanol64):
    """A batch of 3 rMD17 frames: the adapter gives what the potential gives on each frame alone (float64: to
    rounding) and what the ASE calculator gives (float32, the default)."""
    atoms = frames("ethanol", 3)
    assert ethanol64.dtype == torch.float64 and ethanol64.device == torch.device("cpu")
    assert not ethanol64.compute_stress and ethanol64.compute_forces
    state = ts.io.atoms_to_state(atoms, ethanol64.device, ethanol64.dtype)
    out = ethanol64(state)
    assert out["energy"].shape == (3,) and out["forces"].shape == (27, 3)
    assert out["energy"].dtype == out["forces"].dtype == torch.float64
    pot = load_potential("ethanol", dtype=torch.float64)
    for i, a in enumerate(atoms):
        ref = pot(torch.as_tensor(a.numbers), torch.as_tensor(a.positions))
        assert float(out["energy"][i]) == pytest.approx(float(ref["energy"]), abs=1e-8)
        torch.testing.assert_close(out["forces"][9 * i:9 * (i + 1)], ref["forces"], atol=1e-9, rtol=0)
    # the energies are oreo's trained ones (reference energies included): near the DFT labels
    np.testing.assert_allclose(out["energy"].numpy(), [a.get_potential_energy() for a in atoms], atol=0.1)

    model32 = OreoModel("ethanol")                                     # float32, like OreoCalculator's default
    assert model32.dtype == torch.float32
    out32 = model32(ts.io.atoms_to_state(atoms, model32.device, model32.dtype))
    assert out32["forces"].dtype == torch.float32
    calc = OreoCalculator("ethanol")
    for i, a in enumerate(atoms):
        a = a.copy()
        a.calc = calc
        assert float(out32["energy"][i]) == pytest.approx(a.get_potential_energy(), abs=2e-3)   # float32 totals
        np.testing.assert_allclose(out32["forces"][9 * i:9 * (i + 1)].numpy(), a.get_forces(), atol=1e-5)


def test_loaded_potential_and_state_dict_are_accepted(ethanol64):
    pot = load_potential("ethanol", dtype=torch.float64)
    model = OreoModel(pot)
    assert model.potential is pot and model.dtype == torch.float64        # a module keeps its own dtype
    atoms = frames("ethanol", 2)
    state = ts.io.atoms_to_state(atoms, model.device, model.dtype)
    as_dict = {"positions": state.positions, "cell": state.cell, "pbc": state.pbc,
               "atomic_numbers": state.atomic_numbers, "system_idx": state.system_idx}
    torch.testing.assert_close(model(as_dict)["forces"], ethanol64(state)["forces"], atol=0, rtol=0)
    energy_only = OreoModel(pot, compute_forces=False)(state)
    assert "forces" not in energy_only and torch.equal(energy_only["energy"], ethanol64(state)["energy"])
    model32 = OreoModel(pot, dtype=torch.float32)                       # cast on a copy
    assert model32.potential is not pot and pot.scale.dtype == torch.float64
    assert model32.potential.scale.dtype == torch.float32 and model32.potential.atomref.dtype == torch.float64


def test_two_molecules_in_one_state_equal_separate_states():
    model = OreoModel("aspirin", dtype=torch.float64)
    eth, asp = frames("ethanol", 1)[0], frames("aspirin", 1)[0]
    both = model(ts.io.atoms_to_state([asp, eth], model.device, model.dtype))
    apart = [model(ts.io.atoms_to_state([a], model.device, model.dtype)) for a in (asp, eth)]
    assert both["energy"].shape == (2,)
    for i in range(2):
        assert float(both["energy"][i]) == pytest.approx(float(apart[i]["energy"][0]), abs=1e-8)
    torch.testing.assert_close(both["forces"], torch.cat([apart[0]["forces"], apart[1]["forces"]]), atol=1e-9,
                               rtol=0)


def test_periodic_box_larger_than_the_cutoff_changes_nothing(ethanol64):
    atoms = frames("ethanol", 2)
    free = ethanol64(ts.io.atoms_to_state(atoms, ethanol64.device, ethanol64.dtype))
    for a in atoms:
        a.cell = [[16.0, 0.0, 0.0], [1.0, 16.0, 0.0], [0.0, 0.0, 16.0]]      # images > 10 Å apart: beyond 5 Å
        a.pbc = True
        a.positions += 3.0                       # no wrapping needed: each atom stays inside one image
    boxed = ethanol64(ts.io.atoms_to_state(atoms, ethanol64.device, ethanol64.dtype))
    torch.testing.assert_close(boxed["energy"], free["energy"], atol=1e-8, rtol=0)
    torch.testing.assert_close(boxed["forces"], free["forces"], atol=1e-9, rtol=0)


class _FlippedForces(torch.nn.Module):
    """The adapter with the sign of its forces flipped: the NVE test must catch it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.device, self.dtype = model.device, model.dtype

    def forward(self, state):
        out = self.model(state)
        return {"energy": out["energy"], "forces": -out["forces"]}


def _nve_total_energy(model, atoms, steps=20):
    metal = ts.units.MetalUnits
    init, update = ts.nve(model=model, dt=torch.tensor(0.25e-3 * metal.time, dtype=torch.float64),
                          kT=torch.tensor(300.0 * metal.temperature, dtype=torch.float64), seed=0)
    state = init(ts.io.atoms_to_state(atoms, model.device, model.dtype))
    totals, potentials = [], []
    for _ in range(steps):
        state = update(state)
        kinetic = ts.calc_kinetic_energy(masses=state.masses, momenta=state.momenta, system_idx=state.system_idx)
        totals.append(state.energy + kinetic)
        potentials.append(state.energy)
    return torch.stack(totals), torch.stack(potentials)


def test_nve_in_torch_sim_conserves_energy_and_a_flipped_force_sign_does_not(ethanol64):
    """20 velocity-Verlet steps of 0.25 fs (torch-sim's nve), 2 ethanol frames at 300 K, float64."""
    atoms = frames("ethanol", 2)
    total, potential = _nve_total_energy(ethanol64, atoms)
    drift = (total - total[0]).abs().max()
    moved = (potential - potential[0]).abs().max()
    assert torch.isfinite(total).all()
    assert drift < 2e-3, f"total energy drifted by {float(drift):.2e} eV"
    assert moved > 10 * 2e-3                  # the potential energy did change: conservation is not trivial
    bad_total, _ = _nve_total_energy(_FlippedForces(ethanol64), atoms)
    assert (bad_total - bad_total[0]).abs().max() > 10 * 2e-3


def test_integrate_runs_langevin_md_on_shipped_model():
    model = OreoModel("ethanol")                                          # float32, the default
    final = ts.integrate(system=frames("ethanol", 2), model=model, integrator=ts.nvt_langevin, n_steps=10,
                         temperature=300.0, timestep=0.0005)
    assert final.n_systems == 2 and final.positions.dtype == torch.float32
    assert torch.isfinite(final.positions).all() and torch.isfinite(final.energy).all()


def test_stress_is_refused_with_the_fix(ethanol64):
    with pytest.raises(NotImplementedError, match="fixed-cell"):
        OreoModel("ethanol", compute_stress=True)
    with pytest.raises(NotImplementedError, match="fixed-cell"):
        ethanol64.compute_stress = True
    out = ethanol64(ts.io.atoms_to_state(frames("ethanol", 1), ethanol64.device, ethanol64.dtype))
    with pytest.raises(NoStressError, match="nvt_langevin"):
        out["stress"]                                      # what NPT integrators and cell optimizers ask for


def test_missing_torch_sim_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_sim", None)                   # import torch_sim -> ImportError
    monkeypatch.delitem(sys.modules, "forcefield.torchsim")
    with pytest.raises(ImportError, match=r'pip install "oreo\[torchsim\]"'):
        importlib.import_module("forcefield.torchsim")
    import forcefield
    assert forcefield.OreoCalculator is OreoCalculator                    # the rest of oreo does not need it
