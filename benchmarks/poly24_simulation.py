"""oreo-poly24 simulation benchmark: stability, h(r) MAE, force MAE and speed of one model over polymers.

For each polymer of an oreo-poly24 set (default: every polymer in its manifest) runs
``--replicas`` (5) replicas of ``oreo-md simulate --dataset poly24 --polymer NAME`` in-process
(Nosé–Hoover at 600 K by default, 0.5 fs) from the polymer's test-split frames, analyses them and
writes a markdown table::

    python benchmarks/poly24_simulation.py --model runs/poly24/best.pt --ps 100

Reference frames for bond lengths and h(r): the polymer's test frames at ``--temperature`` when
the set has that temperature, else all its test frames (each run's summary says which). Force
MAE: the model on the polymer's test frames (meV/Å).

Resumable: finished runs (summary.json covering ``--ps``) are reused, interrupted ones continue
from their checkpoint. Run directories: ``OUT/<polymer>__<model>/``; table:
``OUT/poly24_simulation.md`` (and ``.json``), rewritten after every polymer.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

try:
    import md  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from md import io
from md.config import SimulationConfig
from md.errors import MDInputError
from md.integrators import THERMOSTATS
from md.poly24 import SHIPPED_MODEL, canonical_polymer, poly24_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from md17_simulation import run_label  # noqa: E402  (run directory names shared with the MD17 benchmark)


def set_polymers(args) -> List[str]:
    """The polymers to run: ``--polymers`` (checked against the set) or every polymer in the manifest."""
    from md.poly24 import load_manifest
    manifest = load_manifest(args.poly24_dir, args.data_dir)
    have = list(manifest.get("polymers", {}))
    if not args.polymers:
        return have
    names = [canonical_polymer(p) for p in args.polymers]
    missing = [n for n in names if n not in have]
    if missing:
        raise MDInputError(f"polymers {', '.join(missing)} are not in the set at "
                           f"{poly24_folder(args.poly24_dir, args.data_dir)} (it has {', '.join(have)})")
    return list(dict.fromkeys(names))


def make_config(polymer: str, args) -> SimulationConfig:
    return SimulationConfig(dataset="poly24", polymer=polymer, model=args.model, poly24_dir=args.poly24_dir,
                            data_dir=args.data_dir, ps=args.ps, replicas=args.replicas,
                            temperature=args.temperature, timestep=args.timestep, thermostat=args.thermostat,
                            seed=args.seed, log_every=args.log_every, device=args.device,
                            force_frames=args.force_frames).validate()


def run_one(polymer: str, args, tag: str) -> dict:
    """Simulate (or resume / reuse) one polymer; returns its summary.json content."""
    from md.analysis import analyze_run
    from md.rundir import finished_summary
    from md.simulate import run_simulation

    cfg = make_config(polymer, args)
    run_dir = Path(args.out) / f"{polymer}__{run_label(cfg.model_spec)}"
    summary = finished_summary(run_dir, cfg)
    if summary is not None:
        print(f"{tag} reusing the finished run in {run_dir}", flush=True)
        return summary
    if (run_dir / io.CHECKPOINT).is_file():
        old = SimulationConfig.from_dict(io.load_checkpoint(run_dir / io.CHECKPOINT)["config"])
        cfg.ps = max(cfg.ps, old.ps)
        print(f"{tag} resuming {run_dir}", flush=True)
    else:
        print(f"{tag} simulating {cfg.replicas} x {cfg.ps:g} ps at {cfg.temperature:g} K in {run_dir}", flush=True)
    run_simulation(cfg, run_dir, progress=args.progress)
    return io.read_json(run_dir / io.SUMMARY_JSON) if cfg.analyze else analyze_run(run_dir)


def row(polymer: str, summary: dict) -> dict:
    """The benchmark's numbers for one polymer from its summary."""
    stab = [r["stability_ps"] for r in summary.get("replicas", []) if r.get("stability_ps") is not None]
    speed = summary.get("speed") or {}
    model_meta = summary.get("model_metadata") or {}
    return {"polymer": polymer, "model": summary.get("model"),
            "stability_ps_mean": (summary.get("stability_ps") or {}).get("mean"),
            "stability_ps_std": (summary.get("stability_ps") or {}).get("std"),
            "stability_ps_min": min(stab) if stab else None,
            "stable_replicas": sum(1 for r in summary.get("replicas", []) if not r.get("unstable")),
            "replicas": summary.get("replicas_n"),
            "hr_mae_mean": (summary.get("hr_mae") or {}).get("mean"),
            "hr_mae_std": (summary.get("hr_mae") or {}).get("std"),
            "force_mae_meV_per_A": summary.get("force_mae_meV_per_A"),
            "force_frames": (summary.get("force") or {}).get("n_frames"),
            "steps_per_s": speed.get("steps_per_s"), "ns_per_day": speed.get("ns_per_day"),
            "simulated_ps": summary.get("simulated_ps"), "requested_ps": summary.get("requested_ps"),
            "completed": summary.get("completed"), "reference_frames": (summary.get("frames") or {}).get("reference"),
            "model_cutoff": model_meta.get("cutoff")}


def _num(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_table(rows: List[dict], args, command: str) -> str:
    model = rows[0]["model"] if rows else (args.model or SHIPPED_MODEL)
    lines = ["# oreo-poly24 simulation benchmark", "", "```", command, "```", "",
             f"Model `{model}`; {args.thermostat} at {args.temperature:g} K, {args.timestep:g} fs, "
             f"{args.replicas} replicas × {args.ps:g} ps per polymer, started from the polymer's test-split frames. "
             f"Stability: time until a bond deviates > 0.5 Å from its mean over the reference frames (the polymer's "
             f"test frames at {args.temperature:g} K when the set has them, else all its test frames); h(r) MAE over "
             f"the stable part (×10 Å); force MAE on the polymer's test frames.", "",
             "| Polymer | Stability mean ± std (ps) | Stability min (ps) | stable | h(r) MAE | Force MAE (meV/Å) "
             "| steps/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        stab = ("n/a" if r["stability_ps_mean"] is None
                else f"{r['stability_ps_mean']:.2f} ± {r['stability_ps_std']:.2f}")
        hr = "n/a" if r["hr_mae_mean"] is None else f"{r['hr_mae_mean']:.3f} ± {r['hr_mae_std']:.3f}"
        done = "" if r["completed"] else f" (partial: {_num(r['simulated_ps'], 2)} ps)"
        lines.append(f"| {r['polymer']}{done} | {stab} | {_num(r['stability_ps_min'], 2)} | "
                     f"{r['stable_replicas']}/{r['replicas']} | {hr} | {_num(r['force_mae_meV_per_A'], 1)} | "
                     f"{_num(r['steps_per_s'], 1)} |")
    if rows:
        def mean(key):
            vals = [r[key] for r in rows if r[key] is not None]
            return sum(vals) / len(vals) if vals else None
        lines.append(f"| **mean over {len(rows)}** | {_num(mean('stability_ps_mean'), 2)} | "
                     f"{_num(mean('stability_ps_min'), 2)} | {sum(r['stable_replicas'] for r in rows)}/"
                     f"{sum(r['replicas'] or 0 for r in rows)} | {_num(mean('hr_mae_mean'), 3)} | "
                     f"{_num(mean('force_mae_meV_per_A'), 1)} | {_num(mean('steps_per_s'), 1)} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, rows: List[dict], args, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, args, command)
    (out / "poly24_simulation.md").write_text(table)
    io.write_json(out / "poly24_simulation.json", {"command": command, "rows": rows})
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"checkpoint/export path, shipped name or py:module:factory "
                                                 f"(default: the shipped model '{SHIPPED_MODEL}')")
    p.add_argument("--polymers", nargs="*", help="subset of the set's polymers (default: all in its manifest)")
    p.add_argument("--poly24-dir", help="folder of the oreo-poly24 set (default $OREO_DATA_DIR/poly24)")
    p.add_argument("--data-dir", help="data folder whose poly24/ to use (default $OREO_DATA_DIR)")
    p.add_argument("--ps", type=float, default=100.0, help="picoseconds per replica (default 100)")
    p.add_argument("--replicas", type=int, default=5)
    p.add_argument("--temperature", type=float, default=600.0, help="K (default 600)")
    p.add_argument("--thermostat", choices=THERMOSTATS, default="nose-hoover")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--log-every", type=int, default=100, help="steps between logged frames (default 100)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--force-frames", type=int, default=1000, help="test frames for the force MAE (default 1000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/poly24", help="folder for runs and the table")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python benchmarks/poly24_simulation.py " + shlex.join(argv)
    out = Path(args.out)
    rows: List[dict] = []
    try:
        polymers = set_polymers(args)
        if polymers:
            make_config(polymers[0], args)            # fail early on a bad model or setting
        print(f"poly24 benchmark: {len(polymers)} polymers ({' '.join(polymers)}), model "
              f"{args.model or SHIPPED_MODEL}, {args.replicas} x {args.ps:g} ps at {args.temperature:g} K", flush=True)
        for i, polymer in enumerate(polymers, 1):
            tag = f"[{i}/{len(polymers)} {polymer}]"
            t0 = time.perf_counter()
            r = row(polymer, run_one(polymer, args, tag))
            rows.append(r)
            write_outputs(out, rows, args, command)
            print(f"{tag} stability {_num(r['stability_ps_mean'], 2)} ps (min {_num(r['stability_ps_min'], 2)}), "
                  f"h(r) MAE {_num(r['hr_mae_mean'], 3)}, force MAE {_num(r['force_mae_meV_per_A'], 1)} meV/Å, "
                  f"{_num(r['steps_per_s'], 1)} steps/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    except MDInputError as exc:
        print(f"poly24_simulation: error: {exc}", file=sys.stderr)
        return 2
    table = write_outputs(out, rows, args, command)
    print(table)
    print(f"wrote {out / 'poly24_simulation.md'} and {out / 'poly24_simulation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
