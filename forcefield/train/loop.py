"""The training-loop skeleton that every oreo trainer shares.

:class:`TrainingRun` owns what a run leaves in its output folder and how it continues after a kill:

- ``last.pt``: the full checkpoint (atomic), and optionally a compact, committable copy in ``state_file``
  (:mod:`~forcefield.train.runstate`; a resume on a fresh clone starts from it and gets the learning curve back);
- ``metrics.csv``: one row per epoch (or logging step), cut back to the checkpoint on resume so nothing is
  logged twice; ``learning_curve.png`` from it;
- wall and cumulative CPU time (``elapsed_s`` and ``cpu_hours`` columns; ``init_cpu_hours`` carries the cost of
  the model a run started from), the time budget, the linear warm-up of every parameter group's ``base_lr``;
- the refusal to overwrite another run, and the errors that say how to resume.

:class:`EpochTrainer` adds the epoch loop of supervised training (shuffled mini-batches, validation,
reduce-on-plateau or a cosine schedule, best model, early stopping). Users:
:class:`~forcefield.train.trainer.Trainer` (energies and forces; fine-tuning subclasses it),
:class:`~forcefield.pretrain.property.PropertyTrainer` (QM9 properties) and
:class:`~forcefield.pretrain.trainer.Pretrainer` (its own step loop, on :class:`TrainingRun`).
"""
import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..files import atomic_torch_save, atomic_write_text, on_cpu
from .runstate import is_runstate, pack_checkpoint, unpack_runstate

__all__ = ["Panel", "TrainingRun", "EpochTrainer", "adamw", "load_optimizer_state", "adamw_with_plateau", "warmup_lr",
           "cosine_lr_factor", "LR_SCHEDULES", "optimizer_step", "early_stop_reason"]

# the learning-rate schedules of an epoch loop (``lr_schedule`` of its options): ``plateau`` cuts the rate by
# ``lr_factor`` after ``lr_patience`` validations without improvement (a run of unknown length: it ends by early
# stopping); ``cosine`` takes it from the warm-up's rate to ``lr_min`` along half a cosine over the run's known
# number of steps (``epochs`` of ``epoch_steps``), so that a fixed-budget run ends on a settled model rather than
# wherever a constant rate's noise left it
LR_SCHEDULES = ("plateau", "cosine")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters, grad_clip: float, step: int,
                   checkpoint: Path, what: str = "training", detail: str = "") -> None:
    """Check the loss is finite (else a clear error naming the checkpoint to resume from), backpropagate,
    clip the gradient norm (``grad_clip`` > 0) and step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} loss became {loss.item()} at step {step}{detail}; lower optim.lr or "
                                 f"optim.grad_clip and resume from {checkpoint}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


def early_stop_reason(epochs_since_best: int, patience: int, lr: float, lr_min: float, step: int,
                      warmup_steps: int, elapsed_s: float, max_minutes: Optional[float], cpu_s: float = 0.0,
                      max_cpu_minutes: Optional[float] = None) -> str:
    """Why an epoch loop should stop now ("" to go on): no improvement, learning rate at its floor, wall-clock or
    CPU-time budget of this invocation."""
    if epochs_since_best >= patience:
        return f"early stop: no improvement for {patience} epochs"
    if lr <= lr_min * 1.0001 and step > warmup_steps:
        return f"learning rate reached its minimum {lr_min:g}"
    if max_minutes is not None and elapsed_s > 60 * max_minutes:
        return f"time budget of {max_minutes:g} min reached (continue with --resume)"
    if max_cpu_minutes is not None and cpu_s > 60 * max_cpu_minutes:
        return f"CPU budget of {max_cpu_minutes:g} min reached (continue with --resume)"
    return ""


@dataclass
class Panel:
    """One panel of the learning curve: ``lines`` are (CSV column, legend label) pairs on a log axis."""
    title: str
    ylabel: str
    lines: Sequence[Tuple[str, str]]


def adamw(groups, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``groups`` (parameters or parameter groups), the fused implementation where the parameters'
    device and dtype have it: one kernel over all tensors instead of a Python loop over them (the campaign's
    ethanol step 1.25x faster, benchmarks/train_step_overhead.py); the same update up to rounding."""
    groups = list(groups)
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):      # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict) -> None:
    """``optimizer.load_state_dict(state)`` that keeps this optimizer's implementation: the saved groups carry
    the ``fused`` / ``foreach`` flags of the run that wrote them (e.g. a checkpoint from before :func:`adamw`
    was fused), and loading them would switch the implementation back."""
    keep = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for g, flags in zip(optimizer.param_groups, keep):
        g.update(flags)
        # a state saved on another device (a CPU run continued on a GPU): the moments follow their parameter,
        # and so does the step count where the fused / capturable kernels read it on the device
        step_on_device = bool(g.get("fused") or g.get("capturable"))
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and (k != "step" or step_on_device) and v.device != p.device:
                    st[k] = v.to(p.device)


def _step_of(ck: Any) -> int:
    """The optimiser step a loaded checkpoint or run state was written at (-1 if it does not say)."""
    return int(ck.get("step", -1)) if isinstance(ck, dict) else -1


def adamw_with_plateau(groups, lr: float, weight_decay: float, factor: float, patience: int, min_lr: float):
    """:func:`adamw` over ``groups`` and its reduce-on-plateau schedule; every group remembers its ``base_lr``,
    the rate the warm-up leads to."""
    optimizer = adamw(groups, lr=lr, weight_decay=weight_decay)
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience,
                                                           min_lr=min_lr)
    return optimizer, scheduler


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The linear warm-up's fraction of the peak rate at optimiser step ``step`` (1 once it is over)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def warmup_lr(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int) -> None:
    """Linear warm-up: during the first ``warmup_steps`` steps each group's rate rises to its ``base_lr``."""
    if warmup_steps > 0 and step <= warmup_steps:
        w = warmup_factor(step, warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * w


def cosine_lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """The rate at optimiser step ``step`` as a fraction of the peak: a linear rise over ``warmup_steps``, then half a
    cosine from 1 down to ``floor`` at ``total_steps`` (and ``floor`` after it)."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainingRun:
    """Output folder, checkpoints (full and compact), CSV log, learning curve, wall and CPU time.

    A subclass sets :attr:`checkpoint_format`, :attr:`what`, :attr:`csv_key` (the column rows are cut back by on
    resume), :attr:`csv_fields` and :attr:`curves`, and implements :meth:`state` / :meth:`load_state` (and, when
    its checkpoint does not have the layout of a training checkpoint, :meth:`runstate_view` /
    :meth:`from_runstate_view` for the compact state)."""
    checkpoint_format = "oreo-checkpoint"
    what = "training"
    csv_key = "epoch"
    csv_fields: Sequence[str] = ()
    curves: Sequence[Panel] = ()

    def __init__(self, out, log: Callable[[str], None] = print, progress: bool = True,
                 state_file: Optional[Path] = None, init_cpu_hours: Optional[float] = None, is_main: bool = True):
        self.out = Path(out)
        self.is_main = is_main
        self.log = log if is_main else (lambda *_: None)
        self.progress = progress and is_main
        self.state_file = Path(state_file) if state_file else None
        self.elapsed = 0.0
        self.cpu_seconds = 3600.0 * float(init_cpu_hours or 0.0)
        self.stop_reason = ""
        self.resumed_from_runstate = False
        self._clock: Optional[Tuple[float, float, float, float]] = None
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ subclass interface
    def state(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state(self, ck: Dict[str, Any]) -> None:
        raise NotImplementedError

    def position(self) -> str:
        """Where the run is, in words (resume messages)."""
        return f"{self.csv_key} {getattr(self, self.csv_key)}"

    def runstate_view(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """The checkpoint in the layout the compact run state packs (``model`` record + ``train_model``)."""
        return state

    def from_runstate_view(self, ck: Dict[str, Any]) -> Dict[str, Any]:
        return ck

    # ------------------------------------------------------------------ the log
    @property
    def csv_path(self) -> Path:
        return self.out / "metrics.csv"

    def rows(self) -> List[Dict[str, str]]:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path) as fh:
            return list(csv.DictReader(fh))

    def write_rows(self, rows: Sequence[Dict[str, Any]]) -> None:
        """Rewrite the log (atomically) with ``rows``, in this run's columns."""
        if not self.is_main:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.csv_fields))
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in self.csv_fields} for r in rows])
        atomic_write_text(self.csv_path, buf.getvalue())

    def append_row(self, row: Dict[str, Any]) -> None:
        """Append one row (the header first when the log is new)."""
        if not self.is_main:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(self.csv_fields))
            if new:
                w.writeheader()
            w.writerow(row)

    def time_columns(self) -> Dict[str, float]:
        return {"elapsed_s": self.elapsed, "cpu_hours": self.cpu_seconds / 3600.0}

    def plot_learning_curve(self) -> Optional[Path]:
        """``learning_curve.png`` from the log: one log-scale panel per :attr:`curves` entry."""
        rows = self.rows() if self.is_main and self.curves else []
        if not rows:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def values(col):
            return [float(r[col]) if r.get(col) not in (None, "") else float("nan") for r in rows]

        x = values(self.csv_key)
        fig, axes = plt.subplots(1, len(self.curves), figsize=(4.5 * len(self.curves), 3.8), squeeze=False)
        for ax, panel in zip(axes[0], self.curves):
            for col, label in panel.lines:
                ax.semilogy(x, values(col), label=label)
            ax.set_xlabel(self.csv_key)
            ax.set_ylabel(panel.ylabel)
            ax.set_title(panel.title)
            ax.legend()
        fig.tight_layout()
        out = self.out / "learning_curve.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    # ------------------------------------------------------------------ checkpoints
    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    def save_checkpoint(self) -> Optional[Path]:
        """``last.pt`` and, with a ``state_file``, the compact run state (with the learning curve)."""
        if not self.is_main:
            return None
        state = on_cpu(self.state())        # a GPU run's checkpoint loads and packs as a CPU run's
        path = atomic_torch_save(state, self.last_path)
        if self.state_file is not None:
            atomic_torch_save(pack_checkpoint(self.runstate_view(state), history=self.rows()), self.state_file)
        self.after_checkpoint(state)
        return path

    def after_checkpoint(self, state: Dict[str, Any]) -> None:
        """Files written with every checkpoint besides ``last.pt`` (e.g. a model file), from its ``state``."""

    def load_checkpoint(self, path: Path, ck: Any = None) -> None:
        """Restore the run from a full checkpoint or a compact run state (which also rewrites the log); ``ck``: the
        file's content when it is loaded already."""
        ck = torch.load(path, map_location="cpu", weights_only=False) if ck is None else ck
        self.resumed_from_runstate = is_runstate(ck)
        if is_runstate(ck):
            rows = ck.get("history") or []
            ck = self.from_runstate_view(unpack_runstate(ck))
            self.write_rows(rows)
        if not isinstance(ck, dict) or ck.get("format") != self.checkpoint_format:
            raise ValueError(f"{path} is not an oreo {self.what} checkpoint")
        self.load_state(ck)

    def begin(self, resume: bool) -> None:
        """The start of every ``fit``: continue the run in the folder (``resume``; from ``last.pt``, else from the
        compact state), or refuse a folder that already holds a run. A run that ended after its first log row and
        before its first checkpoint left nothing to continue: ``resume`` starts it again, its log kept aside."""
        if resume:
            # each candidate read once: the folder's last.pt, and the compact state when it is further along
            found = {p: torch.load(p, map_location="cpu", weights_only=False)
                     for p in (self.last_path, self.state_file) if p is not None and p.is_file()}
            if not found and (self.csv_path.exists() or not self.is_main):
                # other ranks start too: rank 0 moves the log aside, or refuses an empty folder (below) and ends them
                self.set_aside_the_log()
                return
            if not found:
                where = f" or run state {self.state_file}" if self.state_file is not None else ""
                raise FileNotFoundError(f"--resume: no checkpoint {self.last_path}{where}; start without --resume")
            last = self.last_path if self.last_path in found else self.state_file
            if last == self.last_path and self.state_file in found and \
                    _step_of(found[self.state_file]) > _step_of(found[last]):
                # e.g. a GPU piece's state copied over the job's while this folder stayed
                self.log(f"the run state {self.state_file} is further along than {last}: resuming from it")
                last = self.state_file
            self.load_checkpoint(last, found[last])
            value = getattr(self, self.csv_key)
            self.write_rows([r for r in self.rows() if int(r[self.csv_key]) <= value])
            self.log(f"resumed from {last} at {self.position()}")
        elif self.last_path.exists():
            raise FileExistsError(f"{self.out} already holds a {self.what} run; pass --resume to continue it or "
                                  f"choose another --out")
        elif self.csv_path.exists():
            raise FileExistsError(f"{self.out} already holds a {self.what} run's log but no checkpoint (it ended "
                                  f"before its first one); pass --resume to start it again (the log is kept aside) "
                                  f"or choose another --out")

    def set_aside_the_log(self) -> None:
        """Move a log that no checkpoint goes with to ``metrics.no-checkpoint-N.csv``, so the run starts again."""
        if not self.is_main:
            return
        k = 1
        while (self.out / f"metrics.no-checkpoint-{k}.csv").exists():
            k += 1
        self.csv_path.rename(self.out / f"metrics.no-checkpoint-{k}.csv")
        self.log(f"{self.out} holds a log and no checkpoint (the run ended before its first one): log moved to "
                 f"metrics.no-checkpoint-{k}.csv, the run starts again")

    # ------------------------------------------------------------------ time
    def start_clock(self) -> None:
        self._clock = (time.perf_counter(), self.elapsed, time.process_time(), self.cpu_seconds)

    def tick(self) -> None:
        """Bring ``elapsed`` and ``cpu_seconds`` up to now."""
        t0, elapsed0, cpu_t0, cpu0 = self._clock
        self.elapsed = elapsed0 + time.perf_counter() - t0
        self.cpu_seconds = cpu0 + time.process_time() - cpu_t0

    def seconds_this_invocation(self) -> float:
        return time.perf_counter() - self._clock[0]

    def cpu_seconds_this_invocation(self) -> float:
        """CPU time of this process since the loop started (all its threads): a budget that other jobs on the
        machine do not eat into."""
        return time.process_time() - self._clock[2]


class EpochTrainer(TrainingRun):
    """The epoch loop of supervised training. The subclass provides ``opts`` (epochs, batch_size, seed,
    grad_clip, lr_warmup_steps, early_stop_patience, lr_min, max_minutes, max_cpu_minutes), ``model``, ``optimizer``,
    ``scheduler`` and the hooks :meth:`n_train`, :meth:`batch_loss`, :meth:`validate` (a dict whose ``score``
    is lower for better models), :meth:`save_best`, :meth:`epoch_row`, :meth:`epoch_line`, :meth:`test`."""

    def __init__(self, out, opts, **kwargs):
        schedule = getattr(opts, "lr_schedule", "plateau")
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule lr_schedule: '{schedule}'; use plateau (cut the rate "
                             f"when validation stalls) or cosine (down to lr_min over the run's epochs)")
        super().__init__(out, **kwargs)
        self.opts = opts
        self.lr_schedule = schedule
        self.epoch = 0
        self.step = 0
        self.best_val = math.inf
        self.epochs_since_best = 0

    # ------------------------------------------------------------------ hooks
    def n_train(self) -> int:
        raise NotImplementedError

    def batch_loss(self, idx: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """After every optimiser step (e.g. the EMA update)."""

    def validate(self) -> Dict[str, float]:
        raise NotImplementedError

    def save_best(self, val: Dict[str, float]) -> None:
        raise NotImplementedError

    def epoch_row(self, loss: float, val: Dict[str, float], lr: float) -> Dict[str, Any]:
        raise NotImplementedError

    def epoch_line(self, loss: float, val: Dict[str, float], lr: float, improved: bool) -> str:
        raise NotImplementedError

    def on_start(self) -> None:
        """After :meth:`begin`, before the first epoch (record the config, describe the run)."""

    def test(self) -> Dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop
    def steps_per_pass(self) -> int:
        """Batches in one pass over the training set (the last one short when the batch size does not divide it)."""
        return -(-self.n_train() // self.opts.batch_size)

    def steps_per_epoch(self) -> int:
        return int(getattr(self.opts, "epoch_steps", None) or 0) or self.steps_per_pass()

    def set_step_lr(self) -> None:
        """Each group's rate for the step about to be taken: the warm-up (then the plateau schedule's cuts), or the
        cosine schedule's rate, which depends on the step alone (the same after a resume)."""
        o = self.opts
        if self.lr_schedule == "plateau":
            warmup_lr(self.optimizer, self.step, o.lr_warmup_steps)
            return
        f = cosine_lr_factor(self.step, o.lr_warmup_steps, int(o.epochs) * self.steps_per_epoch(),
                             o.lr_min / o.lr if o.lr > 0 else 0.0)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f

    def epoch_batches(self) -> List[np.ndarray]:
        """The batches of the epoch about to run: one pass over the training set in a seeded order (the same on
        resume), or, with ``opts.epoch_steps`` (a large set such as QM9, whose pass would leave validation, the
        plateau schedule, checkpoints and time budgets hours apart), the next ``epoch_steps`` batches of a stream of
        such passes: epoch ``e`` takes the stream's batches ``e * epoch_steps`` onwards, pass ``p`` being the
        training set in the order of ``default_rng([seed, p])``."""
        o = self.opts
        n = self.n_train()

        def one_pass(p: int) -> List[np.ndarray]:
            order = np.random.default_rng([o.seed, p]).permutation(n)
            return [order[s:s + o.batch_size] for s in range(0, n, o.batch_size)]
        size = int(getattr(o, "epoch_steps", None) or 0)
        if size <= 0:
            return one_pass(self.epoch)
        per_pass = self.steps_per_pass()
        first, out, passes = self.epoch * size, [], {}
        for g in range(first, first + size):
            p, k = divmod(g, per_pass)
            if p not in passes:
                passes = {p: one_pass(p)}
            out.append(passes[p][k])
        return out

    def train_epoch(self) -> float:
        """One epoch of :meth:`epoch_batches`; the mean training loss."""
        o = self.opts
        self.model.train()
        batches = self.epoch_batches()
        it = batches
        if self.progress:
            from tqdm.auto import tqdm
            it = tqdm(batches, desc=f"epoch {self.epoch + 1}", unit="batch", leave=False)
        total, count = 0.0, 0
        params = list(self.model.parameters())   # once an epoch, not a walk of the module tree every step
        for idx in it:
            self.set_step_lr()
            loss = self.batch_loss(idx)
            optimizer_step(loss, self.optimizer, params, o.grad_clip, self.step, self.last_path,
                           what=self.what)
            self.after_step()
            self.step += 1
            total += loss.item() * len(idx)
            count += len(idx)
            if self.progress:
                it.set_postfix(loss=f"{total / count:.4g}")
        return total / max(count, 1)

    def score_epoch(self, loss: float) -> None:
        """Validate the epoch just trained: plateau schedule, best model, a row of the curve, the checkpoint."""
        o = self.opts
        val = self.validate()
        if not math.isfinite(val["score"]):
            raise FloatingPointError(f"validation loss is {val['score']} after epoch {self.epoch}: the model "
                                     f"diverged; lower the learning rate and start again (or resume from an "
                                     f"earlier run)")
        if self.step > o.lr_warmup_steps and self.lr_schedule == "plateau":
            self.scheduler.step(val["score"])
        self.tick()
        improved = val["score"] < self.best_val
        if improved:
            self.best_val, self.epochs_since_best = val["score"], 0
            self.save_best(val)
        else:
            self.epochs_since_best += 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.append_row(self.epoch_row(loss, val, lr))
        self.save_checkpoint()
        self.log(self.epoch_line(loss, val, lr, improved))

    def why_stop(self) -> str:
        o = self.opts
        return early_stop_reason(self.epochs_since_best, o.early_stop_patience, self.optimizer.param_groups[0]["lr"],
                                 o.lr_min if self.lr_schedule == "plateau" else 0.0,   # cosine: the epochs end it
                                 self.step, o.lr_warmup_steps, self.seconds_this_invocation(),
                                 o.max_minutes, self.cpu_seconds_this_invocation(), o.max_cpu_minutes)

    def fit(self, resume: bool = False, pause_minutes: Optional[float] = None) -> Dict[str, Any]:
        """Train to the end of the run and test it (``test_metrics.json``); ``resume`` continues the run in the folder.
        ``pause_minutes``: the wall minutes this invocation may take, a deadline and not the run's budget (a campaign
        piece's end): once an epoch ends past it the run pauses, its checkpoint written and no test run, and ``fit``
        returns ``{"paused": True, "stop_reason": ..., "epochs": ..., "steps": ...}`` for a later ``resume`` to go on
        from, which then trains as the uninterrupted run would have (no extra validation at the pause). A budget
        (``max_minutes``, ``max_cpu_minutes``) ends the run instead, tested."""
        o = self.opts
        self.begin(resume)
        if self.resumed_from_runstate:
            # the compact state (a fresh clone, or a GPU piece's) holds the current weights, not the best model of
            # earlier pieces, and a best.pt here would be another run's: the current model becomes the best this run
            # has, scored anew, so that best.pt, its card (CPU-hours, epochs) and best_val agree
            val = self.validate()
            self.best_val = val["score"]
            self.save_best(val)
        self.on_start()
        self.start_clock()
        every = max(1, int(getattr(o, "val_every", 1) or 1))   # patience, plateau and curve count validations
        while self.epoch < o.epochs:
            loss = self.train_epoch()
            self.epoch += 1
            scored = self.epoch % every == 0 or self.epoch >= o.epochs
            if scored:
                self.score_epoch(loss)
            else:
                self.tick()
                self.save_checkpoint()
            if self.epoch % 10 == 0:
                self.plot_learning_curve()
            if self.epoch >= o.epochs:      # the last epoch is done: a budget that ran out with it cut nothing
                continue
            self.stop_reason = self.why_stop()
            if self.stop_reason:
                if not scored:              # a run never ends on epochs no validation has seen
                    self.score_epoch(loss)
                break
            if pause_minutes is not None and self.seconds_this_invocation() > 60 * pause_minutes:
                return self.pause(pause_minutes)
        else:
            self.stop_reason = f"all {o.epochs} epochs done"
        self.log(self.stop_reason)
        self.plot_learning_curve()
        return self.test()

    def pause(self, minutes: float) -> Dict[str, Any]:
        """End this invocation at its deadline: the epoch's checkpoint is written already; no test."""
        self.stop_reason = f"paused at this invocation's deadline of {minutes:g} min (continue with --resume)"
        self.log(self.stop_reason)
        self.plot_learning_curve()
        return {"paused": True, "stop_reason": self.stop_reason, "epochs": self.epoch, "steps": self.step}
