"""Fine-tuning a pretrained model on a force field (rMD17 & co.).

:func:`finetune_forcefield` takes the pretrained backbone, puts a new energy head on it (or keeps the pretrained
one, ``reuse_head``), fits per-element reference energies and the energy scale on the fine-tuning training
frames, and trains with :class:`forcefield.train.Trainer` - the trainer used from scratch - through a thin
subclass that adds optional layer-wise learning rates (``layer_decay``: the head gets ``lr``, backbone layer k of
L gets ``lr * backbone_lr_factor * layer_decay**(L + 1 - k)``, the embeddings the smallest).
QM9 properties: :mod:`forcefield.pretrain.property`.

``pretrained`` may be ``pretrained.pt`` or ``last.pt`` of a pretraining run, or any oreo model file/training
checkpoint (its backbone is used; :func:`forcefield.io.open_model_file` reads them all).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..files import write_json
from ..io import ModelFileNotFound, open_model_file
from ..potential import Potential
from ..train.config import Config
from ..train.statistics import fitted_potential
from ..train.trainer import Trainer

__all__ = ["FinetuneOptions", "load_pretrained", "make_finetune_potential", "layerwise_param_groups",
           "FinetuneTrainer", "finetune_forcefield"]


# ---------------------------------------------------------------------------- loading
def load_pretrained(path: Union[str, Path]) -> Tuple[Potential, Dict[str, Any]]:
    """(Potential in float32, pretraining record) from a pretraining output or any oreo model file."""
    try:
        mf = open_model_file(path)         # a file, or the name of a shipped (pretrained) model
    except ModelFileNotFound:
        raise FileNotFoundError(f"pretrained model {path} not found (pass pretrained.pt or last.pt of an "
                                "`oreo pretrain` run, or a shipped name: see `oreo models`)") from None
    return mf.trainable(), {"path": str(mf.path), **mf.pretraining}


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
    options = options or FinetuneOptions()
    torch.manual_seed(seed)
    meta = {"pretrained": pretrained.metadata.get("pretrained", {}), "finetune": asdict(options)}
    pot = fitted_potential(pretrained.config["backbone"], train, val, metadata=meta,
                           scale=float(pretrained.scale) if options.reuse_head else None)
    src = pretrained.state_dict()
    own = pot.state_dict()
    take = [k for k in src if k.startswith("backbone.") or (options.reuse_head and k.startswith("head."))]
    missing = [k for k in own if k.startswith("backbone.") and k not in src]
    if missing:
        raise ValueError(f"pretrained backbone lacks parameters {missing[:5]}: different architecture?")
    pot.load_state_dict({**own, **{k: src[k] for k in take}})
    return pot.to(next(pretrained.parameters()).dtype)


def _depth(name: str, num_layers: int) -> int:
    """Depth of a parameter: 0 embeddings/radial basis, k+1 interaction layer k, L the output norm, L+1 head
    (names of a Potential, or of a model that holds one as ``potential``)."""
    if name.startswith("potential."):
        name = name[len("potential."):]
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
                 options: Optional[FinetuneOptions] = None, progress: bool = True, log: Callable = print,
                 state_file: Optional[Path] = None):
        self.options = options or FinetuneOptions()
        super().__init__(config, out, splits=splits, init_model=init_model, progress=progress, log=log,
                         state_file=state_file)

    def parameter_groups(self) -> List[Dict[str, Any]]:
        o = self.cfg.optim
        if self.options.layer_decay or self.options.backbone_lr_factor != 1.0:
            return layerwise_param_groups(self.model, o.lr, self.options.layer_decay, self.options.backbone_lr_factor)
        return super().parameter_groups()


def finetune_forcefield(pretrained: Union[str, Path], config: Config, out: Union[str, Path],
                        options: Optional[FinetuneOptions] = None, resume: bool = False, progress: bool = True,
                        log: Callable[[str], None] = print, state_file: Optional[Path] = None,
                        pause_minutes: Optional[float] = None) -> Dict[str, Any]:
    """Fine-tune on the frames ``config.data`` describes (e.g. rMD17 aspirin, ``train_size`` frames); returns the
    test metrics (``test_metrics.json``). ``--resume`` continues the fine-tuning run in ``out``; ``state_file``
    keeps its compact run state (see :class:`~forcefield.train.trainer.Trainer`); ``pause_minutes``: this
    invocation's deadline (see :meth:`~forcefield.train.loop.EpochTrainer.fit`)."""
    from ..train.datasets import build_splits
    options = options or FinetuneOptions()
    pot, info = load_pretrained(pretrained)
    splits = build_splits(config.data, config.optim.seed)
    model = make_finetune_potential(pot, splits.train, splits.val, options, config.optim.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "finetune.json", {"pretrained": info, "options": asdict(options)}, default=str)
    log(f"fine-tuning from {pretrained} ({info.get('method', 'unknown method')}, "
        f"{info.get('steps', '?')} pretraining steps)")
    trainer = FinetuneTrainer(config, out, splits=splits, init_model=model, options=options, progress=progress,
                              log=log, state_file=state_file)
    return trainer.fit(resume=resume, pause_minutes=pause_minutes)


