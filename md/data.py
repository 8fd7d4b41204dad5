"""Where MD gets its frames: rMD17 molecules (via ``forcefield.data.load_rmd17``) or a structure file.

- held-out frames (initial conditions, force MAE) = rMD17 ``split="test"``;
- reference frames (bond lengths, h(r)) = every frame of the dataset (``split="all"``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import MDInputError

def canonical_molecule(name: str) -> str:
    """Normalise an rMD17 molecule name (case, ``salicylic acid`` aliases) or raise a clear error."""
    from forcefield.data.rmd17 import canonical_molecule as _canonical
    try:
        return _canonical(name)
    except ValueError as exc:
        raise MDInputError(f"{exc}; or pass --structure FILE (with --model) for your own system") from None


def load_frames(molecule: str, split: str = "test", data_dir=None, split_index: int = 1):
    """rMD17 frames of ``molecule`` as a ``forcefield.data.ConformationSet``."""
    molecule = canonical_molecule(molecule)
    try:
        from forcefield.data import load_rmd17
    except ImportError as exc:
        raise MDInputError(f"cannot import forcefield.data.load_rmd17 ({exc}); install the oreo package "
                           f"(pip install -e .)") from exc
    data_dir = data_dir if data_dir is not None else os.environ.get("OREO_DATA_DIR")
    try:
        return load_rmd17(molecule, split=split, split_index=split_index, data_dir=data_dir)
    except FileNotFoundError as exc:
        raise MDInputError(f"rMD17 data for '{molecule}' not found ({exc}); pass --data-dir DIR or set "
                           f"OREO_DATA_DIR to the folder holding rmd17/") from exc
    except ValueError as exc:
        raise MDInputError(f"cannot load rMD17 '{molecule}' ({split} split {split_index}): {exc}") from exc


def frames_from_file(path) -> "object":
    """Every frame of an ASE-readable structure file as a ``ConformationSet`` (cell/pbc kept)."""
    from ase.io import read
    from forcefield.data.conformations import ConformationSet

    path = Path(path)
    if not path.is_file():
        raise MDInputError(f"structure file '{path}' does not exist; pass an ASE-readable file "
                           f"(e.g. .xyz/.extxyz/.cif/.traj) to --structure")
    try:
        images = read(str(path), index=":")
    except Exception as exc:  # ase raises many types for unreadable files
        raise MDInputError(f"cannot read structure file '{path}' with ase.io.read: {exc}") from exc
    if not images:
        raise MDInputError(f"structure file '{path}' holds no frames")
    counts = np.array([len(a) for a in images])
    periodic = any(a.pbc.any() for a in images)
    energy = forces = None
    try:
        energy = np.array([a.get_potential_energy() for a in images])
        forces = np.concatenate([a.get_forces() for a in images])
    except Exception:
        energy = forces = None
    return ConformationSet(
        numbers=np.concatenate([a.numbers for a in images]),
        positions=np.concatenate([a.positions for a in images]),
        ptr=np.concatenate([[0], np.cumsum(counts)]),
        energy=energy, forces=forces,
        cell=np.stack([a.cell.array for a in images]) if periodic else None,
        pbc=np.stack([a.pbc for a in images]) if periodic else None,
        source=str(path))


def same_molecule(frames, numbers: np.ndarray) -> np.ndarray:
    """Indices of the frames of ``frames`` whose atomic numbers equal ``numbers`` (n,)."""
    n = len(numbers)
    keep = [f for f in range(len(frames)) if frames.ptr[f + 1] - frames.ptr[f] == n
            and np.array_equal(frames.frame_numbers(f), numbers)]
    return np.asarray(keep, dtype=np.int64)


def frame_stack(frames, idx: Optional[np.ndarray] = None) -> np.ndarray:
    """Positions of frames that share one atom count as an array (F, n, 3)."""
    idx = np.arange(len(frames)) if idx is None else np.asarray(idx)
    return np.stack([frames.frame_positions(int(f)) for f in idx]) if len(idx) else np.zeros((0, 0, 3))
