"""DFT spot-check of a run (``oreo-md dft-check DIR``): PySCF forces on frames of the model's own trajectory.

PySCF is optional (``pip install 'oreo[dft]'`` or ``pip install pyscf``). Default level of
theory = rMD17's: PBE/def2-SVP. The model forces come from the trajectory files (they are
written with every frame), so the model is not needed here. Results: ``dft_check.json`` (per
frame and overall force MAE, meV/Å; finished frames are reused when the command is re-run with
the same settings), ``dft_forces.npz`` and ``dft_parity.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from forcefield.files import atomic_write
from forcefield.evaluate import mae_rmse

from . import io
from .errors import MDInputError

PYSCF_HINT = "pip install 'oreo[dft]'  (or: pip install pyscf)"
DFT_JSON = "dft_check.json"


def require_pyscf():
    """Import PySCF or raise an :class:`MDInputError` saying exactly how to install it."""
    from forcefield.reference import require_pyscf as _require
    try:
        return _require()
    except ImportError as exc:
        raise MDInputError(f"dft-check needs PySCF: {exc}") from exc


def dft_forces(numbers: np.ndarray, positions: np.ndarray, xc: str = "pbe", basis: str = "def2-svp",
               charge: int = 0, grid_level: int = 4, conv_tol: float = 1e-10,
               max_memory: Optional[int] = None) -> Tuple[float, np.ndarray]:
    """Kohn–Sham energy (eV) and forces (n, 3) eV/Å (:func:`forcefield.reference.dft_energy_forces`)."""
    require_pyscf()
    from forcefield.reference import dft_energy_forces
    return dft_energy_forces(numbers, positions, xc, basis, charge=charge, grid_level=grid_level,
                             conv_tol=conv_tol, max_memory=max_memory)


def sample_frames(run_dir: Path, n_frames: int, seed: int, replica: Optional[int] = None) -> List[dict]:
    """Seeded sample of trajectory frames (after t = 0, before each replica's first unstable
    frame when summary.json says so) -> dicts with replica, step, time_ps, numbers, positions,
    model forces."""
    run = io.read_json(run_dir / io.RUN_JSON)
    summary = io.read_json(run_dir / io.SUMMARY_JSON) if (run_dir / io.SUMMARY_JSON).is_file() else None
    limits = {}
    if summary:
        for rep in summary.get("replicas", []):
            if rep.get("first_unstable_time_ps") is not None:
                limits[rep["replica"]] = rep["first_unstable_time_ps"]
    pool = []
    reps = [s["replica"] for s in run["replicas"]] if replica is None else [replica]
    for r in reps:
        path = io.trajectory_path(run_dir, r)
        if not path.is_file():
            raise MDInputError(f"replica {r}: no trajectory file '{path.name}' in '{run_dir}'")
        for a in io.read_trajectory(path):
            t = float(a.info.get("time_ps", 0.0))
            if t <= 0 or (r in limits and t >= limits[r]):
                continue
            if a.pbc.any():
                raise MDInputError("dft-check supports isolated molecules only (this run is periodic)")
            pool.append({"replica": r, "step": int(a.info["step"]), "time_ps": t, "numbers": a.numbers.copy(),
                         "positions": a.positions.copy(), "model_forces": a.get_forces().copy()})
    if not pool:
        raise MDInputError(f"no stable frames after t = 0 in '{run_dir}' to check; simulate longer first")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(pool), size=min(n_frames, len(pool)), replace=False))
    return [pool[k] for k in pick]


def dft_check(run_dir, n_frames: int = 10, seed: int = 0, replica: Optional[int] = None, xc: str = "pbe",
              basis: str = "def2-svp", grid_level: int = 4, conv_tol: float = 1e-10,
              max_memory: Optional[int] = None, progress: Optional[bool] = None) -> Dict[str, object]:
    """Recompute forces of sampled trajectory frames with PySCF; write and return the report."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    if not (run_dir / io.RUN_JSON).is_file():
        raise MDInputError(f"'{run_dir}' is not an oreo-md run directory (no {io.RUN_JSON}); "
                           f"pass the --out folder of 'oreo-md simulate'")
    if n_frames < 1:
        raise MDInputError(f"--frames must be >= 1, got {n_frames}")
    require_pyscf()
    frames = sample_frames(run_dir, n_frames, seed, replica)
    settings = {"xc": xc, "basis": basis, "grid_level": grid_level, "conv_tol": conv_tol}
    done = {}
    if (run_dir / DFT_JSON).is_file():
        old = io.read_json(run_dir / DFT_JSON)
        if old.get("settings") == settings and (run_dir / "dft_forces.npz").is_file():
            cache = np.load(run_dir / "dft_forces.npz")
            for k, rec in enumerate(old.get("frames", [])):
                done[(rec["replica"], rec["step"])] = (rec["dft_energy_eV"], cache[f"dft_{k}"])
    records, dft_all, model_all = [], [], []
    for fr in tqdm(frames, desc="DFT frames", disable=(not progress) if progress is not None else None):
        key = (fr["replica"], fr["step"])
        if key in done:
            e, f = done[key][0], np.asarray(done[key][1])
        else:
            e, f = dft_forces(fr["numbers"], fr["positions"], xc, basis, grid_level=grid_level,
                              conv_tol=conv_tol, max_memory=max_memory)
        err = fr["model_forces"] - f
        records.append({"replica": fr["replica"], "step": fr["step"], "time_ps": fr["time_ps"],
                        "dft_energy_eV": e, "force_mae_meV_per_A": mae_rmse(err)[0]})
        dft_all.append(f)
        model_all.append(fr["model_forces"])
        _write(run_dir, settings, records, dft_all, model_all)
    report = _write(run_dir, settings, records, dft_all, model_all)
    from .plots import plot_parity
    plot_parity(run_dir / "dft_parity.png", np.concatenate(dft_all), np.concatenate(model_all),
                title=f"model vs {xc.upper()}/{basis}: MAE {report['force_mae_meV_per_A']:.1f} meV/Å")
    return report


def _write(run_dir: Path, settings, records, dft_all, model_all) -> dict:
    mae, rmse = mae_rmse(np.concatenate(model_all) - np.concatenate(dft_all))
    report = {"settings": settings, "n_frames": len(records), "force_mae_meV_per_A": mae,
              "force_rmse_meV_per_A": rmse, "frames": records}
    arrays = {f"dft_{k}": f for k, f in enumerate(dft_all)}
    arrays.update({f"model_{k}": f for k, f in enumerate(model_all)})
    def save(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    atomic_write(run_dir / "dft_forces.npz", save)
    io.write_json(run_dir / DFT_JSON, report)
    return report
