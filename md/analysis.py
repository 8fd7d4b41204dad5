"""Analysis of a run directory (``oreo-md analyze DIR``): stability, h(r), force MAE, speed.

Definitions (MDsim, MD17):

- bonds: ASE natural cutoffs on each replica's first frame; reference length of each bond =
  its mean over the dataset's reference frames (rMD17: all frames of the molecule; oreo-poly24:
  the polymer's test frames at the simulation temperature, else all its test frames - see
  :mod:`md.poly24`; ``summary.json["frames"]`` says which);
- a replica is unstable from the first logged frame whose max |bond − reference| exceeds
  ``bond_threshold`` (0.5 Å); its stability is that frame's time (or, if the simulation stopped
  it for another reason first, the stop time; else the full simulated length);
- h(r): normalised histogram of all pair distances, 500 bins on (0, 10] Å, over the stable
  frames; the same over the dataset's frames; h(r) MAE = mean |Δh| × 10;
- force MAE of the model on held-out frames (meV/Å); speed in steps/s and ns/day.

Results go to ``summary.json`` plus ``hr.png`` and ``thermo.png``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import io
from .config import SimulationConfig
from .errors import MDInputError
from .frames import describe_frames, frame_stack, load_system_frames, reference_bonds, same_molecule
from .metrics import HR_RMAX, distance_histogram, first_unstable_frame, hr_mae, max_bond_deviation


def _stats(values: List[Optional[float]]) -> Dict[str, Optional[float]]:
    vals = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(vals) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(len(vals))}


def load_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / io.RUN_JSON
    if not path.is_file():
        raise MDInputError(f"'{run_dir}' is not an oreo-md run directory (no {io.RUN_JSON}); "
                           f"pass the --out folder of 'oreo-md simulate'")
    return io.read_json(path)


def analyze_replica(traj_atoms, reference, status: dict, bond_threshold: float, h_ref: np.ndarray) -> dict:
    """Stability and h(r) of one replica from its frames (list of ``ase.Atoms``)."""
    out = {"replica": status["replica"], "n_frames": len(traj_atoms), "stop_reason": status.get("reason"),
           "initial_frame_id": status.get("initial_frame_id")}
    if not traj_atoms:
        out.update(stability_ps=0.0, unstable=True, first_unstable_time_ps=None, hr_mae=None,
                   n_stable_frames=0, max_bond_deviation=None, hr=None, length_ps=0.0)
        return out
    first = traj_atoms[0]
    cell = first.cell.array if first.pbc.any() else None
    pbc = first.pbc if first.pbc.any() else None
    traj = np.stack([a.positions for a in traj_atoms])
    times = np.array([float(a.info.get("time_ps", np.nan)) for a in traj_atoms])
    bonds, ref_len = reference_bonds(first.numbers, first.positions, reference, cell, pbc)
    dev = max_bond_deviation(traj, bonds, ref_len, cell, pbc)
    k = first_unstable_frame(traj, bonds, ref_len, bond_threshold, cell, pbc)
    length = float(times[-1])
    stop_time = status.get("stop_time_ps")
    if k is not None:
        stability, unstable, stable = float(times[k]), True, traj[:k]
    elif stop_time is not None:
        stability, unstable, stable = float(stop_time), True, traj
    else:
        stability, unstable, stable = length, False, traj
    # h(r) of the simulation needs a stable frame after t = 0: the first frame is the dataset's own (a replica
    # stopped at step 0 would otherwise score a perfect 0.000); an empty histogram is no h(r) either
    simulated = int(np.sum(times[:len(stable)] > 0))
    h = distance_histogram(stable, cell=cell, pbc=pbc)[1] if simulated else None
    if h is not None and not (h.sum() > 0 and np.all(np.isfinite(h))):
        h = None
    ref_ok = h_ref is not None and h_ref.sum() > 0 and np.all(np.isfinite(h_ref))
    out.update(stability_ps=stability, unstable=unstable,
               first_unstable_time_ps=None if k is None else float(times[k]),
               length_ps=length, n_stable_frames=int(len(stable)),
               max_bond_deviation=float(np.max(dev)) if len(dev) else None,
               hr_mae=hr_mae(h, h_ref) if h is not None and ref_ok else None, hr=h)
    return out


def analyze_run(run_dir, forcefield=None, frames=None, force_frames: Optional[int] = None,
                batch_size: int = 64, device: Optional[str] = None, data_dir: Optional[str] = None,
                plots: bool = True, poly24_dir: Optional[str] = None) -> dict:
    """Analyse ``run_dir``; write and return ``summary.json``'s content.

    ``forcefield``: a :class:`~md.potential.ForceField` for the force MAE (else the run's model
    is loaded; if that fails the force MAE is reported as null with a warning).
    ``frames``: ``(held_out, reference)`` ConformationSets (else loaded as in the simulation).
    ``force_frames``: number of held-out frames for the force MAE (0 skips it).
    ``data_dir`` / ``poly24_dir``: where to re-load the frames from (default: the run's).
    """

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    cfg = SimulationConfig.from_dict(run["config"])
    if data_dir is not None:
        cfg.data_dir = data_dir
    if poly24_dir is not None:
        cfg.poly24_dir = poly24_dir
    if device is not None:
        cfg.device = device
    held_out, reference = frames if frames is not None else load_system_frames(cfg)
    statuses = run["replicas"]

    replicas = []
    h_ref = r = None
    for st in statuses:
        atoms = io.read_trajectory(io.trajectory_path(run_dir, st["replica"]))
        if h_ref is None and atoms:
            idx = same_molecule(reference, atoms[0].numbers)
            first = atoms[0]
            pbc = first.pbc if first.pbc.any() else None
            cell = first.cell.array if pbc is not None else None
            r, h_ref = distance_histogram(frame_stack(reference, idx), cell=cell, pbc=pbc)
        replicas.append(analyze_replica(atoms, reference, st, cfg.bond_threshold,
                                        h_ref if h_ref is not None else np.zeros(1)))

    force = _force_errors(cfg, held_out, forcefield, cfg.force_frames if force_frames is None else force_frames,
                          batch_size)
    summary = {
        "system": cfg.system_name, "dataset": cfg.dataset or ("rmd17" if cfg.molecule else "structure"),
        "model": cfg.model_spec, "model_metadata": run.get("model", {}),
        "frames": describe_frames(cfg, held_out, reference),
        "thermostat": cfg.thermostat, "temperature_K": cfg.temperature, "timestep_fs": cfg.timestep,
        "replicas_n": cfg.replicas, "simulated_ps": run.get("time_ps"), "requested_ps": cfg.ps,
        "completed": bool(run.get("completed")),
        "stability_ps": _stats([x["stability_ps"] for x in replicas]),
        "hr_mae": _stats([x["hr_mae"] for x in replicas]),
        "force": force, "force_mae_meV_per_A": None if force is None else force["force_mae_meV_per_A"],
        "speed": run.get("speed", {}),
        "replicas": [{k: v for k, v in x.items() if k != "hr"} for x in replicas],
        "definitions": {"bond_threshold_A": cfg.bond_threshold, "hr_bins": 500, "hr_rmax_A": HR_RMAX,
                        "std": "population standard deviation over replicas (numpy ddof=0)"},
    }
    io.write_json(run_dir / io.SUMMARY_JSON, summary)
    if plots:
        from .plots import plot_hr, plot_thermo
        if h_ref is not None:
            plot_hr(run_dir / "hr.png", r, h_ref, [x["hr"] for x in replicas],
                    title=f"{cfg.system_name}: h(r), {cfg.model_spec}")
        plot_thermo(run_dir / "thermo.png", io.read_thermo(run_dir / io.THERMO_CSV), cfg.temperature,
                    title=f"{cfg.system_name}: {cfg.thermostat}, {cfg.temperature:g} K")
    return summary


def _force_errors(cfg: SimulationConfig, held_out, forcefield, n_frames: int, batch_size: int) -> Optional[dict]:
    from .metrics import force_errors
    from .potential import ForceField, load_model

    if n_frames == 0 or held_out.forces is None:
        return None
    if forcefield is None:
        try:
            forcefield = ForceField(load_model(cfg.model_spec, molecule=cfg.molecule, data_dir=cfg.data_dir,
                                               device=cfg.device, dtype=cfg.dtype,
                                               allow_other_molecule=cfg.allow_other_molecule), device=cfg.device)
        except MDInputError as exc:
            warnings.warn(f"force MAE skipped: {exc}", stacklevel=2)
            return None
    idx = np.arange(len(held_out))
    if n_frames < len(idx):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(idx), n_frames, replace=False))
    return force_errors(forcefield, held_out, idx, batch_size=batch_size, device=cfg.device)
