"""Energy/force errors of a potential on labelled frames, and a parity plot."""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from ase.data import chemical_symbols

from .data.conformations import ConformationSet
from .units import MEV


def predict(potential, cset: ConformationSet, batch_size: int = 64, device="cpu",
            progress: bool = False) -> Dict[str, np.ndarray]:
    """Energies (F,) eV and forces (A, 3) eV/Å of every frame, in float64 numpy."""
    dtype = next((b.dtype for b in potential.parameters()), torch.float32)
    energies, forces = [], []
    starts = range(0, len(cset), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="evaluate", unit="batch")
    for s in starts:
        b = cset.collate(np.arange(s, min(s + batch_size, len(cset))), dtype=dtype, device=device)
        out = potential(b.numbers, b.positions, b.batch, b.cell, b.pbc)
        energies.append(out["energy"].detach().double().cpu().numpy())
        forces.append(out["forces"].detach().double().cpu().numpy())
    return {"energy": np.concatenate(energies), "forces": np.concatenate(forces)}


def mae_rmse(errors) -> Tuple[float, float]:
    """(MAE, RMSE) of an array of errors in eV or eV/Å, in meV or meV/Å: the one definition every report uses
    (training, ``oreo evaluate``, MD force errors, DFT spot checks)."""
    e = np.asarray(errors, dtype=np.float64)
    return MEV * float(np.mean(np.abs(e))), MEV * float(np.sqrt(np.mean(e ** 2)))


def forces_mae_by_energy_quintile(force_errors: np.ndarray, cset: ConformationSet) -> Optional[list]:
    """Force MAE (meV/Å) of the frames in each fifth of the reference energies, lowest first: whether the error
    lives in the rare high-energy frames. None unless every frame is the same molecule (total energies of
    different molecules do not compare) and there are at least 5 frames."""
    n = len(cset)
    if cset.energy is None or n < 5:
        return None
    sizes = np.diff(cset.ptr)
    if np.any(sizes != sizes[0]) or np.any(cset.numbers.reshape(n, sizes[0]) != cset.numbers[:sizes[0]]):
        return None
    per_frame = np.asarray(force_errors).reshape(n, sizes[0], 3)
    return [mae_rmse(per_frame[g])[0] for g in np.array_split(np.argsort(cset.energy, kind="stable"), 5)]


def error_metrics(pred: Dict[str, np.ndarray], cset: ConformationSet) -> Dict[str, Any]:
    """MAE/RMSE in meV (energy, also per atom) and meV/Å (force components), the force MAE of each element's
    atoms (``forces_mae_meV_per_A_by_element``: symbol -> meV/Å; where the error lives, e.g. hydroxyl H) and, for
    frames of one molecule, of each fifth of the frames by reference energy
    (``forces_mae_meV_per_A_by_energy_quintile``, lowest first)."""
    m: Dict[str, Any] = {"n_frames": len(cset)}
    if cset.energy is not None:
        de = pred["energy"] - cset.energy
        mae, rmse = mae_rmse(de)
        m.update(energy_mae_meV=mae, energy_rmse_meV=rmse, energy_per_atom_mae_meV=mae_rmse(de / cset.n_atoms)[0])
    if cset.forces is not None:
        df = pred["forces"] - cset.forces
        mae, rmse = mae_rmse(df)
        m.update(forces_mae_meV_per_A=mae, forces_rmse_meV_per_A=rmse,
                 forces_mae_meV_per_A_by_element={chemical_symbols[z]: mae_rmse(df[cset.numbers == z])[0]
                                                  for z in np.unique(cset.numbers)})
        quintiles = forces_mae_by_energy_quintile(df, cset)
        if quintiles is not None:
            m["forces_mae_meV_per_A_by_energy_quintile"] = quintiles
    return m


def evaluate(potential, cset: ConformationSet, batch_size: int = 64, device="cpu", progress: bool = False):
    pred = predict(potential, cset, batch_size, device, progress)
    return error_metrics(pred, cset), pred


def parity_plot(pred: Dict[str, np.ndarray], cset: ConformationSet, path: Union[str, Path],
                title: Optional[str] = None) -> Path:
    """Two panels: energies (relative to the reference mean) and force components."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    panels = []
    if cset.energy is not None:
        off = cset.energy.mean()
        panels.append((axes[0], cset.energy - off, pred["energy"] - off, "energy − mean (eV)", "meV",
                       1e3 * np.mean(np.abs(pred["energy"] - cset.energy))))
    if cset.forces is not None:
        panels.append((axes[1], cset.forces.ravel(), pred["forces"].ravel(), "force component (eV/Å)", "meV/Å",
                       1e3 * np.mean(np.abs(pred["forces"] - cset.forces))))
    for ax, ref, prd, label, unit, mae in panels:
        lo, hi = float(min(ref.min(), prd.min())), float(max(ref.max(), prd.max()))
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
        ax.scatter(ref, prd, s=2, alpha=0.4, rasterized=True)
        ax.set_xlabel("reference " + label)
        ax.set_ylabel("model " + label)
        ax.set_title(f"MAE {mae:.1f} {unit}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
