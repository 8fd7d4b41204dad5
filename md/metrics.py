"""MD observables and error metrics (MDsim definitions). Pure numpy/torch functions.

Shapes: a trajectory is ``traj`` (T, n, 3) Å (T frames of one system with n atoms);
``bonds`` (M, 2) int atom pairs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from forcefield.evaluate import mae_rmse

HR_RMAX = 10.0   #: Å, upper edge of the h(r) histogram
HR_BINS = 500    #: number of h(r) bins on (0, HR_RMAX]


# ---------------------------------------------------------------------------------- bonds
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
    from forcefield.graph import minimum_image
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


# ---------------------------------------------------------------------------------- h(r)
def hr_bins(rmax: float = HR_RMAX, n_bins: int = HR_BINS) -> np.ndarray:
    """Bin edges (n_bins + 1,) on [0, rmax]."""
    return np.linspace(0.0, rmax, n_bins + 1)


def pair_distances(traj: np.ndarray, cell=None, pbc=None) -> np.ndarray:
    """All distinct pair distances (T * n(n-1)/2,) of a trajectory (T, n, 3), minimum image
    when periodic."""
    traj = np.asarray(traj, dtype=np.float64)
    n = traj.shape[1]
    i, j = np.triu_indices(n, 1)
    if cell is None or pbc is None or not np.any(pbc):
        x = torch.as_tensor(traj)
        d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")[:, i, j]
        return d.reshape(-1).numpy()
    from ase.geometry import get_distances
    return np.concatenate([get_distances(x, cell=cell, pbc=pbc)[1][i, j] for x in traj])


def distance_histogram(traj: np.ndarray, rmax: float = HR_RMAX, n_bins: int = HR_BINS,
                       cell=None, pbc=None, chunk: int = 2000) -> Tuple[np.ndarray, np.ndarray]:
    """h(r): normalised histogram (density=True) of all pair distances in ``traj`` (T, n, 3)
    on ``n_bins`` bins over (0, rmax] Å. Returns ``(bin centres (n_bins,), h (n_bins,))``;
    ``h`` is all zeros when no distance falls in range."""
    edges = hr_bins(rmax, n_bins)
    counts = np.zeros(n_bins, dtype=np.float64)
    traj = np.asarray(traj, dtype=np.float64)
    for s in range(0, len(traj), chunk):
        d = pair_distances(traj[s:s + chunk], cell, pbc)
        d = d[(d > 0) & (d <= rmax)]
        counts += np.histogram(d, bins=edges)[0]
    total = counts.sum()
    h = counts / (total * np.diff(edges)) if total > 0 else counts
    return 0.5 * (edges[1:] + edges[:-1]), h


def hr_mae(h_model: np.ndarray, h_ref: np.ndarray, rmax: float = HR_RMAX) -> float:
    """MDsim's h(r) MAE: ``mean |h_model − h_ref| × rmax`` (dimensionless)."""
    return float(np.abs(np.asarray(h_model) - np.asarray(h_ref)).mean() * rmax)


# ---------------------------------------------------------------------------------- forces
def force_errors(forcefield, frames, indices=None, batch_size: int = 64, device="cpu") -> dict:
    """Force MAE/RMSE (meV/Å) of ``forcefield`` (a :class:`~md.potential.ForceField`) against the
    reference forces of ``frames`` (a ConformationSet with forces), evaluated in batches."""
    if frames.forces is None:
        raise ValueError(f"frames '{frames.source}' carry no reference forces")
    idx = np.arange(len(frames)) if indices is None else np.asarray(indices, dtype=np.int64)
    errors = []
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        b = frames.collate(chunk, dtype=torch.float64, device=device)
        _, f = forcefield(b.positions, b.numbers, b.batch, len(chunk), b.cell, b.pbc)
        errors.append((f - b.forces).reshape(-1).cpu().numpy())
    if not errors:
        raise ValueError("no frames to evaluate the force error on")
    mae, rmse = mae_rmse(np.concatenate(errors))
    return {"force_mae_meV_per_A": mae, "force_rmse_meV_per_A": rmse, "n_frames": int(len(idx))}
