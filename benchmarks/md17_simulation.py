"""MD17 simulation benchmark (MDsim protocol): stability, h(r) MAE, force MAE and speed.

For each molecule (default: aspirin, ethanol, naphthalene, salicylic acid) and each model,
runs ``--replicas`` (5) Nosé–Hoover replicas at 500 K, 0.5 fs, for ``--ps`` (300) ps from
held-out rMD17 frames, analyses them, and writes a markdown table::

    python benchmarks/md17_simulation.py --models aspirin=runs/aspirin/best.pt ethanol=ethanol --ps 300

Resumable: finished runs (summary.json covering ``--ps``) are reused, interrupted ones continue
from their checkpoint. Run directories: ``OUT/<molecule>__<model>/``; table: ``OUT/md17_simulation.md``
(and ``.json``).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

try:
    import md  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from md import io
from md.config import SimulationConfig
from md.frames import canonical_molecule
from md.errors import MDInputError

MOLECULES = ("aspirin", "ethanol", "naphthalene", "salicylic")
TITLE = {"salicylic": "salicylic acid"}


def parse_models(entries: List[str], molecules: List[str]) -> List[Tuple[str, str]]:
    """``["aspirin=path", ...]`` -> ``[(molecule, spec), ...]``; default: the shipped model of each molecule."""
    if not entries:
        return [(m, m) for m in molecules]
    out = []
    for e in entries:
        if "=" not in e:
            raise MDInputError(f"--models entry '{e}' must look like MOLECULE=MODEL (e.g. aspirin=runs/aspirin.pt)")
        mol, spec = e.split("=", 1)
        if not spec:
            raise MDInputError(f"--models entry '{e}' has no model after '='")
        out.append((canonical_molecule(mol), spec))
    return out


def run_label(spec: str) -> str:
    stem = spec[3:] if spec.startswith("py:") else Path(spec).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "model"


def run_one(molecule: str, spec: str, args) -> Optional[dict]:
    """One model's MD run (resumed or reused when its run folder has it); None when ``args.max_minutes`` (if the
    namespace has it) paused it before the end."""
    from md.analysis import analyze_run
    from md.rundir import finished_summary
    from md.simulate import run_simulation

    run_dir = Path(args.out) / f"{molecule}__{run_label(spec)}"
    cfg = SimulationConfig(molecule=molecule, model=spec, ps=args.ps, replicas=args.replicas,
                           temperature=args.temperature, timestep=args.timestep, seed=args.seed,
                           data_dir=args.data_dir, device=args.device, force_frames=args.force_frames,
                           log_every=args.log_every, compile=bool(getattr(args, "compile", False))).validate()
    summary = finished_summary(run_dir, cfg)
    if summary is not None:
        print(f"[{molecule} / {spec}] reusing finished run in {run_dir}")
        return summary
    if (run_dir / io.CHECKPOINT).is_file():
        old = SimulationConfig.from_dict(io.load_checkpoint(run_dir / io.CHECKPOINT)["config"])
        cfg.ps = max(cfg.ps, old.ps)
        print(f"[{molecule} / {spec}] resuming {run_dir}")
    else:
        print(f"[{molecule} / {spec}] simulating {cfg.replicas} x {cfg.ps:g} ps in {run_dir}")
    run_simulation(cfg, run_dir, progress=args.progress, max_minutes=getattr(args, "max_minutes", None))
    if io.read_json(run_dir / io.RUN_JSON).get("paused"):
        return None                                      # paused by max_minutes: run again to continue
    return io.read_json(run_dir / io.SUMMARY_JSON) if cfg.analyze else analyze_run(run_dir)


def _pm(stats: dict, digits: int) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _num(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"   # runs with no timed step have no speed


def markdown_table(rows: List[dict], ps: float, replicas: int) -> str:
    """The table, each row with the length it was run for (a finished longer run is reused for a shorter --ps)
    and the header with the thermostat settings the runs used."""
    settings = sorted({(s["summary"].get("thermostat"), s["summary"].get("temperature_K"),
                        s["summary"].get("timestep_fs")) for s in rows}, key=str)
    names = {"nose-hoover": "Nosé–Hoover", "langevin": "Langevin", "nve": "NVE"}
    used = "; ".join(f"{names.get(str(th), th)} {t:g} K, {dt:g} fs" for th, t, dt in settings
                     if t is not None and dt is not None) or "Nosé–Hoover"
    lines = ["# MD17 simulation benchmark (MDsim protocol)", "",
             f"{used}, {replicas} replicas from held-out rMD17 frames (asked: {ps:g} ps each; the ps column says "
             f"what each row ran). "
             f"Stability: time until a bond deviates > 0.5 Å from its dataset mean (mean ± std over replicas); "
             f"h(r) MAE over the stable part (×10 Å) against every distinct rMD17 frame, beside its sampling floor "
             f"(an ideal sampler's, from draws of the reference); force MAE on held-out frames.", "",
             "| Molecule | Model | ps | Force MAE (meV/Å) | Stability (ps) | h(r) MAE | h(r) floor | steps/s | ns/day |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["summary"]
        force = s.get("force_mae_meV_per_A")
        speed = s.get("speed") or {}
        lines.append(f"| {TITLE.get(r['molecule'], r['molecule'])} | {r['model']} | {s.get('simulated_ps') or 0:g} | "
                     f"{'n/a' if force is None else f'{force:.1f}'} | {_pm(s['stability_ps'], 1)} | "
                     f"{_pm(s['hr_mae'], 3)} | {_pm(s.get('hr_floor'), 3)} | {_num(speed.get('steps_per_s'), 1)} | "
                     f"{_num(speed.get('ns_per_day'), 3)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=[], metavar="MOLECULE=MODEL",
                   help="models to benchmark (path, shipped name or py:module:factory); default: the shipped "
                        "model of each molecule")
    p.add_argument("--molecules", nargs="*", default=list(MOLECULES),
                   help="molecules when --models is not given (default: aspirin ethanol naphthalene salicylic)")
    p.add_argument("--ps", type=float, default=300.0, help="picoseconds per replica (default 300)")
    p.add_argument("--replicas", type=int, default=5)
    p.add_argument("--temperature", type=float, default=500.0)
    p.add_argument("--timestep", type=float, default=0.5)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--force-frames", type=int, default=1000, help="held-out frames for the force MAE")
    p.add_argument("--data-dir", help="folder holding rmd17/ (default $OREO_DATA_DIR)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/md17_simulation", help="folder for runs and the table")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        molecules = [canonical_molecule(m) for m in args.molecules]
        models = parse_models(args.models, molecules)
        rows = [{"molecule": mol, "model": spec, "summary": run_one(mol, spec, args)} for mol, spec in models]
    except MDInputError as exc:
        print(f"md17_simulation: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, args.ps, args.replicas)
    (out / "md17_simulation.md").write_text(table)
    compact = [{"molecule": r["molecule"], "model": r["model"],
                **{k: r["summary"].get(k) for k in ("force_mae_meV_per_A", "stability_ps", "hr_mae", "hr_floor", "speed",
                                                     "simulated_ps", "completed")}} for r in rows]
    io.write_json(out / "md17_simulation.json", compact)
    print(table)
    print(f"wrote {out / 'md17_simulation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
