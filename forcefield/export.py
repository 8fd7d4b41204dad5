"""TorchScript export: one file that loads with ``torch.jit.load`` in a Python that has only torch.

The scripted module is the :class:`~forcefield.potential.Potential` itself (ZBL repulsion and input checks
included), so its numbers equal the eager model's. Call signature::

    module = torch.jit.load("aspirin_ts.pt")
    out = module(numbers, positions)                        # one structure
    out = module(numbers, positions, batch, cell, pbc)      # a batch / periodic cells

    numbers    (N,)       int64   atomic numbers
    positions  (N, 3)     Å       float32 or float64 (``torch.tensor(atoms.positions)`` is float64): cast
                                  to the export's dtype inside
    batch      (N,)       int64   structure index 0..B-1 of each atom; None: one structure
    cell       (B, 3, 3)  Å       lattice vectors as rows (any float dtype); None: no cell
    pbc        (B, 3)     bool    periodic directions; None: not periodic
    returns {"energy": (B,) eV float64 (reference energies included),
             "forces": (N, 3) eV/Å in the dtype of ``positions``}

Forces are -dE/dr by autograd inside: call it with gradients enabled (not under ``torch.no_grad()``).
Atoms closer than 0.1 Å, elements the model was not trained on and NaN positions raise an error naming
the problem. The arithmetic runs in the export's dtype (``metadata["export_dtype"]``, float32 by default).
The same description, units, training data and hyperparameters are in ``module.metadata_json`` and in the
file's extra entry ``oreo_metadata.json`` (:func:`read_export_metadata`). An export holds one model: exporting a
committee raises an error that says so (export its members one by one).
"""
import copy
import json
from pathlib import Path
from typing import Optional, Union

import torch

from .version import __version__
from .committee import refuse_export
from .files import atomic_torch_save
from .io import cast_potential, load_potential
from .potential import Potential

EXPORT_FORMAT = "oreo-torchscript"
EXPORT_FORMAT_VERSION = 1
#: what the export's metadata says about calling it (the module docstring in words)
EXPORT_SIGNATURE = {
    "call": "module(numbers, positions, batch=None, cell=None, pbc=None) -> {'energy', 'forces'}",
    "inputs": {"numbers": "(N,) int64 atomic numbers",
               "positions": "(N, 3) Å, float32 or float64 (cast to export_dtype inside)",
               "batch": "(N,) int64 structure index 0..B-1, or None for one structure",
               "cell": "(B, 3, 3) Å lattice vectors as rows, or None",
               "pbc": "(B, 3) bool periodic directions, or None"},
    "outputs": {"energy": "(B,) eV float64, reference energies included",
                "forces": "(N, 3) eV/Å in the dtype of positions (-dE/dr by autograd: call with gradients "
                          "enabled)"},
    "units": {"energy": "eV", "length": "Å", "forces": "eV/Å"},
}


def export_torchscript(model: Union[str, Path, torch.nn.Module], out: Union[str, Path],
                       dtype: Optional[torch.dtype] = torch.float32) -> Path:
    """Script a potential (or a model file / checkpoint path) and save it atomically to ``out``.

    A committee (:mod:`forcefield.committee`) is refused with a ValueError: an export holds one model (export
    each member instead, or use the committee file itself, which gives the spread too)."""
    if isinstance(model, (str, Path)):
        pot = load_potential(model, dtype=dtype)
    else:  # never change the caller's module
        pot = cast_potential(copy.deepcopy(model), "cpu", dtype)
    refuse_export(pot, "TorchScript")
    if not isinstance(pot, Potential):      # a TorchScript or AOTInductor export: its maker's dtype and build
        raise ValueError(f"{model if isinstance(model, (str, Path)) else type(model).__name__} is already an export "
                         f"({type(pot).__name__}); export from the oreo model file it was made from")
    pot = pot.eval()
    pot.set_metadata(export_format=EXPORT_FORMAT, export_format_version=EXPORT_FORMAT_VERSION,
                     export_dtype=str(pot.scale.dtype).replace("torch.", ""), oreo_version=__version__,
                     repulsion=pot.config.get("repulsion"), **EXPORT_SIGNATURE)
    scripted = torch.jit.script(pot)
    extra = {"oreo_metadata.json": scripted.metadata_json}
    return atomic_torch_save(scripted, out, jit=True, _extra_files=extra)


def read_export_metadata(path: Union[str, Path]) -> dict:
    extra = {"oreo_metadata.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["oreo_metadata.json"] or "{}")
