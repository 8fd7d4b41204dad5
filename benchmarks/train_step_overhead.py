"""Per-step overhead of the compiled training step, side by side in one process (rMD17 molecule, ET 4x96,
batch 2: the campaign's recipe).

    python benchmarks/train_step_overhead.py --molecule ethanol --rounds 5 --steps 150

Three variants of the same steps on the same trainer, interleaved round by round (this machine is shared and
noisy, so only medians and ratios measured together are reported):
  - "module walks, per-tensor AdamW": what the step did before 2026-12-03: the parameter list for gradient
    clipping, the EMA update's operands and the compiled graph's inputs read by walking the module tree at every
    step, and torch's default (per-tensor loop) AdamW on CPU;
  - "lists kept, per-tensor AdamW": those lists built once (``forcefield.train``: now);
  - "lists kept, fused AdamW": and the fused AdamW kernel (``forcefield.train.loop.adamw``: now).
Writes ``OUT/train_step_overhead.md`` and ``.json``.
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

from forcefield.threads import configure_threads  # noqa: E402
from forcefield.train import Trainer, config_from_dict  # noqa: E402
from forcefield.train.loop import optimizer_step  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--molecule", default="ethanol")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150, help="steps per variant and round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step"))
    args = ap.parse_args(argv)
    configure_threads(args.threads)

    cfg = yaml.safe_load((REPO / "examples" / "configs" / f"rmd17_{args.molecule}.yaml").read_text())
    cfg["optim"].update({"compile": True, "batch_size": 2, "lr": 1e-5, "lr_warmup_steps": 0})
    out = Path(args.out)
    trainer = Trainer(config_from_dict(cfg), tempfile.mkdtemp(prefix="oreo-step-"), progress=False, log=print)
    model, ema, fn = trainer.model, trainer.ema, trainer._compiled._fn
    fused = trainer.optimizer
    per_tensor = torch.optim.AdamW(list(model.parameters()), lr=1e-5, weight_decay=0.0, foreach=False)
    kept_tensors = fn.tensors

    def walked_tensors():
        state = {**dict(fn.inner.potential.named_parameters()), **dict(fn.inner.potential.named_buffers())}
        return [state[n] for n in fn.names]

    def run(walk: bool, optimizer) -> float:
        fn.tensors = walked_tensors if walk else kept_tensors
        params = list(model.parameters())
        n_train = trainer.n_train()
        t0 = time.perf_counter()
        for k in range(args.steps):
            idx = np.array([(2 * k) % n_train, (2 * k + 1) % n_train])
            loss = trainer.batch_loss(idx)
            optimizer_step(loss, optimizer, model.parameters() if walk else params, 10.0, k, out / "none")
            if walk:
                torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 0.01)
            else:
                trainer.after_step()
        return (time.perf_counter() - t0) / args.steps * 1e3

    variants = {"module walks, per-tensor AdamW": (True, per_tensor),
                "lists kept, per-tensor AdamW": (False, per_tensor),
                "lists kept, fused AdamW": (False, fused)}
    run(False, fused)                                     # compile (or load the cache) and warm up
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (walk, opt) in variants.items():
            times[name].append(run(walk, opt))
    base = statistics.median(times["module walks, per-tensor AdamW"])
    rows = [{"variant": name, "median_ms": statistics.median(v), "speedup": base / statistics.median(v),
             "rounds_ms": [round(x, 2) for x in v]} for name, v in times.items()]
    lines = [f"{args.molecule}, ET 4x96, batch 2, compiled step, {args.threads} thread(s); medians of {args.rounds} "
             f"interleaved rounds of {args.steps} steps (`python benchmarks/train_step_overhead.py --molecule "
             f"{args.molecule}`)", "", "| variant | ms / step | speed-up |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['median_ms']:.2f} | {r['speedup']:.2f}x |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step_overhead.md").write_text("\n".join(lines) + "\n")
    (out / "train_step_overhead.json").write_text(json.dumps({"molecule": args.molecule, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
