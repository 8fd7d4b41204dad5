"""Two heavy oreo jobs side by side: how much does each slow down?

Runs a fixed workload (energy + forces of the shipped aspirin model on one molecule by default, the
small-op regime of MD)
alone, then N copies at once, each in its own process, under several thread settings; reports each
setting's median rate and the slowdown of the side-by-side copies against the lone one (both measured in
this run, interleaved, so machine noise hits both). Goal: <= 2.2x each for two jobs on two cores.

    python benchmarks/threads.py --seconds 20 --repeats 3 --out benchmarks/results/threads

Settings compared (each process's environment):
  library   : what oreo does for a job that names no thread count (forcefield.threads: one thread)
  2-threads : torch's own default here, one thread per core (2), the runtime's own wait policy: the old behaviour
  2-spin    : 2 threads whose idle threads spin (OMP_WAIT_POLICY=active), as some OpenMP runtimes do by default
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "library": {},
    "2-threads": {"OREO_THREADS": "2", "BENCH_TORCH_DEFAULTS": "1"},
    "2-spin": {"OREO_THREADS": "2", "OMP_WAIT_POLICY": "active", "BENCH_TORCH_DEFAULTS": "1"},
}
CLEARED = ("BENCH_TORCH_DEFAULTS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OREO_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def worker(seconds: float, replicas: int) -> None:
    """The workload: print energy+force calls per second of the aspirin model on ``replicas`` copies."""
    if os.environ.get("BENCH_TORCH_DEFAULTS"):
        import torch     # torch's own thread handling, OREO_THREADS threads
        torch.set_num_threads(int(os.environ["OREO_THREADS"]))
    else:
        from forcefield.threads import configure_threads
        configure_threads()
        import torch
    from forcefield import load_potential
    from forcefield.data import load_rmd17
    pot = load_potential("aspirin")
    frame = load_rmd17("aspirin", split="test", split_index=1).subset([0])
    b = frame.collate([0] * replicas, dtype=torch.float32)
    for _ in range(3):
        pot(b.numbers, b.positions, b.batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pot(b.numbers, b.positions, b.batch)
        n += 1
    print(json.dumps({"rate": n / (time.perf_counter() - t0), "threads": torch.get_num_threads()}))


def launch(setting: str, copies: int, seconds: float, replicas: int):
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update({k: v for k, v in SETTINGS[setting].items() if v})
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--seconds", str(seconds),
                               "--replicas", str(replicas)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker for setting {setting} failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per worker")
    ap.add_argument("--repeats", type=int, default=3, help="alone/side-by-side pairs per setting")
    ap.add_argument("--replicas", type=int, default=1, help="molecules per call (MD replicas)")
    ap.add_argument("--copies", type=int, default=2, help="jobs run side by side")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", type=Path, help="folder for threads.json and threads.md")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.seconds, args.replicas)
        return 0
    rows = []
    for setting in args.settings:
        alone, together, threads = [], [], None
        for r in range(args.repeats):
            a = launch(setting, 1, args.seconds, args.replicas)[0]
            t = launch(setting, args.copies, args.seconds, args.replicas)
            alone.append(a["rate"])
            together.extend(x["rate"] for x in t)
            threads = a["threads"]
            print(f"{setting:9s} repeat {r + 1}: alone {a['rate']:.1f}/s, side by side "
                  + ", ".join(f"{x['rate']:.1f}" for x in t) + "/s", flush=True)
        med_a, med_t = statistics.median(alone), statistics.median(together)
        rows.append({"setting": setting, "threads_per_job": threads, "alone_per_s": med_a,
                     "side_by_side_per_s": med_t, "slowdown": med_a / med_t,
                     "worst_slowdown": med_a / min(together)})
    lines = [f"{args.copies} jobs side by side on {os.cpu_count()} cores; workload: energy+forces of the shipped "
             f"aspirin model, {args.replicas} replica(s) per call; medians of {args.repeats} alone/side-by-side pairs of {args.seconds:g} s",
             "", "| setting | threads per job | alone (calls/s) | side by side (calls/s, each) | slowdown | worst |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['threads_per_job']} | {r['alone_per_s']:.1f} | {r['side_by_side_per_s']:.1f} "
              f"| {r['slowdown']:.2f}x | {r['worst_slowdown']:.2f}x |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "threads.json").write_text(json.dumps(rows, indent=2))
        (args.out / "threads.md").write_text(text + "\n\nCommand: `python benchmarks/threads.py --seconds "
                                             f"{args.seconds:g} --repeats {args.repeats} --out {args.out}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
