"""Eager or compiled pretraining step: which one spends the campaign's pretraining CPU-hours better.

The ET-OREO / ET-ORO campaign jobs (ET 4x96, 5 epochs of the strict corpus each) cost many CPU-hours, so the
step is measured before it is spent. One process, one Pretrainer, the same batches of the real corpus; rounds
interleave ``--steps`` eager steps and ``--steps`` compiled steps (``optim.compile``: the objectives' forward
passes through one traced + Inductor-compiled energy/force graph, built once here, not timed), so machine noise
hits both alike. Reports the median seconds per step of each path and their ratio::

    python benchmarks/pretrain_paths.py --method et-oreo --steps 10 --rounds 3 --out benchmarks/results/pretrain_paths
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import forcefield  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"et-oreo": REPO / "examples/configs/pretrain_et_oreo.yaml",
           "et-oro": REPO / "examples/configs/pretrain_et_oro.yaml"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=sorted(CONFIGS), default="et-oreo")
    ap.add_argument("--corpus", default=str(REPO / "examples/configs/pretrain_corpus.yaml"))
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="folder for result.json and result.md")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from forcefield.pretrain.trainer import Pretrainer, load_pretrain_config
    torch.set_num_threads(args.threads)
    cfg = load_pretrain_config(CONFIGS[args.method], args.corpus)
    cfg.model.update({"hidden": args.hidden, "num_layers": args.layers})
    if args.batch_size:
        cfg.optim.batch_size = args.batch_size
    cfg.optim.compile = True
    with tempfile.TemporaryDirectory() as tmp:
        tr = Pretrainer(cfg, tmp, progress=False, data_dir=args.data_dir)
        compiled = tr._runner
        batches = tr.sampler.epoch_batches(0)
        k = 0

        def steps(runner, n):
            nonlocal k
            tr._runner = runner
            t0 = time.perf_counter()
            for _ in range(n):
                tr.train_step(batches[k % len(batches)])
                k += 1
            return (time.perf_counter() - t0) / n

        t0 = time.perf_counter()
        steps(compiled, 1)                                   # builds the compiled graph (not timed)
        build_s = time.perf_counter() - t0
        steps(None, 2)                                       # warm-up of the eager path
        times = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for name, runner in (("eager", None), ("compiled", compiled)) if r % 2 == 0 else \
                    (("compiled", compiled), ("eager", None)):
                times[name].append(steps(runner, args.steps))
            print(f"round {r + 1}/{args.rounds}: eager {times['eager'][-1]:.2f} s/step, compiled "
                  f"{times['compiled'][-1]:.2f} s/step", flush=True)
    atoms = float(np.mean([len(tr.corpus.collate(b).numbers) for b in batches[:20]]))
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {"method": args.method, "model": f"ET {args.layers}x{args.hidden}", "batch_size": cfg.optim.batch_size,
              "mean_atoms_per_batch": round(atoms, 1), "threads": args.threads, "steps_per_round": args.steps,
              "rounds": args.rounds, "build_s": round(build_s, 1), "s_per_step": times,
              "median_s_per_step": med, "speedup_compiled": med["eager"] / med["compiled"],
              "torch": torch.__version__}
    md = (f"# Pretraining step: eager vs compiled ({args.method}, ET {args.layers}x{args.hidden}, batch "
          f"{cfg.optim.batch_size}, ~{atoms:.0f} atoms, {args.threads} thread)\n\n"
          f"`python benchmarks/pretrain_paths.py --method {args.method} --steps {args.steps} --rounds {args.rounds}`"
          f" (one process, interleaved rounds)\n\n| path | median s/step | per round |\n|---|---:|---|\n"
          + "".join(f"| {n} | {med[n]:.2f} | {', '.join(f'{t:.2f}' for t in v)} |\n" for n, v in times.items())
          + f"\nCompiled / eager speed: **{result['speedup_compiled']:.2f}x**; the compiled graph took "
            f"{build_s:.0f} s to build (once per process, then cached on disk by Inductor).\n")
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1))
        (out / "result.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
