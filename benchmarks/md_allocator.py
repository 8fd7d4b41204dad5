"""Compiled MD (or QM9 property training) with glibc's default malloc policy against
:func:`forcefield.allocator.keep_freed_memory`.

The policy is per process (glibc reads it once), so each timing runs in a fresh child process: the same
compiled ``.pt2`` model, ``--replicas`` replicas from held-out frames, ``--steps`` Nosé–Hoover steps (500 K,
0.5 fs; :mod:`md_paths`' setup) after 5 untimed ones. The two variants alternate, and the first of each round
changes, so machine noise (this machine is shared) hits both alike; the table gives medians and their ratio::

    python benchmarks/md_allocator.py --molecule salicylic --rounds 5 --out benchmarks/results/md_allocator
    python benchmarks/md_allocator.py --pt2 runs/md/model-....pt2 ...     # reuse an export (else built here)

``--workload qm9``: each timing is instead one epoch of the QM9 grid's property training (ET 4x96 from scratch,
LUMO, batches of 32, the compiled step, ``--qm9-steps`` steps then validation on ``--qm9-val`` molecules), as
CPU-time rate (steps per CPU-second, validation included)::

    python benchmarks/md_allocator.py --workload qm9 --rounds 3 --out benchmarks/results/qm9_allocator
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import md  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from md_paths import build, timed, write_results  # noqa: E402

VARIANTS = {"glibc default (OREO_MALLOC=default)": "default", "keep freed memory (oreo's default)": ""}


def child(args) -> int:
    """One timing in this process: print replica-steps per second (QM9: training steps per CPU-second)."""
    from forcefield.threads import configure_threads
    configure_threads(args.threads)
    if args.workload == "qm9":
        print(qm9_epoch_rate(args))
        return 0
    state, integ = build(args.pt2, args.molecule, args.replicas)
    print(args.replicas * args.steps / timed(state, integ, args.steps))
    return 0


def qm9_epoch_rate(args) -> float:
    """One compiled QM9 property-training epoch (the grid's model and batch) in this process: steps per CPU-second,
    validation included (the compile, the first step, is left out)."""
    import time
    from compiled_step_speed import qm9_grid_model
    from forcefield.pretrain.property import PropertyConfig, PropertyTrainer
    cfg = PropertyConfig(property="lumo", val_size=args.qm9_val, test_size=10, epochs=1, epoch_steps=args.qm9_steps,
                         compile=True, model=qm9_grid_model(), threads=args.threads)
    tr = PropertyTrainer(cfg, tempfile.mkdtemp(prefix="oreo-alloc-"), progress=False, log=lambda s: None)
    tr.batch_loss(np.arange(cfg.batch_size)).backward()          # compiles (forward and backward), not timed
    tr.model.zero_grad()
    t0 = time.process_time()
    tr.fit()
    return args.qm9_steps / (time.process_time() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["md", "qm9"], default="md")
    ap.add_argument("--qm9-steps", type=int, default=300, help="--workload qm9: training steps per timing")
    ap.add_argument("--qm9-val", type=int, default=3000, help="--workload qm9: validation molecules per timing")
    ap.add_argument("--molecule", default="salicylic")
    ap.add_argument("--model", help="model to export (default: the molecule's shipped one)")
    ap.add_argument("--pt2", help="an existing export of the model (skips building one)")
    ap.add_argument("--replicas", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="folder for md_allocator.json / md_allocator.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    pt2 = args.pt2
    if pt2 is None and args.workload == "md":
        from forcefield.threads import configure_threads
        configure_threads(args.threads)
        from forcefield.compiled import export_compiled
        pt2 = str(Path(tempfile.mkdtemp()) / f"{args.molecule}.pt2")
        print(f"building {pt2} (AOTInductor; minutes)", flush=True)
        export_compiled(args.model or args.molecule, pt2)
    rates = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            env = {**os.environ, "OREO_MALLOC": VARIANTS[name]}
            cmd = [sys.executable, __file__, "--child", "--workload", args.workload, "--molecule", args.molecule,
                   "--replicas", str(args.replicas), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--qm9-steps", str(args.qm9_steps), "--qm9-val", str(args.qm9_val)] + (["--pt2", pt2] if pt2 else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"the timing run failed:\n{out.stderr[-2000:]}")
            rates[name].append(float(out.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)
    base = statistics.median(rates[names[0]])
    unit = "replica-steps/s" if args.workload == "md" else "steps per CPU-second"
    rows = [{"variant": n, "rate": statistics.median(v), "unit": unit, "ratio": statistics.median(v) / base,
             "rounds": [round(x, 2) for x in v]} for n, v in rates.items()]
    if args.workload == "md":
        what = (f"{args.molecule}, compiled (.pt2), {args.replicas} replicas, {args.steps} Nosé–Hoover steps per timing"
                f" (`python benchmarks/md_allocator.py --molecule {args.molecule}`)")
    else:
        what = (f"QM9 LUMO training, ET 4x96 from scratch, batches of 32, compiled step: {args.qm9_steps} steps and a "
                f"validation on {args.qm9_val} molecules per timing (`python benchmarks/md_allocator.py --workload qm9`)")
    lines = [f"{what}, each in a fresh process; medians of {args.rounds} alternating rounds, {args.threads} thread(s), "
             f"other jobs sharing the machine", "",
             f"| malloc policy | {unit} | vs glibc default |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['rate']:.1f} | {r['ratio']:.2f}x |" for r in rows]
    write_results(args.out, "md_allocator" if args.workload == "md" else "qm9_allocator",
                  {"workload": args.workload, "molecule": args.molecule, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
