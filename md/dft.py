"""DFT spot-check of a run (``oreo-md dft-check DIR | STATE``): PySCF forces on frames of the model's own trajectory.

PySCF is optional (``pip install 'oreo[dft]'`` or ``pip install pyscf``). Default level of
theory = rMD17's: PBE/def2-SVP. The model forces come with the frames, so the model is not needed here:

- a run directory: frames drawn from its trajectory files (they hold the forces of every frame); results in the
  directory: ``dft_check.json`` (per frame and overall force MAE, meV/Å), ``dft_forces.npz``, ``dft_parity.png``;
- a state file (``oreo-md simulate --state``): frames drawn from the sample of stable frames of the run's last
  100 ps that the run keeps in its state (:mod:`md.observables`), so the check works on a fresh clone where the
  trajectory is gone; results beside it: ``<state>.dft_check.json`` and ``<state>.dft_forces.npz`` (small enough
  to commit).

Every frame is saved as it finishes: a re-run with the same settings reuses finished frames (where the stored
geometry is the frame's). A frame whose SCF does not converge (also with the second-order solver) is recorded as
failed, left out of the MAE and not tried again with those settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from forcefield.files import atomic_write
from forcefield.evaluate import mae_rmse

from forcefield.reference import SCFNotConverged

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


def nested_pick(n_pool: int, n_frames: int, seed: int) -> np.ndarray:
    """``n_frames`` seeded indices of a pool, sorted; asking for more frames later keeps the earlier ones (a check
    extended from 10 to 20 frames reuses the 10 it has)."""
    return np.sort(np.random.default_rng(seed).permutation(n_pool)[:min(n_frames, n_pool)])


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
    pick = nested_pick(len(pool), n_frames, seed)
    return [pool[k] for k in pick]


def sample_state_frames(state_file: Path, n_frames: int, seed: int, replica: Optional[int] = None) -> List[dict]:
    """Seeded sample of the frames a run keeps in its state file for this check (stable frames of its last
    100 ps, :mod:`md.observables`) -> the dicts of :func:`sample_frames`."""
    from .config import SimulationConfig
    from .observables import Observables, sample_window_start
    from .rundir import read_state_file
    state = read_state_file(state_file)
    if state is None:
        raise MDInputError(f"state file '{state_file}' not found")
    cfg = SimulationConfig.from_dict(state["config"])
    if state["state"].get("cell") is not None and bool(np.any(np.asarray(state["state"]["pbc"]))):
        raise MDInputError("dft-check supports isolated molecules only (this run is periodic)")
    numbers, batch = np.asarray(state["state"]["numbers"]), np.asarray(state["state"]["batch"])
    kept = Observables.from_dict(state["observables"]).sampled_frames(sample_window_start(cfg))
    pool = [{"replica": f["replica"], "step": f["step"], "time_ps": f["step"] * cfg.timestep / 1000.0,
             "numbers": numbers[batch == f["replica"]].copy(), "positions": f["positions"],
             "model_forces": f["forces"]} for f in kept if replica is None or f["replica"] == replica]
    if not pool:
        step = int(state["state"]["step"])
        raise MDInputError(f"'{state_file}' keeps no stable frame of the run's last 100 ps yet (it is at "
                           f"{step * cfg.timestep / 1000:g} of {cfg.ps:g} ps); simulate further first")
    pick = nested_pick(len(pool), n_frames, seed)
    return [pool[k] for k in pick]


def state_check_paths(state_file: Path) -> Dict[str, Optional[Path]]:
    """Where the check of a state file writes its report and forces (beside it; no plot)."""
    state_file = Path(state_file)
    return {"json": state_file.with_suffix(".dft_check.json"), "npz": state_file.with_suffix(".dft_forces.npz"),
            "png": None}


def output_paths(source: Path) -> Dict[str, Optional[Path]]:
    """Where a check of ``source`` (run directory or state file) writes its report, forces and parity plot."""
    if source.is_file():
        return state_check_paths(source)
    return {"json": source / DFT_JSON, "npz": source / "dft_forces.npz", "png": source / "dft_parity.png"}


def dft_check(run_dir, n_frames: int = 10, seed: int = 0, replica: Optional[int] = None, xc: str = "pbe",
              basis: str = "def2-svp", grid_level: int = 4, conv_tol: float = 1e-10,
              max_memory: Optional[int] = None, progress: Optional[bool] = None,
              max_minutes: Optional[float] = None) -> Dict[str, object]:
    """Recompute forces of sampled frames of a run (``run_dir``: its directory or its state file) with PySCF;
    write and return the report. ``max_minutes``: start no new frame after this much wall time (the report then
    covers the frames done; the same call later continues with the rest)."""
    import time
    from tqdm.auto import tqdm
    deadline = None if max_minutes is None else time.perf_counter() + 60.0 * max_minutes

    run_dir = Path(run_dir)
    if not run_dir.is_file() and not (run_dir / io.RUN_JSON).is_file():
        raise MDInputError(f"'{run_dir}' is not an oreo-md run directory (no {io.RUN_JSON}) or state file; "
                           f"pass the --out folder of 'oreo-md simulate' or its --state file")
    if n_frames < 1:
        raise MDInputError(f"--frames must be >= 1, got {n_frames}")
    require_pyscf()
    paths = output_paths(run_dir)
    frames = sample_state_frames(run_dir, n_frames, seed, replica) if run_dir.is_file() \
        else sample_frames(run_dir, n_frames, seed, replica)
    settings = {"xc": xc, "basis": basis, "grid_level": grid_level, "conv_tol": conv_tol}
    done, failed_before = reusable_frames(paths, settings, frames)
    records, dft_all, model_all, failed = [], [], [], []
    for fr in tqdm(frames, desc="DFT frames", disable=(not progress) if progress is not None else None):
        key = (fr["replica"], fr["step"])
        where = {"replica": fr["replica"], "step": fr["step"], "time_ps": fr["time_ps"]}
        if key in failed_before:
            failed.append(failed_before[key])
            continue
        if key in done:
            e, f = done[key][0], np.asarray(done[key][1])
        elif deadline is not None and time.perf_counter() >= deadline:
            continue                     # no new frame after the deadline; finished ones still count
        else:
            try:
                e, f = dft_forces(fr["numbers"], fr["positions"], xc, basis, grid_level=grid_level,
                                  conv_tol=conv_tol, max_memory=max_memory)
            except SCFNotConverged as exc:   # recorded (never retried with these settings), left out of the MAE
                failed.append({**where, "error": str(exc)})
                _write(paths, settings, records, dft_all, model_all, failed, frames)
                continue
        err = fr["model_forces"] - f
        records.append({**where, "dft_energy_eV": e, "force_mae_meV_per_A": mae_rmse(err)[0]})
        dft_all.append(f)
        model_all.append(fr["model_forces"])
        _write(paths, settings, records, dft_all, model_all, failed, frames)
    if not records:
        return {"settings": settings, "n_frames": 0, "force_mae_meV_per_A": None, "force_rmse_meV_per_A": None,
                "frames": [], "n_failed": len(failed), "failed_frames": failed}
    report = _write(paths, settings, records, dft_all, model_all, failed, frames)
    if paths["png"] is not None:
        from .plots import plot_parity
        plot_parity(paths["png"], np.concatenate(dft_all), np.concatenate(model_all),
                    title=f"model vs {xc.upper()}/{basis}: MAE {report['force_mae_meV_per_A']:.1f} meV/Å")
    return report


def reusable_frames(paths: Dict[str, Optional[Path]], settings: dict, frames: List[dict]):
    """What an earlier check with the same settings left for these frames: ``(done, failed)``, keyed by (replica,
    step). A frame counts only where its stored geometry is this one's (a report of an earlier run of the same
    state path, e.g. one started again with another model, describes other frames)."""
    done, failed = {}, {}
    if not paths["json"].is_file():
        return done, failed
    old = io.read_json(paths["json"])
    if old.get("settings") != settings:
        return done, failed
    here = {(fr["replica"], fr["step"]): fr["positions"] for fr in frames}

    def same(key, positions) -> bool:
        return key in here and (positions is None or np.allclose(positions, here[key], atol=1e-6))
    if paths["npz"].is_file():
        cache = np.load(paths["npz"])
        for k, rec in enumerate(old.get("frames", [])):
            key = (rec["replica"], rec["step"])
            if same(key, cache[f"pos_{k}"] if f"pos_{k}" in cache.files else None):   # reports before 2026-12-04 d
                done[key] = (rec["dft_energy_eV"], cache[f"dft_{k}"])
    for rec in old.get("failed_frames", []):
        key = (rec["replica"], rec["step"])
        if same(key, np.asarray(rec["positions"]) if "positions" in rec else None):
            failed[key] = rec
    return done, failed


def _write(paths: Dict[str, Optional[Path]], settings, records, dft_all, model_all, failed, frames) -> dict:
    where = {(fr["replica"], fr["step"]): fr["positions"] for fr in frames}
    mae, rmse = mae_rmse(np.concatenate(model_all) - np.concatenate(dft_all)) if records else (None, None)
    report = {"settings": settings, "n_frames": len(records), "force_mae_meV_per_A": mae,
              "force_rmse_meV_per_A": rmse, "frames": records, "n_failed": len(failed),
              "failed_frames": [{**r, "positions": np.asarray(where[(r["replica"], r["step"])]).tolist()}
                                for r in failed]}
    arrays = {f"dft_{k}": f for k, f in enumerate(dft_all)}
    arrays.update({f"model_{k}": f for k, f in enumerate(model_all)})
    arrays.update({f"pos_{k}": np.asarray(where[(r["replica"], r["step"])]) for k, r in enumerate(records)})
    def save(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    atomic_write(paths["npz"], save)
    io.write_json(paths["json"], report)
    return report
