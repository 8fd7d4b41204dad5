"""ASE calculator: ``atoms.calc = OreoCalculator("aspirin.pt")``. Knows nothing of training."""
import copy
from pathlib import Path
from typing import Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .committee import SPREAD_PROPERTIES, is_committee
from .devices import resolve_device
from .io import cast_potential, load_potential

DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
          torch.float64: torch.float64}


class OreoCalculator(Calculator):
    """Energy (eV) and forces (eV/Å) from an oreo potential.

    Args:
        model: path to a model file, training checkpoint or TorchScript export, or the name of a shipped
            model ("aspirin" / "aspirin.pt"), or an already loaded potential module.
        device: "cpu", "cuda", ...
        dtype: "float32" (default, fast) or "float64".

    Uncertainty: when the model is a committee (a file written by ``oreo committee`` /
    :func:`forcefield.committee.save_committee`, or a :class:`~forcefield.committee.Committee`), ``energy`` and
    ``forces`` are the committee means and ``implemented_properties`` gains, filled in ``results`` by every
    calculation (conventions: :mod:`forcefield.committee`):

    - ``energy_std``: float, eV, the standard deviation of the members' energies (over the members, divided by
      their number, not by one less);
    - ``forces_std``: (n, 3) array, eV/Å, the same per atom and Cartesian component;
    - ``forces_std_max``: float, eV/Å, the largest per-atom norm of ``forces_std`` (the active-learning criterion).

    For a single model these keys are absent (not zero): ``"forces_std" in calc.implemented_properties`` says
    whether the model gives a spread, and ``calc.get_property("forces_std")`` raises for a single model.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model: Union[str, Path, torch.nn.Module] = "aspirin", device: str = "cpu",
                 dtype: Union[str, torch.dtype] = "float32", **kwargs):
        super().__init__(**kwargs)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.device = resolve_device(device, "device")
        if isinstance(model, torch.nn.Module):   # a copy in the asked dtype: the caller's module stays as it is
            self.potential = cast_potential(copy.deepcopy(model), self.device, self.dtype).eval()
        else:
            self.potential = load_potential(model, device=self.device, dtype=self.dtype)
        self.cutoff = float(self.potential.cutoff)
        self.committee = is_committee(self.potential)
        if self.committee:   # an instance attribute: ASE checks it before every get_property
            self.implemented_properties = list(type(self).implemented_properties) + list(SPREAD_PROPERTIES)

    def check_state(self, atoms, tol=1e-15):
        """What changed since the last calculation: ASE's rule with exact array comparisons.

        ASE's ``compare_atoms`` runs ``np.isclose`` on every array, about 0.2 ms a call and several calls per
        MD step (about 0.6 ms of a 7 ms step of the compiled aspirin model, by cProfile). ``np.array_equal`` gives the same list,
        except that changes below ASE's 1e-15 tolerance also count (a recomputation, never a stale result).
        """
        old = self.atoms
        if old is None or tol > 1e-15:
            return super().check_state(atoms, tol)
        props = set(all_changes) - set(self.ignored_changes)
        changes = [p for p in ("cell", "pbc") if p in props
                   and not np.array_equal(np.asarray(getattr(old, p)), np.asarray(getattr(atoms, p)))]
        a1, a2 = old.arrays, atoms.arrays
        changes += [p for p in all_changes if p in props and (p in a1) != (p in a2)]
        changes += [p for p in all_changes if p in props and p in a1 and p in a2
                    and not np.array_equal(a1[p], a2[p])]
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        numbers = torch.as_tensor(a.numbers, dtype=torch.long, device=self.device)
        positions = torch.as_tensor(np.asarray(a.positions), dtype=self.dtype, device=self.device)
        cell = pbc = None
        if a.pbc.any():
            cell = torch.as_tensor(np.asarray(a.cell[:]), dtype=self.dtype, device=self.device).unsqueeze(0)
            pbc = torch.as_tensor(a.pbc, dtype=torch.bool, device=self.device).unsqueeze(0)
        batch = torch.zeros(len(a), dtype=torch.long, device=self.device)
        with torch.enable_grad():
            if self.committee:
                out = self.potential.energy_forces_spread(numbers, positions, batch, cell, pbc)
            else:
                out = self.potential(numbers, positions, batch, cell, pbc)
        energy = float(out["energy"].detach().double().sum())
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": out["forces"].detach().double().cpu().numpy()}
        if self.committee:
            self.results.update(energy_std=float(out["energy_std"].detach().double().sum()),
                                forces_std=out["forces_std"].detach().double().cpu().numpy(),
                                forces_std_max=float(out["forces_std_max"].detach().double().max()))
