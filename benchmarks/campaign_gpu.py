"""One GPU piece of a campaign job: training recipes side by side, or a pretraining job on a packed corpus, each
resumed from the job's committed state (or started, for a job that has none), for a fixed wall time; then a table
of what each reached.

    python benchmarks/campaign_gpu.py ethanol --minutes 7.5 --out OUT \
        --variant b32 optim.batch_size=32 optim.lr=3e-4 --variant b8 optim.batch_size=8
    python benchmarks/campaign_gpu.py pretrain-et-oro --minutes 8 --out OUT --corpus corpus-et-oro.npz \
        --variant main

A training variant is an ``oreo train --resume`` of the job (its config and ``set`` from ``campaign.yaml``, then
``optim.device=cuda``, ``optim.compile=false`` (eager: Inductor's build of the double backward takes minutes) and
the variant's overrides), with its own copy of the state in ``OUT/<variant>.pt``. The variants run as separate
processes on one GPU: the molecules are small, so each step is bound by kernel launches and the processes fill
each other's gaps. A pretraining job is ``oreo pretrain`` the same way, on the corpus packed where the data is
(``oreo pretrain --config ... --corpus ... --pack-corpus FILE.npz``; ``--corpus FILE.npz`` here): a GPU machine has
neither the data folder nor qm9pack. ``OUT/summary.json`` and the printed table give, per variant, the epochs
(or steps) of this piece and where it ended (best validation force MAE and the test metrics of its best model;
the last logged loss of a pretraining run). Adopt one by copying its state over
``benchmarks/campaign/state/<job>.pt`` (and its overrides into the job's ``set``); the CPU pieces continue it.
The state's ``cpu_hours`` counts the host CPU time of the GPU processes: note GPU pieces in the job's ``note``.

A fine-tune grid (``kind: grid``, with a step budget: ``--finetune-steps``, equal compute on any device) runs as
``--shards K`` processes of ``benchmarks/pretrain_finetune.py --shard I/K --device cuda``, each with its own copy
of the grid's state; the cells they finish are merged into ``OUT/state.json``. A cell the piece's end cuts short is
not recorded (it runs again later). The MD of each fine-tuned model needs every rMD17 file of its molecule
(``gpu_prepare.sh --all-splits MOLECULE``), so a piece takes one molecule or two (``--molecules``)::

    python benchmarks/campaign_gpu.py grid-et-4x96 --minutes 8 --out OUT --shards 12 --molecules ethanol
    python benchmarks/campaign_gpu.py grid-et-4x96 --adopt FOLDER     # here: merge FOLDER/grid-et-4x96.state.json

An MD job (``kind: md``) continues its replicas on the GPU, eager (``--no-compile``: AOTInductor's CUDA package
of an oreo model crashed torch's loader on an H200, 2026-12-04), from a copy of its state, returned as
``OUT/md.pt`` (``<job>.md.pt`` from gpu_piece.sh); it needs every rMD17 file of its molecule (``gpu_prepare.sh
--all-splits``). ``--adopt FOLDER`` copies it over the job's state here, if no CPU piece has moved that since::

    python benchmarks/campaign_gpu.py md-naphthalene --minutes 8 --out OUT
    python benchmarks/campaign_gpu.py md-naphthalene --adopt FOLDER
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from campaign import (REPO, MODELS_DIR, read_jobs, read_state, CAMPAIGN_YAML, state_path, grid_command,  # noqa: E402
                      md_command, finished, running_here, shown, waits_for)


def variant_command(job, name: str, overrides, minutes: float, out: Path, threads: int, resume: bool = True,
                    corpus: Optional[Path] = None, device: str = "cuda"):
    pretrain = job.get("kind", "train") == "pretrain"
    cmd = [sys.executable, "-m", "forcefield.cli", "pretrain" if pretrain else "train",
           "--config", str(REPO / job["config"]), "--out", str(out / "runs" / name), "--state", str(out / f"{name}.pt"),
           "--no-progress", "--threads", str(threads), "--set", f"optim.max_minutes={minutes:.2f}"]
    if pretrain:
        cmd += ["--corpus", str(corpus)] + (["--method", str(job["method"])] if job.get("method") else [])
    for item in list(job["set"]) + [f"optim.device={device}", "optim.compile=false"] + list(overrides):
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def summarize(out: Path, name: str, start: dict) -> dict:
    import csv
    rows = []
    log = out / "runs" / name / "metrics.csv"
    if log.is_file():
        with open(log) as fh:
            rows = list(csv.DictReader(fh))
    if rows and "loss" in rows[0]:                     # a pretraining run: rows by step
        rows = [r for r in rows if int(r["step"]) > start["step"]]
        return {"variant": name, "epochs": int(rows[-1]["epoch"]) - start["epoch"] if rows else 0,
                "steps": (int(rows[-1]["step"]) - start["step"]) if rows else 0,
                "last_loss": float(rows[-1]["loss"]) if rows else None,
                "last_lr": float(rows[-1]["lr"]) if rows else None,
                "steps_per_s": float(rows[-1]["steps_per_s"]) if rows else None}
    rows = [r for r in rows if int(r["epoch"]) > start["epoch"]]
    test_file = out / "runs" / name / "test_metrics.json"
    test = json.loads(test_file.read_text()) if test_file.is_file() else {}
    val = [float(r["val_forces_mae_meV_per_A"]) for r in rows]
    return {"variant": name, "epochs": len(rows), "steps": (int(rows[-1]["step"]) - start["step"]) if rows else 0,
            "best_val_forces_mae": min(val) if val else None, "last_lr": float(rows[-1]["lr"]) if rows else None,
            "test_forces_mae": test.get("forces_mae_meV_per_A"), "test_energy_mae": test.get("energy_mae_meV"),
            "test_by_energy_quintile": test.get("forces_mae_meV_per_A_by_energy_quintile")}


def require_gpu(device: str) -> None:
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("torch sees no GPU here: run this on the device machine (or --device cpu for a dry run)")


def device_name(device: str) -> str:
    import torch
    return "cpu" if device == "cpu" else torch.cuda.get_device_name(0)


def brought_back(folder: Path, job: dict, suffix: str):
    """The piece's ``<job>.<suffix>`` and ``<job>.summary.json`` as gpu_piece.sh brings them back into ``folder``;
    refused while a CPU piece of the job runs here (it rewrites the state it read when it started)."""
    piece, summary = folder / f"{job['name']}.{suffix}", folder / f"{job['name']}.summary.json"
    if not (piece.is_file() and summary.is_file()):
        raise SystemExit(f"{folder} lacks {piece.name} or {summary.name} (what benchmarks/gpu_piece.sh brings back)")
    pid = running_here(job)
    if pid is not None:
        raise SystemExit(f"{job['name']} is running here (pid {pid}, benchmarks/campaign.py): adopting now would be "
                         f"undone by its next save; adopt once it has stopped")
    return piece, summary


def grid_piece(job: dict, args) -> int:
    """K shards of the grid side by side on the GPU; their new cells merged into OUT/state.json."""
    from pretrain_finetune import merge_grid_states
    if "--finetune-steps" not in [str(a) for a in job["args"]]:
        raise SystemExit(f"{job['name']} budgets its runs in CPU time: a GPU piece needs a step budget "
                         f"(--finetune-steps in its args) so that GPU and CPU cells compare")
    require_gpu(args.device)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    src = state_path(job)
    base = json.loads(src.read_text()) if src.is_file() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for i in range(args.shards):
        state = out / f"shard-{i}.json"
        if base is not None:
            shutil.copyfile(src, state)
        # eager on the GPU: compiling there would take minutes of a piece's few (the grid's --compile is for CPUs)
        cmd = [a for a in grid_command(job, args.minutes, out=out / "runs" / f"shard-{i}", state=state)
               if a != "--compile"] + [
            "--device", args.device, "--shard", f"{i}/{args.shards}", "--md-minutes-per-ps",
            str(args.md_minutes_per_ps), "--first-cell-minutes", str(args.first_cell_minutes)] + (
            ["--molecules", *args.molecules] if args.molecules else [])
        fh = open(out / "runs" / f"shard-{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO), fh, state))
    print(f"[gpu] {job['name']}: {args.shards} shards, {args.minutes:g} min"
          + (f", molecules {' '.join(args.molecules)}" if args.molecules else ""), flush=True)
    t0 = time.time()

    def cells() -> int:
        n = 0
        for _, _, state in procs:
            try:
                n += len(json.loads(state.read_text())["forcefield"])
            except (OSError, ValueError, KeyError):
                pass
        return n - (len(base["forcefield"]) * len(procs) if base else 0)

    while any(pr.poll() is None for pr, _, _ in procs):
        time.sleep(30)
        print(f"[gpu {(time.time() - t0) / 60:.1f} min] {cells()} new cell(s)", flush=True)
    shards, failed = [], []
    for i, (pr, fh, state) in enumerate(procs):
        fh.close()
        if pr.returncode:
            failed.append(i)
            print(f"[gpu] shard {i} exited {pr.returncode}; the end of its log:\n" + "\n".join(
                (out / "runs" / f"shard-{i}.log").read_text().splitlines()[-15:]), flush=True)
        if state.is_file():
            shards.append(json.loads(state.read_text()))
        cut = [ln for ln in (out / "runs" / f"shard-{i}.log").read_text().splitlines() if "not recorded" in ln]
        print(f"[gpu] shard {i}: " + ("; ".join(cut) if cut else "no run cut short"), flush=True)
    if not shards:
        return 1
    start = base or {"settings": shards[0]["settings"], "forcefield": [], "qm9": [], "cpu_hours": 0.0}
    base_cpu = float(start.get("cpu_hours") or 0.0)
    merged = merge_grid_states(start, shards, base_cpu)
    (out / "state.json").write_text(json.dumps(merged, indent=1))
    new = len(merged["forcefield"]) - len(start["forcefield"])
    (out / "summary.json").write_text(json.dumps({
        "job": job["name"], "start": {"cpu_hours": base_cpu, "cells": len(start["forcefield"])}, "new_cells": new,
        "minutes": args.minutes, "shards": args.shards, "molecules": args.molecules, "failed_shards": failed,
        "device": device_name(args.device)}, indent=1))
    print(f"[gpu] {job['name']}: {new} new cell(s), {merged['cpu_hours'] - base_cpu:.2f} host CPU-h", flush=True)
    return 1 if failed else 0


def md_piece(job: dict, args) -> int:
    """The MD job's replicas continued on the GPU for --minutes, from a copy of its state (OUT/md.pt)."""
    import torch
    require_gpu(args.device)
    src = state_path(job)
    start = read_state(job)
    # the job's first piece runs here (on the CPU): it pins the job's model (campaign.py pinned_model), which the
    # device's copy of the tree must carry, and which a piece there could not bring back
    if not (MODELS_DIR / f"{job['name']}.pt").is_file() or start is None:
        raise SystemExit(f"{job['name']} has not started here: run its first piece on the CPU (python "
                         f"benchmarks/campaign.py --minutes 10 --jobs {job['name']}), which pins its model; then commit")
    why = waits_for(job, read_jobs(CAMPAIGN_YAML)) or finished(job, start)
    if why:
        raise SystemExit(f"{job['name']}: {why}; no GPU piece")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = out / "md.pt"
    if src.is_file():
        shutil.copyfile(src, state)
    cmd = md_command({**job, "compile": False}, args.minutes, out=out / "run", state=state) + ["--device", args.device]
    print(f"[gpu] {job['name']}: from {start['ps_done'] if start else 0:g} ps, {args.minutes:g} min", flush=True)
    with open(out / "md.log", "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    print("\n".join((out / "md.log").read_text().splitlines()[-12:]), flush=True)
    end = torch.load(state, map_location="cpu", weights_only=False) if state.is_file() else None
    (out / "summary.json").write_text(json.dumps({
        "job": job["name"], "start": {"step": start["step"] if start else 0}, "minutes": args.minutes,
        "end": {"step": int(end["state"]["step"]) if end else None}, "exit": rc,
        "device": device_name(args.device)}, indent=1))
    return rc


def adopt_md(job: dict, folder: Path) -> int:
    """Copy a GPU piece's MD state (``FOLDER/<job>.md.pt``) over the job's, if the job's is still the state the
    piece started from (MD cannot merge two continuations of one trajectory)."""
    piece, summary = brought_back(folder, job, "md.pt")
    started = int(json.loads(summary.read_text())["start"]["step"])
    here = read_state(job)
    if (here["step"] if here else 0) != started:
        raise SystemExit(f"{job['name']}: its state here is at step {here['step'] if here else 0}, the GPU piece "
                         f"started from step {started}: a CPU piece moved it meanwhile; keep one of the two")
    state_path(job).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(piece, state_path(job))
    print(f"[gpu] {job['name']}: adopted the GPU piece's state ({shown(state_path(job))}, now "
          f"{read_state(job)['ps_done']:g} ps)")
    return 0


def adopt_grid(job: dict, folder: Path) -> int:
    """Merge a GPU piece's cells (``FOLDER/<job>.state.json``, begun from the state its summary names) into the
    job's committed state, which CPU pieces may have advanced meanwhile."""
    from pretrain_finetune import merge_grid_states
    piece, summary = brought_back(folder, job, "state.json")
    gpu = json.loads(piece.read_text())
    base_cpu = float(json.loads(summary.read_text())["start"]["cpu_hours"])
    dst = state_path(job)
    here = json.loads(dst.read_text()) if dst.is_file() else \
        {"settings": gpu["settings"], "forcefield": [], "qm9": [], "cpu_hours": base_cpu}
    import hashlib
    piece_id = hashlib.sha256(piece.read_bytes()).hexdigest()[:16]
    if piece_id in here.get("adopted_pieces", []):      # its cells would merge away, its CPU-hours would not
        raise SystemExit(f"{job['name']}: this GPU piece ({piece}) was adopted already; nothing to do")
    before = len(here["forcefield"])
    merged = merge_grid_states(here, [gpu], base_cpu)
    merged["adopted_pieces"] = list(here.get("adopted_pieces", [])) + [piece_id]
    from forcefield.files import write_json
    write_json(dst, merged, indent=1)
    print(f"[gpu] {job['name']}: adopted {len(merged['forcefield']) - before} cell(s) into {shown(dst)} "
          f"({len(merged['forcefield'])} in all)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("job", help="a training job of campaign.yaml")
    p.add_argument("--minutes", type=float, help="wall time of each variant's training (a grid: of the piece)")
    p.add_argument("--out", help="folder for the variants' states, runs and summary.json")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="a name and its config overrides; repeat for each variant (training and pretraining jobs)")
    p.add_argument("--shards", type=int, default=8, help="grid jobs: processes side by side on the GPU")
    p.add_argument("--molecules", nargs="+", help="grid jobs: only these molecules' cells in this piece")
    p.add_argument("--first-cell-minutes", type=float, default=2.0,
                   help="grid: wall minutes (before its MD) kept for a molecule's first run on the GPU (5,000 eager "
                        "steps; later runs take the longest recorded time)")
    p.add_argument("--md-minutes-per-ps", type=float, default=0.5,
                   help="grid jobs: wall minutes a simulated ps of one replica takes on the GPU (cells start only "
                        "while their MD still fits the piece)")
    p.add_argument("--adopt", metavar="FOLDER",
                   help="grid jobs, here: merge a piece's FOLDER/<job>.state.json (and .summary.json) into the "
                        "job's committed state")
    p.add_argument("--corpus", help="pretraining jobs: the packed corpus (.npz of oreo pretrain --pack-corpus)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per variant")
    p.add_argument("--device", default="cuda", help="where the variants train (cpu: a dry run of this script)")
    args = p.parse_args(argv)
    jobs = {j["name"]: j for j in read_jobs(CAMPAIGN_YAML)}
    job = jobs.get(args.job)
    if job is None:
        raise SystemExit(f"{args.job} is not a job of {CAMPAIGN_YAML}; pick one of {', '.join(jobs)}")
    kind = job.get("kind", "train")
    if args.adopt:
        if kind not in ("grid", "md"):
            raise SystemExit(f"--adopt merges a grid's or an MD job's piece; {args.job} is a {kind} job: copy its "
                             f"<job>.<variant>.pt over {shown(state_path(job))}")
        return (adopt_grid if kind == "grid" else adopt_md)(job, Path(args.adopt))
    if args.minutes is None or not args.out:
        raise SystemExit("a GPU piece needs --minutes and --out")
    if kind in ("grid", "md"):
        return (grid_piece if kind == "grid" else md_piece)(job, args)
    if not args.variant:
        raise SystemExit("a training or pretraining piece needs at least one --variant")
    pretrain = job.get("kind", "train") == "pretrain"
    src = state_path(job)
    if pretrain and not (args.corpus and Path(args.corpus).is_file()):
        raise SystemExit(f"{args.job} is a pretraining job: pass --corpus FILE.npz, packed where the data is with "
                         f"oreo pretrain --config {job['config']} --corpus {job.get('corpus')} --set ... "
                         f"--pack-corpus FILE.npz")
    if not pretrain and not src.is_file():
        raise SystemExit(f"{src} does not exist: a GPU piece continues a training job that a CPU piece started")
    import torch
    require_gpu(args.device)
    start = {"epoch": 0, "step": 0}
    if src.is_file():
        st = torch.load(src, map_location="cpu", weights_only=False)
        start = {"epoch": int(st["epoch"]), "step": int(st["step"])}
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    procs = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    for name, *overrides in args.variant:
        if src.is_file():
            shutil.copyfile(src, out / f"{name}.pt")
        cmd = variant_command(job, name, overrides, args.minutes, out, args.threads, resume=src.is_file(),
                              corpus=Path(args.corpus).resolve() if args.corpus else None, device=args.device)
        fh = open(out / "runs" / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO), fh)
        print(f"[gpu] {name}: {' '.join(overrides) or '(job recipe)'}", flush=True)
    t0 = time.time()
    while any(pr.poll() is None for pr, _ in procs.values()):
        time.sleep(30)
        lines = []
        for name in procs:
            s = summarize(out, name, start)
            lines.append(f"{name} step {s['steps']}, loss {s['last_loss'] or float('nan'):.4g}" if pretrain else
                         f"{name} {s['epochs']} ep, best val {s['best_val_forces_mae'] or float('nan'):.2f}")
        print(f"[gpu {(time.time() - t0) / 60:.1f} min] " + " | ".join(lines), flush=True)
    rows = []
    for name, (pr, fh) in procs.items():
        fh.close()
        s = summarize(out, name, start)
        s["exit"] = pr.returncode
        rows.append(s)
        if pr.returncode:
            print(f"[gpu] {name} exited {pr.returncode}; the end of its log:\n"
                  + "\n".join((out / "runs" / f"{name}.log").read_text().splitlines()[-15:]), flush=True)
    (out / "summary.json").write_text(json.dumps({"job": args.job, "start": start, "minutes": args.minutes,
                                                  "variants": [dict(zip(["name", "set"], [v[0], v[1:]]))
                                                               for v in args.variant],
                                                  "device": device_name(args.device),
                                                  "results": rows}, indent=1))
    f = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"
    if pretrain:
        print("| variant | epochs | steps | last loss | steps/s | last lr |")
        print("|---|---|---|---|---|---|")
        for s in rows:
            print(f"| {s['variant']} | {s['epochs']} | {s['steps']} | {f(s['last_loss'], 4)} | "
                  f"{f(s['steps_per_s'], 1)} | {f(s['last_lr'], 6)} |")
    else:
        print("| variant | epochs | steps | best val F MAE | test F MAE | test E MAE | last lr |")
        print("|---|---|---|---|---|---|---|")
        for s in rows:
            print(f"| {s['variant']} | {s['epochs']} | {s['steps']} | {f(s['best_val_forces_mae'])} | "
                  f"{f(s['test_forces_mae'])} | {f(s['test_energy_mae'])} | {f(s['last_lr'], 6)} |")
    return 0 if all(s["exit"] == 0 for s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
