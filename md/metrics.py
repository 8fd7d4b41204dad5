"""MD observables and error metrics (MDsim definitions). Pure numpy/torch functions.

The bond criterion (``find_bonds``, ``bond_lengths``, ``max_bond_deviation``, ``first_unstable_frame``) lives in
:mod:`forcefield.bonds` (``oreo fit`` uses it too) and is re-exported here.

Shapes: a trajectory is ``traj`` (T, n, 3) Å (T frames of one system with n atoms);
``bonds`` (M, 2) int atom pairs.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from forcefield.bonds import bond_lengths, find_bonds, first_unstable_frame, max_bond_deviation  # noqa: F401
from forcefield.evaluate import mae_rmse

__all__ = ["HR_RMAX", "HR_BINS", "hr_bins", "pair_distances", "distance_histogram", "hr_mae", "force_errors",
           "find_bonds", "bond_lengths", "max_bond_deviation", "first_unstable_frame", "speed_record",
           "timed_by_device"]

HR_RMAX = 10.0   #: Å, upper edge of the h(r) histogram
HR_BINS = 500    #: number of h(r) bins on (0, HR_RMAX]


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


# ---------------------------------------------------------------------------------- speed
def speed_record(wall_s: float, timed_steps: int, replicas: int, timestep_fs: float) -> dict:
    """Steps per second (all replicas in one batch), replica-steps per second and ns/day of the timed steps;
    None (printed "n/a") when no step was timed."""
    wall_s, timed_steps = float(wall_s or 0.0), int(timed_steps or 0)
    if timed_steps <= 0 or wall_s <= 0:
        return {"steps_per_s": None, "replica_steps_per_s": None, "ns_per_day": None, "wall_s": wall_s,
                "timed_steps": timed_steps}
    rate = timed_steps / wall_s
    return {"steps_per_s": rate, "replica_steps_per_s": rate * replicas,
            "ns_per_day": rate * timestep_fs * 86400.0 / 1e6, "wall_s": wall_s, "timed_steps": timed_steps}


def timed_by_device(ckpt: dict) -> dict:
    """A run checkpoint's timing per device type, ``{"cpu": [seconds, steps], ...}``; one written before the
    split had one device, the one its config names."""
    by = ckpt.get("timed_by_device")
    if by:
        return {k: [float(v[0]), int(v[1])] for k, v in by.items()}
    device = torch.device((ckpt.get("config") or {}).get("device") or "cpu").type
    return {device: [float(ckpt.get("wall_s") or 0.0), int(ckpt.get("steps_timed") or 0)]}


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
