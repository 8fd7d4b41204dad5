"""The pretraining loop: one model, many sources, several objectives; single process or DistributedDataParallel.

Files in ``out`` (written by rank 0 only, atomically): ``config.yaml``, ``corpus_report.json``,
``last.pt`` (full state: weights, heads, optimiser, scheduler, position in the epoch), ``pretrained.pt`` (an
oreo model file of the pretrained :class:`~forcefield.potential.Potential`, loadable by
:func:`forcefield.io.load_potential`, with the heads and the pretraining record under ``"pretrain"``), and
``metrics.csv`` (one row every ``log_every`` steps, averaged over ranks).

Resuming (``resume=True``) continues exactly: batches depend only on (seed, epoch), the noise of step ``s`` on
rank ``r`` only on (seed, s, r), and the optimiser and scheduler states are restored.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
import yaml

from ..version import __version__
from ..devices import resolve_device
from ..files import atomic_torch_save, atomic_write_text, write_json
from ..io import model_record
from ..potential import Potential
from ..settings import from_mapping, read_yaml
from ..train.loop import Panel, TrainingRun, adamw, cosine_lr_factor, load_optimizer_state, optimizer_step
from .corpus import Corpus, CorpusConfig, EpochSampler, corpus_config_from_obj
from .corpus_pack import open_corpus
from .distributed import DistInfo, all_reduce_mean, barrier
from .objectives import ObjectivesConfig, Outputs, PretrainTask, build_objectives

__all__ = ["PretrainOptim", "PretrainConfig", "pretrain_config_from_dict", "load_pretrain_config", "Pretrainer",
           "PRETRAIN_CHECKPOINT_FORMAT", "DEFAULT_MODEL"]

PRETRAIN_CHECKPOINT_FORMAT = "oreo-pretrain-checkpoint"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MODEL = {"name": "et", "hidden": 128, "num_layers": 6, "num_heads": 8, "num_rbf": 32, "cutoff": 5.0}


@dataclass
class PretrainOptim:
    batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 1000
    epochs: int = 100
    max_steps: Optional[int] = None      # overrides epochs
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    seed: int = 1
    dtype: str = "float32"
    threads: Optional[int] = None
    device: str = "auto"                 # auto | cpu | cuda
    checkpoint_every: int = 500          # steps
    log_every: int = 50                  # steps
    max_minutes: Optional[float] = None  # wall-clock budget of this invocation; --resume continues
    compile: bool = False                # fuse the double backward with torch.compile (ET; objectives that read
                                         # only energies and forces: et-oreo, et-oro; minutes to compile, cached)


@dataclass
class PretrainConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: PretrainOptim = field(default_factory=PretrainOptim)
    elements: List[int] = field(default_factory=list)   # extra elements the model accepts (besides the corpus')

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def pretrain_config_from_dict(d: Dict[str, Any]) -> PretrainConfig:
    d = dict(d or {})
    model = dict(DEFAULT_MODEL) if d.get("model") is None else dict(d["model"])
    model.setdefault("name", "et")
    return from_mapping(PretrainConfig, {**d, "model": model, "corpus": corpus_config_from_obj(d.get("corpus") or [])},
                        "")


def load_pretrain_config(path: Union[str, Path], corpus: Optional[Union[str, Path]] = None) -> PretrainConfig:
    """A pretraining YAML (sections corpus, model, objectives, optim); ``corpus`` (a YAML list of sources or a
    corpus mapping) replaces its corpus section."""
    d = (read_yaml(path) or {}) if path else {}
    if corpus:
        d["corpus"] = read_yaml(corpus, "corpus")
    return pretrain_config_from_dict(d)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


class Pretrainer(TrainingRun):
    """The pretraining loop on :class:`~forcefield.train.loop.TrainingRun` (folder, checkpoints, log, timing):
    steps over the corpus's epochs, a cosine schedule after a linear warm-up, a row every ``log_every`` steps."""
    checkpoint_format = PRETRAIN_CHECKPOINT_FORMAT
    what = "pretraining"
    csv_key = "step"

    def __init__(self, config: PretrainConfig, out: Union[str, Path], corpus: Optional[Corpus] = None,
                 dist_info: Optional[DistInfo] = None, progress: bool = True, log: Callable[[str], None] = print,
                 data_dir=None, state_file: Optional[Path] = None, init_cpu_hours: Optional[float] = None):
        self.dist = dist_info or DistInfo()
        super().__init__(out, log=log, progress=progress, state_file=state_file, init_cpu_hours=init_cpu_hours,
                         is_main=self.dist.is_main)
        self.cfg = config
        o = config.optim
        if o.dtype not in DTYPES:
            raise ValueError(f"optim.dtype must be one of {', '.join(DTYPES)}, got '{o.dtype}'")
        self.dtype = DTYPES[o.dtype]
        if o.threads:
            torch.set_num_threads(int(o.threads))
        if self.dist.enabled:
            self.device = self.dist.device
        else:
            self.device = resolve_device(o.device)
        self.corpus = corpus if corpus is not None else open_corpus(config.corpus, data_dir, log=self.log)

        torch.manual_seed(o.seed)
        elements = sorted(set(self.corpus.elements) | set(int(z) for z in config.elements))
        rms = self.corpus.force_rms()
        weights = config.objectives.resolved_weights()
        potential = Potential(backbone=dict(config.model), elements=elements, atomref=None,
                              scale=rms if rms else 1.0, shift=0.0)
        objectives = build_objectives(config.objectives, int(potential.backbone.hidden))
        self.task = PretrainTask(potential, objectives).to(device=self.device, dtype=self.dtype)
        self.task.potential.atomref.data = self.task.potential.atomref.data.double()
        self.weights = weights
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.task, device_ids=ids, output_device=ids[0] if ids else None)
        else:
            self.model = self.task
        self.optimizer = adamw(self.task.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self._runner = self._compiled_runner() if o.compile else None
        # sources that no objective uses (e.g. equilibrium geometries for ET-ORO) are not drawn at all
        in_use = self.corpus.sources_used(self.task.frames_used(self.corpus.has_forces,
                                                                self.corpus.frames.equilibrium))
        self._refuse_sources_left_out()
        self.source_weights = self.corpus.weights.copy()
        for k, name in enumerate(self.corpus.names):
            if not in_use[k] and len(self.corpus.source_frames(k)) and self.source_weights[k] > 0:
                self.source_weights[k] = 0.0
                self.log(f"corpus: no objective of {', '.join(self.weights)} uses source '{name}': not sampled")
        self.sampler = EpochSampler(self.corpus, o.batch_size, o.seed, self.dist.rank, self.dist.world_size,
                                    weights=self.source_weights)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = int(o.max_steps) if o.max_steps is not None else int(o.epochs) * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.part_names = list(weights) + (["noise_level/accuracy"] if "noise_level" in weights else [])
        self.csv_fields = (["step", "epoch", "lr", "loss"] + self.part_names
                           + ["frames", "elapsed_s", "steps_per_s", "cpu_hours"])
        self.curves = (Panel("", "loss", [("loss", "total")] + [(k, k) for k in weights]),)

    def _refuse_sources_left_out(self) -> None:
        """A packed corpus keeps only the sources its packing method used: one that this method's objectives need
        but that has no frames here would turn the method into another (ET-OREO without its equilibrium terms is
        ET-ORO) without a word, so it is an error."""
        missing = []
        for k, declared in enumerate(self.corpus.summary()):
            if declared.get("frames") and not len(self.corpus.source_frames(k)) and bool(self.task.frames_used(
                    np.array([bool(declared.get("forces"))]),
                    np.array([declared.get("kind") == "equilibrium"]))[0]):
                missing.append(f"'{declared['name']}' ({declared.get('kind')}, {declared['frames']} frames)")
        if missing:
            raise ValueError(f"the corpus holds no frames of {', '.join(missing)}, which the objectives of this "
                             f"method ({', '.join(self.weights)}) use: it was packed for another method. Pack it "
                             f"for this one (`oreo pretrain --config <this method's config> --corpus ... "
                             f"--pack-corpus FILE`) or build it from its sources")

    # ------------------------------------------------------------------ schedule
    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        return cosine_lr_factor(step, o.warmup_steps, self.total_steps, o.min_lr / o.lr if o.lr > 0 else 0.0)

    # ------------------------------------------------------------------ one step
    def train_step(self, frames: np.ndarray) -> Dict[str, float]:
        o = self.cfg.optim
        batch = self.corpus.collate(frames, dtype=self.dtype, device=self.device)
        gen = torch.Generator().manual_seed(_step_seed(o.seed, self.step, self.dist.rank))
        self.model.train()
        loss, parts = self.model(batch, gen, runner=self._runner)
        optimizer_step(loss, self.optimizer, self.task.parameters(), o.grad_clip, self.step, self.out / "last.pt",
                       what="pretraining", detail=f" ({ {k: float(v) for k, v in parts.items()} })")
        self.scheduler.step()
        self.step += 1
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}

    def _compiled_runner(self):
        """The forward passes of the objectives through one compiled energy + force graph (learned part only,
        as :func:`~forcefield.pretrain.objectives.potential_outputs`), built on the first step."""
        readers = [name for name, obj in self.task.objectives.items() if obj.needs_features]
        if readers:
            raise ValueError(f"optim.compile: the objective(s) {', '.join(readers)} read the backbone's features, "
                             f"which the compiled step does not give (it computes energies and forces); set "
                             f"optim.compile: false for this method")
        if self.dist.enabled:
            raise ValueError("optim.compile is not supported with several processes (torchrun); set "
                             "optim.compile: false")
        from ..train.compiled_step import CompiledEnergyForces
        compiled = CompiledEnergyForces(self.task.potential, learned_only=True)   # ET only: a clear error else

        def run(sub, positions, forces: bool) -> Outputs:
            if compiled.compiles == 0:
                self.log("optim.compile: compiling the energy + force graph on the first batch (minutes; cached)")
            out = compiled(sub.numbers, positions, sub.batch, sub.cell, sub.pbc)
            return Outputs(None, None, out["atomic_energies"], out["energy"], positions, True, forces=out["forces"])
        return run

    # ------------------------------------------------------------------ state
    def state(self) -> Dict[str, Any]:
        return {"format": PRETRAIN_CHECKPOINT_FORMAT, "oreo_version": __version__, "config": self.cfg.to_dict(),
                "potential": model_record(self._cpu_potential()), "heads": self.task.heads_state(),
                "task": {k: v.detach().cpu() for k, v in self.task.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "elapsed": self.elapsed, "cpu_seconds": self.cpu_seconds, "world_size": self.dist.world_size,
                "total_steps": self.total_steps,
                "corpus": self.corpus.summary(), "objective_weights": self.weights}

    def _cpu_potential(self) -> Potential:
        pot = copy.deepcopy(self.task.potential).cpu()
        pot.set_metadata(pretrained=self.pretrain_record())
        return pot

    def pretrain_record(self) -> Dict[str, Any]:
        method = self.cfg.objectives.method
        return {"method": method if isinstance(method, str) else "+".join(method),
                "objectives": self.weights, "steps": self.step, "epochs": self.epoch,
                "batch_size": self.cfg.optim.batch_size, "world_size": self.dist.world_size,
                "corpus": self.corpus.summary(), "source_weights": self.source_weights.tolist(),
                "leakage": self.corpus.report.get("leakage", {}), "oreo_version": __version__}

    def after_checkpoint(self, state: Dict[str, Any]) -> None:
        """``pretrained.pt``, the model file fine-tuning starts from, with every checkpoint."""
        rec = dict(state["potential"])
        rec["pretrain"] = {**self.pretrain_record(), "heads": state["heads"], "config": state["config"]}
        atomic_torch_save(rec, self.out / "pretrained.pt")

    def load_state(self, ck: Dict[str, Any]) -> None:
        if ck["corpus"] != self.corpus.summary():
            raise ValueError(f"cannot resume the run in {self.out}: the corpus differs from the one it was trained on "
                             f"({ck['corpus']} vs {self.corpus.summary()}); use the original config or a new --out")
        now = self.cfg.to_dict()
        then = ck.get("config") or {}
        then_model, now_model = then.get("model") or {}, now.get("model") or {}
        same = {"objective weights": (ck.get("objective_weights"), self.weights),
                # the fields the checkpoint records (a field added to the model config later is not a change)
                "model": ({k: then_model[k] for k in then_model if k in now_model} or None,
                          {k: now_model[k] for k in then_model if k in now_model}),
                "optim.batch_size": ((then.get("optim") or {}).get("batch_size"), now["optim"].get("batch_size")),
                "optim.seed": ((then.get("optim") or {}).get("seed"), now["optim"].get("seed"))}
        differ = [f"{what} {a!r} -> {b!r}" for what, (a, b) in same.items() if a is not None and a != b]
        if differ:     # resuming would continue one method or recipe as another (e.g. ET-ORO's state as ET-OREO)
            raise ValueError(f"cannot resume the run in {self.out} with other settings: {'; '.join(differ)}; use "
                             f"the config it was started with (its config.yaml), or a new --out")
        if ck["world_size"] != self.dist.world_size:
            self.log(f"warning: the run in {self.out} was written by {ck['world_size']} process(es), now "
                     f"{self.dist.world_size}: training continues, but not step for step as the original run would "
                     f"have")
        self.task.load_state_dict(ck["task"])
        load_optimizer_state(self.optimizer, ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        self.elapsed = ck["elapsed"]
        self.cpu_seconds = ck.get("cpu_seconds", self.elapsed)

    def position(self) -> str:
        return f"step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})"

    def runstate_view(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """The compact state packs ``train_model`` against ``model``: the task's weights against the potential's
        (the same numbers: exact), the objectives' heads as they are, AdamW's moments quantised."""
        rest = {k: v for k, v in state.items() if k not in ("task", "potential", "heads")}
        sd = {"potential." + k: v for k, v in state["potential"]["state_dict"].items()}
        return {**rest, "model": {**state["potential"], "state_dict": sd}, "train_model": state["task"]}

    def from_runstate_view(self, ck: Dict[str, Any]) -> Dict[str, Any]:
        ck["task"] = ck.pop("train_model")
        ck.pop("model")
        return ck

    # ------------------------------------------------------------------ logging
    def _reduce(self, sums: Dict[str, float], counts: Dict[str, int]) -> Dict[str, float]:
        keys = ["loss"] + self.part_names
        flat = {}
        for k in keys:
            flat["s:" + k] = sums.get(k, 0.0)
            flat["c:" + k] = float(counts.get(k, 0))
        red = all_reduce_mean(flat, self.dist)   # mean of sums / mean of counts = pooled mean
        return {k: (red["s:" + k] / red["c:" + k] if red["c:" + k] > 0 else float("nan")) for k in keys}

    def _should_stop(self, started: float) -> bool:
        o = self.cfg.optim
        if o.max_minutes is None:
            return False
        flag = 1.0 if time.perf_counter() - started > 60 * o.max_minutes else 0.0
        return all_reduce_mean({"stop": flag}, self.dist)["stop"] > 0

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> Dict[str, Any]:
        o = self.cfg.optim
        self.begin(resume)            # checked on every rank (a shared folder)
        barrier(self.dist)
        if self.is_main:
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False,
                                                                       allow_unicode=True))
            write_json(self.out / "corpus_report.json", {"summary": self.corpus.summary(), **self.corpus.report},
                       default=str)
        self.log(f"model: {self.task.potential.describe()}; objectives: {self.weights}")
        self.log(f"corpus: {len(self.corpus)} frames; {self.steps_per_epoch} steps per epoch per process, "
                 f"{self.total_steps} steps, {self.dist.world_size} process(es) on {self.device}")
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step")
        self.start_clock()
        started = time.perf_counter()
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        n_frames = 0
        window_start, window_step = time.perf_counter(), self.step
        while self.step < self.total_steps and not self.stop_reason:
            batches = self.sampler.epoch_batches(self.epoch)
            while self.batch_in_epoch < len(batches) and self.step < self.total_steps:
                vals = self.train_step(batches[self.batch_in_epoch])
                self.batch_in_epoch += 1
                n_frames += len(batches[self.batch_in_epoch - 1])
                for k, v in vals.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{vals['loss']:.4g}")
                if self.batch_in_epoch >= len(batches):
                    self.epoch += 1
                    self.batch_in_epoch = 0
                self.tick()
                if self.step % o.log_every == 0 or self.step >= self.total_steps:
                    self._log_row(sums, counts, n_frames, window_start, window_step)
                    sums, counts, n_frames = {}, {}, 0
                    window_start, window_step = time.perf_counter(), self.step
                if self.step % o.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._should_stop(started):
                    self.stop_reason = f"time budget of {o.max_minutes} min reached (continue with --resume)"
                    break
                if self.batch_in_epoch == 0:
                    break  # next epoch: new batch list
        if counts:
            self._log_row(sums, counts, n_frames, window_start, window_step)
        if bar is not None:
            bar.close()
        self.stop_reason = self.stop_reason or f"all {self.total_steps} steps done"
        self.save_checkpoint()
        barrier(self.dist)
        self.log(self.stop_reason)
        self.plot_learning_curve()
        return {"steps": self.step, "epochs": self.epoch, "stop_reason": self.stop_reason,
                "pretrained": str(self.out / "pretrained.pt"), "minutes": self.elapsed / 60}

    def _log_row(self, sums, counts, n_frames, window_start, window_step) -> None:
        means = self._reduce(sums, counts)
        frames = all_reduce_mean({"f": float(n_frames)}, self.dist)["f"] * self.dist.world_size
        dt = max(time.perf_counter() - window_start, 1e-9)
        row = {"step": self.step, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
               **means, "frames": int(round(frames)), "elapsed_s": round(self.elapsed, 3),
               "steps_per_s": (self.step - window_step) / dt, "cpu_hours": self.cpu_seconds / 3600}
        self.append_row(row)
