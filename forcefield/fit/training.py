"""The committee of ``oreo fit``: M members trained with the project's trainer (no loop of its own), saved as one
committee file (:func:`forcefield.committee.save_committee`).

- First round (and every round with ``--retrain fresh``): from a pretrained backbone, each member is
  :func:`forcefield.pretrain.finetune.make_finetune_potential` (the backbone, a new head with the member's seed,
  reference energies and scale fitted on the training frames) trained by
  :class:`~forcefield.pretrain.finetune.FinetuneTrainer`; with ``--from scratch`` a new model of the training
  config's architecture trained by :class:`~forcefield.train.Trainer`.
- Later rounds (``--retrain warm``, the default): each member continues from its own weights of the previous
  round (``Trainer(init_model=...)``, as ``oreo train --init-from``) on all labels so far.
- Member ``k`` uses seed ``1000 * seed + k + 1`` (head initialisation and batch order): the members differ, and
  their spread is the uncertainty. All members share the training/validation/held-out frames.
- A member's folder is an ordinary training run (``best.pt``, ``last.pt``, ``metrics.csv``, ``test_metrics.json``
  on the held-out frames); a killed run continues from ``last.pt``; ``done.json`` marks a finished member.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..files import write_json
from .config import AUTO, DEFAULT_BACKBONE, SCRATCH, SCRATCH_MODEL, FitConfig
from .progress import format_duration


def training_config(cfg: FitConfig, out: Path, member: int, sizes: Tuple[int, int, int]):
    """The training config of member ``member``: fit's defaults, ``--epochs/--lr/--batch-size/--train-minutes``,
    then the ``--set`` overrides (``model.*`` applies to ``--from scratch`` only)."""
    from ..settings import apply_overrides
    from ..train import config_from_dict
    d = {"data": {"molecule": None, "path": f"oreo fit {out}", "train_size": sizes[0], "val_size": sizes[1],
                  "test_size": sizes[2]},
         "model": dict(SCRATCH_MODEL),
         "optim": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_warmup_steps": 20,
                   "lr_patience": 10, "early_stop_patience": 40, "ema_decay": 0.99,
                   "seed": 1000 * cfg.seed + member + 1, "max_minutes": cfg.train_minutes}}
    d = apply_overrides(d, cfg.train_set)
    return config_from_dict(d)


def resolve_backbone(spec: str, elements: List[int], log: Callable[[str], None] = print):
    """``(Potential or None, name)``: the pretrained backbone to fine-tune (None: train from scratch). ``auto``: the
    shipped backbone when it was pretrained on every element of the molecule, else scratch (said in the log)."""
    from ..pretrain.finetune import load_pretrained
    from ase.data import chemical_symbols
    if spec == SCRATCH:
        return None, SCRATCH
    name = DEFAULT_BACKBONE if spec == AUTO else spec
    pot, _ = load_pretrained(name)
    missing = sorted(set(elements) - set(pot.elements))
    if missing:
        known = ",".join(chemical_symbols[z] for z in pot.elements)
        lacks = ",".join(chemical_symbols[z] for z in missing)
        if spec == AUTO:
            log(f"the shipped backbone {name} was pretrained on {known} only, not on {lacks}: training from scratch")
            return None, SCRATCH
        raise ValueError(f"backbone {name} was pretrained on elements {known}, the molecule also has {lacks}; use "
                         f"--from scratch or a backbone pretrained on these elements")
    return pot, name


def member_done(folder: Path) -> bool:
    return (folder / "done.json").is_file() and (folder / "best.pt").is_file()


def train_member(folder: Path, cfg: FitConfig, member: int, splits, backbone, previous: Optional[Path],
                 log: Callable[[str], None]) -> Dict[str, Any]:
    """Train (or continue) one member in ``folder``; returns its held-out metrics (``test_metrics.json``)."""
    from ..io import load_trainable_potential
    from ..pretrain.finetune import FinetuneTrainer, make_finetune_potential
    from ..train import Trainer
    if member_done(folder):
        return json.loads((folder / "test_metrics.json").read_text())
    resume = (folder / "last.pt").is_file()
    if not resume and folder.exists():          # killed before its first checkpoint: start it again
        shutil.rmtree(folder)
    config = training_config(cfg, folder, member, (len(splits.train), len(splits.val), len(splits.test)))
    t0 = time.perf_counter()
    if previous is not None:
        trainer = Trainer(config, folder, splits=splits, init_model=load_trainable_potential(previous),
                          progress=False, log=log)
    elif backbone is not None:
        model = make_finetune_potential(backbone, splits.train, splits.val, seed=config.optim.seed)
        trainer = FinetuneTrainer(config, folder, splits=splits, init_model=model, progress=False, log=log)
    else:
        trainer = Trainer(config, folder, splits=splits, progress=False, log=log)
    metrics = trainer.fit(resume=resume)
    write_json(folder / "done.json", {"seconds": round(time.perf_counter() - t0, 2), "epochs": trainer.epoch,
                                      "stop_reason": trainer.stop_reason})
    return metrics


class _EpochLog:
    """The trainer's log, quieter: its epoch lines at most every ``every_s`` seconds, with an upper-bound ETA."""

    def __init__(self, prefix: str, epochs: int, log: Callable[[str], None], every_s: float = 30.0):
        self.prefix, self.epochs, self.log, self.every_s = prefix, epochs, log, every_s
        self.t0 = time.perf_counter()
        self.next = self.t0 + every_s
        self.seen = 0

    def __call__(self, line: str) -> None:
        if line.startswith(("model:", "data:")):      # the committee's own lines say it
            return
        if not line.startswith("epoch"):
            self.log(f"{self.prefix}: {line}")
            return
        self.seen += 1
        now = time.perf_counter()
        if now >= self.next:
            self.next = now + self.every_s
            epoch = int(line.split()[1])
            left = (self.epochs - epoch) * (now - self.t0) / max(self.seen, 1)
            self.log(f"{self.prefix}: {line} (at most {format_duration(left)} left)")


def train_committee(round_folder: Path, cfg: FitConfig, splits, backbone, previous_round: Optional[Path],
                    metadata: Dict[str, Any], log: Callable[[str], None] = print) -> Tuple[Path, List[Dict]]:
    """Train the ``cfg.committee`` members of a round and save ``round_folder/committee.pt``."""
    from ..committee import save_committee
    results, paths = [], []
    for k in range(cfg.committee):
        folder = round_folder / "members" / f"m{k}"
        prev = previous_round / "members" / f"m{k}" / "best.pt" if previous_round is not None else None
        prefix = f"{round_folder.name} member {k + 1}/{cfg.committee}"
        if not member_done(folder):
            start = "continuing from the previous round" if prev is not None else \
                ("fine-tuning the backbone" if backbone is not None else "from scratch")
            if (folder / "last.pt").is_file():
                start = f"continuing its interrupted training ({start})"
            log(f"{prefix}: training on {len(splits.train)} frames ({len(splits.val)} validation, {len(splits.test)} "
                f"held-out), {start}")
        results.append(train_member(folder, cfg, k, splits, backbone, prev, _EpochLog(prefix, cfg.epochs, log)))
        paths.append(folder / "best.pt")
    path = save_committee(paths, round_folder / "committee.pt", metadata=metadata,
                          sources=[str(p.relative_to(round_folder.parent.parent)) for p in paths])
    return path, results


def committee_predictions(committee, cset, batch_size: int = 32) -> Dict[str, np.ndarray]:
    """Committee mean energy (F,) eV, forces (A, 3) eV/Å and ``forces_std_max`` (F,) eV/Å of every frame."""
    import torch
    dtype = next(committee.parameters()).dtype
    out: Dict[str, List[np.ndarray]] = {"energy": [], "forces": [], "forces_std_max": []}
    for s in range(0, len(cset), batch_size):
        b = cset.collate(np.arange(s, min(s + batch_size, len(cset))), dtype=dtype)
        with torch.enable_grad():
            res = committee.energy_forces_spread(b.numbers, b.positions, b.batch)
        for key in out:
            out[key].append(res[key].detach().double().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
