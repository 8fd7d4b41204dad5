"""Energy + force training: AdamW, linear warm-up, reduce-on-plateau, EMA weights, gradient clipping,
early stopping; a CSV log, a learning-curve PNG and an atomic checkpoint every epoch; ``resume=True``
continues exactly where a killed run stopped (same shuffles, same optimiser state). The loop, checkpoints,
log and timing are :mod:`forcefield.train.loop`'s; this module adds the model, its loss and the EMA.

Files in ``out``: ``config.yaml``, ``last.pt`` (full training state), ``best.pt`` (EMA model with the best
validation loss, an oreo model file), ``metrics.csv``, ``learning_curve.png``, ``test_metrics.json``.
"""
import copy
import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import yaml

from ..version import __version__
from ..data.conformations import ConformationSet
from ..devices import resolve_device
from ..evaluate import evaluate, parity_plot
from ..files import atomic_write_text, write_json
from ..io import load_potential, model_record, save_model
from ..potential import Potential
from .config import Config
from .datasets import Splits, build_splits
from .loop import EpochTrainer, Panel, adamw_with_plateau, load_optimizer_state
from .statistics import fitted_potential, reference_energy

CHECKPOINT_FORMAT = "oreo-checkpoint"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CSV_FIELDS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_energy_mae_meV", "val_forces_mae_meV_per_A",
              "elapsed_s", "cpu_hours"]


class Trainer(EpochTrainer):
    checkpoint_format = CHECKPOINT_FORMAT
    what = "training"
    csv_fields = CSV_FIELDS
    curves = (Panel("", "loss", [("train_loss", "train"), ("val_loss", "validation (EMA)")]),
              Panel("validation", "MAE", [("val_forces_mae_meV_per_A", "force MAE (meV/Å)"),
                                          ("val_energy_mae_meV", "energy MAE (meV)")]))

    def __init__(self, config: Config, out: Path, splits: Optional[Splits] = None,
                 init_model: Optional[Potential] = None, progress: bool = True,
                 log: Callable[[str], None] = print, state_file: Optional[Path] = None,
                 init_cpu_hours: Optional[float] = None):
        """``init_model``: start from these weights (continue training or fine-tune) instead of a new model;
        ``init_cpu_hours``: CPU-hours already spent on it (default: its metadata's ``cpu_hours``, else 0).
        ``state_file``: also keep a compact, committable copy of the run state there (``runstate.py``),
        written with every checkpoint; ``fit(resume=True)`` falls back to it when ``out`` has no checkpoint."""
        o = config.optim
        if o.dtype not in DTYPES:
            raise ValueError(f"optim.dtype must be one of {', '.join(DTYPES)}, got '{o.dtype}'")
        if init_model is not None and init_cpu_hours is None:
            init_cpu_hours = float(init_model.metadata.get("cpu_hours") or 0.0)
        super().__init__(out, o, log=log, progress=progress, state_file=state_file, init_cpu_hours=init_cpu_hours)
        self.cfg = config
        self.dtype = DTYPES[o.dtype]
        if o.threads:
            torch.set_num_threads(int(o.threads))
        self.device = resolve_device(o.device)
        self.splits = splits if splits is not None else build_splits(config.data, o.seed)
        tr = self.splits.train
        if len(tr) == 0 or len(self.splits.val) == 0:
            raise ValueError("training needs at least one training and one validation frame")
        if tr.forces is None and o.forces_weight > 0:
            raise ValueError("the training frames have no forces; set optim.forces_weight: 0")
        if tr.energy is None and o.energy_weight > 0:
            raise ValueError("the training frames have no energies; set optim.energy_weight: 0")

        torch.manual_seed(o.seed)
        if init_model is not None:
            missing = sorted((set(tr.elements) | set(self.splits.val.elements)) - set(init_model.elements))
            if missing:
                raise ValueError(f"the initial model knows elements {init_model.elements} but the data has "
                                 f"{missing} too; start from a model trained on these elements, or from scratch")
            # the architecture is the initial model's: config.yaml and checkpoints record that, not the defaults
            b = getattr(init_model, "_config", {}).get("backbone") or {}
            self.cfg = config = dataclasses.replace(config, model=dataclasses.replace(
                config.model, **{f.name: b[f.name] for f in dataclasses.fields(config.model) if f.name in b}))
        else:
            mc = config.model
            init_model = fitted_potential({"name": mc.name, "hidden": mc.hidden, "num_layers": mc.num_layers,
                                           "num_heads": mc.num_heads, "num_rbf": mc.num_rbf, "cutoff": mc.cutoff},
                                          tr, self.splits.val)
        self.model = init_model.to(device=self.device, dtype=self.dtype)
        self.model.atomref.data = self.model.atomref.data.double()
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        # the EMA update's operands, listed once (weights are updated and loaded in place)
        self._ema_pairs = (list(self.ema.parameters()), [p.detach() for p in self.model.parameters()])
        self.atomref = {z: float(self.model.atomref[z]) for z in self.model.elements}
        self.model.set_metadata(**self._metadata())
        self.ema.set_metadata(**self._metadata())
        self.optimizer, self.scheduler = adamw_with_plateau(self.parameter_groups(), o.lr, o.weight_decay,
                                                            o.lr_factor, o.lr_patience, o.lr_min)
        # residual energy targets (E - sum of reference energies) in float64: total energies are large
        self._train_resid = self._residual(tr)
        self._compiled = None
        if o.compile:  # checks the backbone now; compiles on the first batch
            from .compiled_step import CompiledEnergyForces
            self._compiled = CompiledEnergyForces(self.model)

    def parameter_groups(self) -> List[Dict]:
        """What the optimiser trains, as parameter groups (each with its ``lr``; fine-tuning splits them)."""
        return [{"params": list(self.model.parameters()), "lr": self.cfg.optim.lr}]

    # ------------------------------------------------------------------ helpers
    def _metadata(self) -> Dict:
        d = self.cfg.data
        if d.dataset:
            source = {"molecule": None, "dataset": d.dataset.lower(), "source": d.path or d.dataset,
                      "polymers": self.splits.train.meta.get("polymers"), "temperatures": d.temperatures}
        else:
            source = {"molecule": d.molecule if not d.path else None, "source": d.path or f"rMD17 {d.molecule}",
                      "labels": d.labels, "split_index": d.split_index}
        return {**source, "units": {"energy": "eV", "length": "Å", "forces": "eV/Å"},
                "formula": self.splits.train.formula,
                "train_frame_ids": self.splits.train.frame_id.tolist(),
                "val_frame_ids": self.splits.val.frame_id.tolist(),
                "level_of_theory": self.splits.train.meta.get("level_of_theory"), "oreo_version": __version__}

    def _energy_forces(self, b) -> Dict[str, torch.Tensor]:
        """Training-mode energies (without reference energies) and forces of a batch; compiled when
        ``optim.compile`` is set (built on the first call)."""
        if self._compiled is None:
            return self.model(b.numbers, b.positions, b.batch, b.cell, b.pbc, with_reference=False)
        if self._compiled.compiles == 0:
            self.log("optim.compile: compiling the energy + force graph on the first batch (minutes; cached)")
        return self._compiled(b.numbers, b.positions, b.batch, b.cell, b.pbc)

    def _residual(self, cset: ConformationSet) -> Optional[np.ndarray]:
        return None if cset.energy is None else cset.energy - reference_energy(cset, self.atomref)

    def _loss(self, out: Dict[str, torch.Tensor], e_target: Optional[torch.Tensor],
              f_target: Optional[torch.Tensor]) -> torch.Tensor:
        o = self.cfg.optim
        loss = out["energy"].new_zeros(())
        if o.energy_weight > 0 and e_target is not None:
            loss = loss + o.energy_weight * (out["energy"] - e_target).pow(2).mean()
        if o.forces_weight > 0 and f_target is not None:
            loss = loss + o.forces_weight * (out["forces"] - f_target).pow(2).mean()
        return loss

    # ------------------------------------------------------------------ the epoch loop's hooks
    def n_train(self) -> int:
        return len(self.splits.train)

    def batch_loss(self, idx: np.ndarray) -> torch.Tensor:
        b = self.splits.train.collate(idx, dtype=self.dtype, device=self.device)
        e_t = (None if self._train_resid is None
               else torch.as_tensor(self._train_resid[idx], dtype=self.dtype, device=self.device))
        return self._loss(self._energy_forces(b), e_t, b.forces)

    @torch.no_grad()
    def after_step(self) -> None:
        """The EMA of the weights, the model that is validated and shipped."""
        d = self.cfg.optim.ema_decay
        torch._foreach_lerp_(*self._ema_pairs, 1.0 - d)

    def validate(self) -> Dict[str, float]:
        o = self.cfg.optim
        m, pred = evaluate(self.ema, self.splits.val, batch_size=o.eval_batch_size, device=self.device)
        val = self.splits.val
        loss = 0.0
        if o.energy_weight > 0 and val.energy is not None:
            loss += o.energy_weight * float(np.mean((pred["energy"] - val.energy) ** 2))
        if o.forces_weight > 0 and val.forces is not None:
            loss += o.forces_weight * float(np.mean((pred["forces"] - val.forces) ** 2))
        m["loss"] = m["score"] = loss
        return m

    def save_best(self, val: Dict[str, float]) -> None:
        self.ema.set_metadata(cpu_hours=self.cpu_seconds / 3600, epochs=self.epoch, steps=self.step,
                              val_forces_mae_meV_per_A=val.get("forces_mae_meV_per_A"))
        save_model(self.ema, self.out / "best.pt")

    def epoch_row(self, loss: float, val: Dict[str, float], lr: float) -> Dict:
        return {"epoch": self.epoch, "step": self.step, "lr": lr, "train_loss": loss, "val_loss": val["loss"],
                "val_energy_mae_meV": val.get("energy_mae_meV", float("nan")),
                "val_forces_mae_meV_per_A": val.get("forces_mae_meV_per_A", float("nan")), **self.time_columns()}

    def epoch_line(self, loss: float, val: Dict[str, float], lr: float, improved: bool) -> str:
        return (f"epoch {self.epoch:4d}  loss {loss:.4g}  val E {val.get('energy_mae_meV', float('nan')):.2f} meV"
                f"  F {val.get('forces_mae_meV_per_A', float('nan')):.2f} meV/Å  lr {lr:.2e}"
                f"{'  *' if improved else ''}")

    def on_start(self) -> None:
        # only now (the folder is ours, the checkpoint matched): record the config of this invocation
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.log(f"model: {self.model.describe()}" + (f" on {self.device}" if self.device.type != "cpu" else ""))
        self.log(f"data: {len(self.splits.train)} train / {len(self.splits.val)} val / "
                 f"{len(self.splits.test)} test frames")

    def position(self) -> str:
        return f"epoch {self.epoch}, step {self.step}"

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> Dict:
        return {"format": CHECKPOINT_FORMAT, "oreo_version": __version__, "config": self.cfg.to_dict(),
                "model": model_record(self.ema), "train_model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "step": self.step, "best_val": self.best_val,
                "epochs_since_best": self.epochs_since_best, "elapsed": self.elapsed,
                "cpu_seconds": self.cpu_seconds,
                "frame_ids": self.splits.frame_ids(), "torch_rng": torch.get_rng_state()}

    def load_state(self, ck: Dict) -> None:
        if ck["frame_ids"] != self.splits.frame_ids():
            raise ValueError(f"cannot resume the run in {self.out}: its data split differs from this config's "
                             f"(different data, seed or sizes). Use the original config or a new --out folder.")
        # the model and the data cannot change under a run (optim settings may: lr, budgets, ...); where the data
        # lives (data_dir, path) may differ between machines
        now = self.cfg.to_dict()
        changed = [f"{section}.{k}: {v!r} -> {now[section].get(k)!r}"
                   for section, skip in (("model", ()), ("data", ("data_dir", "path")))
                   for k, v in (ck.get("config", {}).get(section) or {}).items()
                   if k not in skip and k in now[section] and v != now[section][k]]
        if changed:
            raise ValueError(f"cannot resume the run in {self.out} with another model or data config "
                             f"({'; '.join(changed)}): its weights were trained for the old one. Resume with the "
                             f"run's config (its config.yaml), or start a new run in another --out folder")
        self.model.load_state_dict(ck["train_model"])
        self.ema.load_state_dict(ck["model"]["state_dict"])
        load_optimizer_state(self.optimizer, ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self._apply_changed_schedule(ck["config"]["optim"])
        self.epoch, self.step = ck["epoch"], ck["step"]
        self.best_val, self.epochs_since_best = ck["best_val"], ck["epochs_since_best"]
        self.elapsed = ck["elapsed"]
        self.cpu_seconds = ck.get("cpu_seconds", self.elapsed)
        torch.set_rng_state(ck["torch_rng"])

    def _apply_changed_schedule(self, saved: Dict) -> None:
        """Resuming with a new optim.lr (or plateau settings) restarts the schedule from there: the way to
        continue a run that stopped on its time budget with a lower learning rate. Every group's rate is scaled
        alike (layer-wise rates keep their ratios)."""
        o = self.cfg.optim
        for g in self.optimizer.param_groups:        # checkpoints written before groups recorded it
            g.setdefault("base_lr", saved["lr"])
        if o.lr != saved["lr"]:
            for g in self.optimizer.param_groups:
                g["base_lr"] = o.lr if g["base_lr"] == saved["lr"] else g["base_lr"] * (o.lr / saved["lr"])
                g["lr"] = g["base_lr"]
            self.scheduler.num_bad_epochs = 0
            self.log(f"learning rate set to {o.lr:g} (was {saved['lr']:g} in the checkpoint's config)")
        self.scheduler.patience = o.lr_patience
        self.scheduler.factor = o.lr_factor
        self.scheduler.min_lrs = [o.lr_min] * len(self.optimizer.param_groups)

    # ------------------------------------------------------------------ the end
    def test(self) -> Dict:
        """Errors of the best model on the held-out frames -> test_metrics.json + parity.png."""
        best = load_potential(self.out / "best.pt", device=self.device, dtype=self.dtype)
        m, pred = evaluate(best, self.splits.test, batch_size=self.cfg.optim.eval_batch_size, device=self.device)
        m.update(epochs=self.epoch, steps=self.step, train_minutes=self.elapsed / 60,
                 cpu_hours=self.cpu_seconds / 3600, stop_reason=self.stop_reason)
        write_json(self.out / "test_metrics.json", m)
        parity_plot(pred, self.splits.test, self.out / "parity.png", title=f"{self.splits.test.source} test")
        self.log("test: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k.endswith(("meV", "_A"))))
        return m
