"""Pretraining benchmark: does pretraining help fine-tuning, and which objective helps most?

Pretrains one model per method on the same corpus with the same compute (same backbone, batch size and number of
optimiser steps, or the same wall-clock budget with ``--budget minutes``), then fine-tunes every method - and a
model trained from scratch with the same fine-tuning budget - on rMD17 aspirin, ethanol, naphthalene and salicylic
acid with 50, 200 and 950 training frames, and on QM9 HOMO, LUMO and gap. Writes

    OUT/pretrain/<method>/            pretraining runs (last.pt, pretrained.pt, metrics.csv)
    OUT/finetune/<mol>/<n>/<method>/  fine-tuning runs (test_metrics.json, metrics.csv, learning_curve.png)
    OUT/qm9/<property>/<method>/      property runs (test_metrics.json; ``<method>-s<seed>`` for seeds after the first)
    OUT/md/<mol>/<n>/<method>/        MD of each fine-tuned model (with --md-ps)
    OUT/results.json, OUT/results.md  force MAE (meV/Å) and QM9 MAE (meV) tables
    OUT/learning_curves.png           test force MAE against the number of training frames, per molecule

Every run is resumable and finished runs are skipped, so the script can be killed and restarted at will::

    python benchmarks/pretrain_finetune.py --out runs/bench                  # the full grid (GPU-sized)
    python benchmarks/pretrain_finetune.py --out runs/bench-smoke --smoke    # tiny, for a check on a CPU

As a grid that adds up across fresh clones (the campaign's fine-tune grid): ``--backbone METHOD=FILE`` takes
pretrained backbones made elsewhere (the campaign's pretraining jobs) instead of pretraining, ``--seeds 50:3
200:3`` repeats the small sizes with other seeds (data draw and initialisation; ``--qm9-seeds homo:2`` a QM9 property:
initialisation and batch order), ``--finetune-cpu-minutes`` gives
every run the same CPU time (immune to other jobs on the machine), ``--state FILE`` records every finished cell
in a small JSON that is committed (cells in it are never run again; an interrupted cell restarts), and
``--max-minutes`` starts no cell that would not finish in this invocation::

    python benchmarks/pretrain_finetune.py --out runs/grid --state benchmarks/campaign/state/grid.json \
        --methods scratch et-oro et-oreo --backbone et-oro=A.pt --backbone et-oreo=B.pt --hidden 96 --layers 4 \
        --sizes 50 200 950 --seeds 50:3 200:3 --finetune-cpu-minutes 15 --properties --max-minutes 150

Leakage: the corpus drops the fine-tuning molecules (strict protocol) unless the corpus file says otherwise.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from forcefield.pretrain.finetune import FinetuneOptions, finetune_forcefield  # noqa: E402
from forcefield.pretrain.property import PropertyConfig, finetune_property  # noqa: E402
from forcefield.pretrain.trainer import Pretrainer, pretrain_config_from_dict  # noqa: E402
from forcefield.train import Trainer, config_from_dict  # noqa: E402
from forcefield.train.loop import LR_SCHEDULES  # noqa: E402

CONFIGS = ROOT / "examples" / "configs"
QM9_TEST_MINUTES = 5.0        # wall minutes kept after a QM9 run's budget for its test (10,831 molecules)
QM9_EPOCH_STEPS = 1000        # --qm9-steps: validation, schedule and checkpoint every so many steps (a pass is 3,438)
QM9_FIRST_RUN_MINUTES = 75.0  # --qm9-steps: the wall minutes a QM9 run is assumed to need before one is recorded
QM9_MIN_PIECE_MINUTES = 15.0  # --qm9-steps with --state: a QM9 run starts (or goes on) in a piece with this much time
METHOD_CONFIGS = {
    "et-oro": "pretrain_et_oro.yaml",
    "et-oreo": "pretrain_et_oreo.yaml",
    "3d-emgp": "pretrain_3dmgp_et.yaml",
    "3d-emgp-egnn": "pretrain_3dmgp_egnn.yaml",
    "denoise": "pretrain_denoise.yaml",
}
SCRATCH = {"scratch": "et", "scratch-egnn": "egnn"}   # from-scratch baselines and the backbone they use
DEFAULT_METHODS = ["scratch", "et-oro", "et-oreo", "3d-emgp", "denoise"]
MOLECULES = ["aspirin", "ethanol", "naphthalene", "salicylic"]
SIZES = [50, 200, 950]
PROPERTIES = ["homo", "lumo", "gap"]

FINETUNE_OPTIM = {"epochs": 3000, "batch_size": 8, "lr": 4e-4, "lr_warmup_steps": 300, "lr_factor": 0.7,
                  "lr_patience": 6, "lr_min": 1e-6, "ema_decay": 0.99, "energy_weight": 0.05, "forces_weight": 0.95,
                  "early_stop_patience": 60, "seed": 1}
#: with --finetune-steps (equal compute): every run takes all its steps (no early stop, and the learning-rate floor
#: lies beyond them: 0.7^24 of 4e-4 is below 1e-7, and each cut waits at least the patience), and validation and
#: the plateau patience are counted in optimiser steps, so that 50 and 950 training frames (7 and 119 steps an
#: epoch) get one schedule: a validation about every 50 steps (whole epochs), a cut after about 250 steps without
#: improvement; the model kept is the best on validation, as always
STEP_SCHEDULE = {"val_every_steps": 50, "lr_patience_steps": 250, "lr_min": 1e-7}


#: what tells a grid's runs apart, by table (a row of its state holds these keys and the run's results)
RUN_KEYS = {"forcefield": ("molecule", "size", "method", "seed"), "qm9": ("property", "method", "seed")}
#: a key's value where a row lacks it: QM9 rows recorded before --qm9-seeds are seed 1
KEY_DEFAULTS = {"seed": 1}


def run_key(table: str, row: Dict[str, Any]) -> tuple:
    """The run a row (or a key) is, as a tuple of ``RUN_KEYS[table]``: equal for the same run whenever recorded."""
    return tuple(row.get(k, KEY_DEFAULTS.get(k)) for k in RUN_KEYS[table])


def smoke_settings(data_dir: Path) -> Dict[str, Any]:
    """A grid that runs in about a minute on a busy CPU."""
    qm9_db = data_dir / "schnetpack_testdata" / "test_qm9.db"
    return {
        "corpus": {"leakage": {"protocol": "strict", "targets": ["ethanol"], "split_indices": [1]},
                   "sources": [{"name": "qm9", "reader": "qm9", "kind": "equilibrium", "path": str(qm9_db),
                                "split": "train"},
                               {"name": "rmd17", "reader": "rmd17", "kind": "off-equilibrium",
                                "molecules": ["malonaldehyde", "uracil"], "max_frames": 16}]},
        "model": {"name": "et", "hidden": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff": 4.0},
        "egnn_model": {"name": "egnn", "hidden": 16, "num_layers": 2, "cutoff": None, "num_rbf": 8},
        "pretrain_optim": {"batch_size": 4, "max_steps": 3, "warmup_steps": 1, "log_every": 1,
                           "checkpoint_every": 3},
        "molecules": ["ethanol"], "sizes": [8, 16], "val_size": 4, "test_size": 8,
        "finetune_optim": {"epochs": 2, "batch_size": 4, "lr_warmup_steps": 2, "early_stop_patience": 5},
        "properties": ["gap"],
        "property": {"source": str(qm9_db), "split": "random", "train_size": 8, "val_size": 4, "test_size": 4,
                     "epochs": 2, "batch_size": 4, "lr_warmup_steps": 2},
    }


# ---------------------------------------------------------------------------- runs
def _done(path: Path) -> bool:
    return (path / "test_metrics.json").is_file()


def settings_hash(settings: Any) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def claim_cell_folder(out: Path, args, log, stamp: Optional[str] = None, along: Sequence[Path] = ()) -> None:
    """Make ``out`` a folder of this grid's settings (or of ``stamp``): one a run with other settings (other
    backbones or recipe) left behind is moved aside (``<name>.other-settings-N``, nothing deleted), with the folders
    ``along`` (the cell's MD), so that neither its results nor its ``last.pt`` pass for this grid's; then it is
    stamped with these settings. A folder from before stamps (none there) is taken as this grid's, as it always
    was."""
    stamp = stamp or getattr(args, "settings_stamp", None)
    if stamp is None:
        return
    f = out / "grid_settings.sha256"
    if f.is_file() and f.read_text().strip() != stamp:
        for folder in [out, *along]:
            if not folder.exists():
                continue
            k = 1
            while folder.with_name(f"{folder.name}.other-settings-{k}").exists():
                k += 1
            aside = folder.with_name(f"{folder.name}.other-settings-{k}")
            folder.rename(aside)
            log(f"[{folder}] was run with other grid settings: moved to {aside.name}, it starts anew")
    out.mkdir(parents=True, exist_ok=True)
    if not f.is_file():
        f.write_text(stamp + "\n")


#: pretraining methods whose objectives run through the compiled energy + force graph (``optim.compile``); 3D-EMGP
#: and denoising read the backbone's features, which that graph does not return
COMPILED_PRETRAINING = ("et-oreo", "et-oro")


def has_run(out: Path, state_file: Optional[Path] = None) -> bool:
    """Whether ``out`` (or the committed ``state_file``) holds a run to go on with: a checkpoint, or a log whose run
    ended before its first one (which ``fit(resume=True)`` starts again, the log kept aside)."""
    return (out / "last.pt").is_file() or (out / "metrics.csv").is_file() or \
        (state_file is not None and state_file.is_file())


def pretrain_config(method: str, args, smoke: Optional[Dict]) -> Dict[str, Any]:
    d = yaml.safe_load((CONFIGS / METHOD_CONFIGS[method]).read_text())
    d["corpus"] = yaml.safe_load(Path(args.corpus).read_text()) if not smoke else copy.deepcopy(smoke["corpus"])
    if smoke:
        d["model"] = dict(smoke["egnn_model"] if d["model"]["name"] == "egnn" else smoke["model"])
        d["optim"] = {**d.get("optim", {}), **smoke["pretrain_optim"]}
    else:
        d["model"] = resized_model(d["model"], args)
        d["optim"]["lr"] = args.pretrain_lr or d["optim"].get("lr")
        d["optim"]["warmup_steps"] = min(d["optim"].get("warmup_steps", 1000), max(args.pretrain_steps // 10, 1))
        d["optim"]["threads"] = args.threads
        if args.compile and method in COMPILED_PRETRAINING:      # the same steps, faster (a speed setting)
            d["optim"]["compile"] = True
        # equal compute: every method gets the same batch size and the same number of steps (or minutes)
        o = dict(d.get("optim", {}))
        o["batch_size"] = args.pretrain_batch_size
        if args.budget == "steps":
            o["max_steps"] = args.pretrain_steps
        else:
            o.pop("max_steps", None)
            o["epochs"] = 10 ** 6
            o["max_minutes"] = args.pretrain_minutes
        d["optim"] = o
    return d


def resized_model(model: Dict[str, Any], args) -> Dict[str, Any]:
    """The paper-size model of a method config, resized by --hidden/--layers/--heads (a CPU-sized benchmark)."""
    m = dict(model)
    for key, value in (("hidden", args.hidden), ("num_layers", args.layers), ("num_heads", args.heads)):
        if value is not None and (key != "num_heads" or m.get("name") == "et"):
            m[key] = value
    return m


def pretrain_stamp(method: str, args, smoke) -> str:
    """What a method's pretraining here is made of (corpus, model, optimiser; not the threads or the compiled
    path, speed settings)."""
    d = pretrain_config(method, args, smoke)
    return settings_hash({**d, "optim": {k: v for k, v in d["optim"].items() if k not in ("threads", "compile")}})


def run_pretrain(method: str, args, smoke, log) -> Path:
    out = Path(args.out) / "pretrain" / method
    # a folder pretrained with other steps, batch, corpus or model is not this run's
    claim_cell_folder(out, args, log, stamp=pretrain_stamp(method, args, smoke))
    cfg = pretrain_config_from_dict(pretrain_config(method, args, smoke))
    last = out / "last.pt"
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        finished = ck["step"] >= ck["total_steps"] or (args.budget == "minutes" and not smoke
                                                        and ck["elapsed"] >= 60 * args.pretrain_minutes)
        if finished:
            log(f"[pretrain {method}] done ({ck['step']} steps)")
            return out / "pretrained.pt"
        log(f"[pretrain {method}] resuming at step {ck['step']}")
        Pretrainer(cfg, out, progress=not args.no_progress, log=log, data_dir=args.data_dir).fit(resume=True)
    else:
        log(f"[pretrain {method}] starting")
        Pretrainer(cfg, out, progress=not args.no_progress, log=log, data_dir=args.data_dir).fit(resume=has_run(out))
    return out / "pretrained.pt"


def backbone_name(method: str) -> str:
    """The backbone a method fine-tunes (``et`` or ``egnn``)."""
    if method in SCRATCH:
        return SCRATCH[method]
    return yaml.safe_load((CONFIGS / METHOD_CONFIGS[method]).read_text())["model"]["name"]


def finetune_config(molecule: str, size: int, args, smoke, model: Dict, seed: int = 1,
                    method: Optional[str] = None) -> Dict[str, Any]:
    optim = {**FINETUNE_OPTIM, "seed": seed}
    # the compiled step (ET only) computes what the eager one does, faster: a speed setting, not in the grid's settings
    if args.compile and method is not None and backbone_name(method) == "et":
        optim["compile"] = True
    data = {"molecule": molecule, "train_size": size, "val_size": 50, "split_index": 1}
    if smoke:
        optim.update(smoke["finetune_optim"])
        data.update(val_size=smoke["val_size"], test_size=smoke["test_size"])
    if args.finetune_minutes:
        optim["max_minutes"] = args.finetune_minutes
    if args.finetune_cpu_minutes:
        optim["max_cpu_minutes"] = args.finetune_cpu_minutes
    if args.finetune_epochs:
        optim["epochs"] = args.finetune_epochs
    if args.finetune_steps:          # equal optimiser steps on any device: whole epochs of ceil(size / batch) steps
        per_epoch = -(-size // int(optim["batch_size"]))
        optim["epochs"] = max(1, -(-args.finetune_steps // per_epoch))
        optim["early_stop_patience"] = optim["epochs"] + 1
        optim["val_every"] = max(1, round(STEP_SCHEDULE["val_every_steps"] / per_epoch))
        optim["lr_patience"] = max(1, round(STEP_SCHEDULE["lr_patience_steps"] / (optim["val_every"] * per_epoch)))
        optim["lr_min"] = STEP_SCHEDULE["lr_min"]
    optim["device"] = args.device
    if args.data_dir:
        data["data_dir"] = args.data_dir
    if args.threads:
        optim["threads"] = args.threads
    m = {k: v for k, v in model.items() if k in ("name", "hidden", "num_layers", "num_heads", "num_rbf", "cutoff")}
    return {"data": data, "model": m, "optim": optim}


def seeded(name: str, seed: int) -> str:
    """A run's folder name: ``name`` for seed 1 (grids from before seeds keep theirs), ``name-s<seed>`` after it."""
    return name + (f"-s{seed}" if seed != 1 else "")


def cell_dir(molecule: str, size: int, method: str, seed: int = 1) -> str:
    """``<mol>/<n>/<method>`` (seed 1) or ``<mol>/<n>/<method>-s<seed>``, below ``finetune/`` and ``md/``."""
    return seeded(f"{molecule}/{size}/{method}", seed)


def run_finetune(molecule: str, size: int, method: str, pretrained: Optional[Path], args, smoke, log,
                 seed: int = 1) -> Dict:
    out = Path(args.out) / "finetune" / cell_dir(molecule, size, method, seed)
    claim_cell_folder(out, args, log, along=[Path(args.out) / "md" / cell_dir(molecule, size, method, seed)])
    if _done(out):
        return json.loads((out / "test_metrics.json").read_text())
    log(f"[finetune {molecule} n={size} {method} seed {seed}] " +
        ("resuming" if (out / "last.pt").is_file() else "starting"))
    resume = has_run(out)
    if method in SCRATCH:
        model = (smoke["egnn_model"] if SCRATCH[method] == "egnn" else smoke["model"]) if smoke else \
            resized_model(yaml.safe_load((CONFIGS / (METHOD_CONFIGS["3d-emgp-egnn"] if SCRATCH[method] == "egnn"
                                                     else METHOD_CONFIGS["et-oreo"])).read_text())["model"], args)
        d = finetune_config(molecule, size, args, smoke, model, seed, method)
        if SCRATCH[method] == "egnn":
            # ModelConfig knows ET hyper-parameters only: build the EGNN potential here, train with the same Trainer
            from forcefield.train.datasets import build_splits
            from forcefield.train.statistics import fitted_potential
            cfg = config_from_dict({k: v for k, v in d.items() if k != "model"})
            splits = build_splits(cfg.data, cfg.optim.seed)
            torch.manual_seed(cfg.optim.seed)
            pot = fitted_potential(model, splits.train, splits.val)
            return Trainer(cfg, out, splits=splits, init_model=pot, progress=not args.no_progress,
                           log=log).fit(resume=resume, pause_minutes=args.cell_deadline_minutes)
        d["model"].setdefault("num_heads", 8)
        return Trainer(config_from_dict(d), out, progress=not args.no_progress,
                       log=log).fit(resume=resume, pause_minutes=args.cell_deadline_minutes)
    d = finetune_config(molecule, size, args, smoke, {}, seed, method)
    d.pop("model")
    return finetune_forcefield(pretrained, config_from_dict(d), out, FinetuneOptions(layer_decay=args.layer_decay),
                               resume=resume, progress=not args.no_progress, log=log,
                               pause_minutes=args.cell_deadline_minutes)


def validation_curve(out: Path, y: str = "val_mae_meV", max_points: int = 60) -> List[List[float]]:
    """[[CPU-minutes, validation value], ...] of a run's ``metrics.csv``, thinned to at most ``max_points`` (the last
    point kept): small enough to keep in a grid's state file."""
    import csv
    with open(out / "metrics.csv", newline="") as fh:
        pts = [[round(60.0 * float(r["cpu_hours"]), 2), float(r[y])] for r in csv.DictReader(fh)
               if r.get("cpu_hours") not in (None, "") and r.get(y) not in (None, "")]
    step = max(1, -(-len(pts) // max_points))
    return pts[::step] + ([pts[-1]] if pts and (len(pts) - 1) % step else [])


def qm9_dir(prop: str, method: str, seed: int = 1) -> str:
    """``<property>/<method>`` (seed 1) or ``<property>/<method>-s<seed>``, below ``qm9/``."""
    return seeded(f"{prop}/{method}", seed)


def qm9_out(args, prop: str, method: str, seed: int = 1) -> Path:
    """A QM9 run's folder: ``OUT/qm9/`` and its :func:`qm9_dir`."""
    return Path(args.out) / "qm9" / qm9_dir(prop, method, seed)


def run_property(prop: str, method: str, pretrained: Optional[Path], args, smoke, log, seed: int = 1) -> Dict:
    out = qm9_out(args, prop, method, seed)
    claim_cell_folder(out, args, log)
    if _done(out):
        return {**json.loads((out / "test_metrics.json").read_text()), "curve": validation_curve(out)}
    state_file = qm9_run_state(args, prop, method, seed)
    resume = (out / "last.pt").is_file() or (state_file is not None and state_file.is_file())
    log(f"[qm9 {prop} {method}" + (f" seed {seed}" if seed != 1 else "") + "] "
        + ("resuming" if resume else "starting"))
    # the seed: the head's (and a scratch backbone's) initialisation and the batch order; the split is fixed
    pc: Dict[str, Any] = {"property": prop, "layer_decay": args.layer_decay, "lr_schedule": args.qm9_schedule,
                          "seed": seed}
    if smoke:
        pc.update(smoke["property"])
    elif getattr(args, "qm9_steps", None):
        # equal optimiser steps: whole epochs of --qm9-epoch-steps, all of them taken (no early stop)
        epochs = -(-args.qm9_steps // args.qm9_epoch_steps)
        pc.update(epochs=epochs, epoch_steps=args.qm9_epoch_steps, early_stop_patience=epochs + 1,
                  data_dir=args.data_dir, threads=args.threads)
    else:
        pc.update(epochs=args.qm9_epochs, max_minutes=args.qm9_minutes or args.finetune_minutes,
                  max_cpu_minutes=args.qm9_cpu_minutes or args.finetune_cpu_minutes,
                  data_dir=args.data_dir, threads=args.threads)
        if resume:         # the budgets are the run's, not each invocation's: what a killed invocation used counts
            used = budget_used_minutes(out)
            for key in ("max_minutes", "max_cpu_minutes"):
                if pc.get(key):
                    pc[key] = max(pc[key] - used[key], 1e-3)
    if getattr(args, "compile", False) and backbone_name(method) == "et":
        pc["compile"] = True                            # the same steps, faster: a speed setting, as in fine-tuning
    if not smoke and args.qm9_train_size:
        pc["train_size"] = args.qm9_train_size
    if method in SCRATCH:
        model = (smoke["egnn_model"] if SCRATCH[method] == "egnn" else smoke["model"]) if smoke else \
            resized_model(yaml.safe_load((CONFIGS / (METHOD_CONFIGS["3d-emgp-egnn"] if SCRATCH[method] == "egnn"
                                                     else METHOD_CONFIGS["et-oreo"])).read_text())["model"], args)
        pc["model"] = model
        pretrained = None
    # this invocation's time left is a deadline, not a budget: the run pauses there untested, for a later invocation
    metrics = finetune_property(pretrained, PropertyConfig.from_dict(pc), out, resume=has_run(out, state_file),
                                progress=not args.no_progress, log=log, state_file=state_file,
                                pause_minutes=None if smoke else args.cell_deadline_minutes)
    if metrics.get("paused"):
        raise CutShort(f"{metrics['stop_reason'].split(' (')[0]}, before its budget")
    return {**metrics, "curve": validation_curve(out)}


def run_states_folder(state: Path) -> Path:
    """Where a grid (its ``--state`` JSON) keeps the compact run states of its unfinished runs: ``<state>.runs/``."""
    return state.with_name(state.stem + ".runs")


def qm9_run_state(args, prop: str, method: str, seed: int = 1) -> Optional[Path]:
    """With ``--state`` and ``--qm9-steps``: the compact run state of an unfinished QM9 run, beside the grid's JSON
    (``<state>.runs/qm9-<property>-<method>.pt``, ``...-<method>-s<seed>.pt`` after the first seed; committed with
    it), so that the run goes on in a later piece on a fresh clone; removed once the run is recorded."""
    if not getattr(args, "state", None) or not getattr(args, "qm9_steps", None):
        return None
    return run_states_folder(Path(args.state)) / f"qm9-{qm9_dir(prop, method, seed).replace('/', '-')}.pt"


def steps_in(path: Path) -> int:
    """Optimiser steps of the run a checkpoint (``last.pt``) or compact run state holds."""
    return int(torch.load(path, map_location="cpu", weights_only=False).get("step", 0))


def qm9_steps_done(out: Path, state_file: Optional[Path]) -> int:
    """Optimiser steps a QM9 run has taken: its ``last.pt`` here or its committed run state, the further along."""
    return max([0] + [steps_in(path) for path in (out / "last.pt", state_file) if path is not None and path.is_file()])


def budget_used_minutes(out: Path) -> Dict[str, float]:
    """Wall and CPU minutes a resumable QM9 run in ``out`` has already used, keyed by the budget they count
    against (``max_minutes``, ``max_cpu_minutes``; 0 when it has not started)."""
    last = out / "last.pt"
    ck = torch.load(last, map_location="cpu", weights_only=False) if last.is_file() else {}
    return {"max_minutes": float(ck.get("elapsed", 0.0)) / 60.0,
            "max_cpu_minutes": float(ck.get("cpu_seconds", 0.0)) / 60.0}


def run_md(molecule: str, size: int, method: str, args, log, seed: int = 1) -> Dict:
    """MDsim-protocol stability of one fine-tuned model (benchmarks/md17_simulation.py, same settings). With
    ``--compile`` on a CPU it runs through the model's AOTInductor export (the same function, 1.66x the eager steps
    on naphthalene: benchmarks/md_paths.py; built once per model, under a minute here), and on the eager model when
    that build fails."""
    import argparse as _argparse
    from md.errors import MDInputError
    from md17_simulation import run_one
    model = Path(args.out) / "finetune" / cell_dir(molecule, size, method, seed) / "best.pt"
    md_args = _argparse.Namespace(out=str(Path(args.out) / "md" / cell_dir(molecule, size, method, seed)),
                                  ps=args.md_ps,
                                  replicas=args.md_replicas, temperature=500.0, timestep=0.5, seed=123,
                                  data_dir=args.data_dir, device=args.device, force_frames=0, log_every=100,
                                  progress=False, max_minutes=args.md_deadline_minutes,
                                  compile=bool(getattr(args, "compile", False)) and args.device == "cpu")
    log(f"[md {molecule} n={size} {method}] {args.md_replicas} x {args.md_ps:g} ps"
        + (" (compiled)" if md_args.compile else ""))
    try:
        s = run_one(molecule, str(model), md_args)
    except MDInputError as err:
        if not md_args.compile:
            raise
        log(f"[md {molecule} n={size} {method}] {err}: on the eager model")
        md_args.compile = False
        s = run_one(molecule, str(model), md_args)
    if s is None:
        raise CutShort(f"its MD paused at this invocation's end (--max-minutes) before {args.md_ps:g} ps")
    return {"stability_ps": (s.get("stability_ps") or {}).get("mean"), "hr_mae": (s.get("hr_mae") or {}).get("mean"),
            "md_steps_per_s": (s.get("speed") or {}).get("steps_per_s")}


# ---------------------------------------------------------------------------- report
def merged_results(path: Path, results: List[Dict], qm9: List[Dict]):
    """This invocation's rows plus those of an earlier ``results.json`` for cells this one did not run."""
    if not path.is_file():
        raise FileNotFoundError(f"--merge: no results file {path}")
    old = json.loads(path.read_text())
    have = {run_key("forcefield", r) for r in results}
    have_q = {run_key("qm9", r) for r in qm9}
    results = [r for r in old.get("forcefield", []) if run_key("forcefield", r) not in have] + results
    qm9 = [r for r in old.get("qm9", []) if run_key("qm9", r) not in have_q] + qm9
    return results, qm9


def mean_std(values: List[float], bold: bool = False) -> str:
    """``12.3`` for one value, ``12.3 ± 0.4 (3)`` for several; bold marks the best of a row."""
    m = float(np.mean(values))
    text = f"{m:.1f}" if len(values) == 1 else f"{m:.1f} ± {float(np.std(values, ddof=1)):.1f} ({len(values)})"
    return f"**{text}**" if bold else text


def finite_mean(values: List[Optional[float]], fmt: str) -> str:
    """The mean of the finite values, formatted, or "–" when there is none (an MD replica unstable before its
    first logged frame has no h(r))."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return format(float(np.mean(vals)), fmt) if vals else "–"


#: the issue's goal for a pretrained backbone: its test error at most this share of scratch's, by training frames
GOAL_RATIO = {50: 0.5, 950: 0.75}


def ratio_pairs(methods: List[str]) -> List[tuple]:
    """The (numerator, denominator) methods the reports compare: each pretrained method against scratch, and
    ET-OREO against ET-ORO."""
    pairs = [(m, "scratch") for m in methods if m not in SCRATCH and "scratch" in methods]
    if "et-oreo" in methods and "et-oro" in methods:
        pairs.append(("et-oreo", "et-oro"))
    return pairs


def paired_ratio(mae: Dict[tuple, float], num: tuple, den: tuple) -> Optional[tuple]:
    """Two runs' errors over the seeds both have (``mae`` keyed by a run's key, its seed last; ``num`` and ``den``
    those keys without the seed): (the ratio of their means, the seeds ``num`` won, the seeds), None without one."""
    seeds = sorted(k[-1] for k in mae if k[:-1] == num and den + (k[-1],) in mae)
    if not seeds:
        return None
    a = np.array([mae[num + (s,)] for s in seeds])
    b = np.array([mae[den + (s,)] for s in seeds])
    return float(a.mean() / b.mean()), int((a < b).sum()), len(seeds)


def ratio_cell(r: tuple) -> str:
    """A :func:`paired_ratio` as a table cell: ``0.93``, with ``(won/seeds)`` where there are several seeds."""
    return f"{r[0]:.2f}" + (f" ({r[1]}/{r[2]})" if r[2] > 1 else "")


def ratio_lines(results: List[Dict], methods: List[str]) -> List[str]:
    """Tables of test force MAE ratios, seed-paired (a seed is the same training frames in every method): each
    pretrained method against scratch, and ET-OREO against ET-ORO; a cell is the ratio of the means over the seeds
    both have, with how many seeds the method won; the last column the geometric mean over molecules."""
    by: Dict[tuple, float] = {run_key("forcefield", r): r["forces_mae_meV_per_A"]
                              for r in results if not r.get("failed")}
    pairs = ratio_pairs(methods)
    mols = sorted({k[0] for k in by})
    lines: List[str] = []
    for num, den in pairs:
        rows = []
        for size in sorted({k[1] for k in by}):
            cells, logs = [], []
            for mol in mols:
                r = paired_ratio(by, (mol, size, num), (mol, size, den))
                if r is None:
                    cells.append("–")
                    continue
                logs.append(math.log(r[0]))
                cells.append(ratio_cell(r))
            if logs:
                goal = f" (goal ≤ {GOAL_RATIO[size]:g})" if den == "scratch" and size in GOAL_RATIO else ""
                rows.append(f"| {size} | " + " | ".join(cells) + f" | {math.exp(np.mean(logs)):.2f}{goal} |")
        if rows:
            lines += ["", f"## {num} / {den}: test force MAE ratio (below 1: {num} better)", "",
                      "| train frames | " + " | ".join(mols) + " | geometric mean |",
                      "|---:|" + "---:|" * (len(mols) + 1), *rows, "",
                      f"the ratio of the means over the seeds both ran (the same training frames); in brackets, the "
                      f"seeds {num} won"]
    return lines


def qm9_ratio_lines(qm9: List[Dict], methods: List[str]) -> List[str]:
    """A table of QM9 test MAE ratios, seed-paired: each pretrained method over scratch, and ET-OREO over ET-ORO, per
    property (the ratio of the means over the seeds both ran, with how many seeds the first method won where there
    are several), with the geometric mean over the properties both have; nothing before a pair has a property."""
    mae = {run_key("qm9", r): float(r["test_mae"]) for r in qm9 if not r.get("failed")}
    props = list(dict.fromkeys(k[0] for k in mae))

    def ratio(prop: str, num: str, den: str) -> Optional[tuple]:
        return paired_ratio(mae, (prop, num), (prop, den))

    cols = [(num, den) for num, den in ratio_pairs(methods) if any(ratio(p, num, den) for p in props)]
    if not cols:
        return []
    several = any(len({k[2] for k in mae if k[0] == p}) > 1 for p in props)
    lines = ["", "Test MAE ratios (below 1: the first method is better; " +
             ("the ratio of the means over the seeds both ran, in brackets the seeds the first won):" if several
              else "one run each):"), "",
             "| property | " + " | ".join(f"{n} / {d}" for n, d in cols) + " |", "|---|" + "---:|" * len(cols)]
    for prop in props:
        cells = []
        for n, d in cols:
            r = ratio(prop, n, d)
            cells.append("–" if r is None else ratio_cell(r))
        lines.append(f"| {prop} | " + " | ".join(cells) + " |")
    if len(props) > 1:
        geo = []
        for n, d in cols:
            logs = [math.log(r[0]) for r in (ratio(p, n, d) for p in props) if r]
            geo.append(f"{math.exp(float(np.mean(logs))):.2f} ({len(logs)})")
        lines.append("| geometric mean (properties) | " + " | ".join(geo) + " |")
    return lines


QM9_SETTLING_VALIDATIONS = 5     # a QM9 run's noise is read from its last so many validations


def curve_scatter(values: Sequence[float]) -> float:
    """The scatter of a learning curve's points about the straight line fitted through them (RMS residual, n - 2
    degrees of freedom): the noise of a curve that wobbles at a constant rate, and little for one that still falls
    smoothly (as at the end of a decaying schedule), where the spread of the points would count the fall too."""
    y = np.asarray(values, dtype=float)
    x = np.arange(len(y), dtype=float)
    residual = y - np.polyval(np.polyfit(x, y, 1), x)
    return float(np.sqrt((residual ** 2).sum() / (len(y) - 2)))


def qm9_settling_lines(qm9: List[Dict], methods: List[str], last: int = QM9_SETTLING_VALIDATIONS) -> List[str]:
    """Whether the QM9 runs can rank the methods: each run's validation MAE at its end and the scatter of its last
    ``last`` validations about their trend (:func:`curve_scatter`), the noise a difference between methods has to
    beat (a run at a high learning rate wobbles by more than the methods differ; one at the end of a decaying
    schedule has settled)."""
    cells: Dict[tuple, Dict[str, str]] = {}
    for r in qm9:
        curve = [y for _, y in r.get("curve") or []]
        if r.get("failed") or len(curve) < last:
            continue
        prop, method, seed = run_key("qm9", r)
        cells.setdefault((prop, seed), {})[method] = f"{curve[-1]:.1f} ± {curve_scatter(curve[-last:]):.1f}"
    if not cells:
        return []
    props = list(dict.fromkeys(prop for prop, _ in cells))
    rows = []
    for prop, seed in sorted(cells, key=lambda k: (props.index(k[0]), k[1])):      # a property's seeds together
        label = prop + (f" (seed {seed})" if seed != 1 else "")
        rows.append(f"| {label} | " + " | ".join(cells[prop, seed].get(m, "–") for m in methods) + " |")
    return ["", f"Validation MAE at the end of each run ± the scatter of its last {last} validations about their "
            f"trend (meV; RMS about a fitted line): a difference between methods within that scatter does not rank "
            f"them:", "", "| property | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)] + rows


def write_report(out: Path, results: List[Dict], qm9: List[Dict], methods: List[str],
                 notes: Optional[List[str]] = None) -> None:
    (out / "results.json").write_text(json.dumps({"forcefield": results, "qm9": qm9}, indent=2, default=str))
    lines = ["# Pretraining benchmark"]
    if results:                 # a QM9-only grid has no force table
        lines += ["", "## Force MAE on the rMD17 test frames (meV/Å)", "",
                  "| molecule | train frames | " + " | ".join(methods) + " |",
                  "|---|---:|" + "---:|" * len(methods)]
    if not results and not qm9:
        lines += ["", "No run recorded yet."]
    failed = [r for r in results if r.get("failed")]
    results = [r for r in results if not r.get("failed")]
    table: Dict[tuple, Dict[str, List[float]]] = {}
    for r in results:
        table.setdefault((r["molecule"], r["size"]), {}).setdefault(r["method"], []).append(r["forces_mae_meV_per_A"])
    for (mol, size), row in sorted(table.items()):
        best = min(float(np.mean(v)) for v in row.values())
        cells = [mean_std(row[m], bold=float(np.mean(row[m])) == best) if m in row else "–" for m in methods]
        lines.append(f"| {mol} | {size} | " + " | ".join(cells) + " |")
    if any(len(v) > 1 for row in table.values() for v in row.values()):
        lines += ["", "mean ± standard deviation over seeds (number of seeds in brackets) where a cell has several"]
    lines += ratio_lines(results, methods)
    md_rows = [r for r in results if r.get("stability_ps") is not None]
    if md_rows:
        lines += ["", "## MD stability of the fine-tuned models (Nosé–Hoover 500 K; ps stable, mean over replicas; "
                      "h(r) MAE)", "", "| molecule | train frames | " + " | ".join(methods) + " |",
                  "|---|---:|" + "---:|" * len(methods)]
        runs: Dict[tuple, List[Dict]] = {}
        for r in md_rows:   # several seeds: their mean
            runs.setdefault((r["molecule"], r["size"], r["method"]), []).append(r)
        mt: Dict[tuple, Dict[str, str]] = {}
        for (mol, size, method), rs in runs.items():
            mt.setdefault((mol, size), {})[method] = (f"{finite_mean([x['stability_ps'] for x in rs], '.1f')} / "
                                                     f"{finite_mean([x.get('hr_mae') for x in rs], '.3f')}"
                                                     + (f" ({len(rs)})" if len(rs) > 1 else ""))
        for (mol, size), row in sorted(mt.items()):
            lines.append(f"| {mol} | {size} | " + " | ".join(row.get(m, "–") for m in methods) + " |")
        lines += ["", "stable ps / h(r) MAE: the mean over seeds (their number in brackets); – where no replica "
                      "had a stable logged frame"]
    if failed:
        lines += ["", "Cells that failed (recorded, not run again): " + "; ".join(
            f"{r['molecule']} n={r['size']} {r['method']} seed {r.get('seed', 1)}: {r['failed']}" for r in failed)]
    failed_q = [r for r in qm9 if r.get("failed")]
    qm9 = [r for r in qm9 if not r.get("failed")]
    if failed_q:
        lines += ["", "QM9 runs that failed (recorded, not run again): " + "; ".join(
            f"{r['property']} {r['method']}" + (f" seed {r['seed']}" if r.get("seed", 1) != 1 else "")
            + f": {r['failed']}" for r in failed_q)]
    if qm9:
        lines += ["", "## QM9 test MAE (meV)", "", "| property | " + " | ".join(methods) + " |",
                  "|---|" + "---:|" * len(methods)]
        qt: Dict[str, Dict[str, List[float]]] = {}
        for r in qm9:
            qt.setdefault(r["property"], {}).setdefault(r["method"], []).append(float(r["test_mae"]))
        for prop, row in qt.items():
            best = min(float(np.mean(v)) for v in row.values())
            bold = len(row) > 1 and any(len(v) > 1 for v in row.values())     # a ranking worth marking
            lines.append(f"| {prop} | " + " | ".join(
                mean_std(row[m], bold=bold and float(np.mean(row[m])) == best) if m in row else "–"
                for m in methods) + " |")
        if any(len(v) > 1 for row in qt.values() for v in row.values()):
            lines += ["", "mean ± standard deviation over seeds (their number in brackets) where a run has several; "
                          "a seed is the initialisation and batch order, on the same split"]
        lines += qm9_ratio_lines(qm9, methods) + qm9_settling_lines(qm9, methods)
    lines += [""] + [f"- {n}" for n in notes or []]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_qm9_curves(out, qm9, methods)
    if not results:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mols = sorted({r["molecule"] for r in results})
    fig, axes = plt.subplots(1, len(mols), figsize=(4.2 * len(mols), 3.8), squeeze=False)
    for ax, mol in zip(axes[0], mols):
        # log axes set before anything is drawn (autoscaling a lone size on a linear axis first left it empty); the
        # methods drawn side by side around each size (a small factor apart) so that their error bars do not hide
        # one another
        ax.set_xscale("log")
        ax.set_yscale("log")
        for k, m in enumerate(methods):
            by_size: Dict[int, List[float]] = {}
            for r in results:
                if r["molecule"] == mol and r["method"] == m:
                    by_size.setdefault(r["size"], []).append(r["forces_mae_meV_per_A"])
            if by_size:
                xs = sorted(by_size)
                mean = np.array([np.mean(by_size[x]) for x in xs])
                std = np.array([np.std(by_size[x], ddof=1) if len(by_size[x]) > 1 else 0.0 for x in xs])
                dodge = 1.0 + 0.05 * (k - (len(methods) - 1) / 2)
                ax.errorbar(np.array(xs, dtype=float) * dodge, mean, yerr=[np.minimum(std, 0.9 * mean), std],
                            fmt="o-", capsize=3, label=m)
        sizes = sorted({r["size"] for r in results if r["molecule"] == mol})
        ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
        ax.set_xticks(sizes)
        ax.set_xticks([], minor=True)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.set_title(mol)
        ax.set_xlabel("training frames")
        ax.set_ylabel("test force MAE (meV/Å)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)


def plot_qm9_curves(out: Path, qm9: List[Dict], methods: List[str]) -> None:
    """``qm9_curves.png``: validation MAE against CPU-minutes per property, a line per method (equal budgets are
    long enough to rank the methods when the lines have stopped crossing)."""
    props = list(dict.fromkeys(r["property"] for r in qm9 if r.get("curve")))
    if not props:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(props), figsize=(4.2 * len(props), 3.6), squeeze=False)
    for ax, prop in zip(axes[0], props):
        for k, m in enumerate(methods):
            for r in qm9:
                if r["property"] == prop and r["method"] == m and r.get("curve"):
                    x, y = zip(*r["curve"])
                    seed = r.get("seed", 1)          # one colour per method, a dash per later seed
                    ax.plot(x, y, color=f"C{k}", linestyle="-" if seed == 1 else (0, (1 + seed, 2)),
                            label=m if seed == 1 else f"{m} (seed {seed})")
        ax.set_yscale("log")
        ax.set_title(f"QM9 {prop}")
        ax.set_xlabel("CPU-minutes")
        ax.set_ylabel("validation MAE (meV)")
        ax.grid(alpha=0.3, which="both")
        if ax is axes[0][0] or any(r["property"] == prop and r.get("seed", 1) != 1 for r in qm9):
            ax.legend(fontsize=8)                    # the first panel's, and each with a later seed's lines
    fig.tight_layout()
    fig.savefig(out / "qm9_curves.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- a grid across invocations
def parse_backbones(specs: List[str], methods: List[str], parser) -> Dict[str, Path]:
    out = {}
    for spec in specs:
        method, _, path = spec.partition("=")
        if not path or method not in METHOD_CONFIGS:
            parser.error(f"--backbone takes METHOD=FILE with METHOD from {list(METHOD_CONFIGS)}, got '{spec}'")
        if method not in methods:
            parser.error(f"--backbone {method}: the method is not in --methods")
        if not Path(path).is_file():
            parser.error(f"--backbone {method}: no file {path}")
        out[method] = Path(path)
    return out


def parse_seeds(specs: List[str], parser) -> Dict[int, int]:
    out = {}
    for spec in specs:
        size, _, n = spec.partition(":")
        if not (size.isdigit() and n.isdigit() and int(n) >= 1):
            parser.error(f"--seeds takes SIZE:N (e.g. 50:3), got '{spec}'")
        out[int(size)] = int(n)
    return out


def parse_qm9_seeds(specs: List[str], properties: Sequence[str], parser) -> Dict[str, int]:
    out = {}
    for spec in specs:
        prop, _, n = spec.partition(":")
        if not (n.isdigit() and int(n) >= 1):
            parser.error(f"--qm9-seeds takes PROPERTY:N (e.g. homo:2), got '{spec}'")
        if prop not in properties:
            parser.error(f"--qm9-seeds {spec}: '{prop}' is not one of --properties "
                         f"({', '.join(properties) or 'none'})")
        out[prop] = int(n)
    return out


def qm9_runs(properties: Sequence[str], methods: Sequence[str], seeds: Dict[str, int]) -> List[Dict[str, Any]]:
    """The QM9 runs of a grid, in the order they are run: property by property, within one seed by seed (every
    method of a seed before the next seed)."""
    return [{"property": prop, "method": m, "seed": seed}
            for prop in properties for seed in range(1, seeds.get(prop, 1) + 1) for m in methods]


def planned_runs(args, parser) -> Dict[str, List[Dict[str, Any]]]:
    """Every run of a grid (its arguments, the smoke ones applied), by table, as the keys of its rows, in the
    order they are run."""
    return {"forcefield": finetune_runs(args.molecules, args.sizes, args.methods, parse_seeds(args.seeds, parser),
                                        args.order),
            "qm9": qm9_runs(args.properties, args.methods, parse_qm9_seeds(args.qm9_seeds, args.properties, parser))}


def grid_runs_of(argv: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    """The runs a grid with these arguments (a campaign job's) holds once complete: a grid whose runs grew (another
    seed) is incomplete again, whatever its state says."""
    parser = build_parser()
    args = parser.parse_args([str(a) for a in argv])
    if args.smoke:
        apply_smoke(args)
    return planned_runs(args, parser)


def all_recorded(data: Dict[str, Any], runs: Dict[str, List[Dict[str, Any]]]) -> bool:
    """Whether a grid's state (``data``: its rows by table) holds every run of ``runs``."""
    have = {table: {run_key(table, r) for r in data.get(table) or []} for table in RUN_KEYS}
    return all(run_key(table, k) in have[table] for table, keys in runs.items() for k in keys)


def grid_settings(args, backbones: Dict[str, Path]) -> Dict[str, Any]:
    """What makes two invocations' cells comparable: the same backbones, model size and fine-tuning budget."""
    from forcefield.data.registry import sha256sum
    return {"backbones": {m: sha256sum(f) for m, f in sorted(backbones.items())},
            "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads},
            "finetune": {"cpu_minutes": args.finetune_cpu_minutes, "minutes": args.finetune_minutes,
                         "epochs": args.finetune_epochs, "layer_decay": args.layer_decay, "optim": FINETUNE_OPTIM,
                         **({"steps": args.finetune_steps, "step_schedule": STEP_SCHEDULE}
                            if args.finetune_steps else {})},
            "qm9": {"train_size": args.qm9_train_size,
                    **({"steps": args.qm9_steps, "epoch_steps": args.qm9_epoch_steps} if args.qm9_steps else
                       {"epochs": args.qm9_epochs, "cpu_minutes": args.qm9_cpu_minutes}),
                    # recorded only when not the default, so that grids from before the option keep their settings
                    **({"schedule": args.qm9_schedule} if args.qm9_schedule != "plateau" else {})},
            "md": {"ps": args.md_ps, "replicas": args.md_replicas}}


class CutShort(Exception):
    """A run this invocation had to end before its budget (the --max-minutes deadline): not a finished cell."""


def finetune_runs(molecules: Sequence[str], sizes: Sequence[int], methods: Sequence[str], seeds: Dict[int, int],
                  order: str = "molecules") -> List[Dict[str, Any]]:
    """The fine-tuning runs of a grid, in the order they are run. ``molecules``: molecule by molecule (each size, method
    and seed of one before the next). ``seeds``: seed by seed, and within a seed size by size in the order given,
    every molecule and method, so that each molecule's cells have a first seed (and the sizes listed first have all
    their molecules) before any cell gets another one: a grid that takes many pieces answers across molecules early.
    The runs are the same either way; only when each runs changes."""
    n_seeds = {size: seeds.get(size, 1) for size in sizes}
    if order == "molecules":
        return [{"molecule": mol, "size": size, "method": m, "seed": seed}
                for mol in molecules for size in sizes for m in methods for seed in range(1, n_seeds[size] + 1)]
    if order == "seeds":
        return [{"molecule": mol, "size": size, "method": m, "seed": seed}
                for seed in range(1, max(n_seeds.values(), default=0) + 1)
                for size in sizes if seed <= n_seeds[size] for mol in molecules for m in methods]
    raise ValueError(f"unknown run order {order!r}: 'molecules' or 'seeds'")


def parse_shard(spec: Optional[str], parser) -> Optional[tuple]:
    if not spec:
        return None
    try:
        i, k = (int(x) for x in spec.split("/"))
    except ValueError:
        parser.error(f"--shard takes I/K (e.g. 0/8), got {spec!r}")
    if not 0 <= i < k:
        parser.error(f"--shard {spec}: I must be in 0..K-1")
    return i, k


def merge_grid_states(into: Dict[str, Any], shards: List[Dict[str, Any]], base_cpu_hours: float) -> Dict[str, Any]:
    """``into`` with the cells of ``shards``, grid states that each began with ``base_cpu_hours`` (copies of one
    state, run side by side with --shard): every finished cell once, and the CPU-hours each shard added. Never
    complete (the next invocation over every cell says)."""
    out = json.loads(json.dumps(into))
    for sh in shards:
        if sh.get("settings") != out.get("settings"):
            raise ValueError("a shard ran with other settings (backbones, budgets) than the grid it is merged into")
        for table in RUN_KEYS:
            have = {run_key(table, r) for r in out[table]}
            out[table] += [r for r in sh[table] if run_key(table, r) not in have]
        out["cpu_hours"] = float(out.get("cpu_hours") or 0.0) + float(sh.get("cpu_hours") or 0.0) - base_cpu_hours
    out["complete"] = False
    return out


def process_tag(pid: int) -> Optional[str]:
    """``"<pid> <start time>"`` of a live process (its start time tells a reused pid apart), None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else f"{pid} {fields[19]}"       # a zombie has ended
    except OSError:
        pass
    try:                                                 # no /proc (not Linux): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return str(pid)


class GridState:
    """The finished cells of a grid in one small JSON (committed), rewritten atomically after each cell.

    Several processes may advance one grid side by side (a campaign grid job's ``workers``: one per core that is
    free), given the same ``--state`` and ``--out``: each re-reads the file under a lock (``<out>/workers/grid.lock``)
    before it records a cell, and claims a run before it starts it (``<out>/workers/<run>.claim``, holding its pid
    and start time), so that no run is done twice and no recorded cell is lost. A claim whose process has ended is
    stale and taken over."""

    def __init__(self, path: Path, settings: Dict[str, Any], workers: Optional[Path] = None):
        self.path = path
        self.settings = json.loads(json.dumps(settings))
        self.workers = workers
        self.data = {"settings": settings, "forcefield": [], "qm9": [], "complete": False, "cpu_hours": 0.0}
        with self._locked():
            self._refresh()

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock on the grid among the processes that share ``workers`` (none without it)."""
        if self.workers is None:
            yield
            return
        import fcntl
        self.workers.mkdir(parents=True, exist_ok=True)
        with open(self.workers / "grid.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _refresh(self) -> None:
        """The file as it is now (other workers' cells too)."""
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("settings") != self.settings:
                raise SystemExit(f"--state {self.path}: its cells were run with other settings "
                                 f"({old.get('settings')}); use the same backbones and budgets, or another "
                                 f"--state file")
            self.data = old

    def _find(self, table: str, key: Dict[str, Any]) -> Optional[Dict]:
        want = run_key(table, key)
        return next((r for r in self.data[table] if run_key(table, r) == want), None)

    def row(self, table: str, key: Dict[str, Any]) -> Optional[Dict]:
        """The recorded row of a run (by any worker), else None."""
        with self._locked():
            self._refresh()
        return self._find(table, key)

    def _claim_path(self, table: str, key: Dict[str, Any]) -> Path:
        return self.workers / (f"{table}-" + "-".join(str(v) for v in key.values()) + ".claim")

    def claim(self, table: str, key: Dict[str, Any]) -> str:
        """Take a run for this process: ``"mine"``; ``"done"`` if another worker has recorded it meanwhile;
        ``"taken"`` while another live process works on it."""
        if self.workers is None:
            return "mine"
        with self._locked():
            self._refresh()
            if self._find(table, key) is not None:
                return "done"
            path = self._claim_path(table, key)
            holder = path.read_text().strip() if path.is_file() else ""
            if holder and holder != process_tag(os.getpid()):
                pid = holder.split()[0]
                if pid.isdigit() and process_tag(int(pid)) == holder:
                    return "taken"
            path.write_text(process_tag(os.getpid()) + "\n")
            return "mine"

    def release(self, table: str, key: Dict[str, Any]) -> None:
        """Give up this process's claim on a run (recorded, cut short or failed)."""
        if self.workers is None:
            return
        with self._locked():
            path = self._claim_path(table, key)
            if path.is_file() and path.read_text().strip() == process_tag(os.getpid()):
                path.unlink()

    def add(self, table: str, row: Dict[str, Any], cpu_seconds: float = 0.0) -> None:
        with self._locked():
            self._refresh()
            self.data[table].append(json.loads(json.dumps(row, default=str)))
            self.data["cpu_hours"] = float(self.data.get("cpu_hours") or 0.0) + cpu_seconds / 3600.0
            self._write()

    def finish(self, runs: Optional[Dict[str, List[Dict[str, Any]]]]) -> bool:
        """Mark the grid complete when every run of ``runs`` (per table, their keys) is recorded, by whichever
        worker (None: never, as for a shard, whose state holds its own runs only); returns whether it is."""
        with self._locked():
            self._refresh()
            self.data["complete"] = runs is not None and all_recorded(self.data, runs)
            self._write()
        return self.data["complete"]

    def _write(self) -> None:
        from forcefield.files import write_json
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.data, indent=1)


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrain_benchmark")
    p.add_argument("--smoke", action="store_true", help="tiny corpus, model and grid (a CPU check)")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS,
                   help=f"from {list(SCRATCH) + list(METHOD_CONFIGS)}")
    p.add_argument("--molecules", nargs="*", default=MOLECULES)
    p.add_argument("--sizes", nargs="*", type=int, default=SIZES)
    p.add_argument("--properties", nargs="*", default=PROPERTIES, help="QM9 properties ([] to skip QM9)")
    p.add_argument("--corpus", default=str(CONFIGS / "pretrain_corpus.yaml"))
    p.add_argument("--budget", choices=["steps", "minutes"], default="steps",
                   help="equal compute as equal optimiser steps or equal wall-clock minutes")
    p.add_argument("--pretrain-steps", type=int, default=100_000)
    p.add_argument("--pretrain-minutes", type=float, default=600.0)
    p.add_argument("--pretrain-batch-size", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, help="default: the method config's")
    p.add_argument("--hidden", type=int, help="resize every model (default: the paper's 128 features)")
    p.add_argument("--layers", type=int, help="resize every model (default: 6 ET / 7 EGNN layers)")
    p.add_argument("--heads", type=int, help="ET attention heads (default 8)")
    p.add_argument("--threads", type=int, help="torch threads per run")
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--finetune-steps", type=int,
                   help="optimiser steps per fine-tuning run, as whole epochs of ceil(frames / batch) steps: equal "
                        "compute on any device (a CPU piece and a GPU piece of one grid add up)")
    p.add_argument("--compile", action="store_true",
                   help="fine-tune ET models with the compiled training step (optim.compile), and pretrain "
                        "ET-OREO/ET-ORO with their compiled objectives, train ET QM9 property models with a compiled "
                        "step (property compile), and run each fine-tuned model's MD on a CPU through its AOTInductor "
                        "export: the same steps, faster (benchmarks/compiled_step_speed.py, "
                        "benchmarks/pretrain_paths.py, benchmarks/md_paths.py); EGNN runs stay eager")
    p.add_argument("--finetune-minutes", type=float, help="wall-clock cap per fine-tuning run")
    p.add_argument("--finetune-cpu-minutes", type=float,
                   help="CPU-time cap per fine-tuning run (equal compute on a shared machine)")
    p.add_argument("--qm9-cpu-minutes", type=float, help="CPU-time cap per QM9 run (default: --finetune-cpu-minutes)")
    p.add_argument("--backbone", action="append", default=[], metavar="METHOD=FILE",
                   help="use this pretrained backbone for METHOD instead of pretraining it (repeatable)")
    p.add_argument("--seeds", nargs="*", default=[], metavar="SIZE:N",
                   help="N seeds (1..N: data draw and initialisation) for a training-set size (default 1 each)")
    p.add_argument("--order", choices=["molecules", "seeds"], default="molecules",
                   help="the fine-tuning runs' order: molecule by molecule, or seed by seed (within a seed, the sizes in "
                        "the order --sizes gives them, every molecule and method: a grid run in pieces answers across "
                        "molecules early)")
    p.add_argument("--state", help="JSON of the finished cells (commit it): they are skipped, new ones added; "
                                    "processes given the same --state and --out share the grid's runs (workers)")
    p.add_argument("--max-minutes", type=float,
                   help="start no run after this many minutes minus one run's budget (campaign pieces)")
    p.add_argument("--qm9-epochs", type=int, default=300)
    p.add_argument("--qm9-steps", type=int,
                   help="equal compute for QM9 runs as optimiser steps (each run takes all of them; replaces the "
                        "epoch and time budgets); validation, learning-rate schedule and checkpoint every "
                        "--qm9-epoch-steps")
    p.add_argument("--qm9-epoch-steps", type=int, default=QM9_EPOCH_STEPS,
                   help="steps between validations of a QM9 run with --qm9-steps (a pass of the 110,000 training "
                        "molecules is 3,438 steps of 32)")
    p.add_argument("--qm9-schedule", choices=LR_SCHEDULES, default="plateau",
                   help="learning-rate schedule of QM9 runs: plateau (cut after stalled validations) or cosine "
                        "(down to the floor over the run's steps, so that equal budgets end on settled models)")
    p.add_argument("--qm9-minutes", type=float, help="wall-clock cap per QM9 run (default: --finetune-minutes)")
    p.add_argument("--qm9-train-size", type=int, help="default: the whole QM9 train split")
    p.add_argument("--qm9-seeds", nargs="*", default=[], metavar="PROPERTY:N",
                   help="N seeds (1..N: the initialisation and the batch order; the split is fixed) for a QM9 property "
                        "(default 1 each): how far the methods' differences stand above a run's seed")
    p.add_argument("--md-ps", type=float, default=0.0,
                   help="MD stability of every fine-tuned model: ps per replica (0 skips; MDsim uses 300)")
    p.add_argument("--md-replicas", type=int, default=5)
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay when fine-tuning")
    p.add_argument("--merge", help="results.json of an earlier invocation with the same pretraining settings: its "
                                    "rows enter the tables where this invocation has none (e.g. other molecules)")
    p.add_argument("--device", default="cpu", help="where fine-tuning and MD run: cpu, cuda or auto (QM9: the CPU)")
    p.add_argument("--shard", metavar="I/K",
                   help="only every K-th force-field and QM9 cell, from the I-th (0-based): K processes side by side "
                        "(one GPU), each with its own --out and --state, merged afterwards (campaign_gpu.py)")
    p.add_argument("--md-minutes-per-ps", type=float, default=2.0,
                   help="wall minutes one simulated ps takes (with --max-minutes: the time kept for each cell's MD)")
    p.add_argument("--first-cell-minutes", type=float, default=15.0,
                   help="with --max-minutes and --finetune-steps: the wall minutes (before its MD) kept for a run of a "
                        "molecule no recorded run on this device has timed yet (later ones take the longest such time)")
    p.add_argument("--data-dir", default=os.environ.get("OREO_DATA_DIR"))
    p.add_argument("--no-progress", action="store_true")
    return p


def apply_smoke(args) -> Dict[str, Any]:
    """``--smoke``: the tiny settings, and the grid's molecules, sizes and properties set to theirs."""
    args.data_dir = args.data_dir or str(ROOT.parent / "shared" / "data")
    smoke = smoke_settings(Path(args.data_dir))
    args.molecules, args.sizes = smoke["molecules"], smoke["sizes"]
    args.properties = [q for q in args.properties if q in smoke["properties"]] or smoke["properties"]
    return smoke


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.cell_deadline_minutes = args.md_deadline_minutes = None
    shard = parse_shard(args.shard, p)
    unknown = [m for m in args.methods if m not in METHOD_CONFIGS and m not in SCRATCH]
    if unknown:
        p.error(f"unknown methods {unknown}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = apply_smoke(args) if args.smoke else None
    log = print
    backbones = parse_backbones(args.backbone, args.methods, p)
    runs = planned_runs(args, p)
    pretrained = {m: backbones.get(m) or run_pretrain(m, args, smoke, log) for m in args.methods
                  if m in METHOD_CONFIGS}
    settings = grid_settings(args, backbones)
    made_here = {m: pretrain_stamp(m, args, smoke) for m in pretrained if m not in backbones}
    if made_here:        # backbones pretrained here: other pretraining settings make other cells
        settings["pretraining"] = made_here
    grid = GridState(Path(args.state), settings, workers=out / "workers") if args.state else None
    args.settings_stamp = settings_hash(settings)
    started = time.time()
    md_minutes = args.md_minutes_per_ps * args.md_ps if args.md_ps else 0.0
    # the wall minutes a run needs (one thread: a CPU-time budget takes at least as long), so none starts too late
    run_minutes = {"forcefield": (args.finetune_cpu_minutes or args.finetune_minutes or 0.0) + md_minutes,
                   "qm9": min([m for m in (args.qm9_cpu_minutes or args.finetune_cpu_minutes,
                                           args.qm9_minutes or args.finetune_minutes) if m] or [0.0])}

    left = elsewhere = 0
    index = -1

    def minutes_left() -> float:
        return args.max_minutes - (time.time() - started) / 60

    def minutes_needed(table: str, key: Dict[str, Any]) -> float:
        """Wall minutes the cell needs to finish. A step budget's: the longest any recorded run of the molecule took
        on this device (the state's rows and this invocation's), else a first guess; a time budget's: what is left
        of it (a resumed QM9 run has used some)."""
        if table == "qm9" and args.qm9_steps:
            # the longest recorded QM9 run on this device (else a first guess), for the steps it has left; with a
            # committed run state a run also starts in a shorter piece and goes on in the next one
            rows = (grid.data["qm9"] if grid else []) + qm9
            # (its training minutes, summed over the pieces it ran in, and its test)
            took = [float(r.get("train_minutes") or r["wall_minutes"]) for r in rows
                    if r.get("device") == args.device and r.get("wall_minutes") and not r.get("failed")]
            run_state = qm9_run_state(args, key["property"], key["method"], key["seed"])
            done = qm9_steps_done(qm9_out(args, key["property"], key["method"], key["seed"]),
                                  run_state)
            need = (max(took) if took else QM9_FIRST_RUN_MINUTES) * max(0.0, 1.0 - done / args.qm9_steps)
            if run_state is not None:
                need = min(need, QM9_MIN_PIECE_MINUTES)
            return need + QM9_TEST_MINUTES
        if table == "qm9":
            used = budget_used_minutes(qm9_out(args, key["property"], key["method"], key["seed"]))["max_cpu_minutes"]
            return max(run_minutes["qm9"] - used, 0.0) + QM9_TEST_MINUTES
        if not args.finetune_steps:
            return run_minutes["forcefield"]
        rows = (grid.data["forcefield"] if grid else []) + results
        took = [float(r["wall_minutes"]) for r in rows if r.get("molecule") == key["molecule"]
                and r.get("device") == args.device and r.get("wall_minutes")]
        return max(took) if took else args.first_cell_minutes + md_minutes

    def after_training(key: Dict[str, Any]) -> float:
        """Wall minutes a fine-tuning run of the molecule needs after its training (test and MD): what the recorded
        runs on this device took besides training, else the MD guess. The start rule counts whole runs (the same
        records), so the training's deadline leaves it what it needs (a guess of 20 minutes of MD beside a recorded
        10-minute run started runs with a negative deadline, each cut after one epoch)."""
        rows = (grid.data["forcefield"] if grid else []) + results
        rest = [float(r["wall_minutes"]) - float(r["train_minutes"]) for r in rows
                if r.get("molecule") == key["molecule"] and r.get("device") == args.device
                and r.get("wall_minutes") and r.get("train_minutes")]
        return max(rest) if rest else md_minutes

    def cell(table: str, key: Dict[str, Any], compute) -> Optional[Dict]:
        """The row of one run: from the grid's state when it is there, else computed (and recorded) when this
        invocation has time for it and no other worker of the grid has claimed it, else None (counted as left, or
        as elsewhere); another shard's cells are not this one's."""
        nonlocal left, elsewhere, index
        index += 1
        if shard and index % shard[1] != shard[0]:
            return None
        row = grid.row(table, key) if grid else None
        if row is not None:
            return row
        if args.max_minutes is not None and minutes_left() < minutes_needed(table, key):
            left += 1
            return None
        claim = grid.claim(table, key) if grid else "mine"
        if claim == "done":                      # another worker recorded it since
            return grid.row(table, key)
        if claim == "taken":                     # another worker is on it
            elsewhere += 1
            return None
        try:
            return run_cell(table, key, compute)
        finally:
            if grid:
                grid.release(table, key)

    def run_cell(table: str, key: Dict[str, Any], compute) -> Optional[Dict]:
        nonlocal left
        args.cell_deadline_minutes = None
        if args.max_minutes is not None and (args.finetune_steps or table == "qm9"):   # the time left caps the run
            args.cell_deadline_minutes = minutes_left() - (after_training(key) if table == "forcefield"
                                                           else QM9_TEST_MINUTES)
        cpu0, wall0 = time.process_time(), time.time()
        args.md_deadline_minutes = None
        name = " ".join(str(v) for v in key.values())
        try:
            row = {**key, **compute()}
        except CutShort as cut:
            log(f"[{name}] {cut}: not recorded, it runs again in a later invocation")
            left += 1
            return None
        except FloatingPointError as err:     # diverged: recorded as failed (it would diverge again), not retried
            log(f"[{name}] failed: {err}")
            row = {**key, "failed": str(err).split(";")[0]}
        row.update(wall_minutes=round((time.time() - wall0) / 60, 2), device=args.device)
        if grid:
            grid.add(table, row, time.process_time() - cpu0)
        return row

    def finetune_row(mol, size, m, seed) -> Dict:
        r = run_finetune(mol, size, m, pretrained.get(m), args, smoke, log, seed)
        if r.get("paused"):        # untested, no test_metrics.json: a later invocation resumes it from its last.pt
            raise CutShort(f"{r['stop_reason'].split(' (')[0]}, before its {args.finetune_steps} steps")
        if args.max_minutes is not None:                 # the MD gets what is left of the piece, and no more
            args.md_deadline_minutes = max(0.1, minutes_left())
        return {**r, **run_md(mol, size, m, args, log, seed)} if args.md_ps else r

    results, qm9 = [], []
    for key in runs["forcefield"]:
        row = cell("forcefield", key, lambda k=key: finetune_row(k["molecule"], k["size"], k["method"], k["seed"]))
        if row is not None:
            results.append(row)
            write_report(out, results, [], args.methods)
    for key in runs["qm9"]:
        row = cell("qm9", key, lambda k=key: run_property(k["property"], k["method"], pretrained.get(k["method"]),
                                                          args, smoke, log, k["seed"]))
        if row is not None:
            qm9.append(row)
            run_state = qm9_run_state(args, key["property"], key["method"], key["seed"])   # --state only
            if run_state is not None:
                run_state.unlink(missing_ok=True)          # the row is recorded: nothing left to go on from
    if grid:
        # complete when every run is recorded, by this process or another worker; a shard's state holds only its
        # own runs (merged afterwards), so it never is
        grid.finish(None if shard else runs)
    if left:
        log(f"{left} run(s) left for a later invocation (--max-minutes {args.max_minutes:g})")
    if elsewhere:
        log(f"{elsewhere} run(s) in progress in another worker of this grid (same --out and --state)")
    notes = []
    if args.merge:
        n_before = len(results) + len(qm9)
        results, qm9 = merged_results(Path(args.merge), results, qm9)
        old_mols = sorted({r["molecule"] for r in results} - set(args.molecules))
        notes.append(f"{len(results) + len(qm9) - n_before} rows ({', '.join(old_mols) or 'none'}"
                     f"{', QM9' if qm9 and not args.properties else ''}) come from an earlier invocation with the same "
                     f"settings ({args.merge}); pretraining is not bit-reproducible across machines, so those rows "
                     f"used other pretrained weights of the same recipe")
    write_report(out, results, qm9, args.methods, notes)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
