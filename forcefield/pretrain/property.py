"""QM9 property models (HOMO, LUMO, gap, ...): fine-tuned from a pretrained backbone, or trained from scratch.

:class:`PropertyModel` is a :class:`~forcefield.potential.Potential` used for one number per molecule: the
potential's learned per-atom output (:meth:`~forcefield.potential.Potential.atomic_energies` with
``learned_only``: no repulsion, no reference energies) pooled over the molecule (mean or sum), on standardised
targets. :func:`finetune_property` trains it with :class:`PropertyTrainer` (the epoch loop of
:mod:`forcefield.train.loop`) on QM9's train split, selects on val and reports the test MAE in meV. Model files
(``best.pt``, format ``oreo-property-model``) are registered with :mod:`forcefield.io`, so
:func:`forcefield.io.load_model` reads them like any model.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..allocator import keep_freed_memory
from ..version import __version__
from ..files import atomic_torch_save, write_json
from ..io import ModelFileError, RecordFormat, cast_potential, open_model_file, register_record_format
from ..potential import MAX_Z, Potential, graph_sum
from ..settings import from_mapping
from ..train.loop import EpochTrainer, Panel, adamw_with_plateau, load_optimizer_state
from .finetune import layerwise_param_groups, load_pretrained

__all__ = ["PropertyConfig", "PropertyModel", "PropertyTrainer", "finetune_property", "load_property_model",
           "save_property_model", "PROPERTY_MODEL_FORMAT"]

PROPERTY_MODEL_FORMAT = "oreo-property-model"
PROPERTY_CHECKPOINT_FORMAT = "oreo-property-checkpoint"


@dataclass
class PropertyConfig:
    property: str = "homo"
    source: Optional[str] = None            # QM9 source (see forcefield.data.qm9.read_qm9); None: default
    data_dir: Optional[str] = None
    split: str = "qm9"                      # qm9: the fixed QM9 split (TorchMD-Net's: forcefield.data.qm9);
                                            # random: seeded split of all molecules
    train_size: Optional[int] = None        # None: the whole split
    val_size: Optional[int] = None
    test_size: Optional[int] = None
    model: Dict[str, Any] = field(default_factory=lambda: {"name": "et", "hidden": 128, "num_layers": 6,
                                                           "num_heads": 8, "num_rbf": 32, "cutoff": 5.0})
    reduce: str = "mean"                    # mean (intensive: HOMO/LUMO/gap) | sum
    loss: str = "l1"                        # l1 | mse (on standardised targets)
    epochs: int = 300
    epoch_steps: Optional[int] = None       # an epoch of this many steps (a stream of seeded passes) instead of one
                                            # pass: validation, schedule, checkpoints and budgets every so many
                                            # steps (a pass of QM9's 110,000 molecules is 3,438 steps of 32)
    batch_size: int = 32
    lr: float = 5e-4
    lr_warmup_steps: int = 1000
    lr_schedule: str = "plateau"            # plateau (cut by lr_factor after lr_patience stalled validations) |
                                            # cosine (down to lr_min over the epochs: a fixed budget's steady end)
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
    max_cpu_minutes: Optional[float] = None  # CPU-time budget of this invocation
    eval_batch_size: int = 128
    compile: bool = False                   # the training step's forward and backward through Inductor (ET only;
                                            # forcefield.train.compiled_step): the same numbers, 1.42x the eager
                                            # step here (benchmarks/compiled_step_speed.py --qm9 homo)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PropertyConfig":
        return from_mapping(cls, d, "property")


class PropertyModel(nn.Module):
    """A potential's learned per-atom output, pooled: ``pool(e_atom) * std + mean`` per molecule."""
    precise_buffers = ("potential.atomref", "mean", "std")     # kept float64 by forcefield.io.cast_potential

    def __init__(self, backbone: Dict[str, Any], reduce: str = "mean", mean: float = 0.0, std: float = 1.0,
                 property_name: str = "", unit: str = ""):
        super().__init__()
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got '{reduce}'")
        cfg = dict(backbone)
        cfg.setdefault("max_z", MAX_Z)
        self._config = {"backbone": cfg, "reduce": reduce, "property": property_name, "unit": unit}
        # every element allowed, unit scale, no repulsion: the per-atom output is the head's, as it is
        self.potential = Potential(cfg, elements=list(range(1, int(cfg["max_z"]))), scale=1.0, shift=0.0,
                                   repulsion=False)
        self.cutoff = self.potential.cutoff
        self.reduce = reduce
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float64))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float64))

    @property
    def backbone(self) -> nn.Module:
        return self.potential.backbone

    @property
    def config(self) -> Dict[str, Any]:
        return {**self._config, "mean": float(self.mean), "std": float(self.std)}

    def standardised(self, numbers: Tensor, positions: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        return self.pool(self.potential.atomic_energies(numbers, positions, batch, learned_only=True), batch,
                         num_graphs)

    def pool(self, y: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """The per-atom outputs ``y`` (N,) pooled per molecule (B,): the standardised prediction."""
        pooled = graph_sum(y, batch, num_graphs)
        if self.reduce == "mean":
            pooled = pooled / graph_sum(torch.ones_like(y), batch, num_graphs).clamp_min(1)
        return pooled

    def forward(self, numbers: Tensor, positions: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        z = self.standardised(numbers, positions, batch, num_graphs)
        return z * self.std.to(z.dtype) + self.mean.to(z.dtype)

    # ------------------------------------------------------------------ files
    def record(self, extra: Optional[Dict] = None) -> Dict[str, Any]:
        return {"format": PROPERTY_MODEL_FORMAT, "format_version": 1, "oreo_version": __version__,
                "config": self.config, "extra": extra or {},
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    def load_weights(self, state_dict: Dict[str, Tensor]) -> None:
        """Load a property model's state dict, also one written before the model held a Potential (its keys
        ``backbone.*`` / ``head.*``, without the potential's constant buffers)."""
        own = self.state_dict()
        moved = {("potential." + k if k.startswith(("backbone.", "head.")) else k): v for k, v in state_dict.items()}
        self.load_state_dict({**own, **moved})

    @classmethod
    def from_record(cls, rec: Dict[str, Any]) -> "PropertyModel":
        c = rec["config"]
        m = cls(c["backbone"], c["reduce"], c["mean"], c["std"], c.get("property", ""), c.get("unit", ""))
        m.load_weights(rec["state_dict"])
        return m


register_record_format(RecordFormat(PROPERTY_MODEL_FORMAT, 1, PropertyModel.from_record, potential=False))


def save_property_model(model: PropertyModel, path: Union[str, Path], extra: Optional[Dict] = None) -> Path:
    return atomic_torch_save(model.record(extra), path)


def load_property_model(path: Union[str, Path], dtype: torch.dtype = torch.float32) -> PropertyModel:
    """A property model file (``best.pt``) or property fine-tuning checkpoint (``last.pt``), in eval mode."""
    mf = open_model_file(path)
    if mf.kind != PROPERTY_MODEL_FORMAT:
        raise ModelFileError(f"{mf.path} is not an oreo property model (it is a {mf.kind})")
    return mf.load(dtype=dtype)


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


class PropertyTrainer(EpochTrainer):
    """QM9 property regression: AdamW (layer-wise rates optional), warm-up, reduce-on-plateau or cosine, early stopping;
    ``last.pt`` every epoch (resumable), ``best.pt`` (best validation MAE), ``metrics.csv``,
    ``learning_curve.png``, ``test_metrics.json``."""
    checkpoint_format = PROPERTY_CHECKPOINT_FORMAT
    what = "property fine-tuning"
    csv_fields = ["epoch", "step", "lr", "train_loss", "val_mae_meV", "elapsed_s", "cpu_hours"]
    curves = (Panel("", "loss (standardised)", [("train_loss", "train")]),
              Panel("validation", "MAE", [("val_mae_meV", "MAE (meV, or the property's unit)")]))

    def __init__(self, cfg: PropertyConfig, out: Union[str, Path], pretrained: Optional[Union[str, Path]] = None,
                 splits=None, progress: bool = True, log: Callable[[str], None] = print,
                 state_file: Optional[Path] = None):
        from ..data.qm9 import QM9_PROPERTIES
        if cfg.property not in QM9_PROPERTIES:
            raise ValueError(f"unknown QM9 property '{cfg.property}'; known: {', '.join(QM9_PROPERTIES)}")
        super().__init__(out, cfg, log=log, progress=progress, state_file=state_file)
        self.cfg = cfg
        keep_freed_memory()        # per-batch buffers reused, not page-faulted anew each step (forcefield.allocator)
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
            corpus = self.pretrained_info.get("corpus") or []
            drawn = self.pretrained_info.get("source_weights") or [1.0] * len(corpus)   # 0: a source never drawn
            seen = [c.get("name") for c, w in zip(corpus, drawn)                      # (ET-ORO's equilibrium ones)
                    if "qm9" in str(c.get("name", "")).lower() and c.get("frames") and w > 0]
            if cfg.split == "random" and seen and splits is None:      # a smoke test may mean it; a benchmark not
                warnings.warn(f"split 'random' draws its test molecules from all of QM9, but the backbone "
                              f"{self.pretrained_info.get('path')} was pretrained on QM9 ({', '.join(seen)}): its test "
                              f"MAE is on molecules it has seen; use split: qm9 (the fixed split, whose test molecules "
                              f"pretraining never reads) for a number to report", stacklevel=2)
        model = PropertyModel(backbone, cfg.reduce, float(np.mean(y)), float(np.std(y)) or 1.0, cfg.property,
                              self.unit)
        if pretrained is not None:
            model.load_weights({k: v for k, v in pot.state_dict().items() if k.startswith("backbone.")})
        self.model = cast_potential(model, "cpu", self.dtype)
        self._compiled = None
        if cfg.compile:        # checks the backbone now (ET only: an error that says so); compiles on the first batch
            from ..train.compiled_step import CompiledEnergyForces
            self._compiled = CompiledEnergyForces(self.model.potential, learned_only=True, with_forces=False,
                                                  setting="compile")
        self.optimizer, self.scheduler = adamw_with_plateau(
            layerwise_param_groups(self.model, cfg.lr, cfg.layer_decay, cfg.backbone_lr_factor), cfg.lr,
            cfg.weight_decay, cfg.lr_factor, cfg.lr_patience, cfg.lr_min)

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

    # ------------------------------------------------------------------ the epoch loop's hooks
    def n_train(self) -> int:
        return len(self.train)

    def batch_loss(self, idx: np.ndarray) -> Tensor:
        b, y = self._batch(self.train, idx)
        if self._compiled is None:
            z = self.model.standardised(b.numbers, b.positions, b.batch, len(idx))
        else:
            if self._compiled.compiles == 0:
                self.log("compile: compiling the training step on the first batch (a minute or two; cached)")
            z = self.model.pool(self._compiled(b.numbers, b.positions, b.batch)["atomic_energies"], b.batch, len(idx))
        target = (y - float(self.model.mean)) / float(self.model.std)
        return (z - target).abs().mean() if self.cfg.loss == "l1" else (z - target).pow(2).mean()

    def validate(self) -> Dict[str, float]:
        mae = self.mae(self.val)
        return {"mae": mae, "score": mae}

    def save_best(self, val: Dict[str, float]) -> None:
        atomic_torch_save(self._record(), self.out / "best.pt")

    def epoch_row(self, loss: float, val: Dict[str, float], lr: float) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "lr": lr, "train_loss": loss, "val_mae_meV": val["mae"],
                **self.time_columns()}

    def epoch_line(self, loss: float, val: Dict[str, float], lr: float, improved: bool) -> str:
        return f"epoch {self.epoch:4d}  loss {loss:.4g}  val MAE {val['mae']:.2f} meV  lr {lr:.2e}"

    def on_start(self) -> None:
        write_json(self.out / "config.json", asdict(self.cfg))
        self.log(f"QM9 {self.cfg.property}: {len(self.train)} train / {len(self.val)} val / {len(self.test_set)} "
                 f"test molecules" + (f"; backbone from {self.pretrained_info.get('path')}" if self.pretrained_info
                                      else "; from scratch"))

    # ------------------------------------------------------------------ checkpoints
    def _record(self) -> Dict[str, Any]:
        return self.model.record({"pretrained": self.pretrained_info})

    def _index(self) -> Dict[str, list]:
        return {k: getattr(self, k).index.tolist() for k in ("train", "val", "test_set")}

    def state(self) -> Dict[str, Any]:
        return {"format": PROPERTY_CHECKPOINT_FORMAT, "config": asdict(self.cfg), "model": self._record(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "step": self.step, "best_val": self.best_val,
                "epochs_since_best": self.epochs_since_best, "elapsed": self.elapsed,
                "cpu_seconds": self.cpu_seconds, "index": self._index()}

    def load_state(self, ck: Dict[str, Any]) -> None:
        if ck["index"] != self._index():
            raise ValueError(f"cannot resume the run in {self.out}: its molecules differ from this config's")
        if (ck.get("config") or {}).get("epoch_steps") != self.cfg.epoch_steps:
            raise ValueError(f"cannot resume the run in {self.out} with epoch_steps {self.cfg.epoch_steps}: it ran "
                             f"with {(ck.get('config') or {}).get('epoch_steps')} (its epochs would be other batches)")
        self.model.load_weights(ck["model"]["state_dict"])
        load_optimizer_state(self.optimizer, ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.epoch, self.step = ck["epoch"], ck["step"]
        self.best_val, self.epochs_since_best, self.elapsed = ck["best_val"], ck["epochs_since_best"], ck["elapsed"]
        self.cpu_seconds = ck.get("cpu_seconds", self.elapsed)

    def runstate_view(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return {**state, "train_model": state["model"]["state_dict"]}   # no EMA: the weights are the model

    def from_runstate_view(self, ck: Dict[str, Any]) -> Dict[str, Any]:
        ck.pop("train_model", None)
        return ck

    # ------------------------------------------------------------------ the end
    def test(self) -> Dict[str, Any]:
        best = load_property_model(self.out / "best.pt", dtype=self.dtype)
        m = {"property": self.cfg.property, "unit": "meV" if self.unit == "eV" else self.unit,
             "test_mae": self.mae(self.test_set, best) if len(self.test_set) else float("nan"),
             "val_mae": self.best_val, "n_train": len(self.train), "n_val": len(self.val),
             "n_test": len(self.test_set), "epochs": self.epoch, "steps": self.step,
             "train_minutes": self.elapsed / 60, "cpu_hours": self.cpu_seconds / 3600,
             "stop_reason": self.stop_reason, "pretrained": self.pretrained_info.get("path")}
        write_json(self.out / "test_metrics.json", m)
        self.log(f"test MAE {m['test_mae']:.2f} {m['unit']}")
        return m


def finetune_property(pretrained: Optional[Union[str, Path]], cfg: PropertyConfig, out: Union[str, Path],
                      resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                      state_file: Optional[Path] = None, pause_minutes: Optional[float] = None) -> Dict[str, Any]:
    """Train a QM9 property model (from ``pretrained``'s backbone, or from scratch when None); ``pause_minutes``:
    this invocation's deadline (see :meth:`~forcefield.train.loop.EpochTrainer.fit`)."""
    return PropertyTrainer(cfg, out, pretrained=pretrained, progress=progress, log=log,
                           state_file=state_file).fit(resume=resume, pause_minutes=pause_minutes)
