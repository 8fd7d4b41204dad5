"""Which exact path runs the MD17 table fastest: eager model or compiled export, and how many replicas a batch.

The 300 ps MD17 table (4 molecules x 5 replicas, ``benchmarks/campaign.py`` MD jobs) costs tens of CPU-hours,
so its path is measured before it is spent. One process, rounds interleaved so machine noise hits every path
alike; each timing is ``--steps`` Nosé–Hoover steps (500 K, 0.5 fs) of the shipped model from held-out frames:

- ``eager``        the model as ``oreo-md simulate`` loads it (float32), ``--replicas`` replicas in one batch;
- ``compiled``     the same model as an AOTInductor ``.pt2`` export (built once here, not timed);
- ``eager xK``     K times the replicas in one batch (what running several molecules' replicas together would
                   give if one model served them: per-atom cost is what matters).

Reports median replica-steps per second of each path and the ratio to ``eager``::

    python benchmarks/md_paths.py --molecule naphthalene --steps 200 --rounds 3 --out benchmarks/results/md_paths
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

try:
    import md  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(spec: str, molecule: str, replicas: int, seed: int = 0):
    """(state, integrator) of ``replicas`` replicas started from held-out frames."""
    import torch
    from md.config import SimulationConfig
    from md.frames import load_frames
    from md.integrators import compute_forces, make_integrator
    from md.potential import ForceField, load_model
    from md.simulate import initial_state
    cfg = SimulationConfig(molecule=molecule, model=spec, replicas=replicas, seed=seed).validate()
    held_out = load_frames(molecule, "test")
    state, _ = initial_state(cfg, held_out, torch.Generator().manual_seed(seed))
    ff = ForceField(load_model(spec, molecule=molecule))
    integ = make_integrator(cfg.thermostat, ff, cfg.timestep, cfg.temperature, tau=cfg.tau_steps * cfg.timestep)
    return integ.init(compute_forces(state, ff)), integ


def timed(state, integ, steps: int) -> float:
    """Seconds for ``steps`` integration steps (after 5 untimed ones)."""
    for _ in range(5):
        state = integ.step(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state = integ.step(state)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecule", default="naphthalene")
    ap.add_argument("--model", help="model (default: the molecule's shipped one)")
    ap.add_argument("--replicas", type=int, default=5)
    ap.add_argument("--batch-factors", type=int, nargs="*", default=[4], help="K of the 'eager xK' paths")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compiled", action="store_true", help="skip the .pt2 export (needs a C++ compiler)")
    ap.add_argument("--out", help="folder for md_paths.json / md_paths.md")
    from forcefield.threads import add_threads_argument, configure_threads
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    configure_threads(args.threads)
    spec = args.model or args.molecule
    paths = {"eager": (spec, args.replicas)}
    if not args.no_compiled:
        from forcefield.compiled import export_compiled
        pt2 = Path(tempfile.mkdtemp()) / f"{Path(spec).stem}.pt2"
        print(f"building {pt2} (AOTInductor; minutes)", flush=True)
        export_compiled(spec, pt2)
        paths["compiled"] = (str(pt2), args.replicas)
    for k in args.batch_factors:
        paths[f"eager x{k}"] = (spec, args.replicas * k)
    runs = {name: build(s, args.molecule, n) for name, (s, n) in paths.items()}
    rates = {name: [] for name in paths}
    for r in range(args.rounds):
        for name, (state, integ) in runs.items():
            rates[name].append(paths[name][1] * args.steps / timed(state, integ, args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)
    base = statistics.median(rates["eager"])
    rows = [{"path": n, "replicas": paths[n][1], "replica_steps_per_s": statistics.median(v),
             "ratio_to_eager": statistics.median(v) / base, "rounds": v} for n, v in rates.items()]
    lines = [f"{args.molecule}, {args.steps} Nosé–Hoover steps per timing, medians of {args.rounds} interleaved "
             f"rounds, {args.threads or 1} thread(s)", "", "| path | replicas in the batch | replica-steps/s | vs eager |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['replicas']} | {r['replica_steps_per_s']:.1f} | {r['ratio_to_eager']:.2f}x |"
              for r in rows]
    write_results(args.out, "md_paths", {"molecule": args.molecule, "rows": rows}, lines)
    return 0


def write_results(out_dir: Optional[str], name: str, payload: Dict, lines: List[str]) -> None:
    """Print the table ``lines``; with an output folder, also write ``NAME.json`` (``payload``) and ``NAME.md``."""
    print("\n".join(lines))
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
