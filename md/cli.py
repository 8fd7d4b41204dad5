"""``oreo-md``: simulate, analyze and DFT-check MD runs. Only parses arguments and calls md/ functions.

Examples::

    oreo-md simulate --molecule aspirin --ps 300            # shipped model 'aspirin', 5 replicas, 500 K NH
    oreo-md simulate --molecule ethanol --model runs/ethanol.pt --thermostat langevin --friction 0.02
    oreo-md simulate --dataset poly24 --polymer PE --model runs/poly24.pt --temperature 600   # oreo-poly24 polymer
    oreo-md simulate --out runs/md/aspirin_x                 # resume a killed run (automatic)
    oreo-md simulate --molecule ethanol --model aspirin --allow-other-molecule   # another molecule's model, on purpose
    oreo-md simulate --molecule aspirin --ps 300 --state aspirin-md.pt --max-minutes 120   # in pieces, any clone
    oreo-md analyze runs/md/aspirin_x
    oreo-md analyze aspirin-md.pt                          # a run's metrics from its state file alone
    oreo-md dft-check runs/md/aspirin_x --frames 10
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Optional

from forcefield.threads import add_threads_argument, configure_threads

from .config import DATASETS
from .errors import MDInputError
from .integrators import THERMOSTATS

PROG = "oreo-md"


def _molecule(name: str) -> str:
    from .frames import canonical_molecule
    try:
        return canonical_molecule(name)
    except MDInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _polymer(name: str) -> str:
    from .poly24 import canonical_polymer
    try:
        return canonical_polymer(name)
    except MDInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{text}'") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Molecular dynamics with oreo force fields (MDsim-style "
                                "stability / h(r) benchmark).")
    sub = p.add_subparsers(dest="command", metavar="{simulate,analyze,dft-check}")
    sub.required = True

    s = sub.add_parser("simulate", help="run (or resume) batched MD replicas",
                       description="Run MD replicas as one batch; resumes automatically when --out has a checkpoint. "
                                   "Defaults follow MDsim for MD17 (500 K, 0.5 fs, Nose-Hoover, 5 replicas).")
    sys_ = s.add_mutually_exclusive_group()
    sys_.add_argument("--molecule", type=_molecule, help="rMD17 molecule (initial frames: held-out test split)")
    sys_.add_argument("--structure", help="ASE-readable file with the initial/reference frames (e.g. periodic)")
    sys_.add_argument("--polymer", type=_polymer, help="oreo-poly24 polymer (with --dataset poly24; initial frames: "
                                                      "its test split)")
    s.add_argument("--dataset", choices=("rmd17",) + DATASETS,
                   help="where --molecule / --polymer frames come from: rmd17 (default, --molecule) or poly24 "
                        "(--polymer)")
    s.add_argument("--poly24-dir", help="folder of the oreo-poly24 set (default $OREO_DATA_DIR/poly24)")
    s.add_argument("--model", help="checkpoint/export path, shipped model name (default: the molecule's name; "
                                   "poly24: the shipped model 'poly24'), or py:module:factory")
    s.add_argument("--allow-other-molecule", action="store_true", default=None,
                   help="run a model trained on another molecule than --molecule (refused by default)")
    s.add_argument("--ps", type=_positive(float), help="picoseconds per replica (default 300)")
    s.add_argument("--replicas", type=_positive(int), help="number of replicas (default 5)")
    s.add_argument("--temperature", type=float, help="K (default 500)")
    s.add_argument("--timestep", type=_positive(float), help="fs (default 0.5)")
    s.add_argument("--thermostat", choices=THERMOSTATS, help="default nose-hoover")
    s.add_argument("--tau-steps", type=_positive(float), help="Nose-Hoover coupling time in steps (default 20)")
    s.add_argument("--friction", type=_positive(float), help="Langevin friction in 1/fs (default 0.01)")
    s.add_argument("--seed", type=int, help="seed for initial frames, velocities and noise (default 123)")
    s.add_argument("--out", help="run directory (default runs/md/<system>_<model>_<thermostat>_<T>K_seed<seed>)")
    s.add_argument("--data-dir", help="folder holding rmd17/ and poly24/ (default $OREO_DATA_DIR)")
    s.add_argument("--split-index", type=_positive(int), help="rMD17 split 1-5 for the held-out frames (default 1)")
    s.add_argument("--device", help="torch device (default cpu)")
    s.add_argument("--dtype", choices=("float32", "float64"), help="dtype of the potential (default float32)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model through its AOTInductor export, built once in --out (a few minutes; needs a "
                        "C++ compiler): the same function in fused kernels (benchmarks/md_paths.py measures the gain)")
    s.add_argument("--log-every", type=_positive(int), help="steps between logged frames (default 100)")
    s.add_argument("--checkpoint-every", type=_positive(int), help="steps between checkpoints (default 10 x log-every)")
    s.add_argument("--stop-unstable", action=argparse.BooleanOptionalAction, default=None,
                   help="stop replicas whose max bond deviation exceeds --bond-threshold (default on)")
    s.add_argument("--bond-threshold", type=_positive(float), help="Å (default 0.5)")
    s.add_argument("--max-temperature-factor", type=_positive(float),
                   help="stop replicas hotter than this x --temperature (default 10)")
    s.add_argument("--max-force-std", type=_positive(float),
                   help="eV/Å: stop replicas whose committee force spread (largest per-atom norm of the force std "
                        "over the members) exceeds this; needs a committee model (oreo committee). Committee runs "
                        "log the spread in thermo.csv (Fstd_max) and each frame (forces_std_max) either way")
    s.add_argument("--force-frames", type=_non_negative_int,
                   help="held-out frames for the force MAE in the analysis (default 1000; 0 skips)")
    s.add_argument("--analyze", action=argparse.BooleanOptionalAction, default=None,
                   help="analyze the run at the end (default on)")
    s.add_argument("--resume", action="store_true", help="require a checkpoint in --out and continue it")
    s.add_argument("--state", help="also keep the run's compact state in this file (positions, velocities, "
                                   "thermostat, RNG, step, accumulated metrics: kB, not MB) and continue from it "
                                   "when it is further along than --out's checkpoint, e.g. on a fresh clone")
    s.add_argument("--max-minutes", type=_positive(float),
                   help="pause at the first checkpoint after this many minutes of wall time (run again to continue)")
    s.add_argument("--overwrite", action="store_true", help="delete a previous run in --out and start over")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: on when stderr is a terminal); without it a plain progress "
                        "line (ps done, steps/s, ETA) goes to stderr every minute. Either way the estimated wall "
                        "time is printed after the first steps")

    add_threads_argument(s)

    a = sub.add_parser("analyze", help="stability, h(r), force MAE and speed of a run",
                       description="Write summary.json, hr.png and thermo.png of a run directory.")
    a.add_argument("run_dir", help="run directory (--out of simulate), or a state file (--state of simulate): "
                                   "then no trajectory file is needed and no plot is written")
    a.add_argument("--force-frames", type=_non_negative_int, help="held-out frames for the force MAE (0 skips)")
    a.add_argument("--batch-size", type=_positive(int), default=64, help="frames per force evaluation (default 64)")
    a.add_argument("--device", help="torch device for the force MAE (default: the run's)")
    a.add_argument("--data-dir", help="folder holding rmd17/ (default: the run's, or $OREO_DATA_DIR)")
    a.add_argument("--poly24-dir", help="folder of the oreo-poly24 set (default: the run's)")
    a.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    add_threads_argument(a)

    d = sub.add_parser("dft-check", help="PySCF forces on frames of the model's own trajectory",
                       description="Recompute forces of sampled trajectory frames at PBE/def2-SVP (rMD17's level) "
                                   "with PySCF and report the model's force MAE. Needs: pip install 'oreo[dft]'.")
    d.add_argument("run_dir", help="run directory (--out of simulate: frames from its trajectory), or a state file "
                                   "(--state of simulate: frames from the sample of the run's last 100 ps it keeps)")
    d.add_argument("--frames", type=_positive(int), default=10, help="frames to check (default 10)")
    d.add_argument("--seed", type=int, default=0, help="seed of the frame sample (default 0)")
    d.add_argument("--replica", type=_non_negative_int, help="only frames of this replica")
    d.add_argument("--xc", default="pbe", help="exchange-correlation functional (default pbe)")
    d.add_argument("--basis", default="def2-svp", help="basis set (default def2-svp)")
    d.add_argument("--grid-level", type=_non_negative_int, default=4, help="PySCF DFT grid level (default 4)")
    d.add_argument("--conv-tol", type=_positive(float), default=1e-10, help="SCF convergence, Hartree (default 1e-10)")
    d.add_argument("--max-memory", type=_positive(int), help="PySCF memory limit in MB")
    d.add_argument("--max-minutes", type=_positive(float),
                   help="start no new frame after this many minutes (frames are saved as they finish; run the same "
                        "command again to continue)")
    add_threads_argument(d)
    return p


# ---------------------------------------------------------------------------------- commands
def _simulate(args) -> int:
    from . import io
    from .config import SimulationConfig
    from .rundir import plan_run
    from .simulate import run_simulation

    names = {f.name for f in fields(SimulationConfig)}
    given: Dict[str, object] = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg, out, continuing = plan_run(given, Path(args.out) if args.out else None, args.resume, args.overwrite,
                                    state_file=args.state)
    if continuing:
        print(f"resuming the run in {out}")
    run_simulation(cfg, out, resume=True if args.resume else None, overwrite=args.overwrite, progress=args.progress,
                   state_file=args.state, max_minutes=args.max_minutes)
    print(f"run directory: {out}")
    run = io.read_json(out / io.RUN_JSON)
    if cfg.analyze and not run.get("paused"):
        _print_summary(io.read_json(out / io.SUMMARY_JSON))
    replicas = run["replicas"]
    if replicas and all(r.get("non_finite") for r in replicas):
        first = min(replicas, key=lambda r: r["stop_step"])
        print(f"{PROG} simulate: error: every replica ({len(replicas)}) went non-finite (NaN or inf energies, forces "
              f"or positions), the first at step {first['stop_step']}: {first['reason']}. The potential failed on "
              f"these structures; check the model (--model) and the initial frames. Files are in {out}",
              file=sys.stderr)
        return 1
    return 0


def _analyze(args) -> int:
    from .analysis import analyze_run, analyze_state
    if Path(args.run_dir).is_file():
        summary = analyze_state(args.run_dir, force_frames=args.force_frames, data_dir=args.data_dir,
                                batch_size=args.batch_size, device=args.device or "cpu", poly24_dir=args.poly24_dir)
        _print_summary(summary)
        return 0
    summary = analyze_run(args.run_dir, force_frames=args.force_frames, batch_size=args.batch_size,
                          device=args.device, data_dir=args.data_dir, plots=not args.no_plots,
                          poly24_dir=args.poly24_dir)
    _print_summary(summary)
    print(f"wrote {Path(args.run_dir) / 'summary.json'}")
    return 0


def _dft_check(args) -> int:
    from .dft import dft_check
    report = dft_check(args.run_dir, n_frames=args.frames, seed=args.seed, replica=args.replica, xc=args.xc,
                       basis=args.basis, grid_level=args.grid_level, conv_tol=args.conv_tol,
                       max_memory=args.max_memory, max_minutes=args.max_minutes)
    failed = int(report.get("n_failed") or 0)
    if not report["n_frames"]:
        if failed:
            print(f"{PROG} dft-check: error: the SCF converged on none of the {failed} frame(s) tried (see "
                  f"failed_frames in the report); try another --xc / --basis or check the trajectory",
                  file=sys.stderr)
            return 1
        print("DFT check: no frame done" + (f" within --max-minutes {args.max_minutes:g}"
                                             if args.max_minutes is not None else "") + "; run again to continue")
        return 0
    print(f"DFT check ({args.xc}/{args.basis}) on {report['n_frames']} of {args.frames} frames: force MAE "
          f"{report['force_mae_meV_per_A']:.1f} meV/Å (RMSE {report['force_rmse_meV_per_A']:.1f})"
          + (f"; {failed} frame(s) without a converged SCF left out" if failed else ""))
    from .dft import output_paths
    paths = output_paths(Path(args.run_dir))
    print(f"wrote {paths['json']}" + (f" and {paths['png'].name}" if paths["png"] is not None else ""))
    return 0


def _num(value, digits: int, unit: str = "") -> str:
    """A number, or "n/a" when there is none (None, NaN, inf): never a number that is not one."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def _fmt(stats: dict, digits: int = 2) -> str:
    if not stats or _num(stats.get("mean"), digits) == "n/a":
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _print_summary(summary: dict) -> None:
    print(f"{summary['system']} with {summary['model']} ({summary['thermostat']}, {summary['temperature_K']:g} K, "
          f"{summary['simulated_ps']:g} ps of {summary['requested_ps']:g})")
    for rep in summary["replicas"]:
        why = f"  [{rep['stop_reason']}]" if rep.get("stop_reason") else ""
        floor = f" (sampling floor {_num(rep.get('hr_floor'), 3)})" if rep.get("hr_floor") is not None else ""
        print(f"  replica {rep['replica']}: stability {_num(rep['stability_ps'], 2)} ps, "
              f"h(r) MAE {_num(rep['hr_mae'], 3)}{floor}{why}")
    if summary.get("frames", {}).get("reference") and summary.get("dataset") == "poly24":
        print(f"  reference frames (bonds, h(r)): {summary['frames']['reference']}")
    speed = summary.get("speed") or {}
    steps_per_s = _num(speed.get("steps_per_s"), 1)
    pace = ("speed n/a (no step timed)" if steps_per_s == "n/a"
            else f"{steps_per_s} steps/s ({_num(speed.get('ns_per_day'), 3)} ns/day)")
    print(f"  stability {_fmt(summary['stability_ps'])} ps | h(r) MAE {_fmt(summary['hr_mae'], 3)} (floor "
          f"{_fmt(summary.get('hr_floor') or {}, 3)}) | force MAE "
          f"{_num(summary.get('force_mae_meV_per_A'), 1, ' meV/Å')} | {pace}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"simulate": _simulate, "analyze": _analyze, "dft-check": _dft_check}
    try:
        configure_threads(getattr(args, "threads", None))   # before torch loads: one thread unless told
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return handlers[args.command](args)
    except MDInputError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the last checkpoint is kept - run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
