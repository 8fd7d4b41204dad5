"""The campaign: advance long training and MD jobs piece by piece, on fresh clones, until they are done.

    python benchmarks/campaign.py --minutes 150            # advance every unfinished job for 150 min of wall time
    python benchmarks/campaign.py --report                 # only regenerate tables and plots from the saved state
    python benchmarks/campaign.py --minutes 60 --jobs aspirin naphthalene

Jobs are listed in ``benchmarks/campaign/campaign.yaml`` (re-read whenever a slot frees, so it can be edited
while the runner works; a running job that an edit marks ``stopped`` is ended, and its slot goes to the next job,
e.g. ``--jobs pretrain-et-oreo aspirin md-salicylic`` runs md-salicylic once aspirin is stopped). A training
job is an ``oreo train`` run whose compact state (``--state``, see ``forcefield/train/runstate.py``: weights, EMA,
optimiser moments, schedule, RNG, cumulative CPU time and learning curve) lives in
``benchmarks/campaign/state/<job>.pt``, one file per job, overwritten with every checkpoint (atomically: a kill -9
loses at most one epoch). An MD job (``kind: md``) is an ``oreo-md simulate``
run whose state file holds positions, velocities, thermostat, RNG, step and the accumulated metrics (h(r)
counts, each logged frame's largest bond deviation; :mod:`md.observables`), a few hundred kB at 300 ps. Commit
those files: the next piece, on a fresh clone, continues from them (``--commit-every 45`` commits them, and only
them, every 45 minutes and when the runner ends, so that a piece cut short loses at most that much). Full
checkpoints, trajectories and logs stay in ``runs/campaign/<job>/``.

The runner keeps ``--slots`` jobs running (default: cores / threads per job; a grid job with ``workers: K`` may
fill up to K of them, its further processes only on slots every job's first process has left free), each pinned
to its threads and started with ``nice`` so that interactive work goes first, prints a progress line every
``--every`` seconds, and at the end writes ``benchmarks/results/campaign/``: ``campaign.md`` (a table per group of
jobs), ``campaign.json``, and ``learning_curves.png`` (validation force MAE against cumulative CPU-hours).
"""
import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN_YAML = REPO / "benchmarks" / "campaign" / "campaign.yaml"
STATE_DIR = REPO / "benchmarks" / "campaign" / "state"
MODELS_DIR = REPO / "benchmarks" / "campaign" / "models"   # MD jobs' pinned models, pretraining jobs' backbones
RUNS_DIR = REPO / "runs" / "campaign"
RESULTS_DIR = REPO / "benchmarks" / "results" / "campaign"
README = REPO / "README.md"
JOB_KEYS = {"name", "group", "config", "set", "init_from", "init_cpu_hours", "budget_cpu_hours", "threads",
            "target_meV_per_A", "ship", "note", "stopped", "kind", "molecule", "model", "ps", "replicas", "dft_frames",
            "corpus", "method", "compile", "priority", "args", "backbones", "after", "finetune_from", "workers"}
GRID_KEYS = {"name", "group", "kind", "args", "backbones", "threads", "note", "stopped", "priority", "after",
             "workers"}
MD_KEYS = {"name", "group", "kind", "molecule", "model", "ps", "replicas", "threads", "note", "stopped", "dft_frames",
           "compile", "priority", "after"}


def sibling(name: str):
    """A script of ``benchmarks/`` as a module (``pretrain_finetune``): they are not a package, and this file is also
    imported from elsewhere (tests, ``campaign_gpu.py``), where ``benchmarks/`` need not be on the path."""
    import importlib
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.append(str(REPO / "benchmarks"))
    return importlib.import_module(name)


# ---------------------------------------------------------------------------- jobs
POLL_SECONDS = 5.0        # the runner's tick: finished jobs collected, job file edits seen
FILL_EVERY_S = 60.0       # a free slot is re-checked this often, and whenever a job ends or the job file changes
MIN_START_MINUTES = 8.0   # no job starts with less time left (a compiled step or export alone takes minutes)
GRACE_MINUTES = 15.0      # jobs stop themselves at the deadline (their --max-minutes); one still running this much
                          # later (a long epoch, an SCF that hangs) is ended so that the final commit happens


def read_jobs(path: Path) -> List[Dict]:
    """The job list, checked: every key known, names unique, configs present."""
    if not path.is_file():
        raise SystemExit(f"campaign file {path} not found")
    doc = yaml.safe_load(path.read_text()) or {}
    defaults = doc.get("defaults") or {}
    jobs, seen = [], set()
    for i, raw in enumerate(doc.get("jobs") or []):
        job = {**defaults, **raw}
        unknown = sorted(set(job) - JOB_KEYS)
        if unknown:
            raise SystemExit(f"{path}: job {i + 1} has unknown key(s) {unknown}; known: {sorted(JOB_KEYS)}")
        job.setdefault("kind", "train")
        if job["kind"] not in ("train", "md", "pretrain", "grid"):
            raise SystemExit(f"{path}: job {i + 1}: kind must be 'train', 'pretrain', 'md' or 'grid', got "
                             f"{job['kind']!r}")
        if job["kind"] == "grid":
            extra = sorted(set(job) - GRID_KEYS)
            if extra or "name" not in job or not isinstance(job.get("args"), list):
                raise SystemExit(f"{path}: grid job {i + 1} needs 'name' and 'args' (a list: the arguments of "
                                 f"benchmarks/pretrain_finetune.py); optional: backbones (method: pretraining "
                                 f"job), threads, workers, note, stopped, priority; not {extra}")
            workers = job.setdefault("workers", 1)
            if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
                raise SystemExit(f"{path}: grid job {job['name']}: workers must be a whole number of processes "
                                 f"(1 or more), got {workers!r}")
        elif job["kind"] == "md":
            extra = sorted(set(job) - MD_KEYS)
            if extra or "name" not in job or "molecule" not in job:
                raise SystemExit(f"{path}: MD job {i + 1} needs 'name' and 'molecule' (optional: model, ps, "
                                 f"replicas, threads, note, stopped); not {extra}")
        elif "workers" in job:
            raise SystemExit(f"{path}: job {i + 1}: 'workers' belongs to a grid job (kind: grid), whose runs "
                             f"several processes can share")
        elif "name" not in job or "config" not in job:
            raise SystemExit(f"{path}: job {i + 1} needs a 'name' and a 'config'")
        if job["name"] in seen:
            raise SystemExit(f"{path}: two jobs are named {job['name']!r}")
        seen.add(job["name"])
        if job["kind"] == "pretrain" and job.get("corpus") and not (REPO / job["corpus"]).is_file():
            raise SystemExit(f"{path}: job {job['name']}: corpus {job['corpus']} not found")
        if job["kind"] in ("train", "pretrain") and not (REPO / job["config"]).is_file():
            raise SystemExit(f"{path}: job {job['name']}: config {job['config']} not found")
        if job["kind"] == "train" and job.get("ship"):   # --ship compares against, and writes, the data's file
            data = {**(yaml.safe_load((REPO / job["config"]).read_text()).get("data") or {}),
                    **{k.split(".", 1)[1]: v for k, v in (job.get("set") or {}).items() if k.startswith("data.")}}
            ships_as = "poly24" if str(data.get("dataset") or "").lower() == "poly24" else data.get("molecule")
            if job["ship"] != ships_as:
                raise SystemExit(f"{path}: job {job['name']}: `ship: {job['ship']}`, but its model is trained on "
                                 f"{ships_as} and ships as {ships_as}.pt; set `ship: {ships_as}`")
        after = job.get("after") or []
        after = [after] if isinstance(after, str) else after
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise SystemExit(f"{path}: job {i + 1}: 'after' takes a job name or a list of them, got {after!r}")
        job["after"] = list(after)
        if job.get("finetune_from"):                     # a fine-tune starts once its backbone's job is done
            if job["kind"] != "train":
                raise SystemExit(f"{path}: job {job['name']}: finetune_from belongs to a training job")
            job["after"] = list(dict.fromkeys(job["after"] + [str(job["finetune_from"])]))
        job.setdefault("group", "campaign")
        job.setdefault("threads", 1)
        job["set"] = [f"{k}={v}" for k, v in (job.get("set") or {}).items()]
        jobs.append(job)
    after = {}
    for job in jobs:
        unknown = sorted(set(job["after"]) - seen)
        if unknown:
            raise SystemExit(f"{path}: job {job['name']}: 'after' names no job of the file: {unknown}")
        ft = job.get("finetune_from")
        if ft and next(j for j in jobs if j["name"] == ft)["kind"] != "pretrain":
            raise SystemExit(f"{path}: job {job['name']}: finetune_from names {ft!r}, which is not a pretraining job")
        after[job["name"]] = job["after"]
    for name in after:                                   # no job may wait for itself, directly or around a cycle
        todo, reach = list(after[name]), set()
        while todo:
            other = todo.pop()
            if other == name:
                raise SystemExit(f"{path}: job {name} waits for itself through 'after' (a cycle); remove one link")
            if other not in reach:
                reach.add(other)
                todo += after[other]
    return jobs


def done(job: Dict, state: Optional[Dict]) -> bool:
    """Whether a job is finished (not merely unable to start yet, as a grid waiting for its backbones)."""
    why = finished(job, state)
    return bool(why) and not why.startswith("waits for")


def waits_for(job: Dict, jobs: List[Dict]) -> str:
    """Why a job may not start yet: the jobs its ``after`` names that are not done ("" when none), e.g. the MD
    of a molecule after the training job that ships its final model."""
    by_name = {j["name"]: j for j in jobs}
    pending = [name for name in job.get("after") or [] if not done(by_name[name], read_state(by_name[name]))]
    return f"waits for {', '.join(pending)} to finish" if pending else ""


def state_path(job: Dict) -> Path:
    return STATE_DIR / (f"{job['name']}.json" if job.get("kind") == "grid" else f"{job['name']}.pt")


def read_state(job: Dict) -> Optional[Dict]:
    """The small part of a job's saved state: counters, cumulative CPU time, learning curve (training); step,
    simulated and requested ps, replicas still running (MD)."""
    path = state_path(job)
    if not path.is_file():
        return None
    if job.get("kind") == "grid":
        return grid_summary(json.loads(path.read_text()), job)
    import torch
    rs = torch.load(path, map_location="cpu", weights_only=False)
    if job.get("kind", "train") == "md":
        cfg = rs["config"]
        step = int(rs["state"]["step"])
        n_steps = int(round(cfg["ps"] * 1000.0 / cfg["timestep"]))
        dft = dft_report(job)
        return {"step": step, "ps_done": step * cfg["timestep"] / 1000.0, "ps": cfg["ps"], "n_steps": n_steps,
                "running": sum(bool(st.get("active")) for st in rs["status"]), "replicas": len(rs["status"]),
                "cpu_hours": float(rs.get("wall_s") or 0.0) / 3600.0, "model": rs.get("model") or {},
                "sampled": len((rs.get("observables") or {}).get("sample") or []),
                "dft_done": 0 if dft is None else int(dft["n_frames"]) + int(dft.get("n_failed") or 0)}
    return {"epoch": rs["epoch"], "step": rs["step"], "cpu_hours": rs.get("cpu_seconds", rs["elapsed"]) / 3600,
            "history": rs.get("history") or [], "best_val": rs.get("best_val"),
            "lr": rs["optimizer"]["param_groups"][0]["lr"], "total_steps": rs.get("total_steps")}


def grid_summary(g: Dict, job: Dict) -> Dict:
    """A grid job's state (its JSON) as the runner needs it: CPU-hours, runs done, and complete: every run the job's
    arguments make is recorded (a grid given another seed after it finished is incomplete again)."""
    pretrain_finetune = sibling("pretrain_finetune")
    runs = pretrain_finetune.grid_runs_of(job.get("args") or [])
    return {"cpu_hours": float(g.get("cpu_hours") or 0.0), "complete": pretrain_finetune.all_recorded(g, runs),
            "cells": len(g.get("forcefield") or []) + len(g.get("qm9") or [])}


def runs_in_progress(job: Dict) -> List[str]:
    """A grid's unfinished runs that carry on from a committed run state (``<state>.runs/<run>.pt``, e.g. a QM9 run
    with a step budget), as "<run> (step S of its run)"."""
    pretrain_finetune = sibling("pretrain_finetune")
    folder = pretrain_finetune.run_states_folder(state_path(job))
    if not folder.is_dir():
        return []
    return [f"{f.stem} (step {pretrain_finetune.steps_in(f):,})" for f in sorted(folder.glob("*.pt"))]


def dft_report(job: Dict) -> Optional[Dict]:
    """The DFT check along an MD job's trajectory (``oreo-md dft-check STATE``), when it has run."""
    path = state_path(job).with_suffix(".dft_check.json")
    return json.loads(path.read_text()) if path.is_file() else None


def md_simulated(state: Dict) -> bool:
    return state["step"] >= state["n_steps"] or state["running"] == 0


def finished(job: Dict, state: Optional[Dict]) -> str:
    """Why a job needs no more compute ("" if it does)."""
    if job.get("kind") == "grid":
        missing = [f"{m} ({name})" for m, name in (job.get("backbones") or {}).items()
                   if not backbone_path({"name": name}).is_file()]
        if missing:
            return f"waits for the backbone(s) of {', '.join(missing)}"
        if state is not None and state["complete"]:
            return f"all {state['cells']} runs done"
        return job.get("stopped") or ""
    if state is None:
        return job.get("stopped") or ""                  # never started, and marked stopped: never starts
    if job.get("kind", "train") == "md":
        if not md_simulated(state):
            return job.get("stopped") or ""
        how = f"{state['ps']:g} ps simulated" if state["step"] >= state["n_steps"] else "every replica stopped"
        want = min(int(job.get("dft_frames", 10)), state.get("sampled", 0))
        if state.get("dft_done", 0) < want:
            return ""                                    # the DFT check along the trajectory is still to do
        return how + (f", DFT-checked on {state['dft_done']} frames" if want else ", no frame for the DFT check")
    if job.get("kind") == "pretrain" and pretraining_done(state):
        if not backbone_path(job).is_file():
            return ""                                    # one short run still writes the backbone from the state
        return f"all {state['total_steps']} steps done ({state['epoch']} epochs); backbone {shown(backbone_path(job))}"
    budget = job.get("budget_cpu_hours")
    if budget is not None and state["cpu_hours"] - float(job.get("init_cpu_hours") or 0) >= budget - 1e-3:
        return f"budget of {budget:g} CPU-h spent"
    if job.get("stopped"):
        return job["stopped"]
    return ""


def archive_state(job: Dict) -> str:
    """Cut a finished training (or pretraining) job's state file down to its record (counters, cumulative CPU time, learning curve,
    last lr: what the tables and plots read), dropping weights, moments and RNG (4 MB for ET 4x96, a few kB left):
    the shipped model (a pretraining job's kept backbone) holds its weights, and every file in the tree travels to a
    GPU machine, whose calls take 67 MB. Git history keeps the full state. To train the job on later, start it
    again from the shipped model."""
    import torch
    sys.path.insert(0, str(REPO))
    from forcefield.files import atomic_torch_save
    path = state_path(job)
    kind = job.get("kind", "train")
    why = finished(job, read_state(job)) if kind in ("train", "pretrain") and path.is_file() else ""
    if not why:
        raise SystemExit(f"{job['name']}: only a finished training or pretraining job with a state file is archived "
                         f"(it has {'no state' if not path.is_file() else 'compute left' if kind in ('train', 'pretrain') else 'kind ' + kind})")
    rs = torch.load(path, map_location="cpu", weights_only=False)
    if rs.get("archived"):
        return f"{job['name']}: already archived"
    before = path.stat().st_size
    record = {k: rs[k] for k in ("format", "epoch", "step", "elapsed", "cpu_seconds", "history", "best_val",
                                 "total_steps") if k in rs}
    record["optimizer"] = {"param_groups": [{"lr": rs["optimizer"]["param_groups"][0]["lr"]}]}
    record["archived"] = (f"{time.strftime('%Y-%m-%d')}: {why}; weights, moments and RNG dropped"
                          + (f" (the shipped {job['ship']}.pt holds its best weights: init_from it to train on)"
                             if job.get("ship") else "")
                          + (f" (the backbone {shown(backbone_path(job))} holds its weights)" if kind == "pretrain"
                             else ""))
    atomic_torch_save(record, path)
    return f"{job['name']}: {shown(path)} {before / 1e6:.1f} MB -> {path.stat().st_size / 1e3:.0f} kB"


def shown(path: Path) -> str:
    """A path as the repository names it (as it is when outside)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def pretraining_done(state: Optional[Dict]) -> bool:
    """Whether a pretraining job's state has done every step."""
    return bool(state and state.get("total_steps") and state["step"] >= state["total_steps"])


def pretrain_hours_to_go(state: Dict) -> float:
    """CPU-hours a pretraining job still needs at its own rate so far (compilation included); NaN if unknown."""
    total, step = state.get("total_steps"), state.get("step") or 0
    if not total or step <= 0:
        return float("nan")
    return max(total - step, 0) * state["cpu_hours"] / step


def md_cpu_speed(summary: Dict) -> Dict:
    """An MD job's speed on the CPU (its pieces on a GPU apart), as ``md.metrics.speed_record`` gives it."""
    by_device = summary.get("speed_by_device") or {}
    return by_device.get("cpu") or ({} if by_device else summary.get("speed") or {})


def md_hours_to_go(summary: Dict) -> float:
    """CPU-hours an MD job still needs at its measured steps/s on the CPU (times its ``threads``); NaN if unknown or
    if every replica has stopped."""
    rate = md_cpu_speed(summary).get("steps_per_s")
    running = sum(1 for x in summary.get("replicas") or [] if x.get("stop_reason") is None)
    if not rate or not math.isfinite(rate) or running == 0 or summary.get("simulated_ps") is None:
        return float("nan")
    timestep_fs = float(summary.get("timestep_fs") or 0.5)
    steps_left = max(float(summary["requested_ps"]) - float(summary["simulated_ps"]), 0.0) * 1000.0 / timestep_fs
    return steps_left / rate / 3600.0 * int(summary.get("threads") or 1)


def backbone_path(job: Dict) -> Path:
    """Where a finished pretraining job's backbone is kept (committed: fine-tuning starts from it on any clone)."""
    return MODELS_DIR / f"{job['name']}.pt"


def pretraining_cpu_hours(name: str) -> float:
    """The cumulative CPU-hours of pretraining job ``name`` (from its state; nan without one)."""
    st = read_state({"name": name, "kind": "pretrain"})
    return float(st["cpu_hours"]) if st else float("nan")


def keep_backbone(job: Dict) -> Optional[Path]:
    """After a piece of a pretraining job: once every step is done, its ``pretrained.pt`` (written from the state
    by the last piece; ``oreo pretrain --resume`` on a finished state only writes it) becomes
    :func:`backbone_path`."""
    made = RUNS_DIR / job["name"] / "pretrained.pt"
    if not made.is_file() or not pretraining_done(read_state(job)):
        return None
    import shutil
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = backbone_path(job).with_suffix(".tmp")
    shutil.copyfile(made, tmp)
    tmp.replace(backbone_path(job))
    print(f"[campaign] {job['name']}: pretraining done, backbone kept in {shown(backbone_path(job))}", flush=True)
    return backbone_path(job)


def pinned_model(job: Dict) -> Path:
    """The model file an MD job runs, relative to the repository: a copy of the model it names, made when the job
    starts (``benchmarks/campaign/models/<job>.pt``; git stores an identical copy once, so it costs nothing). A
    molecule's model re-shipped by a training job later leaves the running MD job on the model it started with."""
    pinned = MODELS_DIR / f"{job['name']}.pt"
    if not pinned.is_file():
        if state_path(job).is_file():
            raise SystemExit(f"MD job {job['name']}: its state exists but its model {pinned} does not; restore the "
                             f"file (git checkout) or delete the state to start the job again")
        sys.path.insert(0, str(REPO))
        from forcefield.io import resolve_model_path
        import shutil
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(resolve_model_path(str(job.get("model") or job["molecule"])), pinned)
    return pinned.relative_to(REPO)


def md_command(job: Dict, minutes: float, out: Optional[Path] = None, state: Optional[Path] = None) -> List[str]:
    """``oreo-md simulate`` continuing from the job's state file (MDsim's MD17 protocol unless the job says;
    ``state``: another copy of it, as a GPU piece keeps)."""
    cmd = [sys.executable, "-m", "md.cli", "simulate", "--molecule", job["molecule"],
           "--model", str(pinned_model(job)), "--ps", str(job.get("ps", 300)),
           "--replicas", str(job.get("replicas", 5)), "--out", str(out or RUNS_DIR / job["name"]),
           "--state", str(state or state_path(job)), "--max-minutes", f"{minutes:.2f}", "--no-progress",
           "--threads", str(job["threads"]), "--compile" if job.get("compile", True) else "--no-compile",
           "--device", "cpu"]             # a GPU piece (campaign_gpu.py) appends its own; its state says cuda
    return cmd


def dft_command(job: Dict, minutes: float) -> List[str]:
    """``oreo-md dft-check`` on the frames of the last 100 ps the finished MD job kept in its state (PBE/def2-SVP,
    rMD17's level; each frame saved as it finishes)."""
    return [sys.executable, "-m", "md.cli", "dft-check", str(state_path(job)), "--frames",
            str(int(job.get("dft_frames", 10))), "--threads", str(job["threads"]), "--max-minutes", f"{minutes:.2f}"]


def pretrain_command(job: Dict, minutes: float, fresh: bool) -> List[str]:
    """``oreo pretrain`` advancing the job's run from its compact state (``--state``; ``--resume`` after the first
    piece)."""
    cmd = [sys.executable, "-m", "forcefield.cli", "pretrain", "--config", str(REPO / job["config"]),
           "--out", str(RUNS_DIR / job["name"]), "--state", str(state_path(job)), "--no-progress",
           "--threads", str(job["threads"]), "--set", f"optim.max_minutes={minutes:.2f}"]
    if job.get("corpus"):
        cmd += ["--corpus", str(REPO / job["corpus"])]
    if job.get("method"):
        cmd += ["--method", str(job["method"])]
    for item in job["set"]:
        cmd += ["--set", item]
    return cmd + ([] if fresh else ["--resume"])


def grid_command(job: Dict, minutes: float, out: Optional[Path] = None, state: Optional[Path] = None) -> List[str]:
    """``benchmarks/pretrain_finetune.py`` advancing the job's grid: its finished cells are in its state file
    (JSON; ``state``: another copy of it, as a GPU piece's shards keep), its backbones are the pretraining jobs'
    kept backbones."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "pretrain_finetune.py"), *[str(a) for a in job["args"]],
           "--out", str(out or RUNS_DIR / job["name"]), "--state", str(state or state_path(job)),
           "--max-minutes", f"{minutes:.2f}", "--threads", str(job["threads"]), "--no-progress"]
    for method, name in (job.get("backbones") or {}).items():
        cmd += ["--backbone", f"{method}={backbone_path({'name': name})}"]
    return cmd


def job_command(job: Dict, minutes: float, fresh: bool, nice: int = 10) -> List[str]:
    if job.get("kind") == "grid":
        return ["nice", "-n", str(nice)] + grid_command(job, minutes)
    if job.get("kind", "train") == "pretrain":
        return ["nice", "-n", str(nice)] + pretrain_command(job, minutes, fresh)
    if job.get("kind", "train") == "md":
        state = read_state(job)
        if state is not None and md_simulated(state):
            return ["nice", "-n", str(nice)] + dft_command(job, minutes)
        return ["nice", "-n", str(nice)] + md_command(job, minutes)
    # a training job, or with finetune_from, `oreo finetune` from a pretraining job's kept backbone (a new energy head
    # and reference energies fitted to the data; the backbone is named on every piece, the state holds the rest)
    ft = job.get("finetune_from")
    cmd = [sys.executable, "-m", "forcefield.cli", "finetune" if ft else "train", "--config", str(REPO / job["config"]),
           "--out", str(RUNS_DIR / job["name"]), "--state", str(state_path(job)), "--no-progress",
           "--threads", str(job["threads"]), "--set", f"optim.max_minutes={minutes:.2f}"]
    if ft:
        cmd += ["--from", str(backbone_path({"name": ft}))]
    if not any(item.startswith("optim.epochs=") for item in job["set"]):
        # a campaign job's pieces end on their time; the config's epoch cap would end the job (and leave its core
        # idle for the rest of the piece) while it still falls, as ethanol-ft-oreo's 3,000 did on 2026-12-04
        cmd += ["--set", "optim.epochs=1000000"]
    for item in job["set"]:
        cmd += ["--set", item]
    if fresh:
        if job.get("init_from"):
            cmd += ["--init-from", str(job["init_from"])]
            if job.get("init_cpu_hours") is not None:
                cmd += ["--init-cpu-hours", str(job["init_cpu_hours"])]
    else:
        cmd.append("--resume")
    return ["nice", "-n", str(nice)] + cmd


# ---------------------------------------------------------------------------- running
class Slot:
    def __init__(self, job: Dict, proc: subprocess.Popen, log_path: Path, started: float, worker: int = 1):
        self.job, self.proc, self.log_path, self.started = job, proc, log_path, started
        self.worker = worker  # which of a grid job's workers (1: the job's first process)
        self.stopping = ""   # why the runner ended the job (campaign.yaml marked it stopped while it ran)

    @property
    def label(self) -> str:
        return self.job["name"] + (f" (worker {self.worker})" if self.worker > 1 else "")


def stop_marked_jobs(running: List["Slot"], jobs: List[Dict]) -> List["Slot"]:
    """End each running job that ``campaign.yaml`` now marks ``stopped`` (edited while the runner works, e.g. a
    model that met its target): SIGTERM, which loses at most the work since its last checkpoint (the state file is
    written atomically). Its slot then goes to the next job. Returns the slots it ended."""
    marked = {j["name"]: j["stopped"] for j in jobs if j.get("stopped")}
    ended = []
    for s in running:
        reason = marked.get(s.job["name"])
        # a job launched while already marked stopped (an MD job's DFT check, a pretraining job writing its
        # backbone) was launched for that last piece: only a new mark ends it
        if reason and reason != s.job.get("stopped") and not s.stopping and s.proc.poll() is None:
            s.stopping = str(reason)
            s.proc.terminate()
            print(f"[campaign] {s.label}: marked stopped in {CAMPAIGN_YAML.name} ({s.stopping}); ending it",
                  flush=True)
            ended.append(s)
    return ended


def worker_file(job: Dict, worker: int, name: str) -> Path:
    """A runner's file of one of a job's processes: ``runs/campaign/<job>/<name>`` for its first,
    ``<stem>.w<k><suffix>`` for a grid job's further workers (``campaign.w2.log``, ``running.w2.pid``)."""
    path = RUNS_DIR / job["name"] / name
    return path if worker == 1 else path.with_name(f"{path.stem}.w{worker}{path.suffix}")


def launch(job: Dict, minutes: float, nice: int, worker: int = 1) -> Slot:
    out = RUNS_DIR / job["name"]
    out.mkdir(parents=True, exist_ok=True)
    fresh = not (out / "last.pt").is_file() and not state_path(job).is_file()
    cmd = job_command(job, minutes, fresh, nice)
    log_path = worker_file(job, worker, "campaign.log")
    # each job compiles into its own Inductor cache: after ethanol's compiled step failed (torch 2.13 Inductor,
    # UnboundLocalError in the generated backward), a naphthalene export reading the shared cache failed the same
    # way and built fine in a fresh one
    # Inductor compiles in worker processes of its own (as many as the machine has cores by default): one job, its
    # threads, also while it compiles
    env = {**os.environ, "OREO_THREADS": str(job["threads"]), "OMP_NUM_THREADS": str(job["threads"]),
           "MKL_NUM_THREADS": str(job["threads"]), "TORCHINDUCTOR_COMPILE_THREADS": str(job["threads"]),
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                                                     f"/tmp/oreo-inductor-{os.getuid()}") + f"/{job['name']}"}
    with open(log_path, "a") as fh:
        fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(shlex.quote(c) for c in cmd)}\n")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "a"), stderr=subprocess.STDOUT)
    worker_file(job, worker, "running.pid").write_text(str(proc.pid))   # while it runs, no GPU piece is adopted over it
    slot = Slot(job, proc, log_path, time.time(), worker)
    print(f"[campaign] start {slot.label} ({'new' if fresh else 'resumed'}, {minutes:.0f} min); log {log_path}",
          flush=True)
    return slot


def running_here(job: Dict) -> Optional[int]:
    """The pid of a runner's process (any of a grid job's workers) that is working on ``job`` on this machine now,
    else None (a zombie, exited but not yet collected, is not working)."""
    process_tag = sibling("pretrain_finetune").process_tag
    for path in sorted((RUNS_DIR / job["name"]).glob("running*.pid")):
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            continue
        if process_tag(pid) is not None:
            return pid
    return None


def last_csv_row(job: Dict) -> Optional[Dict]:
    path = RUNS_DIR / job["name"] / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return rows[-1] if rows else None


def grid_progress(job: Dict, log_path: Path, label: Optional[str] = None) -> str:
    """A grid job's progress line: the runs its state records, and the run its log says it is on."""
    st = read_state(job) or {"cells": 0, "cpu_hours": 0.0}
    now = ""
    if log_path.is_file():
        with open(log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 20000))
            tail = fh.read().decode("utf-8", "replace").splitlines()
        # this invocation's lines only: the log keeps earlier pieces' (each begins with a "# <date> <command>" line)
        starts = [k for k, line in enumerate(tail) if line.startswith("# ")]
        tail = tail[starts[-1] + 1:] if starts else tail
        heads = [line for line in tail if line.startswith(("[finetune ", "[md ", "[qm9 ", "[pretrain "))]
        now = f"; now {heads[-1].split(']')[0]}]" if heads else ""
    return f"{label or job['name']}: {st['cells']} runs recorded, {st['cpu_hours']:.2f} CPU-h{now}"


def own_cpu_hours(job: Dict, state: Optional[Dict]) -> float:
    """CPU-hours a job has had of its own (not counting the model it started from)."""
    if state is None:
        return 0.0
    return float(state["cpu_hours"]) - float(job.get("init_cpu_hours") or 0.0)


def schedule(jobs: List[Dict], names: Optional[List[str]]) -> List[Dict]:
    """The order free slots are filled in: the jobs named by ``--jobs`` in that order; otherwise fair shares
    across pieces: lowest ``priority`` first (default 0), then the job that has had the least CPU time of its own,
    so training, MD and pretraining jobs all advance from one session to the next."""
    if names:
        by_name = {j["name"]: j for j in jobs}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"--jobs: no job named {unknown} in {CAMPAIGN_YAML}; known: {sorted(by_name)}")
        return [by_name[n] for n in names]
    return sorted(jobs, key=lambda j: (float(j.get("priority", 0)), own_cpu_hours(j, read_state(j))))


def commit_state(message: str) -> str:
    """Commit the state files and the pinned models and backbones (those paths only: whatever else is staged or
    edited in the checkout stays as it is) in the checkout the runner works in. Returns what happened, in words;
    never raises, since the jobs matter more than the commit."""
    try:
        paths = [str(p.relative_to(REPO)) for p in (STATE_DIR, MODELS_DIR) if p.is_dir()]
    except ValueError:
        return f"not committed: the state lives outside the checkout {REPO}"
    if not paths:
        return "no state to commit yet"

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)

    def failed(out: subprocess.CompletedProcess, verb: str) -> str:
        return (f"not committed (git {verb}: {(out.stderr or out.stdout).strip()[:200]}); the state files are in "
                f"{STATE_DIR}: commit them by hand")

    out = git("add", "-A", "--", *paths)
    if out.returncode:
        return failed(out, "add")
    out = git("diff", "--cached", "--name-only", "--", *paths)
    if out.returncode:
        return failed(out, "diff")
    changed = out.stdout.split()
    if not changed:
        return "state unchanged since the last commit"
    size = sum((REPO / f).stat().st_size for f in changed if (REPO / f).is_file())
    out = git("commit", "-q", "-m", message, "--", *paths)
    if out.returncode:
        return failed(out, "commit")
    sha = git("rev-parse", "--short", "HEAD").stdout.strip()
    return f"committed {len(changed)} state file(s) ({size / 1e6:.1f} MB) as {sha}"


class Stopped(Exception):
    """The runner was told to stop (SIGTERM, SIGHUP)."""


def end_jobs(running: List["Slot"], wait_s: float = 60.0) -> None:
    """SIGTERM to every running job (each loses at most the work since its last checkpoint; state files are written
    atomically), then wait up to ``wait_s`` for them to exit, then SIGKILL what is left."""
    for s in running:
        if s.proc.poll() is None:
            s.proc.terminate()
    t_end = time.time() + wait_s
    for s in running:
        try:
            s.proc.wait(timeout=max(0.1, t_end - time.time()))
        except subprocess.TimeoutExpired:
            s.proc.kill()


def run(jobs: List[Dict], minutes: float, slots: int, every: float, names: Optional[List[str]],
        nice: int = 10, commit_every: Optional[float] = None) -> None:
    import signal

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    running: List[Slot] = []
    try:
        _run(running, minutes, slots, every, names, nice, commit_every)
    except BaseException as exc:     # the runner dies (a bug, Ctrl-C, kill): no job goes on unwatched, and what the
        end_jobs(running)            # jobs saved is committed
        print(f"[campaign] stopping ({type(exc).__name__}: {exc}); jobs ended", flush=True)
        if commit_every:
            print(f"[campaign] {commit_state(autosave_message('a stop'))}", flush=True)
        if not isinstance(exc, Stopped):
            raise
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if commit_every:
        print(f"[campaign] {commit_state(autosave_message('the end of the run'))}", flush=True)


def autosave_message(when: str) -> str:
    return f"campaign state at {when} ({time.strftime('%Y-%m-%d %H:%M %Z')}; benchmarks/campaign.py --commit-every)"


def _run(running: List[Slot], minutes: float, slots: int, every: float, names: Optional[List[str]],
         nice: int, commit_every: Optional[float] = None) -> None:
    deadline = time.time() + 60 * minutes
    next_commit = time.time() + 60 * commit_every if commit_every else math.inf
    tried = set()         # (job name, worker) started in this invocation: once each, not restarted in a loop
    relaunched = set()    # MD jobs given a second start in this invocation (their DFT check after the trajectory)
    restart = set()       # ... whose second start is still to come
    said = set()
    last_print = 0.0
    next_fill = 0.0

    def say_once(key, text: str) -> None:
        if key not in said:
            said.add(key)
            print(f"[campaign] {text}", flush=True)

    def mtime() -> Optional[float]:
        try:
            return CAMPAIGN_YAML.stat().st_mtime
        except OSError:                                  # an editor or git replacing the file
            return None

    def current_jobs() -> Optional[List[Dict]]:
        """The job file as it is now; None (said once per version) when an edit left it unreadable."""
        try:
            return read_jobs(CAMPAIGN_YAML)
        except (SystemExit, Exception) as exc:           # a half-saved or wrong edit: running jobs go on
            say_once(("unreadable", mtime()), f"{CAMPAIGN_YAML.name} does not read ({exc}); running jobs go on, "
                                              f"no job starts until it is fixed")
            return None

    yaml_mtime = mtime()
    while True:
        now = time.time()
        fill = now >= next_fill
        if mtime() != yaml_mtime:                        # edited: end the jobs it now marks stopped
            yaml_mtime, fill = mtime(), True
            stop_marked_jobs(running, current_jobs() or [])
        # collect finished processes
        for s in list(running):
            if s.proc.poll() is not None:
                running.remove(s)
                worker_file(s.job, s.worker, "running.pid").unlink(missing_ok=True)
                fill = True
                rc = s.proc.returncode
                print(f"[campaign] {s.label} stopped (exit {rc}) after {(now - s.started) / 60:.1f} min"
                      + (f": {s.stopping}" if s.stopping else ""), flush=True)
                if rc != 0 and not s.stopping:
                    tail = s.log_path.read_text().splitlines()[-5:]
                    print("  " + "\n  ".join(tail), flush=True)
                elif s.job.get("kind") == "pretrain":
                    keep_backbone(s.job)
                elif (rc == 0 and not s.stopping and s.job.get("kind") == "md" and s.job["name"] not in relaunched
                      and md_simulated(read_state(s.job) or {"step": 0, "n_steps": 1, "running": 1})):
                    # its trajectory just ended: the DFT check along it is the job's next piece, in this invocation
                    restart.add((s.job["name"], s.worker))
                    relaunched.add(s.job["name"])
        left = (deadline - now) / 60
        if left < -GRACE_MINUTES and running:
            print(f"[campaign] {', '.join(s.label for s in running)} still running {GRACE_MINUTES:g} min after "
                  f"the deadline: ending them", flush=True)
            end_jobs(running)
            continue
        # fill free slots (the YAML is re-read, so edits take effect); states are MBs: only when a slot is free and
        # something changed, or once a minute
        listed = current_jobs() if fill and left > MIN_START_MINUTES and len(running) < slots else None
        if listed is not None:
            next_fill = now + FILL_EVERY_S
            known = {j["name"] for j in listed}
            for gone in [n for n in names or [] if n not in known]:
                say_once(("gone", gone), f"--jobs names {gone}, which {CAMPAIGN_YAML.name} no longer lists")
            busy = {(s.job["name"], s.worker) for s in running}
            order = schedule(listed, [n for n in names if n in known] if names else None)
            # every job's first process before any grid job's further workers (slots no other job can use)
            most = max((j.get("workers", 1) for j in order), default=1)
            candidates = [(job, k) for k in range(1, most + 1) for job in order if k <= job.get("workers", 1)]
            for job, worker in candidates:
                if len(running) >= slots:
                    break
                key = (job["name"], worker)
                if key in busy or (key in tried and key not in restart):
                    continue
                restart.discard(key)
                try:
                    state = read_state(job)
                    if finished(job, state):
                        continue
                    ran_here = [a for a in job["after"] if (a, 1) in tried]  # its model ships after this run (--ship)
                    wait = waits_for(job, listed) or (f"waits for {', '.join(ran_here)}, which ran in this "
                                                       f"invocation" if ran_here else "")
                    if wait:
                        say_once(("wait", job["name"], wait), f"{job['name']} {wait}")
                        continue
                    budget = job.get("budget_cpu_hours")
                    job_left = left
                    if budget is not None:
                        spent = 0.0 if state is None else state["cpu_hours"] - float(job.get("init_cpu_hours") or 0)
                        job_left = min(left, 60 * (budget - spent))
                    tried.add(key)
                    running.append(launch(job, job_left, nice, worker))
                    busy.add(key)
                except (Exception, SystemExit) as exc:      # one job's problem is not every job's
                    tried.add(key)
                    say_once(("failed", key), f"{job['name']} not started: {exc}")
            if running and len(running) < slots:
                # e.g. a job of --jobs reached its learning-rate floor: say it where it shows, once per count
                say_once(("idle", len(running)),
                         f"{slots - len(running)} of {slots} slot(s) idle: no other job "
                         + ("of --jobs " if names else "") + f"can run now ({left:.0f} min left); add jobs to "
                         f"{CAMPAIGN_YAML.name} or start another runner with --jobs NAME --slots 1")
        if not running:
            break
        if now >= next_commit:
            next_commit = now + 60 * commit_every
            print(f"[campaign] {commit_state(autosave_message(time.strftime('%H:%M')))}", flush=True)
        if now - last_print >= every:
            last_print = now
            parts = []
            for s in running:
                row = last_csv_row(s.job) if s.job.get("kind", "train") == "train" else None
                st = read_state(s.job) if s.job.get("kind") in ("md", "pretrain") else None
                if st and s.job["kind"] == "md":
                    parts.append(f"{s.job['name']}: {st['ps_done']:.2f}/{st['ps']:g} ps, {st['running']}/"
                                 f"{st['replicas']} replicas running")
                elif st and st.get("total_steps"):
                    parts.append(f"{s.job['name']}: step {st['step']}/{st['total_steps']}, "
                                 f"{st['cpu_hours']:.2f} CPU-h")
                elif s.job.get("kind") == "grid":
                    parts.append(grid_progress(s.job, s.log_path, s.label))
                elif row:
                    parts.append(f"{s.job['name']}: epoch {row['epoch']} val F "
                                 f"{float(row['val_forces_mae_meV_per_A']):.2f} meV/Å, "
                                 f"{float(row.get('cpu_hours') or 'nan'):.2f} CPU-h")
                else:
                    parts.append(f"{s.job['name']}: starting")
            print(f"[campaign {time.strftime('%H:%M')}] {max(left, 0):.0f} min left | " + " | ".join(parts),
                  flush=True)
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------- report
def report(jobs: List[Dict]) -> Dict:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for job in jobs:
        st = read_state(job) if job.get("kind", "train") == "pretrain" else None
        if st is None:
            continue
        curve = [(float(r["cpu_hours"]), float(r["loss"])) for r in st["history"]
                 if r.get("cpu_hours") not in (None, "") and r.get("loss") not in (None, "")]
        rows.append({"name": job["name"], "group": job["group"], "note": job.get("note", ""), "set": job["set"],
                     "kind": "pretrain", "epochs": st["epoch"], "steps": st["step"], "cpu_hours": st["cpu_hours"],
                     "own_cpu_hours": st["cpu_hours"], "last_loss": curve[-1][1] if curve else float("nan"),
                     "lr": st["lr"], "target": None, "finished": finished(job, st), "curve": curve,
                     "total_steps": st.get("total_steps"), "cpu_hours_to_go": pretrain_hours_to_go(st),
                     "ylabel": "pretraining loss (training batches)"})
    for job in jobs:
        st = read_state(job) if job.get("kind", "train") == "train" else None
        if st is None:
            continue
        hist = [r for r in st["history"] if r.get("val_forces_mae_meV_per_A") not in (None, "")]
        curve = [(float(r["cpu_hours"]) if r.get("cpu_hours") not in (None, "") else float("nan"),
                  float(r["val_forces_mae_meV_per_A"])) for r in hist]
        best = min((f for _, f in curve), default=float("nan"))
        rows.append({"name": job["name"], "group": job["group"], "note": job.get("note", ""), "set": job["set"],
                     "epochs": st["epoch"], "steps": st["step"], "cpu_hours": st["cpu_hours"],
                     "own_cpu_hours": st["cpu_hours"] - float(job.get("init_cpu_hours") or 0),
                     "best_val_forces_mae": best, "last_val_forces_mae": curve[-1][1] if curve else float("nan"),
                     "lr": st["lr"], "target": job.get("target_meV_per_A"), "finished": finished(job, st),
                     "curve": curve})
    (RESULTS_DIR / "campaign.json").write_text(json.dumps(rows, indent=2))
    lines = ["# Campaign state", "", "Regenerated from `benchmarks/campaign/state/*.pt` by "
             "`python benchmarks/campaign.py --report`. Validation force MAE of the EMA model (meV/Å) on the "
             "job's validation frames; CPU-hours are cumulative (including the model a job started from).", ""]
    for group in dict.fromkeys(r["group"] for r in rows if r.get("kind") == "pretrain"):
        lines += [f"## {group}", "", "CPU-h to go: the steps left at the job's own rate so far.", "",
                  "| job | CPU-h | CPU-h to go | epochs | steps | last loss | lr | status | recipe |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        lines += [f"| {r['name']} | {r['cpu_hours']:.2f} | {_fmt(r['cpu_hours_to_go'], 2)} | {r['epochs']} | "
                  f"{r['steps']} / {r['total_steps'] or '?'} | {r['last_loss']:.4g} | "
                  f"{r['lr']:.1e} | {r['finished'] or 'running'} | {r['note'] or ', '.join(r['set'])} |"
                  for r in rows if r["group"] == group]
        lines.append("")
    for group in dict.fromkeys(r["group"] for r in rows if r.get("kind") != "pretrain"):
        lines += [f"## {group}", "", "| job | CPU-h (own) | epochs | best val F MAE | last | lr | target | status | "
                  "recipe |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in rows:
            if r["group"] != group:
                continue
            target = "" if r["target"] is None else f"{r['target']:g}"
            lines.append(f"| {r['name']} | {r['cpu_hours']:.2f} ({r['own_cpu_hours']:.2f}) | {r['epochs']} | "
                         f"{r['best_val_forces_mae']:.2f} | {r['last_val_forces_mae']:.2f} | {r['lr']:.1e} | "
                         f"{target} | {r['finished'] or 'running'} | {r['note'] or ', '.join(r['set'])} |")
        lines.append("")
    lines += study_table(rows)
    lines += grid_tables([j for j in jobs if j.get("kind") == "grid"])
    md_rows = md_summaries([j for j in jobs if j.get("kind", "train") == "md"])
    lines += md_table(md_rows)
    (RESULTS_DIR / "campaign.md").write_text("\n".join(lines))
    if md_rows:
        (RESULTS_DIR / "md17_simulation.json").write_text(json.dumps(md_rows, indent=2))
    plot_curves(rows)
    return {"rows": rows, "md": md_rows}


def grid_methods(job: Dict) -> List[str]:
    """The methods a grid job compares (its ``--methods``), in that order."""
    args = [str(a) for a in job.get("args") or []]
    if "--methods" not in args:
        return []
    out = []
    for a in args[args.index("--methods") + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


def grid_tables(jobs: List[Dict]) -> List[str]:
    """Each fine-tune grid's tables (``benchmarks/results/campaign/<job>/results.md`` and its plot, regenerated from
    the state file) and one status line per grid for ``campaign.md``."""
    if not jobs:
        return []
    pretrain_finetune = sibling("pretrain_finetune")
    lines = ["## Fine-tune grids", "", "| job | runs done | CPU-h | status | tables |", "|---|---:|---:|---|---|"]
    for job in jobs:
        g = json.loads(state_path(job).read_text()) if state_path(job).is_file() else None
        st = None if g is None else grid_summary(g, job)
        going = runs_in_progress(job)
        status = finished(job, st) or ("running" if st or going else "not started")
        if going:
            status += f"; carrying on: {', '.join(going)}"
        where = ""
        if g is not None:
            ff, qm9 = g.get("forcefield") or [], g.get("qm9") or []
            out = RESULTS_DIR / job["name"]
            out.mkdir(parents=True, exist_ok=True)
            pretrain_finetune.write_report(out, ff, qm9, grid_methods(job) or
                                           list(dict.fromkeys(r["method"] for r in ff + qm9)))
            where = f"`{shown(out / 'results.md')}`"
            embed_in_readme(README, job["name"], (out / "results.md").read_text())
        lines.append(f"| {job['name']} | {0 if st is None else st['cells']} | "
                     f"{0.0 if st is None else st['cpu_hours']:.2f} | {status} | {where} |")
    return lines + [""]


def embed_in_readme(readme: Path, name: str, report_md: str) -> bool:
    """Put a grid's tables (its ``results.md``, without the title; its sections as level-5 headings, inside the
    README's pretraining section) between the README's ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``
    lines, so that ``--report`` keeps the README's tables the state's. False (nothing written) where the README has
    no such pair."""
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    text = readme.read_text() if readme.is_file() else ""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return False
    body = [("#####" + ln[2:]) if ln.startswith("## ") else ln for ln in report_md.strip().splitlines()
            if not ln.startswith("# ")]
    while body and not body[0].strip():
        body.pop(0)
    new = text[:i] + start + "\n\n" + "\n".join(body) + "\n\n" + text[j:]
    if new != text:
        readme.write_text(new)
    return True


def md_summaries(jobs: List[Dict]) -> List[Dict]:
    """Each MD job's summary from its state file alone (no trajectory needed): ``md.analysis.analyze_state``."""
    sys.path.insert(0, str(REPO))
    from md.analysis import analyze_state
    out = []
    for job in jobs:
        if not state_path(job).is_file():
            continue
        summary = analyze_state(state_path(job))
        summary["job"], summary["group"], summary["threads"] = job["name"], job["group"], job["threads"]
        summary["model_name"] = Path(str(job.get("model") or job["molecule"])).stem
        dft = dft_report(job)
        summary["dft_check"] = dft
        failed = int((dft or {}).get("n_failed") or 0)
        summary["dft_text"] = "—" if dft is None else (
            f"{_fmt(dft['force_mae_meV_per_A'])} ({dft['n_frames']} frames"
            + (f"; {failed} more without a converged SCF" if failed else "")
            + f", {dft['settings']['xc'].upper()}/{dft['settings']['basis']})")
        summary["status"] = finished(job, read_state(job)) or "running"
        out.append(summary)
    return out


def md_table(rows: List[Dict]) -> List[str]:
    """The MDsim table: stability and h(r) MAE (mean ± std over replicas) beside the h(r) sampling floor."""
    if not rows:
        return []

    def pm(stats, digits):
        if not stats or stats.get("mean") is None:
            return "n/a"
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"

    def num(v, digits):
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"

    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        out += [f"## {group}", "",
                "Nosé–Hoover, 500 K, 0.5 fs, replicas from held-out rMD17 frames (test split 01). Stability: time "
                "until a bond deviates > 0.5 Å from its mean over the reference; h(r) MAE over the stable frames "
                "against every distinct rMD17 frame (9,633), beside the sampling floor (what an ideal sampler's as "
                "many independent frames score against the reference: `md.observables.sampling_floor`). Force MAE: the model on 1000 held-out "
                "frames; beside it, against PBE/def2-SVP (PySCF, rMD17's level) on frames of the last 100 ps of the "
                "model's own trajectories (`oreo-md dft-check STATE`): much larger means the MD visits places the "
                "data does not cover. Model: the shipped model the job started with and the first digits of its SHA-256 (the "
                "job keeps that file, `benchmarks/campaign/models/<job>.pt`, when the molecule is re-shipped). "
                "Steps/s: all replicas in one batch, 1 thread, other jobs sharing the machine (the mean over every "
                "CPU piece of the job; pieces on a GPU are timed apart); CPU-h to go: the steps left at that rate.", "",
                "| molecule | model | simulated (ps) | replicas running | stability (ps) | h(r) MAE | h(r) floor | "
                "force MAE, test (meV/Å) | force MAE vs DFT on its trajectory | steps/s | CPU-h to go | status |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r["group"] != group:
                continue
            meta = r.get("model_metadata") or {}
            model = f"`{r['model_name']}.pt` {str(meta.get('model_sha256', ''))[:8]}"
            running = sum(1 for x in r["replicas"] if x.get("stop_reason") is None)
            out.append(f"| {r['system']} | {model} | {r['simulated_ps']:.1f} / {r['requested_ps']:g} | "
                       f"{running} / {r['replicas_n']} | {pm(r['stability_ps'], 1)} | {pm(r['hr_mae'], 3)} | "
                       f"{pm(r.get('hr_floor'), 3)} | {num(r.get('force_mae_meV_per_A'), 1)} | {r['dft_text']} | "
                       f"{num(md_cpu_speed(r).get('steps_per_s'), 1)} | {_fmt(md_hours_to_go(r), 1)} | "
                       f"{r['status']} |")
        out.append("")
    return out


STUDY_MINUTES = (5, 10, 15, 20, 25, 30)
# TorchMD-Net's own ET (6x128) on this machine, 950 aspirin training frames: force MAE at these CPU-minutes
# (measured by this project before oreo existed; quoted in issue 11)
TORCHMDNET_ET = {5: 106, 10: 73, 15: 60, 20: 51, 25: 52, 30: 44.3}


def value_at(curve, x: float) -> float:
    """Linear interpolation of (x, y) points at x; NaN outside the curve."""
    pts = sorted((a, b) for a, b in curve if math.isfinite(a))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return float("nan")


def study_table(rows: List[Dict]) -> List[str]:
    """Accuracy per CPU-minute: validation force MAE of each study job at equal CPU-minutes of its own."""
    study = [r for r in rows if r["group"].startswith("recipe study")]
    if not study:
        return []
    reach = max((r["own_cpu_hours"] * 60 for r in study), default=0)
    mins = [m for m in STUDY_MINUTES if m <= reach + 1e-6] or [STUDY_MINUTES[0]]
    head = " | ".join(f"{m} min" for m in mins)
    out = ["## Accuracy per CPU-minute (aspirin, validation force MAE in meV/Å at equal CPU-minutes)", "",
           "Each job trains from scratch on the same 950 frames; values are interpolated on its learning curve at "
           "its own CPU-minutes (compilation included). TorchMD-Net's own ET (6x128) on this machine for scale.", "",
           f"| job | recipe | {head} | at its end (CPU-min) |", "|---|---|" + "---:|" * (len(mins) + 1)]
    for r in study:
        own = [(c - (r["cpu_hours"] - r["own_cpu_hours"])) * 60 for c, _ in r["curve"]]
        curve = list(zip(own, [f for _, f in r["curve"]]))
        vals = " | ".join(_fmt(value_at(curve, m)) for m in mins)
        end = f"{curve[-1][1]:.1f} ({curve[-1][0]:.1f})" if curve else "—"
        out.append(f"| {r['name']} | {r['note']} | {vals} | {end} |")
    out.append("| TorchMD-Net ET 6x128 | its own trainer | " + " | ".join(_fmt(TORCHMDNET_ET.get(m, float('nan')))
                                                                       for m in mins) + " | |")
    return out + [""]


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------- shipping
SHIP_CONFIDENCE = 0.95    # a model replaces the shipped one when it is better in this share of paired resamples


def better_on_resamples(forces_new, forces_old, frames, resamples: int = 4000, seed: int = 0) -> float:
    """The share of bootstrap resamples of the validation frames (paired: the same frames for both models) in which
    the new model's force MAE is below the old one's. 50 frames are few: a lower MAE on them alone is often noise,
    and following it would swap models back and forth (and ship worse ones)."""
    import numpy as np
    ref = np.asarray(frames.forces)
    atoms = np.diff(np.asarray(frames.ptr))
    owner = np.repeat(np.arange(len(atoms)), atoms)

    def per_frame(forces):
        err = np.abs(np.asarray(forces) - ref).sum(axis=1)
        return np.bincount(owner, weights=err, minlength=len(atoms))       # summed |error| per frame
    diff, count = per_frame(forces_new) - per_frame(forces_old), 3.0 * atoms
    pick = np.random.default_rng(seed).integers(0, len(atoms), size=(resamples, len(atoms)))
    return float(np.mean(diff[pick].sum(axis=1) / count[pick].sum(axis=1) < 0.0))


def ship_if_better(label: str, run_dir: Path, candidate, ship_as: str, val, dest: Path, training: str,
                   reproduce: str) -> Optional[Dict]:
    """Ship ``run_dir``'s best model (``candidate``, loaded) as ``dest/<ship_as>.pt`` when its force MAE on ``val``
    is below the shipped model's beyond the noise of those frames (:func:`better_on_resamples` at least
    :data:`SHIP_CONFIDENCE`; no shipped model: any). Returns the shipped model's summary (test errors recomputed),
    or None (said why)."""
    import torch
    sys.path.insert(0, str(REPO))
    from release.ship_models import ship
    from forcefield.evaluate import evaluate
    from forcefield.io import load_potential
    cand, cand_pred = evaluate(candidate, val)
    shipped_path = dest / f"{ship_as}.pt"
    old, sure = float("inf"), 1.0
    if shipped_path.is_file():
        shipped_metrics, shipped_pred = evaluate(load_potential(shipped_path, dtype=torch.float32), val)
        old = shipped_metrics["forces_mae_meV_per_A"]
        sure = better_on_resamples(cand_pred["forces"], shipped_pred["forces"], val)
    new = cand["forces_mae_meV_per_A"]
    if not new < old:
        print(f"[campaign] {label}: validation force MAE {new:.2f} meV/Å, not below the shipped {ship_as}.pt "
              f"({old:.2f}); not shipped")
        return None
    if sure < SHIP_CONFIDENCE:
        print(f"[campaign] {label}: validation force MAE {new:.2f} against the shipped {ship_as}.pt's {old:.2f} "
              f"meV/Å, lower in {100 * sure:.0f}% of paired resamples of the {len(val)} validation frames (shipping "
              f"takes {100 * SHIP_CONFIDENCE:.0f}%): within their noise; not shipped")
        return None
    summary = ship(run_dir, dest, training=training, reproduce=reproduce)
    print(f"[campaign] shipped {ship_as}.pt from {label}: validation {old:.2f} -> {new:.2f} meV/Å, test force MAE "
          f"{summary['forces_mae_meV_per_A']:.2f} meV/Å")
    return summary


def grid_cells_here(job: Dict) -> Dict[str, List[Dict]]:
    """The fine-tuned models of a grid job that this clone holds, by molecule: the cells its state records as
    finished (not failed) whose folder below ``runs/campaign/<job>/finetune/`` still has its ``best.pt`` (a grid
    runs over many clones; the models of earlier pieces are gone, their rows stay). Each: the state's row plus
    ``run_dir``."""
    cell_dir = sibling("pretrain_finetune").cell_dir
    path = state_path(job)
    cells: Dict[str, List[Dict]] = {}
    for row in (json.loads(path.read_text()) if path.is_file() else {}).get("forcefield") or []:
        if row.get("failed"):
            continue
        run_dir = RUNS_DIR / job["name"] / "finetune" / cell_dir(row["molecule"], int(row["size"]), row["method"],
                                                                 int(row.get("seed") or 1))
        if (run_dir / "best.pt").is_file() and (run_dir / "test_metrics.json").is_file():
            cells.setdefault(row["molecule"], []).append({**row, "run_dir": run_dir})
    return cells


def shipped_validation(path: Path):
    """The validation frames a shipped rMD17 model was chosen on (its card's frame ids), or None (no such model,
    or one that records none)."""
    import torch
    from forcefield.data import load_rmd17, select_by_frame_id
    from forcefield.io import load_potential
    if not path.is_file():
        return None
    meta = load_potential(path, dtype=torch.float32).metadata or {}
    if not meta.get("molecule") or not meta.get("val_frame_ids"):
        return None
    pool = load_rmd17(meta["molecule"], split="train", split_index=int(meta.get("split_index") or 1),
                      labels=meta.get("labels") or "revised")
    return select_by_frame_id(pool, meta["val_frame_ids"]), meta


def ship_grid_cells(job: Dict, dest: Path) -> None:
    """A grid's fine-tuned models (issue 13 item 3): per molecule, the one lowest on the shipped model's validation
    frames (among those that never trained on them: other seeds draw other frames) replaces the shipped model by
    :func:`ship_if_better`'s rule; its card names the backbone and its pretraining compute, and the fine-tuning
    compute."""
    import torch
    from forcefield.evaluate import evaluate
    from forcefield.io import load_potential
    for molecule, cells in sorted(grid_cells_here(job).items()):
        shipped = shipped_validation(dest / f"{molecule}.pt")
        if shipped is None:
            print(f"[campaign] {job['name']}: no shipped {molecule}.pt with validation frame ids in {shown(dest)}; "
                  f"its cells have nothing to be compared with (a training job ships first)")
            continue
        val, meta = shipped
        val_ids = set(int(i) for i in meta["val_frame_ids"])
        best, best_mae, best_pot, n_scored = None, float("inf"), None, 0
        for c in cells:
            pot = load_potential(c["run_dir"] / "best.pt", dtype=torch.float32)
            cmeta = pot.metadata or {}
            seen = val_ids & set(int(i) for i in cmeta.get("train_frame_ids") or [])
            if seen or cmeta.get("split_index") != meta.get("split_index") or cmeta.get("labels") != meta.get("labels"):
                continue          # trained on (some of) those frames, or on another split: not comparable there
            n_scored += 1
            mae = evaluate(pot, val)[0]["forces_mae_meV_per_A"]
            if mae < best_mae:
                best, best_mae, best_pot = c, mae, pot
        if best is None:
            print(f"[campaign] {job['name']}: none of its {len(cells)} {molecule} model(s) here is comparable with "
                  f"the shipped one (each trained on some of its validation frames); not shipped")
            continue
        backbone = (job.get("backbones") or {}).get(best["method"])
        tm = json.loads((best["run_dir"] / "test_metrics.json").read_text())
        origin = (f"the {best['method']} backbone of the campaign's pretraining job `{backbone}` "
                  f"({pretraining_cpu_hours(backbone):.2f} CPU-h of pretraining, not counted here)" if backbone
                  else f"random weights ({best['method']})")
        training = (f"fine-tuned in the campaign's grid `{job['name']}` on {best['size']} rMD17 frames (seed "
                    f"{best.get('seed', 1)}): {tm.get('steps', '?')} optimiser steps, {tm.get('epochs', '?')} "
                    f"epochs, {float(tm.get('cpu_hours', float('nan'))):.2f} CPU-hours of fine-tuning, from {origin}")
        reproduce = ("Reproduce: the campaign's fine-tune grid runs this cell; its settings are in "
                     f"`benchmarks/campaign/campaign.yaml` (job `{job['name']}`) and its finished cells in "
                     f"`benchmarks/campaign/state/{job['name']}.json`:\n\n```bash\n"
                     "export OREO_DATA_DIR=/path/to/data          # holds rmd17/ (oreo data download rmd17)\n"
                     f"python benchmarks/campaign.py --minutes 150 --jobs {job['name']}\n"
                     "python benchmarks/campaign.py --ship          # ships a cell that beats the shipped model\n```")
        ship_if_better(f"{job['name']} {molecule} n={best['size']} {best['method']} seed {best.get('seed', 1)} "
                       f"(best of {n_scored} comparable cell(s) here)", best["run_dir"], best_pot, molecule, val,
                       dest, training, reproduce)


def ship_improved(jobs: List[Dict], dest: Optional[Path] = None) -> None:
    """Ship each job's best model as ``forcefield/pretrained/<ship>.pt`` (or into ``dest``) when it beats the
    shipped one on the job's validation frames beyond their noise (:func:`ship_if_better`; card: cumulative
    CPU-hours, epochs, recipe, frame ids; test errors recomputed); then each grid job's best cells
    (:func:`ship_grid_cells`)."""
    import torch
    sys.path.insert(0, str(REPO))
    from forcefield.io import PRETRAINED_DIR, load_potential
    from forcefield.train.config import config_from_dict
    from forcefield.train.datasets import build_splits
    dest = Path(dest) if dest is not None else PRETRAINED_DIR
    for job in jobs:
        if job.get("kind") == "grid":
            continue
        run_dir = RUNS_DIR / job["name"]
        if not job.get("ship") or (job.get("stopped") and not (run_dir / "best.pt").is_file()):
            continue                      # nothing to ship, or a finished job (its model shipped) not run here
        if not (run_dir / "best.pt").is_file():
            print(f"[campaign] {job['name']}: no {shown(run_dir / 'best.pt')} here (a fresh clone): run a piece of it "
                  f"first (--jobs {job['name']}), which writes one; not shipped")
            continue
        cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        val = build_splits(cfg.data, cfg.optim.seed).val
        candidate = load_potential(run_dir / "best.pt", dtype=torch.float32)
        meta = candidate.metadata
        recipe = ", ".join(job["set"]) or "the config as it is"
        training = (f"{meta.get('cpu_hours', float('nan')):.2f} cumulative CPU-hours (1 thread each) over "
                    f"{meta.get('epochs', '?')} epochs of this campaign job"
                    + (f", continued from `{job['init_from']}` ({job.get('init_cpu_hours', 0):g} CPU-h)"
                       if job.get("init_from") else "")
                    + (f", fine-tuned from the backbone of the campaign's pretraining job `{job['finetune_from']}` "
                       f"({pretraining_cpu_hours(job['finetune_from']):.2f} CPU-h of pretraining, not counted above)"
                       if job.get("finetune_from") else "") + f"; recipe: `{job['config']}` with {recipe}"
                    + (f". {job['note']}" if job.get("note") else ""))
        reproduce = ("Reproduce: the accuracy campaign trains this model piece by piece; its state is committed in "
                     f"`benchmarks/campaign/state/{job['name']}.pt` and continued by\n\n```bash\n"
                     "export OREO_DATA_DIR=/path/to/data          # holds rmd17/ (oreo data download rmd17)\n"
                     f"python benchmarks/campaign.py --minutes 150 --jobs {job['name']}\n"
                     "python benchmarks/campaign.py --ship          # ships it when it beats the shipped model\n```")
        ship_if_better(job["name"], run_dir, candidate, job["ship"], val, dest, training, reproduce)
    for job in jobs:
        if job.get("kind") == "grid":
            ship_grid_cells(job, dest)


def plot_curves(rows: List[Dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys(r["group"] for r in rows))
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for r in rows:
            if r["group"] != group or not r["curve"]:
                continue
            x = [c for c, _ in r["curve"]]
            y = [f for _, f in r["curve"]]
            line, = ax.semilogy(x, y, label=r["name"], lw=1.2)
            if r["target"]:
                ax.axhline(r["target"], color=line.get_color(), ls=":", lw=1)
        if group.startswith("recipe study"):
            ax.plot([m / 60 for m in TORCHMDNET_ET], list(TORCHMDNET_ET.values()), "kx", ms=7,
                    label="TorchMD-Net ET 6x128 (its trainer)")
        ax.set_xlabel("cumulative CPU-hours")
        ax.set_ylabel(next((r.get("ylabel") for r in rows if r["group"] == group and r.get("ylabel")),
                           "validation force MAE (meV/Å)"))
        ax.set_title(group)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "learning_curves.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, help="wall time to spend (jobs stop at their next epoch end)")
    ap.add_argument("--jobs", nargs="*", help="only these jobs, in this order (default: every unfinished one, "
                                              "lowest priority first, then the one with the least CPU time so far)")
    ap.add_argument("--slots", type=int, help="jobs at once (default: cores // threads per job)")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--nice", type=int, default=10, help="nice level of the jobs (default 10)")
    ap.add_argument("--commit-every", type=float, metavar="MIN",
                    help="commit the state files (only those) to git every MIN minutes and when the run ends, so "
                         "that a piece cut short loses at most MIN minutes; about 4 MB a training job each time")
    ap.add_argument("--report", action="store_true", help="only regenerate the tables and plots")
    ap.add_argument("--ship", action="store_true", help="ship every job's model that beats the shipped one on "
                                                        "validation (after the run, or alone)")
    ap.add_argument("--archive", nargs="+", metavar="JOB",
                    help="cut finished training and pretraining jobs' state files to their record (curve, "
                         "counters): weights and moments dropped, the shipped model or kept backbone has the weights")
    args = ap.parse_args(argv)
    if args.archive:
        jobs = {j["name"]: j for j in read_jobs(CAMPAIGN_YAML)}
        for name in args.archive:
            if name not in jobs:
                raise SystemExit(f"--archive: no job {name!r} in {CAMPAIGN_YAML.name}")
            print(f"[campaign] {archive_state(jobs[name])}")
        return 0
    if args.report and args.minutes:
        raise SystemExit("--report and --minutes exclude each other")
    if args.commit_every is not None and (args.commit_every <= 0 or not args.minutes):
        raise SystemExit("--commit-every takes minutes > 0 and goes with --minutes (e.g. --minutes 150 "
                         "--commit-every 45)")
    if not args.report and not args.ship and (not args.minutes or args.minutes <= 0):
        raise SystemExit("give the wall time to spend: --minutes 150 (or --report for tables only, --ship to ship)")
    if args.minutes:
        jobs = read_jobs(CAMPAIGN_YAML)
        slots = args.slots or max(1, (os.cpu_count() or 1) // int(jobs[0]["threads"] if jobs else 1))
        run(jobs, args.minutes, slots, args.every, args.jobs, args.nice, args.commit_every)
    if args.ship:
        ship_improved(read_jobs(CAMPAIGN_YAML))
    report(read_jobs(CAMPAIGN_YAML))
    print(f"[campaign] wrote {RESULTS_DIR / 'campaign.md'} and learning_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
