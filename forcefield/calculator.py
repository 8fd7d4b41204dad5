"""ASE calculator: ``atoms.calc = OreoCalculator("aspirin.pt")``. Knows nothing of training."""
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .io import load_potential

DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
          torch.float64: torch.float64}


class OreoCalculator(Calculator):
    """Energy (eV) and forces (eV/Å) from an oreo potential.

    Args:
        model: path to a model file, training checkpoint or TorchScript export, or the name of a shipped
            model ("aspirin" / "aspirin.pt"), or an already loaded potential module.
        device: "cpu", "cuda", ...
        dtype: "float32" (default, fast) or "float64".
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model: Union[str, Path, torch.nn.Module] = "aspirin", device: str = "cpu",
                 dtype: Union[str, torch.dtype] = "float32", **kwargs):
        super().__init__(**kwargs)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device)
        if isinstance(model, torch.nn.Module):
            self.potential = model.to(self.device).eval()
        else:
            self.potential = load_potential(model, device=self.device, dtype=self.dtype)
        self.cutoff = float(self.potential.cutoff)

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
            out = self.potential(numbers, positions, batch, cell, pbc)
        energy = float(out["energy"].detach().double().sum())
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": out["forces"].detach().double().cpu().numpy()}
