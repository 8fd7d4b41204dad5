"""Fine-tuning a pretrained model: force fields (rMD17 & co.) and QM9 properties (HOMO, LUMO, gap).

Force fields
    :func:`finetune_forcefield` takes the pretrained backbone, puts a new energy head on it (or keeps the
    pretrained one, ``reuse_head``), fits per-element reference energies and the energy scale on the fine-tuning
    training frames, and trains with :class:`forcefield.train.Trainer` - the trainer used from scratch - through a
    thin subclass that adds optional layer-wise learning rates (``layer_decay``: the head gets ``lr``, backbone
    layer k of L gets ``lr * backbone_lr_factor * layer_decay**(L + 1 - k)``, the embeddings the smallest).
Properties
    :func:`finetune_property` trains a :class:`PropertyModel` (backbone + scalar head, mean- or sum-pooled,
    targets standardised) on QM9's train split, selects on val, reports the test MAE in meV. Without a
    pretrained file it trains the same model from scratch (the baseline).

``pretrained`` may be ``pretrained.pt`` or ``last.pt`` of a pretraining run, or any oreo model file/training
checkpoint (its backbone is used).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..io import atomic_torch_save
from ..potential import Potential
from ..train.config import Config
from ..train.step import append_csv, early_stop_reason, optimizer_step
from ..train.trainer import Trainer

__all__ = ["FinetuneOptions", "load_pretrained", "make_finetune_potential", "layerwise_param_groups",
           "FinetuneTrainer", "finetune_forcefield", "PropertyConfig", "PropertyModel", "PropertyTrainer",
           "finetune_property", "load_property_model", "PROPERTY_MODEL_FORMAT"]

PROPERTY_MODEL_FORMAT = "oreo-property-model"


# ---------------------------------------------------------------------------- loading
def load_pretrained(path: Union[str, Path]) -> Tuple[Potential, Dict[str, Any]]:
    """(Potential in float32, pretraining record) from a pretraining output or any oreo model file."""
    from ..models.egnn import register_egnn
    register_egnn()
    from ..io import ModelFileError, resolve_model_path
    try:
        path = resolve_model_path(path)          # a file, or the name of a shipped (pretrained) model
    except ModelFileError:
        raise FileNotFoundError(f"pretrained model {path} not found (pass pretrained.pt or last.pt of an "
                                "`oreo pretrain` run, or a shipped name: see `oreo models`)") from None
    rec = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(rec, dict):
        raise ValueError(f"{path} is not an oreo model or checkpoint")
    info: Dict[str, Any] = {"path": str(path)}
    fmt = rec.get("format")
    if fmt == "oreo-pretrain-checkpoint":
        info.update(rec["potential"]["config"].get("metadata", {}).get("pretrained", {}))
        rec = rec["potential"]
    elif fmt == "oreo-checkpoint":
        rec = rec["model"]
    elif fmt != "oreo-potential":
        raise ValueError(f"{path} is not an oreo model or checkpoint (format={fmt!r})")
    if "pretrain" in rec:
        info.update({k: v for k, v in rec["pretrain"].items() if k not in ("heads", "config")})
    elif "pretrained" in rec["config"].get("metadata", {}):
        info.update(rec["config"]["metadata"]["pretrained"])
    pot = Potential.from_config(rec["config"], rec["state_dict"]).float()
    pot.atomref.data = pot.atomref.data.double()
    return pot, info


# ---------------------------------------------------------------------------- force fields
@dataclass
class FinetuneOptions:
    reuse_head: bool = False               # keep the pretrained energy head (and its scale) instead of a new one
    layer_decay: Optional[float] = None    # layer-wise lr decay (e.g. 0.8); None: one lr for all
    backbone_lr_factor: float = 1.0        # multiplies every backbone lr


def make_finetune_potential(pretrained: Potential, train, val=None, options: Optional[FinetuneOptions] = None,
                            seed: int = 1) -> Potential:
    """A new :class:`Potential` for the fine-tuning frames: pretrained backbone, fresh head (unless
    ``reuse_head``), reference energies and scale fitted on ``train``."""
    from ..train.statistics import energy_scale, fit_reference_energies
    options = options or FinetuneOptions()
    elements = sorted(set(train.elements) | (set(val.elements) if val is not None else set()))
    atomref = fit_reference_energies(train, elements)
    scale, shift = energy_scale(train, atomref)
    if options.reuse_head:
        scale = float(pretrained.scale)
    torch.manual_seed(seed)
    meta = {"pretrained": pretrained.metadata.get("pretrained", {}), "finetune": asdict(options)}
    pot = Potential(backbone=pretrained.config["backbone"], elements=elements, atomref=atomref, scale=scale,
                    shift=shift, metadata=meta)
    src = pretrained.state_dict()
    own = pot.state_dict()
    take = [k for k in src if k.startswith("backbone.") or (options.reuse_head and k.startswith("head."))]
    missing = [k for k in own if k.startswith("backbone.") and k not in src]
    if missing:
        raise ValueError(f"pretrained backbone lacks parameters {missing[:5]}: different architecture?")
    pot.load_state_dict({**own, **{k: src[k] for k in take}})
    return pot.to(next(pretrained.parameters()).dtype)


def _depth(name: str, num_layers: int) -> int:
    """Depth of a parameter: 0 embeddings/radial basis, k+1 interaction layer k, L the output norm, L+1 head."""
    if name.startswith("head.") or not name.startswith("backbone."):
        return num_layers + 1
    parts = name.split(".")
    if parts[1] == "layers":
        return int(parts[2]) + 1
    if parts[1] in ("out_norm", "disp_proj"):
        return num_layers
    return 0


def layerwise_param_groups(model: nn.Module, lr: float, layer_decay: Optional[float] = None,
                           backbone_lr_factor: float = 1.0, num_layers: Optional[int] = None) -> List[Dict[str, Any]]:
    """Parameter groups (largest lr first) for ``torch.optim``: each has ``lr`` and ``base_lr``."""
    if num_layers is None:
        layers = getattr(getattr(model, "backbone", None), "layers", None)
        num_layers = len(layers) if layers is not None else 0
    groups: Dict[int, List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(_depth(name, num_layers), []).append(p)
    out = []
    for depth in sorted(groups, reverse=True):
        if depth == num_layers + 1:
            g_lr = lr
        else:
            g_lr = lr * backbone_lr_factor * (layer_decay ** (num_layers + 1 - depth) if layer_decay else 1.0)
        out.append({"params": groups[depth], "lr": g_lr, "base_lr": g_lr, "depth": depth})
    return out


class FinetuneTrainer(Trainer):
    """:class:`forcefield.train.Trainer` with per-group (layer-wise) learning rates; everything else unchanged."""

    def __init__(self, config: Config, out, splits=None, init_model: Optional[Potential] = None,
                 options: Optional[FinetuneOptions] = None, progress: bool = True, log: Callable = print):
        super().__init__(config, out, splits=splits, init_model=init_model, progress=progress, log=log)
        self.options = options or FinetuneOptions()
        o = config.optim
        if self.options.layer_decay or self.options.backbone_lr_factor != 1.0:
            groups = layerwise_param_groups(self.model, o.lr, self.options.layer_decay,
                                            self.options.backbone_lr_factor)
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=o.lr_factor, patience=o.lr_patience, min_lr=o.lr_min)

    def _set_warmup_lr(self) -> None:
        o = self.cfg.optim
        if o.lr_warmup_steps > 0 and self.step <= o.lr_warmup_steps:
            w = min(1.0, (self.step + 1) / o.lr_warmup_steps)
            for g in self.optimizer.param_groups:
                g["lr"] = g.get("base_lr", o.lr) * w


def finetune_forcefield(pretrained: Union[str, Path], config: Config, out: Union[str, Path],
                        options: Optional[FinetuneOptions] = None, resume: bool = False, progress: bool = True,
                        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Fine-tune on the frames ``config.data`` describes (e.g. rMD17 aspirin, ``train_size`` frames); returns the
    test metrics (``test_metrics.json``). ``--resume`` continues the fine-tuning run in ``out``."""
    from ..train.datasets import build_splits
    options = options or FinetuneOptions()
    pot, info = load_pretrained(pretrained)
    splits = build_splits(config.data, config.optim.seed)
    model = make_finetune_potential(pot, splits.train, splits.val, options, config.optim.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps({"pretrained": info, "options": asdict(options)}, indent=2,
                                                  default=str))
    log(f"fine-tuning from {pretrained} ({info.get('method', 'unknown method')}, "
        f"{info.get('steps', '?')} pretraining steps)")
    trainer = FinetuneTrainer(config, out, splits=splits, init_model=model, options=options, progress=progress,
                              log=log)
    return trainer.fit(resume=resume)


# ---------------------------------------------------------------------------- properties
@dataclass
class PropertyConfig:
    property: str = "homo"
    source: Optional[str] = None            # QM9 source (see forcefield.data.qm9.read_qm9); None: default
    data_dir: Optional[str] = None
    split: str = "qm9"                      # qm9: the fixed QM9 split; random: seeded split of all molecules
    train_size: Optional[int] = None        # None: the whole split
    val_size: Optional[int] = None
    test_size: Optional[int] = None
    model: Dict[str, Any] = field(default_factory=lambda: {"name": "et", "hidden": 128, "num_layers": 6,
                                                           "num_heads": 8, "num_rbf": 32, "cutoff": 5.0})
    reduce: str = "mean"                    # mean (intensive: HOMO/LUMO/gap) | sum
    loss: str = "l1"                        # l1 | mse (on standardised targets)
    epochs: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    lr_warmup_steps: int = 1000
    lr_factor: float = 0.8
    lr_patience: int = 10
    lr_min: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    early_stop_patience: int = 50
    layer_decay: Optional[float] = None
    backbone_lr_factor: float = 1.0
    seed: int = 1
    dtype: str = "float32"
    threads: Optional[int] = None
    max_minutes: Optional[float] = None
    eval_batch_size: int = 128

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PropertyConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown property fine-tuning key(s) {bad}; valid: {', '.join(sorted(known))}")
        return cls(**d)


class PropertyModel(nn.Module):
    """Backbone + scalar head -> one number per molecule: pool(head(x, vec)) * std + mean."""

    def __init__(self, backbone: Dict[str, Any], reduce: str = "mean", mean: float = 0.0, std: float = 1.0,
                 property_name: str = "", unit: str = ""):
        super().__init__()
        from ..models import EquivariantScalarHead, create_backbone
        from ..models.egnn import register_egnn
        register_egnn()
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got '{reduce}'")
        cfg = dict(backbone)
        cfg.setdefault("max_z", 100)
        self._config = {"backbone": cfg, "reduce": reduce, "property": property_name, "unit": unit}
        self.backbone = create_backbone(cfg)
        self.head = EquivariantScalarHead(self.backbone.hidden)
        self.cutoff = float(self.backbone.cutoff)
        self.reduce = reduce
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float64))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float64))

    @property
    def config(self) -> Dict[str, Any]:
        return {**self._config, "mean": float(self.mean), "std": float(self.std)}

    def standardised(self, numbers: Tensor, positions: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        from ..graph import radius_graph
        edge_index, edge_vec = radius_graph(positions, batch, self.cutoff)
        x, vec = self.backbone(numbers, edge_index, edge_vec)
        y = self.head(x, vec)
        pooled = torch.zeros(num_graphs, dtype=y.dtype, device=y.device).index_add(0, batch, y)
        if self.reduce == "mean":
            count = torch.zeros(num_graphs, dtype=y.dtype, device=y.device).index_add(0, batch, torch.ones_like(y))
            pooled = pooled / count.clamp_min(1)
        return pooled

    def forward(self, numbers: Tensor, positions: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        z = self.standardised(numbers, positions, batch, num_graphs)
        return z * self.std.to(z.dtype) + self.mean.to(z.dtype)


def save_property_model(model: PropertyModel, path: Union[str, Path], extra: Optional[Dict] = None) -> Path:
    return atomic_torch_save({"format": PROPERTY_MODEL_FORMAT, "format_version": 1, "oreo_version": __version__,
                              "config": model.config, "extra": extra or {},
                              "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def load_property_model(path: Union[str, Path]) -> PropertyModel:
    rec = torch.load(path, map_location="cpu", weights_only=False)
    if rec.get("format") == "oreo-property-checkpoint":
        rec = rec["model"]
    if rec.get("format") != PROPERTY_MODEL_FORMAT:
        raise ValueError(f"{path} is not an oreo property model")
    c = rec["config"]
    m = PropertyModel(c["backbone"], c["reduce"], c["mean"], c["std"], c.get("property", ""), c.get("unit", ""))
    m.load_state_dict(rec["state_dict"])
    return m.eval()


def _property_splits(cfg: PropertyConfig):
    from ..data.qm9 import read_qm9
    from ..data.splits import random_split
    props = (cfg.property,)
    if cfg.split == "random":
        full = read_qm9(cfg.source, split="all", properties=props, data_dir=cfg.data_dir)
        n = len(full)
        ntr = cfg.train_size if cfg.train_size is not None else int(0.8 * n)
        nva = cfg.val_size if cfg.val_size is not None else max(1, int(0.1 * n))
        nte = cfg.test_size if cfg.test_size is not None else n - ntr - nva
        idx = random_split(n, {"train": ntr, "val": nva, "test": nte}, cfg.seed)
        return full.subset(idx["train"]), full.subset(idx["val"]), full.subset(idx["test"])
    if cfg.split != "qm9":
        raise ValueError(f"split must be 'qm9' or 'random', got '{cfg.split}'")
    out = []
    for name, size in (("train", cfg.train_size), ("val", cfg.val_size), ("test", cfg.test_size)):
        d = read_qm9(cfg.source, split=name, properties=props, data_dir=cfg.data_dir)
        if size is not None and size < len(d):
            rng = np.random.default_rng([cfg.seed, {"train": 0, "val": 1, "test": 2}[name]])
            d = d.subset(np.sort(rng.choice(len(d), size=size, replace=False)))
        out.append(d)
    return tuple(out)


class PropertyTrainer:
    """Epoch loop for QM9 property regression: AdamW, warm-up, reduce-on-plateau, early stopping; ``last.pt``
    every epoch (resumable), ``best.pt`` (best validation MAE), ``metrics.csv``, ``test_metrics.json``."""
    CSV_FIELDS = ["epoch", "step", "lr", "train_loss", "val_mae_meV", "elapsed_s"]

    def __init__(self, cfg: PropertyConfig, out: Union[str, Path], pretrained: Optional[Union[str, Path]] = None,
                 splits=None, progress: bool = True, log: Callable[[str], None] = print):
        from ..data.qm9 import QM9_PROPERTIES
        if cfg.property not in QM9_PROPERTIES:
            raise ValueError(f"unknown QM9 property '{cfg.property}'; known: {', '.join(QM9_PROPERTIES)}")
        self.cfg, self.out, self.progress, self.log = cfg, Path(out), progress, log
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.train, self.val, self.test_set = splits if splits is not None else _property_splits(cfg)
        if len(self.train) == 0 or len(self.val) == 0:
            raise ValueError("property fine-tuning needs at least one training and one validation molecule")
        y = self.train.target(cfg.property)
        self.unit = QM9_PROPERTIES[cfg.property].unit
        self.to_meV = 1000.0 if self.unit == "eV" else 1.0
        torch.manual_seed(cfg.seed)
        self.pretrained_info: Dict[str, Any] = {}
        backbone = dict(cfg.model)
        if pretrained is not None:
            pot, self.pretrained_info = load_pretrained(pretrained)
            backbone = dict(pot.config["backbone"])
        self.model = PropertyModel(backbone, cfg.reduce, float(np.mean(y)), float(np.std(y)) or 1.0, cfg.property,
                                   self.unit)
        if pretrained is not None:
            src = {k: v for k, v in pot.state_dict().items() if k.startswith("backbone.")}
            self.model.load_state_dict({**self.model.state_dict(), **src})
        self.model.to(self.dtype)
        self.model.mean.data = self.model.mean.data.double()
        self.model.std.data = self.model.std.data.double()
        groups = layerwise_param_groups(self.model, cfg.lr, cfg.layer_decay, cfg.backbone_lr_factor)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.lr_min)
        self.epoch = self.step = self.epochs_since_best = 0
        self.best_val = math.inf
        self.elapsed = 0.0
        self.stop_reason = ""

    # ------------------------------------------------------------------ helpers
    def _batch(self, data, idx):
        b = data.conformations.collate(idx, dtype=self.dtype)
        y = torch.as_tensor(data.target(self.cfg.property)[idx], dtype=self.dtype)
        return b, y

    @torch.no_grad()
    def predict(self, data, model: Optional[PropertyModel] = None) -> np.ndarray:
        model = model or self.model
        model.eval()
        out = []
        for s in range(0, len(data), self.cfg.eval_batch_size):
            idx = np.arange(s, min(s + self.cfg.eval_batch_size, len(data)))
            b, _ = self._batch(data, idx)
            out.append(model(b.numbers, b.positions, b.batch, len(idx)).double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def mae(self, data, model=None) -> float:
        return float(np.mean(np.abs(self.predict(data, model) - data.target(self.cfg.property)))) * self.to_meV

    def train_epoch(self) -> float:
        c = self.cfg
        self.model.train()
        order = np.random.default_rng([c.seed, self.epoch]).permutation(len(self.train))
        batches = [order[s:s + c.batch_size] for s in range(0, len(order), c.batch_size)]
        it = batches
        if self.progress:
            from tqdm.auto import tqdm
            it = tqdm(batches, desc=f"epoch {self.epoch + 1}", unit="batch", leave=False)
        total = count = 0.0
        std = float(self.model.std)
        for idx in it:
            b, y = self._batch(self.train, idx)
            if c.lr_warmup_steps > 0 and self.step <= c.lr_warmup_steps:
                w = min(1.0, (self.step + 1) / c.lr_warmup_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * w
            z = self.model.standardised(b.numbers, b.positions, b.batch, len(idx))
            target = (y - float(self.model.mean)) / std
            loss = (z - target).abs().mean() if c.loss == "l1" else (z - target).pow(2).mean()
            optimizer_step(loss, self.optimizer, self.model.parameters(), c.grad_clip, self.step,
                           self.out / "last.pt", what="property fine-tuning")
            self.step += 1
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        return total / max(count, 1)

    # ------------------------------------------------------------------ checkpoints
    def _record(self) -> Dict[str, Any]:
        return {"format": PROPERTY_MODEL_FORMAT, "format_version": 1, "oreo_version": __version__,
                "config": self.model.config, "extra": {"pretrained": self.pretrained_info},
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def save_checkpoint(self) -> Path:
        return atomic_torch_save({"format": "oreo-property-checkpoint", "config": asdict(self.cfg),
                                  "model": self._record(), "optimizer": self.optimizer.state_dict(),
                                  "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                                  "best_val": self.best_val, "epochs_since_best": self.epochs_since_best,
                                  "elapsed": self.elapsed,
                                  "index": {k: getattr(self, k).index.tolist() for k in ("train", "val", "test_set")}},
                                 self.out / "last.pt")

    def load_checkpoint(self, path: Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if ck.get("format") != "oreo-property-checkpoint":
            raise ValueError(f"{path} is not a property fine-tuning checkpoint")
        if ck["index"] != {k: getattr(self, k).index.tolist() for k in ("train", "val", "test_set")}:
            raise ValueError(f"cannot resume from {path}: its molecules differ from this config's")
        self.model.load_state_dict(ck["model"]["state_dict"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.epoch, self.step = ck["epoch"], ck["step"]
        self.best_val, self.epochs_since_best, self.elapsed = ck["best_val"], ck["epochs_since_best"], ck["elapsed"]

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> Dict[str, Any]:
        c = self.cfg
        csv_path, last = self.out / "metrics.csv", self.out / "last.pt"
        if resume:
            if not last.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {last}")
            self.load_checkpoint(last)
            if csv_path.exists():
                with open(csv_path) as fh:
                    rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= self.epoch]
                with open(csv_path, "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=self.CSV_FIELDS)
                    w.writeheader()
                    w.writerows(rows)
            self.log(f"resumed from {last} at epoch {self.epoch}")
        elif last.exists() or csv_path.exists():
            raise FileExistsError(f"{self.out} already holds a run; pass --resume or choose another --out")
        (self.out / "config.json").write_text(json.dumps(asdict(c), indent=2))
        self.log(f"QM9 {c.property}: {len(self.train)} train / {len(self.val)} val / {len(self.test_set)} test "
                 f"molecules" + (f"; backbone from {self.pretrained_info.get('path')}" if self.pretrained_info
                                 else "; from scratch"))
        started, elapsed0 = time.perf_counter(), self.elapsed
        while self.epoch < c.epochs:
            loss = self.train_epoch()
            val = self.mae(self.val)
            self.epoch += 1
            if self.step > c.lr_warmup_steps:
                self.scheduler.step(val)
            if val < self.best_val:
                self.best_val, self.epochs_since_best = val, 0
                atomic_torch_save(self._record(), self.out / "best.pt")
            else:
                self.epochs_since_best += 1
            self.elapsed = elapsed0 + time.perf_counter() - started
            lr = self.optimizer.param_groups[0]["lr"]
            append_csv(csv_path, {"epoch": self.epoch, "step": self.step, "lr": lr, "train_loss": loss,
                                  "val_mae_meV": val, "elapsed_s": self.elapsed}, self.CSV_FIELDS)
            self.save_checkpoint()
            self.log(f"epoch {self.epoch:4d}  loss {loss:.4g}  val MAE {val:.2f} meV  lr {lr:.2e}")
            self.stop_reason = early_stop_reason(self.epochs_since_best, c.early_stop_patience, lr, c.lr_min,
                                                 self.step, c.lr_warmup_steps, time.perf_counter() - started,
                                                 c.max_minutes)
            if self.stop_reason:
                break
        else:
            self.stop_reason = f"all {c.epochs} epochs done"
        return self.evaluate_test()

    def evaluate_test(self) -> Dict[str, Any]:
        best = load_property_model(self.out / "best.pt").to(self.dtype)
        best.mean.data, best.std.data = best.mean.data.double(), best.std.data.double()
        m = {"property": self.cfg.property, "unit": "meV" if self.unit == "eV" else self.unit,
             "test_mae": self.mae(self.test_set, best) if len(self.test_set) else float("nan"),
             "val_mae": self.best_val, "n_train": len(self.train), "n_val": len(self.val),
             "n_test": len(self.test_set), "epochs": self.epoch, "steps": self.step,
             "train_minutes": self.elapsed / 60, "stop_reason": self.stop_reason,
             "pretrained": self.pretrained_info.get("path")}
        (self.out / "test_metrics.json").write_text(json.dumps(m, indent=2))
        self.log(f"test MAE {m['test_mae']:.2f} {m['unit']}")
        return m


def finetune_property(pretrained: Optional[Union[str, Path]], cfg: PropertyConfig, out: Union[str, Path],
                      resume: bool = False, progress: bool = True, log: Callable[[str], None] = print
                      ) -> Dict[str, Any]:
    """Train a QM9 property model (from ``pretrained``'s backbone, or from scratch when None)."""
    return PropertyTrainer(cfg, out, pretrained=pretrained, progress=progress, log=log).fit(resume=resume)
