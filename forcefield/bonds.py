"""Bonds of a molecule and how far a structure strays from them: MDsim's stability criterion, in one place.

``find_bonds`` takes ASE's natural cutoffs (MDsim's definition); ``max_bond_deviation`` is the largest |bond
length - reference length| per frame. Used by the MD harness (``md.metrics`` re-exports these) and ``oreo fit``'s
committee MD. Shapes: a trajectory ``traj`` (T, n, 3) Å; ``bonds`` (M, 2) int atom pairs, ``i < j``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["find_bonds", "bond_lengths", "max_bond_deviation", "first_unstable_frame"]


def find_bonds(numbers: np.ndarray, positions: np.ndarray, cell: Optional[np.ndarray] = None,
               pbc: Optional[np.ndarray] = None) -> np.ndarray:
    """Bonded pairs (M, 2), ``i < j``, from ASE natural cutoffs on one frame.

    As MDsim: ``NeighborList(natural_cutoffs(atoms), self_interaction=False)`` with ASE's default
    skin (0.3 Å added to each radius), so a pair is bonded when
    ``d < r_cov(i) + r_cov(j) + 0.6 Å``. Periodic images are folded onto the same pair.
    """
    from ase import Atoms
    from ase.neighborlist import NeighborList, natural_cutoffs

    atoms = Atoms(numbers=np.asarray(numbers), positions=np.asarray(positions, dtype=np.float64))
    if cell is not None:
        atoms.cell = np.asarray(cell)
        atoms.pbc = np.zeros(3, bool) if pbc is None else np.asarray(pbc, bool)
    nl = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=False)
    nl.update(atoms)
    i, j = nl.get_connectivity_matrix(sparse=False).nonzero()
    pairs = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist()) if a != b}
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def _mic(d: np.ndarray, cell: Optional[np.ndarray], pbc: Optional[np.ndarray]) -> np.ndarray:
    """Minimum-image vectors (..., 3) for a (3, 3) cell (:func:`forcefield.graph.minimum_image`; exact for
    vectors shorter than half the cell width, which holds for bonds)."""
    if cell is None or pbc is None or not np.any(pbc):
        return d
    from .graph import minimum_image
    flat = torch.as_tensor(np.asarray(d, dtype=np.float64).reshape(-1, 3))
    out = minimum_image(flat, torch.as_tensor(np.asarray(cell, dtype=np.float64)),
                        torch.as_tensor(np.asarray(pbc, dtype=bool)))
    return out.numpy().reshape(np.shape(d))


def bond_lengths(traj: np.ndarray, bonds: np.ndarray, cell: Optional[np.ndarray] = None,
                 pbc: Optional[np.ndarray] = None) -> np.ndarray:
    """Bond lengths (T, M) Å of ``bonds`` (M, 2) in every frame of ``traj`` (T, n, 3)."""
    traj = np.asarray(traj, dtype=np.float64)
    bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    d = traj[:, bonds[:, 1]] - traj[:, bonds[:, 0]]
    return np.linalg.norm(_mic(d, cell, pbc), axis=-1)


def max_bond_deviation(traj: np.ndarray, bonds: np.ndarray, reference: np.ndarray,
                       cell=None, pbc=None) -> np.ndarray:
    """Per frame (T,) max over bonds of |length − reference length| in Å (0 with no bonds;
    +inf for frames with non-finite positions)."""
    traj = np.asarray(traj, dtype=np.float64)
    if len(bonds) == 0:
        dev = np.zeros(len(traj))
    else:
        dev = np.abs(bond_lengths(traj, bonds, cell, pbc) - np.asarray(reference)[None]).max(axis=1)
    return np.where(np.isfinite(dev), dev, np.inf)


def first_unstable_frame(traj: np.ndarray, bonds: np.ndarray, reference: np.ndarray,
                         threshold: float = 0.5, cell=None, pbc=None) -> Optional[int]:
    """Index of the first frame whose max bond deviation exceeds ``threshold`` Å, or ``None``."""
    bad = np.nonzero(max_bond_deviation(traj, bonds, reference, cell, pbc) > threshold)[0]
    return int(bad[0]) if len(bad) else None
