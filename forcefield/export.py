"""TorchScript export: one file that loads with ``torch.jit.load`` in a Python that has only torch.

The scripted module is the :class:`~forcefield.potential.Potential` itself, so its numbers equal the
eager model's. Call it as ``module(numbers, positions)`` or ``module(numbers, positions, batch, cell, pbc)``;
it returns ``{"energy": (B,) eV float64, "forces": (N, 3) eV/Å}``. Units, training data and hyperparameters
are in ``module.metadata_json`` and in the file's extra entry ``oreo_metadata.json``.
"""
import copy
import json
from pathlib import Path
from typing import Optional, Union

import torch

from . import __version__
from .io import atomic_torch_save, cast_potential, load_potential

EXPORT_FORMAT = "oreo-torchscript"
EXPORT_FORMAT_VERSION = 1


def export_torchscript(model: Union[str, Path, torch.nn.Module], out: Union[str, Path],
                       dtype: Optional[torch.dtype] = torch.float32) -> Path:
    """Script a potential (or a model file / checkpoint path) and save it atomically to ``out``."""
    if isinstance(model, (str, Path)):
        pot = load_potential(model, dtype=dtype)
    else:  # never change the caller's module
        pot = cast_potential(copy.deepcopy(model), "cpu", dtype)
    pot = pot.eval()
    if isinstance(pot, torch.jit.ScriptModule):
        scripted = pot
    else:
        pot.set_metadata(export_format=EXPORT_FORMAT, export_format_version=EXPORT_FORMAT_VERSION,
                         export_dtype=str(dtype).replace("torch.", ""), oreo_version=__version__,
                         call="module(numbers[N] int64, positions[N,3] Å, batch[N]=None, cell[B,3,3]=None, "
                              "pbc[B,3]=None) -> {'energy': [B] eV, 'forces': [N,3] eV/Å}")
        scripted = torch.jit.script(pot)
    extra = {"oreo_metadata.json": scripted.metadata_json}
    return atomic_torch_save(scripted, out, jit=True, _extra_files=extra)


def read_export_metadata(path: Union[str, Path]) -> dict:
    extra = {"oreo_metadata.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["oreo_metadata.json"] or "{}")
