"""Eager against compiled training step, side by side in one process, at the fine-tune grid's batch size.

    python benchmarks/compiled_step_speed.py --molecules aspirin ethanol --batch-size 8 --rounds 4 --steps 40
    python benchmarks/compiled_step_speed.py --molecules --qm9 homo --qm9-batch-size 32 --steps 30 --out benchmarks/results/train_step_qm9

For each molecule, two trainers of the same config (ET 4x96, rMD17 split 01, ``--train-size`` frames), one eager
and one with ``optim.compile``, take the same optimiser steps (batches in a fixed order, lr 1e-5), interleaved
round by round (this machine is shared and noisy, so only medians and ratios measured together are reported). The
compile itself (minutes once, cached on disk by Inductor) is timed apart, as a cost paid once per run. Writes
``OUT/compiled_vs_eager.md`` and ``.json``; the fine-tune grid's ``--compile`` (``pretrain_finetune.py``) rests on it.
``--qm9 PROPERTY`` does the same for a QM9 property model (ET 4x96 from scratch, the QM9 grid's batch of 32; its
compiled step has no forces: ``PropertyConfig.compile``), the QM9 grid's ``--compile``.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forcefield.pretrain.property import PropertyConfig, PropertyTrainer  # noqa: E402
from forcefield.threads import configure_threads  # noqa: E402
from forcefield.train import Trainer, config_from_dict  # noqa: E402
from forcefield.train.loop import optimizer_step  # noqa: E402


def trainer(molecule: str, compiled: bool, batch_size: int, train_size: int) -> Trainer:
    cfg = yaml.safe_load((REPO / "examples" / "configs" / f"rmd17_{molecule}.yaml").read_text())
    cfg["optim"].update({"compile": compiled, "batch_size": batch_size, "lr": 1e-5, "lr_warmup_steps": 0})
    cfg["data"]["train_size"] = train_size
    return Trainer(config_from_dict(cfg), tempfile.mkdtemp(prefix="oreo-step-"), progress=False, log=print)


def qm9_grid_model() -> dict:
    """The QM9 grid's scratch model: the ET-OREO config's backbone at 4x96 (``grid-qm9-4x96``)."""
    model = yaml.safe_load((REPO / "examples" / "configs" / "pretrain_et_oreo.yaml").read_text())["model"]
    return {**model, "hidden": 96, "num_layers": 4}


def property_trainer(prop: str, compiled: bool, batch_size: int, train_size: int) -> PropertyTrainer:
    """The QM9 grid's property run (ET 4x96 from scratch, TorchMD-Net's split) on ``train_size`` molecules."""
    cfg = PropertyConfig(property=prop, train_size=train_size, val_size=100, test_size=100, batch_size=batch_size,
                         lr=1e-5, lr_warmup_steps=0, compile=compiled, model=qm9_grid_model())
    return PropertyTrainer(cfg, tempfile.mkdtemp(prefix="oreo-step-"), progress=False, log=print)


def ms_per_step(t: Trainer, steps: int, batch_size: int) -> float:
    params = list(t.model.parameters())
    n = t.n_train()
    t0 = time.perf_counter()
    for k in range(steps):
        idx = np.arange(batch_size * k, batch_size * (k + 1)) % n
        optimizer_step(t.batch_loss(idx), t.optimizer, params, 10.0, k, t.out / "none")
        t.after_step()
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--molecules", nargs="*", default=["aspirin", "ethanol"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--qm9", nargs="*", default=[], metavar="PROPERTY",
                    help="also QM9 property models (homo, lumo, gap) at --qm9-batch-size")
    ap.add_argument("--qm9-batch-size", type=int, default=32)
    ap.add_argument("--qm9-train-size", type=int, default=2000)
    ap.add_argument("--train-size", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40, help="steps per path and round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step"))
    args = ap.parse_args(argv)
    configure_threads(args.threads)
    rows = []
    runs = [(m, args.batch_size, lambda c, m=m: trainer(m, c, args.batch_size, args.train_size)) for m in args.molecules]
    runs += [(f"QM9 {q}", args.qm9_batch_size,
              lambda c, q=q: property_trainer(q, c, args.qm9_batch_size, args.qm9_train_size)) for q in args.qm9]
    if not runs:
        ap.error("nothing to time: give --molecules and/or --qm9")
    for mol, batch_size, make in runs:
        eager, compiled = (make(c) for c in (False, True))
        t0 = time.perf_counter()
        ms_per_step(compiled, 1, batch_size)                 # compiles (or loads Inductor's cache)
        compile_s = time.perf_counter() - t0
        for t in (eager, compiled):                          # warm up both
            ms_per_step(t, 3, batch_size)
        times = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            times["eager"].append(ms_per_step(eager, args.steps, batch_size))
            times["compiled"].append(ms_per_step(compiled, args.steps, batch_size))
            print(f"{mol} round {r + 1}: eager {times['eager'][-1]:.1f}, compiled {times['compiled'][-1]:.1f} "
                  f"ms/step", flush=True)
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        rows.append({"molecule": mol, "batch_size": batch_size, "eager_ms": e, "compiled_ms": c, "speedup": e / c,
                     "compile_s": compile_s,
                     "rounds_ms": {k: [round(x, 1) for x in v] for k, v in times.items()}})
    command = " ".join(["python benchmarks/compiled_step_speed.py --molecules", *args.molecules]
                       + ([f"--batch-size {args.batch_size}"] if args.molecules else [])
                       + (["--qm9", *args.qm9, f"--qm9-batch-size {args.qm9_batch_size}"] if args.qm9 else [])
                       + [f"--rounds {args.rounds} --steps {args.steps}"])
    lines = [f"ET 4x96, {args.threads} thread(s); medians of {args.rounds} interleaved rounds of {args.steps} steps "
             f"(`{command}`)", "",
             "| model | batch | eager ms/step | compiled ms/step | speed-up | first compiled call (s; compile or "
             "Inductor cache) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['molecule']} | {r['batch_size']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['compile_s']:.0f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled_vs_eager.md").write_text("\n".join(lines) + "\n")
    (out / "compiled_vs_eager.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
