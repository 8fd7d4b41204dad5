#!/usr/bin/env python
"""Side-by-side speed benchmark: oreo ET against the installed peers (the command line; the work is in
``speed_contenders.py`` (the models), ``speed_harness.py`` (data, interleaved timing, workloads) and
``speed_report.py`` (tables and plot)).

Measures, in one run and interleaved (round-robin blocks, the order rotated every round, so load
drift hits every contender alike), medians over the blocks:

  (a) single    one energy + forces call on aspirin (21 atoms), ms
  (b) ase-md    ASE Langevin MD, ms per step (ASE calculator, 0.5 fs, 300 K; fp32 model, fp64 integration)
  (c) batched   R replicas of aspirin in one batched model call per step, Langevin BAOAB in float64 by
                md.integrators (the same loop for all contenders): atom-steps per second
  (d) train     energy + force training steps (batch of B rMD17 aspirin frames, AdamW, grad clipping): samples/s

Contenders: oreo ET at the paper size (6 layers x 128, 8 heads, 32 rbf, 5 Å) — eager, TorchScript, and
AOTInductor (``--aoti``) — plus any module with oreo's call signature (``--contender NAME=module:factory``, e.g.
the frozen code from before the speed work: ``--contender "oreo original=tests.test_speed_equivalence:reference_of"``).
Peers run in their own virtual environments (they conflict with each other): each peer worker process times the
peer *and* oreo eager interleaved, so every peer ratio comes from one process; see benchmarks/README_speed.md
for installing them.

    python benchmarks/speed.py --threads 2 --aoti build \\
        --peer tmdnet=/tmp/peers-tmdnet/bin/python --peer mace=/tmp/peers-mace/bin/python \\
        --peer nequip=/tmp/peers-nequip/bin/python

Writes ``<out>/speed.md`` (markdown table), ``<out>/speed.json`` and ``<out>/speed.png``.
Random weights everywhere (speed does not depend on them).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from forcefield.files import write_json  # noqa: E402
from speed_contenders import PEERS, aoti_path, compiled_contender, oreo_contenders, oreo_model, potential_contender  # noqa: E402
from speed_harness import WORKLOADS, aspirin, run_all, with_batch  # noqa: E402
from speed_report import report  # noqa: E402


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def settings(args) -> dict:
    return {"threads": args.threads, "rounds": args.rounds, "replicas": args.replicas, "train_batch": args.train_batch,
            "command": " ".join(sys.argv), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def worker(args) -> None:
    """Run inside a peer's environment: the peer, oreo eager and (with --aoti PATH) oreo compiled, interleaved;
    JSON to --json."""
    set_threads(args.threads)
    data = with_batch(aspirin(), args.train_batch)
    contenders = []
    try:
        got = PEERS[args.worker](args, data)
        contenders.extend(got if isinstance(got, list) else [got])
    except Exception as exc:
        write_json(args.json, {"error": f"{type(exc).__name__}: {exc}"})
        raise
    contenders.insert(0, potential_contender("oreo ET eager", oreo_model(), data, oreo_model()))
    if args.aoti and Path(args.aoti).is_file():  # the main process's .pt2: compiled oreo in the same process too
        contenders.insert(1, compiled_contender(Path(args.aoti), data))
    res = run_all(contenders, data, args)
    peers = [c for c in contenders if not c.name.startswith("oreo")]
    write_json(args.json, {"results": res, "note": "; ".join(c.note for c in peers if c.note)})


def run_peer(name: str, python: str, args, out: Path, results: dict) -> None:
    """One peer's worker process (its own interpreter); its results join ``results``."""
    if name not in PEERS:
        results["notes"].append(f"peer '{name}' unknown (known: {', '.join(PEERS)}); skipped")
        return
    if not python or not Path(python).exists():
        results["notes"].append(f"peer '{name}': interpreter '{python}' not found; skipped "
                                f"(see benchmarks/README_speed.md to install it)")
        return
    print(f"== peer {name} ({python})", flush=True)
    js = out / "cache" / f"peer_{name}.json"  # worker output, merged into speed.json
    js.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--json", str(js),
           "--threads", str(args.threads), "--rounds", str(args.rounds), "--replicas", str(args.replicas),
           "--train-batch", str(args.train_batch), "--workloads", ",".join(args.workloads)]
    if args.aoti:
        cmd += ["--aoti", str(aoti_path(args))]
    if args.nequip_compiled:
        cmd += ["--nequip-compiled", args.nequip_compiled]
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: e3nn 0.4.x (pinned by mace-torch) torch.load()s its own constants.pt,
    # which torch >= 2.6 refuses by default
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env)
    info = json.loads(js.read_text()) if js.is_file() else {}
    if proc.returncode != 0 or "results" not in info:
        results["notes"].append(f"peer '{name}' failed: {info.get('error', f'exit code {proc.returncode}')}; skipped")
        return
    results["groups"][f"peer: {name}"] = info["results"]
    results["notes"].append(f"peer '{name}': {info.get('note', '')}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds per workload (medians over them)")
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--oreo", default="script", help="extra oreo contenders: script (TorchScript), or none")
    ap.add_argument("--contender", action="append", default=[], metavar="NAME=module:factory",
                    help="also time factory(potential), a module with oreo's call signature and the same function")
    ap.add_argument("--aoti", default="", help="'build' (compile now, ~2 min) or a path to an exported .pt2")
    ap.add_argument("--peer", action="append", default=[],
                    help="NAME=PYTHON: run peer NAME (tmdnet, mace, nequip) with that interpreter (its venv)")
    ap.add_argument("--nequip-compiled", default="",
                    help="a .nequip.pt2 from `nequip-compile --mode aotinductor --target ase` to time beside NequIP")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--report", default="", help="rewrite speed.md/png from an existing speed.json (no timing)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.oreo = [x for x in args.oreo.split(",") if x]
    if args.worker:
        return worker(args)
    if args.report:
        return report(json.loads(Path(args.report).read_text()), Path(args.out))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(args.threads)
    data = with_batch(aspirin(), args.train_batch)
    results = {"groups": {}, "notes": [], "threads": args.threads, "settings": settings(args)}
    print(f"== oreo contenders ({args.threads} threads)", flush=True)
    results["groups"]["oreo"] = run_all(oreo_contenders(args, data), data, args)
    for spec in args.peer:
        name, _, python = spec.partition("=")
        run_peer(name, python, args, out, results)
    report(results, out)


if __name__ == "__main__":
    main()
