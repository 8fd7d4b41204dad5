"""Ship a pretrained backbone from a pretraining run, with a card saying what it saw and what it is worth.

    python release/ship_pretrained.py runs/pretrain_bench/pretrain/et-oreo --name pretrained-et-oreo \
        --benchmark runs/pretrain_bench

Writes ``forcefield/pretrained/<name>.pt`` (the run's ``pretrained.pt``: an oreo model file, so
``oreo finetune --from <name>`` and ``load_potential`` resolve it by name) and ``<name>.md`` (corpus sizes,
leakage protocol, steps, batch, wall time; the fine-tuning table of the benchmark when given).
"""
import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forcefield.io import PRETRAINED_DIR  # noqa: E402

CARD = """# oreo pretrained backbone: {name}

| | |
|---|---|
| file | `forcefield/pretrained/{name}.pt` (fine-tune: `oreo finetune --from {name} --molecule aspirin --train-size 200`) |
| objective | {method} ({objectives}) |
| architecture | {arch} |
| corpus | {corpus_frames:,} conformations: {corpus_rows} |
| leakage control | {leakage} |
| optimisation | {steps} steps × batch {batch}{ranks} = {seen:,} conformations seen ({epochs:.2f} epochs), lr {lr:g} cosine, {minutes:.0f} min of wall time ({where}) |

**This is a small pretraining.** The ET-OREO paper pretrains on 15.7 M conformations on GPUs; this backbone saw
{seen:,} conformations in {minutes:.0f} minutes ({where}) as {arch_short}. It is shipped because, in the benchmark
below, fine-tuning from its objective beat training from scratch at equal fine-tuning budget (in the cells the
table shows; read them, they differ by molecule and size); larger runs (`--pretrain-steps`,
the paper's 6 × 128 model) are a matter of compute (`torchrun` scales the same command out).

{benchmark}

Reproduce:

```bash
export OREO_DATA_DIR=/path/to/data
python benchmarks/pretrain_finetune.py {bench_args}
python release/ship_pretrained.py {run} --name {name} --benchmark {bench_out}
```
"""


def leakage_text(leak: dict) -> str:
    """What the corpus's leakage protocol did, in words, from its report (not one fixed sentence)."""
    targets = ", ".join(leak.get("targets") or []) or "no target"
    how = "same composition" if leak.get("match") == "composition" else "same bond graph"
    protocol = leak.get("protocol", "strict")
    if protocol == "strict":
        return f"`strict` protocol: every conformation of {targets} removed ({how})"
    if protocol == "paper":
        return f"`paper` protocol: the test frames of {targets} removed wherever they occur; their other frames kept"
    return f"`{protocol}` protocol: nothing removed"


def ship(run: Path, name: str, dest: Path, benchmark: Path = None, bench_args: str = "") -> Path:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    report = json.loads((run / "corpus_report.json").read_text())
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    # the counters of the shipped file itself (pretrained.pt is written at checkpoints, the log more often)
    from forcefield.io import load_potential
    shipped = (load_potential(run / "pretrained.pt").metadata or {}).get("pretrained") or {}
    steps = int(shipped.get("steps", last["step"]))
    batch, world = int(shipped.get("batch_size", cfg["optim"]["batch_size"])), int(shipped.get("world_size", 1))
    corpus_frames = sum(s["frames"] for s in report["summary"])
    m = cfg["model"]
    arch = (f"Equivariant Transformer {m['num_layers']} layers × {m['hidden']}, {m.get('num_heads', 8)} heads, "
            f"{m.get('num_rbf', 32)} RBF, cutoff {m.get('cutoff', 5.0):g} Å" if m["name"] == "et"
            else f"EGNN {m['num_layers']} layers × {m['hidden']}")
    objectives = cfg["objectives"]
    card = CARD.format(
        name=name, method=objectives.get("method"), objectives=", ".join(
            f"{k} {v:g}" for k, v in (objectives.get("weights") or {}).items()) or "paper weights",
        arch=arch, corpus_frames=corpus_frames,
        corpus_rows="; ".join(f"{s['name']} {s['frames']:,} ({s['kind']})" for s in report["summary"]),
        leakage=leakage_text(report["leakage"]), ranks=f" × {world} processes" if world > 1 else "",
        where=(f"device {cfg['optim'].get('device')}" if str(cfg["optim"].get("device") or "cpu") not in
               ("cpu", "auto") else "CPU") + f", {cfg['optim'].get('threads') or 1} thread(s) a process",
        arch_short=f"{m['name'].upper()} {m['num_layers']} × {m['hidden']}",
        steps=steps, batch=batch, seen=steps * batch * world, epochs=steps * batch * world / corpus_frames,
        lr=float(cfg["optim"]["lr"]), minutes=float(last["elapsed_s"]) / 60,
        benchmark=(benchmark / "results.md").read_text().replace("# Pretraining benchmark", "## Benchmark")
        if benchmark else "", run=run, bench_out=benchmark or "OUT", bench_args=bench_args or "...")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "pretrained.pt", dest / f"{name}.pt")
    (dest / f"{name}.md").write_text(card)
    return dest / f"{name}.pt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a pretraining run folder (oreo pretrain --out)")
    ap.add_argument("--name", required=True, help="shipped name, e.g. pretrained-et-oreo")
    ap.add_argument("--benchmark", type=Path, help="the pretrain_finetune.py --out folder whose table to quote")
    ap.add_argument("--bench-args", default="", help="the pretrain_finetune.py arguments, for the card")
    ap.add_argument("--dest", type=Path, default=PRETRAINED_DIR)
    args = ap.parse_args(argv)
    print(f"wrote {ship(args.run, args.name, args.dest, args.benchmark, args.bench_args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
