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
  frames; the same over the dataset's frames (rMD17: every distinct frame of the 10 published split files,
  9,633 per molecule); h(r) MAE = mean |Δh| × 10; beside it the sampling floor: what as many independent frames
  score against the reference (:func:`md.observables.sampling_floor`, from two disjoint draws of it);
- all of it is computed from the observables the simulation accumulates (:mod:`md.observables`), saved in the
  checkpoint and the compact state file, so no trajectory file is needed (:func:`analyze_state`);
- force MAE of the model on held-out frames (meV/Å); speed in steps/s and ns/day.

Results go to ``summary.json`` plus ``hr.png`` and ``thermo.png``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import io
from .config import SimulationConfig
from .errors import MDInputError
from .frames import describe_frames, frame_stack, load_system_frames, reference_bonds, same_molecule
from .metrics import HR_RMAX, distance_histogram, hr_mae, speed_record, timed_by_device
from .observables import Observables, replay_trajectories, sampling_floor


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


def replica_metrics(obs: Observables, r: int, status: dict, h_ref: Optional[np.ndarray], timestep_fs: float,
                    h_floor: Optional[float] = None) -> dict:
    """Stability and h(r) of replica ``r`` from the run's observables (its logged steps, their max bond deviation
    and the h(r) counts of its stable frames); ``h_floor``: the h(r) sampling floor for its frame count."""
    out = {"replica": status["replica"], "n_frames": len(obs.steps[r]), "stop_reason": status.get("reason"),
           "initial_frame_id": status.get("initial_frame_id")}
    if not obs.steps[r]:
        out.update(stability_ps=0.0, unstable=True, first_unstable_time_ps=None, hr_mae=None, hr_floor=None,
                   n_stable_frames=0, max_bond_deviation=None, hr=None, length_ps=0.0)
        return out
    ps = timestep_fs / 1000.0
    length = obs.steps[r][-1] * ps
    first_bad = int(obs.first_unstable_step[r])
    stop_time = status.get("stop_time_ps")
    if first_bad >= 0:
        stability, unstable = first_bad * ps, True
    elif stop_time is not None:
        stability, unstable = float(stop_time), True
    else:
        stability, unstable = length, False
    h = obs.hr(r)
    ref_ok = h_ref is not None and h_ref.sum() > 0 and np.all(np.isfinite(h_ref))
    if h is not None and not np.all(np.isfinite(h)):
        h = None
    out.update(stability_ps=float(stability), unstable=unstable,
               first_unstable_time_ps=None if first_bad < 0 else float(first_bad * ps),
               length_ps=float(length), n_stable_frames=int(obs.hr_frames[r]),
               max_bond_deviation=float(np.max(obs.max_dev[r])),
               hr_mae=hr_mae(h, h_ref) if h is not None and ref_ok else None,
               hr_floor=h_floor if h is not None else None, hr=h)
    return out


def analyze_replica(traj_atoms, reference, status: dict, bond_threshold: float, h_ref: np.ndarray,
                    timestep_fs: float = 0.5) -> dict:
    """Stability and h(r) of one replica from its frames (list of ``ase.Atoms``, ``info['step']`` each): the
    frames replayed through the same observables the simulation accumulates."""
    if not traj_atoms:
        return replica_metrics(Observables(1, bond_threshold), 0, status, h_ref, timestep_fs)
    first = traj_atoms[0]
    cell = first.cell.array if first.pbc.any() else None
    pbc = first.pbc if first.pbc.any() else None
    bonds = reference_bonds(first.numbers, first.positions, reference, cell, pbc)
    obs = replay_trajectories([traj_atoms], [bonds], bond_threshold, timestep_fs)
    return replica_metrics(obs, 0, status, h_ref, timestep_fs)


def run_observables(run_dir: Path, cfg: SimulationConfig, ckpt: Optional[dict], statuses: List[dict],
                    reference) -> Observables:
    """The run's observables: from its checkpoint, else (checkpoints older than observables) replayed from its
    trajectory files."""
    if ckpt is not None and ckpt.get("observables") is not None:
        return Observables.from_dict(ckpt["observables"])
    trajectories, bonds = [], []
    for st in statuses:
        atoms = io.read_trajectory(io.trajectory_path(run_dir, st["replica"]))
        trajectories.append(atoms)
        if atoms:
            first = atoms[0]
            cell = first.cell.array if first.pbc.any() else None
            pbc = first.pbc if first.pbc.any() else None
            bonds.append(reference_bonds(first.numbers, first.positions, reference, cell, pbc))
        else:
            bonds.append((np.zeros((0, 2), np.int64), np.zeros(0)))
    return replay_trajectories(trajectories, bonds, cfg.bond_threshold, cfg.timestep)


def reference_hr(reference, state: dict):
    """``(bin centres, h(r), reference frames (F, n, 3), cell, pbc)`` of the reference frames of the simulated
    molecule (the atoms of replica 0 of the stored MD state)."""
    numbers = np.asarray(state["numbers"])[np.asarray(state["batch"]) == 0]
    idx = same_molecule(reference, numbers)
    cell = pbc = None
    if state.get("cell") is not None and state.get("pbc") is not None and bool(np.any(np.asarray(state["pbc"][0]))):
        cell, pbc = np.asarray(state["cell"][0]), np.asarray(state["pbc"][0])
    frames = frame_stack(reference, idx)
    r, h = distance_histogram(frames, cell=cell, pbc=pbc)
    return r, h, frames, cell, pbc


def summarize(cfg: SimulationConfig, ckpt: dict, statuses: List[dict], obs: Observables, reference, held_out,
              forcefield=None, force_frames: Optional[int] = None, batch_size: int = 64, speed=None,
              model_meta=None) -> Tuple[dict, list, Optional[np.ndarray], Optional[np.ndarray]]:
    """The summary of a run from its checkpoint or state file (``ckpt``) and observables: ``(summary, per-replica
    results with h(r), bin centres, reference h(r))``. No trajectory file is read."""
    r_bins, h_ref, ref_frames, cell, pbc = reference_hr(reference, ckpt["state"])
    floors: Dict[int, Optional[float]] = {}
    replicas = []
    for k, st in enumerate(statuses):
        n = int(obs.hr_frames[k])
        if n not in floors:
            floors[n] = sampling_floor(ref_frames, n, seed=cfg.seed, cell=cell, pbc=pbc)
        replicas.append(replica_metrics(obs, k, st, h_ref, cfg.timestep, floors[n]))
    force = _force_errors(cfg, held_out, forcefield, cfg.force_frames if force_frames is None else force_frames,
                          batch_size)
    step = int(ckpt["state"]["step"])
    summary = {
        "system": cfg.system_name, "dataset": cfg.dataset or ("rmd17" if cfg.molecule else "structure"),
        "model": cfg.model_spec, "model_metadata": model_meta if model_meta is not None else ckpt.get("model", {}),
        "frames": describe_frames(cfg, held_out, reference),
        "thermostat": cfg.thermostat, "temperature_K": cfg.temperature, "timestep_fs": cfg.timestep,
        "replicas_n": cfg.replicas, "simulated_ps": step * cfg.timestep / 1000.0, "requested_ps": cfg.ps,
        "completed": step >= cfg.n_steps or not any(st.get("active") for st in statuses),
        "stability_ps": _stats([x["stability_ps"] for x in replicas]),
        "hr_mae": _stats([x["hr_mae"] for x in replicas]),
        "hr_floor": _stats([x["hr_floor"] for x in replicas]),
        "force": force, "force_mae_meV_per_A": None if force is None else force["force_mae_meV_per_A"],
        "speed": speed if speed is not None else speed_record(ckpt.get("wall_s"), ckpt.get("steps_timed"),
                                                              cfg.replicas, cfg.timestep),
        "speed_by_device": {dev: speed_record(w, n, cfg.replicas, cfg.timestep)
                            for dev, (w, n) in timed_by_device(ckpt).items()},
        "replicas": [{k: v for k, v in x.items() if k != "hr"} for x in replicas],
        "definitions": {"bond_threshold_A": cfg.bond_threshold, "hr_bins": 500, "hr_rmax_A": HR_RMAX,
                        "hr_floor": "h(r) MAE between two disjoint random draws of the reference with the replica's "
                                    "number of h(r) frames (at most half the reference each): what sampling alone "
                                    "gives (MD frames are correlated, so theirs is larger)",
                        "std": "population standard deviation over replicas (numpy ddof=0)"},
    }
    return summary, replicas, r_bins, h_ref


def _model_changed(cfg: SimulationConfig, recorded: Optional[dict]) -> bool:
    """Whether the model file the run names is no longer the one it ran (a molecule re-shipped since): then its
    force MAE would be another model's, so it is skipped, with a warning."""
    from .potential import model_change, model_fingerprint
    change = model_change(recorded, model_fingerprint(cfg.model_spec))
    if change:
        warnings.warn(f"force MAE skipped: the model file of '{cfg.model_spec}' has changed since the run started "
                      f"({change})", stacklevel=3)
    return change is not None


def analyze_state(state_file, forcefield=None, force_frames: Optional[int] = None, data_dir: Optional[str] = None,
                  batch_size: int = 64, frames=None, device: str = "cpu", poly24_dir: Optional[str] = None) -> dict:
    """The summary of a run from its compact state file alone (``oreo-md simulate --state``): what the campaign
    report tabulates on a fresh clone, where the run directory is gone. ``frames``: ``(held_out, reference)``
    (else loaded as in the simulation); ``device``: where the force MAE is computed (not the device the run's last
    piece used, which may be a GPU this machine lacks)."""
    from .rundir import read_state_file
    ckpt = read_state_file(state_file)
    if ckpt is None:
        raise MDInputError(f"state file '{state_file}' not found")
    cfg = SimulationConfig.from_dict(ckpt["config"])
    cfg.device = device
    if data_dir is not None:
        cfg.data_dir = data_dir
    if poly24_dir is not None:            # the folder recorded at run time may not exist on this machine
        cfg.poly24_dir = poly24_dir
    held_out, reference = frames if frames is not None else load_system_frames(cfg)
    obs = Observables.from_dict(ckpt["observables"])
    if forcefield is None and _model_changed(cfg, ckpt.get("model")):
        force_frames = 0
    return summarize(cfg, ckpt, ckpt["status"], obs, reference, held_out, forcefield, force_frames, batch_size)[0]


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
    from .rundir import read_run_checkpoint

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
    ckpt = read_run_checkpoint(run_dir)
    if ckpt is None:
        raise MDInputError(f"'{run_dir}' has no {io.CHECKPOINT}; the run never reached its first checkpoint")
    statuses = run["replicas"]
    if forcefield is None and _model_changed(cfg, run.get("model")):
        force_frames = 0
    obs = run_observables(run_dir, cfg, ckpt, statuses, reference)
    summary, replicas, r, h_ref = summarize(cfg, ckpt, statuses, obs, reference, held_out, forcefield, force_frames,
                                            batch_size, speed=run.get("speed", {}), model_meta=run.get("model", {}))
    summary["simulated_ps"], summary["completed"] = run.get("time_ps"), bool(run.get("completed"))
    io.write_json(run_dir / io.SUMMARY_JSON, summary)
    if plots:
        from .plots import plot_hr, plot_thermo
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
