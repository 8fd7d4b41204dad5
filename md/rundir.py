"""A run directory and the resume policy: whether a call starts a run, continues one, or is refused.

The policy, in one place (``oreo-md simulate``, :func:`~md.simulate.run_simulation` and the benchmarks all use
it): a directory with a checkpoint is continued automatically (``resume=None``), required to have one
(``resume=True``) or refused (``resume=False``); ``overwrite`` deletes the previous run first. A continued run
takes the settings it was started with; only :data:`~md.config.RESUMABLE_CHANGES` may differ now (a longer
``ps``, another device, ...), any other setting given differently is an error that names it. File layout:
:mod:`md.io`.

A run can also continue from its compact state file (``--state FILE``: the checkpoint without the trajectory
files' sizes, small enough to commit), e.g. on a fresh clone where the run directory is gone: the state is taken
when it is further along than the run directory's checkpoint (or there is none), and the trajectory files then
start anew at the state's step (the metrics do not need the earlier frames: :mod:`md.observables`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple

from . import io
from .config import RESUMABLE_CHANGES, SimulationConfig
from .errors import MDInputError

CHECKPOINT_FORMAT = "oreo-md-checkpoint"
CHECKPOINT_VERSION = 2   #: 2: observables and the model file's SHA-256 in the checkpoint
#: every file a run (and its analysis) writes: what ``overwrite`` deletes
RUN_FILES = ("run.json", "checkpoint.pt", "thermo.csv", "summary.json", "hr.png", "thermo.png",
             "dft_check.json", "dft_parity.png", "dft_forces.npz")


def default_run_dir(config: SimulationConfig) -> Path:
    """``runs/md/<system>_<model>_<thermostat>_<T>K_seed<seed>``."""
    model = Path(config.model_spec.replace("py:", "").replace(":", "-")).stem or "model"
    return (Path("runs") / "md"
            / f"{config.system_name}_{model}_{config.thermostat}_{config.temperature:g}K_seed{config.seed}")


def read_run_checkpoint(out_dir: Path) -> Optional[dict]:
    """The run's checkpoint, or None when there is none; an error when the file is not an oreo-md checkpoint."""
    path = Path(out_dir) / io.CHECKPOINT
    if not path.is_file():
        return None
    ckpt = io.load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MDInputError(f"'{path}' is not an oreo-md checkpoint; choose another --out")
    return ckpt


def read_state_file(path) -> Optional[dict]:
    """A run's compact state file (``--state``), or None when the file does not exist yet."""
    path = Path(path)
    if not path.is_file():
        return None
    state = io.load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MDInputError(f"'{path}' is not an oreo-md state file; choose another --state")
    return state


def resume_conflicts(stored: SimulationConfig, config: SimulationConfig) -> Dict[str, tuple]:
    """Settings of ``config`` that differ from the ``stored`` run's and may not change on resume:
    ``{name: (stored, now)}``."""
    return {k: (getattr(stored, k), v) for k, v in config.to_dict().items()
            if k not in RESUMABLE_CHANGES and getattr(stored, k) != v}


def _no_checkpoint(out_dir) -> MDInputError:
    return MDInputError(f"--resume: no checkpoint in '{out_dir}'; drop --resume to start a new run there")


def further_along(state: Optional[dict], ckpt: Optional[dict]) -> bool:
    """Whether a run continues from the state file's record rather than the run directory's checkpoint: it exists
    and is further along (a fresh clone, or a GPU piece's state adopted while this folder stayed)."""
    return state is not None and (ckpt is None or int(state["state"]["step"]) > int(ckpt["state"]["step"]))


def plan_run(given: Dict[str, object], out_dir: Optional[Path], resume: bool = False,
             overwrite: bool = False, state_file=None) -> Tuple[SimulationConfig, Path, bool]:
    """``(config, run directory, continuing)`` for the settings given on a command line (``given``: only those
    set). A run directory with a checkpoint (``out_dir``, else the default directory of the given settings), or a
    ``state_file`` that exists, is continued with its stored settings, the given ones on top; otherwise the given
    settings start a new run."""
    given = dict(given)
    if given.get("dataset") == "rmd17":        # rMD17 is implied by --molecule; the config stores no dataset
        if not given.get("molecule"):
            raise MDInputError("--dataset rmd17 needs --molecule NAME")
        del given["dataset"]
    state = read_state_file(state_file) if state_file is not None and not overwrite else None
    ckpt = read_run_checkpoint(out_dir) if out_dir is not None and not overwrite else None
    if further_along(state, ckpt):
        ckpt = state                      # the record the run continues from, and its settings
    if ckpt is None:
        if resume and out_dir is None:
            raise MDInputError("--resume needs --out DIR (the run directory to continue)")
        if resume:
            raise _no_checkpoint(out_dir)
        if not any(given.get(k) for k in ("molecule", "structure", "polymer", "dataset")):
            raise MDInputError("give --molecule NAME (rMD17), --dataset poly24 --polymer NAME, or --structure FILE, "
                               "or --out DIR of a run to resume")
        config = SimulationConfig(**given).validate()
        out_dir = out_dir or default_run_dir(config)
        ckpt = None if overwrite else read_run_checkpoint(out_dir)
    if ckpt is None:
        return config, Path(out_dir), False
    stored = SimulationConfig.from_dict(ckpt["config"])
    return replace(stored, **given), Path(out_dir or default_run_dir(stored)), True


def prepare_run_dir(out_dir: Path, config: SimulationConfig, resume: Optional[bool], overwrite: bool,
                    state_file=None) -> Tuple[Optional[dict], bool]:
    """Create/clean ``out_dir``; return ``(checkpoint dict to resume from or None, taken from the state file)``.

    ``resume=None`` resumes automatically when a checkpoint (or ``state_file``) exists; ``True`` requires one;
    ``False`` refuses to touch an existing run (use ``overwrite``, which also ignores ``state_file``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        if resume:
            raise MDInputError("--resume and --overwrite contradict each other; pick one")
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for p in out_dir.glob("traj_*.extxyz"):
            p.unlink()
        return None, False
    ckpt = read_run_checkpoint(out_dir)
    state = read_state_file(state_file) if state_file is not None else None
    from_state = further_along(state, ckpt)
    if from_state:
        ckpt = state
    if ckpt is None:
        if resume:
            raise _no_checkpoint(out_dir)
        if any(out_dir.glob("traj_*.extxyz")) or (out_dir / io.THERMO_CSV).exists():
            raise MDInputError(f"'{out_dir}' holds trajectory files but no checkpoint; pass --overwrite to start "
                               f"over there or choose another --out")
        return None, False
    where = f"the state file '{state_file}'" if from_state else f"'{out_dir}'"
    if resume is False:
        raise MDInputError(f"{where} already holds a run; resume it (drop --no-resume), "
                           f"pass --overwrite to start over, or choose another --out")
    conflicts = resume_conflicts(SimulationConfig.from_dict(ckpt["config"]), config)
    if conflicts:
        desc = ", ".join(f"{k}: run has {a!r}, you gave {b!r}" for k, (a, b) in conflicts.items())
        raise MDInputError(f"cannot resume {where} with different settings ({desc}); drop those options, "
                           f"pass --overwrite to start over, or choose another --out")
    if config.n_steps < int(ckpt["state"]["step"]):
        raise MDInputError(f"--ps {config.ps} is shorter than the {int(ckpt['state']['step']) * config.timestep / 1000:g} ps "
                           f"already simulated in {where}; give a longer --ps or analyse with oreo-md analyze")
    return ckpt, from_state


def finished_summary(run_dir, config: SimulationConfig) -> Optional[dict]:
    """The summary.json of a finished run in ``run_dir`` that covers ``config``: the same settings (all but
    those a resume may change) and at least ``config.ps`` simulated; None when the run must be (re)done."""
    run_dir = Path(run_dir)
    summary_path, run_path = run_dir / io.SUMMARY_JSON, run_dir / io.RUN_JSON
    if not summary_path.is_file() or not run_path.is_file():
        return None
    run = io.read_json(run_path)
    old = SimulationConfig.from_dict(run["config"])
    summary = io.read_json(summary_path)
    if (not resume_conflicts(old, config) and run.get("completed")
            and old.ps >= config.ps and summary.get("requested_ps") == old.ps):
        from .potential import model_change, model_fingerprint
        if model_change(run.get("model"), model_fingerprint(config.model_spec)):
            return None                      # the model file was retrained or re-shipped since: not its run
        return summary
    return None
