"""Energy + force training: AdamW, linear warm-up, reduce-on-plateau, EMA weights, gradient clipping,
early stopping; a CSV log, a learning-curve PNG and an atomic checkpoint every epoch; ``resume=True``
continues exactly where a killed run stopped (same shuffles, same optimiser state).

Files in ``out``: ``config.yaml``, ``last.pt`` (full training state), ``best.pt`` (EMA model with the best
validation loss, an oreo model file), ``metrics.csv``, ``learning_curve.png``, ``test_metrics.json``.
"""
import copy
import csv
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import yaml

from .. import __version__
from ..data.conformations import ConformationSet
from ..evaluate import evaluate, parity_plot
from ..io import atomic_torch_save, model_record, save_model
from ..potential import Potential
from .config import Config
from .datasets import Splits, build_splits
from .step import append_csv, early_stop_reason, optimizer_step
from .runstate import is_runstate, pack_checkpoint, unpack_runstate
from .statistics import energy_scale, fit_reference_energies, reference_energy

CHECKPOINT_FORMAT = "oreo-checkpoint"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CSV_FIELDS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_energy_mae_meV", "val_forces_mae_meV_per_A",
              "elapsed_s", "cpu_hours"]


class Trainer:
    def __init__(self, config: Config, out: Path, splits: Optional[Splits] = None,
                 init_model: Optional[Potential] = None, progress: bool = True,
                 log: Callable[[str], None] = print, state_file: Optional[Path] = None,
                 init_cpu_hours: Optional[float] = None):
        """``init_model``: start from these weights (continue training or fine-tune) instead of a new model;
        ``init_cpu_hours``: CPU-hours already spent on it (default: its metadata's ``cpu_hours``, else 0).
        ``state_file``: also keep a compact, committable copy of the run state there (``runstate.py``),
        written with every checkpoint; ``fit(resume=True)`` falls back to it when ``out`` has no checkpoint."""
        self.cfg = config
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.log = log
        o = config.optim
        if o.dtype not in DTYPES:
            raise ValueError(f"optim.dtype must be one of {', '.join(DTYPES)}, got '{o.dtype}'")
        self.dtype = DTYPES[o.dtype]
        if o.threads:
            torch.set_num_threads(int(o.threads))
        self.splits = splits if splits is not None else build_splits(config.data, o.seed)
        tr = self.splits.train
        if len(tr) == 0 or len(self.splits.val) == 0:
            raise ValueError("training needs at least one training and one validation frame")
        if tr.forces is None and o.forces_weight > 0:
            raise ValueError("the training frames have no forces; set optim.forces_weight: 0")
        if tr.energy is None and o.energy_weight > 0:
            raise ValueError("the training frames have no energies; set optim.energy_weight: 0")

        torch.manual_seed(o.seed)
        self.state_file = Path(state_file) if state_file else None
        self.init_from = None
        if init_model is not None:
            meta = init_model.metadata
            missing = sorted((set(tr.elements) | set(self.splits.val.elements)) - set(init_model.elements))
            if missing:
                raise ValueError(f"the initial model knows elements {init_model.elements} but the data has "
                                 f"{missing} too; start from a model trained on these elements, or from scratch")
            if init_cpu_hours is None:
                init_cpu_hours = float(meta.get("cpu_hours") or 0.0)
            self.init_from = meta.get("name") or meta.get("source")
        self.cpu_seconds = 3600.0 * float(init_cpu_hours or 0.0)
        if init_model is None:
            elements = sorted(set(tr.elements) | set(self.splits.val.elements))
            atomref = fit_reference_energies(tr, elements)
            scale, shift = energy_scale(tr, atomref)
            mc = config.model
            init_model = Potential(
                backbone={"name": mc.name, "hidden": mc.hidden, "num_layers": mc.num_layers,
                          "num_heads": mc.num_heads, "num_rbf": mc.num_rbf, "cutoff": mc.cutoff},
                elements=elements, atomref=atomref, scale=scale, shift=shift)
        self.model = init_model.to(self.dtype)
        self.model.atomref.data = self.model.atomref.data.double()
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.atomref = {z: float(self.model.atomref[z]) for z in self.model.elements}
        self.model.set_metadata(**self._metadata())
        self.ema.set_metadata(**self._metadata())

        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=o.lr_factor, patience=o.lr_patience, min_lr=o.lr_min)
        self.epoch = 0
        self.step = 0
        self.best_val = math.inf
        self.epochs_since_best = 0
        self.elapsed = 0.0
        self.stop_reason = ""
        self._process_cpu0 = time.process_time()
        # residual energy targets (E - sum of reference energies) in float64: total energies are large
        self._train_resid = self._residual(tr)
        self._compiled = None
        if o.compile:  # checks the backbone now; compiles on the first batch
            from .compiled_step import CompiledEnergyForces
            self._compiled = CompiledEnergyForces(self.model)

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

    def _set_warmup_lr(self) -> None:
        o = self.cfg.optim
        if o.lr_warmup_steps > 0 and self.step <= o.lr_warmup_steps:
            for g in self.optimizer.param_groups:
                g["lr"] = o.lr * min(1.0, (self.step + 1) / o.lr_warmup_steps)

    def _loss(self, out: Dict[str, torch.Tensor], e_target: Optional[torch.Tensor],
              f_target: Optional[torch.Tensor]) -> torch.Tensor:
        o = self.cfg.optim
        loss = out["energy"].new_zeros(())
        if o.energy_weight > 0 and e_target is not None:
            loss = loss + o.energy_weight * (out["energy"] - e_target).pow(2).mean()
        if o.forces_weight > 0 and f_target is not None:
            loss = loss + o.forces_weight * (out["forces"] - f_target).pow(2).mean()
        return loss

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.optim.ema_decay
        ema_p = list(self.ema.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in self.model.parameters()], 1.0 - d)

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self) -> float:
        o = self.cfg.optim
        tr = self.splits.train
        self.model.train()
        order = np.random.default_rng([o.seed, self.epoch]).permutation(len(tr))
        batches = [order[s:s + o.batch_size] for s in range(0, len(order), o.batch_size)]
        it = batches
        if self.progress:
            from tqdm.auto import tqdm
            it = tqdm(batches, desc=f"epoch {self.epoch + 1}", unit="batch", leave=False)
        total, count = 0.0, 0
        for idx in it:
            b = tr.collate(idx, dtype=self.dtype)
            e_t = None if self._train_resid is None else torch.as_tensor(self._train_resid[idx], dtype=self.dtype)
            self._set_warmup_lr()
            out = self._energy_forces(b)
            loss = self._loss(out, e_t, b.forces)
            optimizer_step(loss, self.optimizer, self.model.parameters(), o.grad_clip, self.step,
                           self.out / "last.pt")
            self._update_ema()
            self.step += 1
            total += loss.item() * len(idx)
            count += len(idx)
            if self.progress:
                it.set_postfix(loss=f"{total / count:.4g}")
        return total / max(count, 1)

    def validate(self) -> Dict[str, float]:
        o = self.cfg.optim
        m, pred = evaluate(self.ema, self.splits.val, batch_size=o.eval_batch_size)
        val = self.splits.val
        loss = 0.0
        if o.energy_weight > 0 and val.energy is not None:
            loss += o.energy_weight * float(np.mean((pred["energy"] - val.energy) ** 2))
        if o.forces_weight > 0 and val.forces is not None:
            loss += o.forces_weight * float(np.mean((pred["forces"] - val.forces) ** 2))
        m["loss"] = loss
        return m

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> Dict:
        return {"format": CHECKPOINT_FORMAT, "oreo_version": __version__, "config": self.cfg.to_dict(),
                "model": model_record(self.ema), "train_model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "step": self.step, "best_val": self.best_val,
                "epochs_since_best": self.epochs_since_best, "elapsed": self.elapsed,
                "cpu_seconds": self.cpu_seconds,
                "frame_ids": self.splits.frame_ids(), "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self) -> Path:
        state = self.state()
        path = atomic_torch_save(state, self.out / "last.pt")
        if self.state_file is not None:
            atomic_torch_save(pack_checkpoint(state, history=self._csv_rows()), self.state_file)
        return path

    def _csv_rows(self):
        path = self.out / "metrics.csv"
        if not path.exists():
            return []
        with open(path) as fh:
            return list(csv.DictReader(fh))

    def load_checkpoint(self, path: Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if is_runstate(ck):      # the compact, committed copy: rebuild the full checkpoint and the CSV
            rows = ck.get("history") or []
            ck = unpack_runstate(ck)
            with open(self.out / "metrics.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
                w.writeheader()
                w.writerows([{k: r.get(k, "") for k in CSV_FIELDS} for r in rows])
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an oreo training checkpoint")
        saved_ids = ck["frame_ids"]
        if saved_ids != self.splits.frame_ids():
            raise ValueError(f"cannot resume from {path}: its data split differs from this config's "
                             f"(different data, seed or sizes). Use the original config or a new --out folder.")
        self.model.load_state_dict(ck["train_model"])
        self.ema.load_state_dict(ck["model"]["state_dict"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self._apply_changed_schedule(ck["config"]["optim"])
        self.epoch, self.step = ck["epoch"], ck["step"]
        self.best_val, self.epochs_since_best = ck["best_val"], ck["epochs_since_best"]
        self.elapsed = ck["elapsed"]
        self.cpu_seconds = ck.get("cpu_seconds", self.elapsed)
        torch.set_rng_state(ck["torch_rng"])

    def _apply_changed_schedule(self, saved: Dict) -> None:
        """Resuming with a new optim.lr (or plateau settings) restarts the schedule from there: the way to
        continue a run that stopped on its time budget with a lower learning rate."""
        o = self.cfg.optim
        if o.lr != saved["lr"]:
            for g in self.optimizer.param_groups:
                g["lr"] = o.lr
            self.scheduler.num_bad_epochs = 0
            self.log(f"learning rate set to {o.lr:g} (was {saved['lr']:g} in the checkpoint's config)")
        self.scheduler.patience = o.lr_patience
        self.scheduler.factor = o.lr_factor
        self.scheduler.min_lrs = [o.lr_min] * len(self.optimizer.param_groups)

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> Dict:
        o = self.cfg.optim
        csv_path = self.out / "metrics.csv"
        if resume:
            last = self.out / "last.pt"
            if not last.is_file() and self.state_file is not None and self.state_file.is_file():
                last = self.state_file
            if not last.is_file():
                where = f" or run state {self.state_file}" if self.state_file is not None else ""
                raise FileNotFoundError(f"--resume: no checkpoint {self.out / 'last.pt'}{where}; "
                                        f"start without --resume")
            self.load_checkpoint(last)
            self._truncate_csv(csv_path, self.epoch)
            if not (self.out / "best.pt").is_file():   # resumed from the compact state on a fresh clone
                save_model(self.ema, self.out / "best.pt")
            self.log(f"resumed from {last} at epoch {self.epoch}, step {self.step}")
        elif csv_path.exists() or (self.out / "last.pt").exists():
            raise FileExistsError(f"{self.out} already holds a training run; pass --resume to continue it "
                                  f"or choose another --out")
        # only now (the folder is ours, the checkpoint matched): record the config of this invocation
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.log(f"model: {self.model.describe()}")
        self.log(f"data: {len(self.splits.train)} train / {len(self.splits.val)} val / "
                 f"{len(self.splits.test)} test frames")
        started = time.perf_counter()
        elapsed0 = self.elapsed
        cpu0, self._process_cpu0 = self.cpu_seconds, time.process_time()
        while self.epoch < o.epochs:
            loss = self.train_epoch()
            val = self.validate()
            if not math.isfinite(val["loss"]):
                raise FloatingPointError(f"validation loss is {val['loss']} after epoch {self.epoch + 1}: the model "
                                         f"diverged; lower optim.lr and start again (or resume from an earlier run)")
            self.epoch += 1
            if self.step > o.lr_warmup_steps:
                self.scheduler.step(val["loss"])
            self.elapsed = elapsed0 + time.perf_counter() - started
            self.cpu_seconds = cpu0 + time.process_time() - self._process_cpu0
            improved = val["loss"] < self.best_val
            if improved:
                self.best_val = val["loss"]
                self.epochs_since_best = 0
                self.ema.set_metadata(cpu_hours=self.cpu_seconds / 3600, epochs=self.epoch, steps=self.step,
                                      val_forces_mae_meV_per_A=val.get("forces_mae_meV_per_A"))
                save_model(self.ema, self.out / "best.pt")
            else:
                self.epochs_since_best += 1
            lr = self.optimizer.param_groups[0]["lr"]
            append_csv(csv_path, {"epoch": self.epoch, "step": self.step, "lr": lr, "train_loss": loss,
                                        "val_loss": val["loss"],
                                        "val_energy_mae_meV": val.get("energy_mae_meV", float("nan")),
                                        "val_forces_mae_meV_per_A": val.get("forces_mae_meV_per_A", float("nan")),
                                        "elapsed_s": self.elapsed, "cpu_hours": self.cpu_seconds / 3600},
                       CSV_FIELDS)
            self.save_checkpoint()
            self.log(f"epoch {self.epoch:4d}  loss {loss:.4g}  val E {val.get('energy_mae_meV', float('nan')):.2f} meV"
                     f"  F {val.get('forces_mae_meV_per_A', float('nan')):.2f} meV/Å  lr {lr:.2e}"
                     f"{'  *' if improved else ''}")
            if self.epoch % 10 == 0:
                self.plot_learning_curve()
            self.stop_reason = early_stop_reason(self.epochs_since_best, o.early_stop_patience, lr, o.lr_min,
                                                 self.step, o.lr_warmup_steps, time.perf_counter() - started,
                                                 o.max_minutes)
            if self.stop_reason:
                break
        else:
            self.stop_reason = f"all {o.epochs} epochs done"
        self.log(self.stop_reason)
        self.plot_learning_curve()
        return self.test()

    def test(self) -> Dict:
        """Errors of the best model on the held-out frames -> test_metrics.json + parity.png."""
        from ..io import load_potential
        best = load_potential(self.out / "best.pt", dtype=self.dtype)
        m, pred = evaluate(best, self.splits.test, batch_size=self.cfg.optim.eval_batch_size)
        m.update(epochs=self.epoch, steps=self.step, train_minutes=self.elapsed / 60,
                 cpu_hours=self.cpu_seconds / 3600, stop_reason=self.stop_reason)
        (self.out / "test_metrics.json").write_text(json.dumps(m, indent=2))
        parity_plot(pred, self.splits.test, self.out / "parity.png", title=f"{self.splits.test.source} test")
        self.log("test: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k.endswith(("meV", "_A"))))
        return m

    # ------------------------------------------------------------------ logs and plots
    @staticmethod
    def _truncate_csv(path: Path, epoch: int) -> None:
        """Drop rows written after the checkpoint (the killed run may have logged an epoch it did not save)."""
        if not path.exists():
            return
        with open(path) as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= epoch]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def plot_learning_curve(self) -> Optional[Path]:
        path = self.out / "metrics.csv"
        if not path.exists():
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        with open(path) as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            return None
        ep = [int(r["epoch"]) for r in rows]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.8))
        ax[0].semilogy(ep, [float(r["train_loss"]) for r in rows], label="train")
        ax[0].semilogy(ep, [float(r["val_loss"]) for r in rows], label="validation (EMA)")
        ax[0].set_xlabel("epoch"); ax[0].set_ylabel("loss"); ax[0].legend()
        ax[1].semilogy(ep, [float(r["val_forces_mae_meV_per_A"]) for r in rows], label="force MAE (meV/Å)")
        ax[1].semilogy(ep, [float(r["val_energy_mae_meV"]) for r in rows], label="energy MAE (meV)")
        ax[1].set_xlabel("epoch"); ax[1].set_title("validation"); ax[1].legend()
        fig.tight_layout()
        out = self.out / "learning_curve.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out
