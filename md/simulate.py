"""Run a batched, resumable MD simulation of several replicas (``oreo-md simulate``).

:func:`run_simulation` does everything between a :class:`~md.config.SimulationConfig` and a
finished run directory (layout in :mod:`md.io`, resume policy in :mod:`md.rundir`, frames from
:mod:`md.frames`): it picks seeded initial frames, draws Maxwell–Boltzmann velocities, integrates all
replicas as one batch, logs, accumulates the observables the analysis needs (:mod:`md.observables`),
checkpoints (and, with ``state_file``, writes the compact state a fresh clone continues from), stops replicas
that become unstable or too hot, and finally runs the analysis (:mod:`md.analysis`). ``max_minutes`` pauses a
run at the first checkpoint after that much wall time (the campaign runner advances long runs that way).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import io
from .config import SimulationConfig
from .errors import MDInputError
from .frames import describe_frames, load_system_frames, reference_bonds
from .integrators import compute_forces, conserved_energy, make_integrator
from .metrics import timed_by_device
from .observables import Observables, replay_trajectories, sample_window_start
from .rundir import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, prepare_run_dir
from .potential import ForceField, load_model, model_change, model_fingerprint, model_metadata
from .state import MDState, make_state, maxwell_boltzmann_velocities, overlapping_atoms

#: the wall-time estimate is printed after this many steps or seconds of the run, whichever comes first
ESTIMATE_AFTER_STEPS = 20
ESTIMATE_AFTER_S = 10.0
#: seconds between plain progress lines on stderr when there is no progress bar (stderr not a terminal)
PROGRESS_EVERY_S = 60.0
#: an eager run that the estimate puts above this many seconds is told about --compile
COMPILE_HINT_AFTER_S = 900.0
NON_FINITE = "non-finite energy, forces or positions"


# ---------------------------------------------------------------------------------- frames
def check_initial_frames(config: SimulationConfig, held_out) -> None:
    """MDInputError naming the frame and the two atoms when a replica would start from a frame with atoms
    closer than 0.1 Å (checked before the model is loaded or called)."""
    from forcefield.potential import close_pair_text
    picks = np.unique(pick_initial_frames(len(held_out), config.replicas, config.seed))
    counts = np.array([held_out.ptr[f + 1] - held_out.ptr[f] for f in picks])
    positions = torch.as_tensor(np.concatenate([held_out.frame_positions(int(f)) for f in picks]))
    batch = torch.as_tensor(np.repeat(np.arange(len(picks)), counts))
    cell = pbc = None
    if held_out.cell is not None and held_out.pbc is not None and bool(np.any(held_out.pbc[picks])):
        cell, pbc = torch.as_tensor(held_out.cell[picks]), torch.as_tensor(held_out.pbc[picks])
    overlaps = overlapping_atoms(positions, batch, cell, pbc)
    if overlaps:
        g, (i, j, d) = min(overlaps.items())
        where = describe_frames(config, held_out, held_out)["held_out"]
        raise MDInputError(f"initial frame {int(picks[g])} of {where}: {close_pair_text(i, j, d)}. Two atoms on "
                           f"top of each other give NaN or meaningless forces; remove the duplicated atom or fix "
                           f"the coordinates (Å) of that frame, or choose other initial frames (--seed)")


def pick_initial_frames(n_frames: int, replicas: int, seed: int) -> np.ndarray:
    """Seeded choice of one held-out frame per replica (without replacement when possible)."""
    if n_frames == 0:
        raise MDInputError("no held-out frames to start from; check --data-dir / --structure")
    rng = np.random.default_rng(seed)
    return rng.choice(n_frames, size=replicas, replace=replicas > n_frames).astype(np.int64)


# ---------------------------------------------------------------------------------- the run
class _Run:
    """Mutable bookkeeping of one simulation (status per replica, timing)."""

    def __init__(self, config: SimulationConfig, out_dir: Path, forcefield: ForceField, files: io.RunFiles,
                 generator: torch.Generator, progress_bar, on_log=None):
        self.config, self.out_dir, self.ff, self.files = config, out_dir, forcefield, files
        self.generator, self.bar, self.on_log = generator, progress_bar, on_log
        self.status: List[dict] = []
        self.bonds: List[Tuple[np.ndarray, np.ndarray]] = []
        self.wall_s = 0.0
        self.steps_timed = 0
        #: the same timing per device type ({"cpu": [seconds, steps], "cuda": ...}): pieces of one run may run on a
        #: GPU and on CPUs, and a rate or an estimate of the time left is one device's
        self.timed_by_device: Dict[str, List[float]] = {}
        self.device_type = torch.device(config.device or "cpu").type
        self.model_meta: Dict[str, object] = {}
        self.frames: Dict[str, str] = {}
        self.obs = Observables(config.replicas, config.bond_threshold)
        self.state_file: Optional[Path] = None
        self.trajectory_from_step = 0    #: the trajectory files start here (> 0 when continued from a state file)
        self.deadline: Optional[float] = None
        self.paused = False

    # .............................................................. records
    def time_ps(self, step: int) -> float:
        return step * self.config.timestep / 1000.0

    def stop(self, state: MDState, r: int, reason: str, non_finite: bool = False) -> None:
        st = self.status[r]
        st.update(active=False, stop_step=state.step, stop_time_ps=self.time_ps(state.step), reason=reason,
                  non_finite=non_finite)
        msg = f"replica {r} stopped at {st['stop_time_ps']:.3f} ps (step {state.step}): {reason}"
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg)

    def note(self, msg: str) -> None:
        """A progress message on stderr (above the bar when there is one)."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def log(self, state: MDState) -> None:
        """Append one frame per active replica and their thermo rows."""
        cfg = self.config
        t = self.time_ps(state.step)
        temp = state.temperature().cpu().numpy()
        ekin = state.kinetic_energy().cpu().numpy()
        epot = state.energy.cpu().numpy()
        econs = conserved_energy(state, cfg.temperature).cpu().numpy()
        pos = state.positions.cpu().numpy()
        frc = state.forces.cpu().numpy()
        num = state.numbers.cpu().numpy()
        batch = state.batch.cpu().numpy()
        spread = None if self.ff.last_force_std_max is None else self.ff.last_force_std_max.cpu().numpy()
        rows = []
        for r in range(state.n_systems):
            if not self.status[r]["active"]:
                continue
            sel = batch == r
            cell = pbc = None
            if state.cell is not None:
                cell, pbc = state.cell[r].cpu().numpy(), state.pbc[r].cpu().numpy()
            info = {"step": int(state.step), "time_ps": float(t), "replica": r, "energy": float(epot[r])}
            row = (int(state.step), t, r, temp[r], epot[r], ekin[r], epot[r] + ekin[r], econs[r])
            if spread is not None:
                info["forces_std_max"] = float(spread[r])
                row += (spread[r],)
            self.files.write_frame(r, io.format_extxyz_frame(num[sel], pos[sel], frc[sel], info, cell, pbc))
            rows.append(row)
        self.files.write_log_rows(rows)
        self.files.flush()

    def check_step(self, state: MDState) -> MDState:
        """Stop replicas with non-finite values or a temperature above the limit (every step)."""
        cfg = self.config
        finite_atom = torch.isfinite(state.positions).all(1) & torch.isfinite(state.forces).all(1) \
            & torch.isfinite(state.velocities).all(1)
        finite = (state.system_sum((~finite_atom).to(torch.float64)) == 0) & torch.isfinite(state.energy)
        temp = state.temperature()
        hot = temp > cfg.max_temperature_factor * cfg.temperature if cfg.temperature > 0 \
            else torch.zeros_like(finite)
        spread = self.ff.last_force_std_max
        uncertain = (spread > cfg.max_force_std) if cfg.max_force_std is not None and spread is not None \
            else torch.zeros_like(finite)
        bad = state.active & (~finite | hot | uncertain)
        if not bool(bad.any()):
            return state
        active = state.active.clone()
        overlaps = overlapping_atoms(state.positions, state.batch, state.cell, state.pbc) \
            if bool((bad & ~finite).any()) else {}
        for r in torch.nonzero(bad).squeeze(1).tolist():
            if not bool(finite[r]):
                reason = NON_FINITE
                if r in overlaps:
                    from forcefield.potential import close_pair_text
                    reason += f" ({close_pair_text(*overlaps[r])}: the replica collapsed)"
                self.stop(state, r, reason, non_finite=True)
            elif bool(uncertain[r]):
                self.stop(state, r, f"committee force spread {float(spread[r]):.3f} eV/A exceeds --max-force-std "
                                    f"{cfg.max_force_std:g} eV/A: the model is extrapolating here")
            else:
                self.stop(state, r, f"temperature {float(temp[r]):.0f} K exceeds {cfg.max_temperature_factor:g} x "
                                    f"the target {cfg.temperature:g} K")
            active[r] = False
        return replace(state, active=active)

    def observe(self, state: MDState) -> MDState:
        """Record the frame just logged in the observables (h(r), max bond deviation) and, with ``stop_unstable``,
        stop replicas whose max bond deviation exceeds the threshold."""
        cfg = self.config
        pos = state.positions.cpu().numpy()
        frc = state.forces.cpu().numpy()
        batch = state.batch.cpu().numpy()
        active = state.active.clone()
        for r in range(state.n_systems):
            if not self.status[r]["active"]:
                continue
            bonds, ref = self.bonds[r]
            cell = pbc = None
            if state.cell is not None:
                cell, pbc = state.cell[r].cpu().numpy(), state.pbc[r].cpu().numpy()
            sel = batch == r
            dev = self.obs.add_frame(r, state.step, pos[sel], bonds, ref, cell, pbc, forces=frc[sel],
                                     sample_from_step=sample_window_start(cfg))
            if cfg.stop_unstable and dev > cfg.bond_threshold:
                self.stop(state, r, f"unstable: max bond deviation {dev:.3f} A > {cfg.bond_threshold:g} A")
                active[r] = False
        return replace(state, active=active)

    def timed(self, seconds: float, steps: int) -> None:
        """Add ``steps`` integration steps that took ``seconds`` of wall time to the run's timing."""
        self.wall_s += seconds
        self.steps_timed += steps
        w = self.timed_by_device.setdefault(self.device_type, [0.0, 0])
        w[0] += seconds
        w[1] += steps

    def speed(self) -> Dict[str, Optional[float]]:
        """Steps per second etc. of the timed steps (:func:`md.metrics.speed_record`)."""
        from .metrics import speed_record
        return speed_record(self.wall_s, self.steps_timed, self.config.replicas, self.config.timestep)

    def checkpoint(self, state: MDState, completed: bool = False) -> None:
        cfg = self.config
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": cfg.to_dict(),
                   "state": state.to_dict(), "generator": self.generator.get_state(),
                   "generator_device": self.generator.device.type,
                   "files": self.files.sizes(), "status": [dict(s) for s in self.status],
                   "wall_s": self.wall_s, "steps_timed": self.steps_timed, "timed_by_device": self.timed_by_device,
                   "model": self.model_meta,
                   "frames": self.frames, "observables": self.obs.to_dict(),
                   "trajectory_from_step": self.trajectory_from_step, "completed": completed}
        self.files.flush(fsync=True)
        io.save_checkpoint(self.out_dir / io.CHECKPOINT, payload)
        if self.state_file is not None:   # the same without the file sizes: it must not depend on this directory
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            io.save_checkpoint(self.state_file, {**payload, "files": {}, "trajectory_from_step": None})
        self.write_run_json(state, completed)

    def write_run_json(self, state: MDState, completed: bool) -> None:
        cfg = self.config
        io.write_json(self.out_dir / io.RUN_JSON, {
            "config": cfg.to_dict(), "model": self.model_meta, "frames": self.frames, "step": int(state.step),
            "n_steps": cfg.n_steps,
            "time_ps": self.time_ps(state.step), "completed": completed, "paused": self.paused,
            "trajectory_from_step": self.trajectory_from_step,
            "n_atoms": [int(n) for n in state.atoms_per_system.cpu().tolist()],
            "replicas": [dict(s) for s in self.status], "speed": self.speed()})


def initial_state(config: SimulationConfig, held_out, generator: torch.Generator) -> Tuple[MDState, List[dict]]:
    """Replicas started from seeded held-out frames with Maxwell–Boltzmann velocities (COM momentum
    removed), and their initial status records."""
    picks = pick_initial_frames(len(held_out), config.replicas, config.seed)
    cells = pbcs = None
    if held_out.cell is not None and bool(np.any(held_out.pbc[picks])):
        cells, pbcs = held_out.cell[picks], held_out.pbc[picks]
    state = make_state([held_out.frame_numbers(int(f)) for f in picks],
                       [held_out.frame_positions(int(f)) for f in picks], cells, pbcs,
                       remove_com=config.thermostat != "langevin", device=config.device)
    state = replace(state, velocities=maxwell_boltzmann_velocities(
        state.masses, state.batch, state.n_systems, config.temperature, generator, remove_com=True))
    status = [{"replica": r, "initial_frame": int(f), "initial_frame_id": int(held_out.frame_id[f]),
               "active": True, "stop_step": None, "stop_time_ps": None, "reason": None}
              for r, f in enumerate(picks)]
    return state, status


def _check_same_model(ckpt: dict, fingerprint: Dict[str, object], where: str) -> None:
    """A run continues with the model file it started with (the shipped name may point at a re-shipped model)."""
    change = model_change(ckpt.get("model"), fingerprint)
    if change:
        raise MDInputError(f"the model file {fingerprint.get('model_file')} has changed since the run in {where} "
                           f"started ({change}; a re-shipped model?): one "
                           f"trajectory must come from one model. Pass --model with the original file, or start a "
                           f"new run (--overwrite, or another --out / --state)")


def _restore(ckpt: dict, config: SimulationConfig, generator: torch.Generator) -> Tuple[MDState, List[dict]]:
    state = MDState.from_dict(ckpt["state"], device=config.device)
    saved_on = ckpt.get("generator_device", "cpu")
    if saved_on == torch.device(config.device).type:
        generator.set_state(ckpt["generator"])
    elif config.thermostat == "langevin":
        raise MDInputError(f"this Langevin run was checkpointed on {saved_on}; resume it with --device {saved_on} "
                           f"(its noise stream is device-specific)")
    return state, ckpt["status"]


def _make_generator(device: str, seed: int) -> torch.Generator:
    dev = torch.device(device)
    gen = torch.Generator(device=dev) if dev.type != "cpu" else torch.Generator()
    return gen.manual_seed(int(seed))


def run_simulation(config: SimulationConfig, out_dir, potential=None, frames=None, resume: Optional[bool] = None,
                   overwrite: bool = False, progress: Optional[bool] = None,
                   on_log: Optional[Callable[[MDState], None]] = None, state_file=None,
                   max_minutes: Optional[float] = None) -> Path:
    """Run (or resume) the simulation described by ``config`` in ``out_dir``; returns ``out_dir``.

    ``potential``: a ready potential object (else ``config.model_spec`` is loaded);
    ``frames``: ``(held_out, reference)`` ConformationSets (else :func:`load_system_frames`);
    ``resume``: None = automatic, True = require a checkpoint, False = refuse an existing run;
    ``progress``: tqdm bar (None = only on a terminal); ``on_log(state)`` is called after every
    logged frame (tests use it to interrupt a run); ``state_file``: also write the compact state there with every
    checkpoint, and continue from it when it is further along than ``out_dir``'s checkpoint (a fresh clone);
    ``max_minutes``: pause at the first checkpoint after this much wall time (no analysis then; run again to
    continue).
    """
    from tqdm.auto import tqdm

    deadline = None if max_minutes is None else time.perf_counter() + 60.0 * float(max_minutes)  # loading counts
    config = SimulationConfig.from_dict(config.to_dict()).validate()
    if config.molecule and config.data_dir is None and os.environ.get("OREO_DATA_DIR"):
        config.data_dir = str(Path(os.environ["OREO_DATA_DIR"]).resolve())   # recorded for later analysis
    out_dir = Path(out_dir)
    held_out, reference = frames if frames is not None else load_system_frames(config)
    check_initial_frames(config, held_out)
    if config.polymer and config.poly24_dir is None:
        from .poly24 import poly24_folder
        config.poly24_dir = str(poly24_folder(None, config.data_dir).resolve())   # recorded for later analysis
    ckpt, from_state = prepare_run_dir(out_dir, config, resume, overwrite, state_file)
    if ckpt is None and state_file is not None:     # a new run on this state path: an old DFT check is not its
        from .dft import state_check_paths
        for path in state_check_paths(state_file).values():
            if path is not None:
                path.unlink(missing_ok=True)
    described = describe_frames(config, held_out, reference)
    if config.polymer:
        print(f"{config.system_name}: initial frames and force MAE from {described['held_out']}; "
              f"bond lengths and h(r) against {described['reference']}")
    if potential is None:
        from .potential import compiled_model
        spec = (compiled_model(config.model_spec, out_dir, config.dtype, config.device) if config.compile
                else config.model_spec)
        potential = load_model(spec, molecule=config.molecule, data_dir=config.data_dir,
                               device=config.device, dtype=config.dtype,
                               allow_other_molecule=config.allow_other_molecule)
    ff = ForceField(potential, device=config.device)
    if config.max_force_std is not None and not ff.committee:
        raise MDInputError(f"--max-force-std {config.max_force_std:g} needs a committee model (its spread is the "
                           f"uncertainty): build one with `oreo committee --out committee.pt MODEL1 MODEL2 ...` and "
                           f"pass --model committee.pt, or drop --max-force-std")
    fingerprint = model_fingerprint(config.model_spec) if isinstance(config.model_spec, str) else {}
    if ckpt is not None:
        _check_same_model(ckpt, fingerprint, str(state_file) if from_state else str(out_dir))
    generator = _make_generator(config.device, config.seed)
    files = io.RunFiles(out_dir, config.replicas,
                        io.THERMO_COLUMNS + ((io.SPREAD_COLUMN,) if ff.committee else ()))

    if ckpt is None:
        state, status = initial_state(config, held_out, generator)
        files.truncate({})
    else:
        state, status = _restore(ckpt, config, generator)
        files.truncate({} if from_state else ckpt["files"])
        if from_state:
            print(f"continuing from the state file {state_file} at {state.step * config.timestep / 1000:g} ps; "
                  f"the trajectory files in {out_dir} start there")

    integrator = make_integrator(config.thermostat, ff, config.timestep, config.temperature,
                                 tau=config.tau_steps * config.timestep, friction=config.friction,
                                 generator=generator)
    total_ps = config.n_steps * config.timestep / 1000.0
    bar = tqdm(total=total_ps, initial=state.step * config.timestep / 1000.0, unit="ps", dynamic_ncols=True,
               disable=(not progress) if progress is not None else None, desc=f"MD {config.system_name}",
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} ps [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
    run = _Run(config, out_dir, ff, files, generator, bar if not bar.disable else None, on_log)
    run.status = status
    run.model_meta = {**model_metadata(potential), **fingerprint}
    run.frames = described
    run.state_file = Path(state_file) if state_file is not None else None
    run.deadline = deadline
    if ckpt is not None:
        run.wall_s, run.steps_timed = float(ckpt["wall_s"]), int(ckpt["steps_timed"])
        run.timed_by_device = timed_by_device(ckpt)
        run.trajectory_from_step = int(state.step) if from_state else int(ckpt.get("trajectory_from_step") or 0)
    for r in range(state.n_systems):
        sel = (state.batch == r).cpu().numpy()
        first = held_out.frame_positions(status[r]["initial_frame"])
        cell = None if state.cell is None else state.cell[r].cpu().numpy()
        pbc = None if state.pbc is None else state.pbc[r].cpu().numpy()
        run.bonds.append(reference_bonds(state.numbers.cpu().numpy()[sel], first, reference, cell, pbc))
    if ckpt is not None and ckpt.get("observables") is not None:
        run.obs = Observables.from_dict(ckpt["observables"])
    elif ckpt is not None:   # a checkpoint from before observables existed: rebuild them from its trajectories
        run.obs = replay_trajectories([io.read_trajectory(io.trajectory_path(out_dir, r))
                                       for r in range(config.replicas)], run.bonds, config.bond_threshold,
                                      config.timestep)

    files.open()
    try:
        if ckpt is None:
            state = integrator.init(compute_forces(state, ff))
            run.log(state)
            state = run.observe(run.check_step(state))
            run.checkpoint(state)
        state = _loop(run, state, integrator)
        if not run.paused:
            run.checkpoint(state, completed=True)
    finally:
        files.close()
        bar.close()
    if run.paused:
        print(f"paused at {run.time_ps(state.step):g} ps of {config.ps:g} ps after {max_minutes:g} min (--max-minutes); "
              f"run the same command again to continue")
        return out_dir
    if config.analyze:
        from .analysis import analyze_run
        analyze_run(out_dir, forcefield=ff, frames=(held_out, reference))
    return out_dir


def format_duration(seconds: float) -> str:
    """A wall time in the unit a person reads at a glance: '45 s', '12 min', '3.4 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class _Progress:
    """What a run says about its pace: one wall-time estimate after the first steps (``ESTIMATE_AFTER_STEPS``
    or ``ESTIMATE_AFTER_S``), and without a progress bar a plain line every ``PROGRESS_EVERY_S`` seconds
    (ps done, steps/s, ETA) on stderr, so a log file shows a run is alive and when it will end."""

    def __init__(self, run: _Run, step0: int):
        self.run, self.step0 = run, step0
        self.t0 = time.perf_counter()
        self.estimated = False
        cfg, spec = run.config, str(run.config.model_spec)
        # --compile exports an eager oreo model file for the CPU: say so where it applies
        self.compile_hint = (not cfg.compile and (cfg.device or "cpu") == "cpu" and not spec.startswith("py:")
                             and not spec.endswith(".pt2"))
        self.next_line = self.t0 + PROGRESS_EVERY_S

    def __call__(self, state: MDState) -> None:
        now = time.perf_counter()
        done, elapsed = state.step - self.step0, now - self.t0
        cfg, run = self.run.config, self.run
        if done <= 0 or elapsed <= 0 or state.step >= cfg.n_steps or not bool(state.active.any()):
            return
        rate = done / elapsed
        left = (cfg.n_steps - state.step) / rate
        if not self.estimated and (done >= ESTIMATE_AFTER_STEPS or elapsed >= ESTIMATE_AFTER_S):
            self.estimated = True
            run.note(f"{rate:.1f} steps/s over the first {done} steps: the remaining "
                     f"{run.time_ps(cfg.n_steps - state.step):g} ps of {cfg.ps:g} ps ({cfg.n_steps - state.step} "
                     f"steps) will take about {format_duration(left)}. Stop with Ctrl-C at any time and rerun the "
                     f"same command to resume (or pass a smaller --ps)"
                     + ("" if not self.compile_hint or left < COMPILE_HINT_AFTER_S else
                        ". For a run this long, --compile is faster: the same model through its AOTInductor export, "
                        "built once in --out in a few minutes (benchmarks/md_paths.py and md_allocator.py measure "
                        "it)"))
        if run.bar is None and now >= self.next_line:
            self.next_line = now + PROGRESS_EVERY_S
            run.note(f"MD {cfg.system_name}: {run.time_ps(state.step):.6g}/{cfg.ps:g} ps "
                     f"({100.0 * state.step / cfg.n_steps:.1f}%), {rate:.1f} steps/s, "
                     f"{rate * cfg.timestep * 86400.0 / 1e6:.2f} ns/day, "
                     f"{int(state.active.sum())}/{state.n_systems} replicas running, ETA {format_duration(left)}")


def _loop(run: _Run, state: MDState, integrator) -> MDState:
    cfg = run.config
    n_steps, log_every, ckpt_every = cfg.n_steps, cfg.log_every, cfg.checkpoint_interval
    t0, steps0 = time.perf_counter(), state.step
    last_logged = state.step
    progress = _Progress(run, state.step)
    while state.step < n_steps and bool(state.active.any()):
        state = run.check_step(integrator.step(state))
        if state.step % log_every == 0 or state.step == n_steps:
            run.log(state)
            state = run.observe(state)
            last_logged = state.step
            now = time.perf_counter()
            run.timed(now - t0, state.step - steps0)
            t0, steps0 = now, state.step
            if state.step % ckpt_every == 0 or state.step == n_steps:
                run.checkpoint(state)
                if run.deadline is not None and time.perf_counter() >= run.deadline and state.step < n_steps:
                    run.paused = True
                    run.write_run_json(state, completed=False)
                    break
            if run.bar is not None:
                speed = run.speed()
                if speed["steps_per_s"] is not None:
                    run.bar.set_postfix_str(f"{speed['steps_per_s']:.0f} steps/s, {speed['ns_per_day']:.2f} ns/day",
                                            refresh=False)
                run.bar.update(run.time_ps(state.step) - run.bar.n)
            if run.on_log is not None:
                run.on_log(state)
        progress(state)
    if state.step != last_logged:   # every replica stopped between two log steps
        run.timed(time.perf_counter() - t0, state.step - steps0)
    return state
