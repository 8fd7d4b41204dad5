"""Where MD gets its frames: rMD17 molecules (via ``forcefield.data.load_rmd17``), oreo-poly24 polymers
(:mod:`md.poly24`) or a structure file; and the reference geometry the stability criterion compares with.

- held-out frames (initial conditions, force MAE) = rMD17 ``split="test"``;
- reference frames (bond lengths, h(r)) = every distinct frame of the 10 published split files
  (``split="distinct"``, 9,633 per molecule).

:func:`load_system_frames` is the one entry point: the simulation and the analysis both call it.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

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
    from forcefield.data.ase_reader import read_structures
    from forcefield.data.conformations import ConformationSet

    try:
        images = read_structures(path)
    except (FileNotFoundError, ValueError) as exc:
        raise MDInputError(f"--structure: {exc}") from None
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


def load_system_frames(config):
    """``(held_out, reference)`` ConformationSets of a :class:`~md.config.SimulationConfig`: rMD17 test split and
    every distinct frame of the molecule; poly24 test split of the polymer and its test frames at the simulation
    temperature (:mod:`md.poly24`); or every frame of ``config.structure`` for both."""
    if config.structure:
        frames = frames_from_file(config.structure)
        return frames, frames
    if config.polymer:
        from .poly24 import load_polymer_frames
        return load_polymer_frames(config.polymer, config.temperature, config.poly24_dir, config.data_dir)
    held_out = load_frames(config.molecule, "test", config.data_dir, config.split_index)
    reference = load_frames(config.molecule, "distinct", config.data_dir, config.split_index)
    return held_out, reference


def describe_frames(config, held_out, reference) -> Dict[str, str]:
    """Which frames a run starts from / compares with, in words (for the log and summary.json)."""
    if config.structure:
        text = f"every frame of {config.structure} ({len(reference)} frames)"
        return {"held_out": text, "reference": text}
    if config.molecule:
        return {"held_out": f"rMD17 {config.molecule} test split {config.split_index} ({len(held_out)} frames)",
                "reference": f"rMD17 {config.molecule}, every distinct frame of the 10 split files "
                             f"({len(reference)} frames)"}
    return {"held_out": str(held_out.meta.get("md_held_out", f"{len(held_out)} held-out frames")),
            "reference": str(reference.meta.get("md_reference", f"{len(reference)} reference frames"))}


def reference_bonds(numbers: np.ndarray, first_positions: np.ndarray, reference, cell=None, pbc=None):
    """Bonds (M, 2) of a replica's first frame and their mean length (M,) over the reference
    frames of the same molecule (ASE natural cutoffs, MDsim's definition)."""
    from .metrics import bond_lengths, find_bonds
    bonds = find_bonds(numbers, first_positions, cell, pbc)
    idx = same_molecule(reference, numbers)
    if len(idx) == 0:
        raise MDInputError("no reference frame has the same atoms (in the same order) as the simulated system; "
                           "reference frames must be the same molecule")
    if len(bonds) == 0:
        return bonds, np.zeros(0)
    ref_cell = None if reference.cell is None else reference.cell[idx[0]]
    ref_pbc = None if reference.pbc is None else reference.pbc[idx[0]]
    lengths = bond_lengths(frame_stack(reference, idx), bonds, ref_cell, ref_pbc)
    return bonds, lengths.mean(axis=0)
