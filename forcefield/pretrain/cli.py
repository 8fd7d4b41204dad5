"""``oreo pretrain`` and ``oreo finetune``: argument parsing only; the work is done by the library.

Multi-process: ``torchrun --nproc_per_node=N $(which oreo) pretrain --config ... --out ...``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from ..settings import (add_set_argument, add_state_argument, apply_overrides, command_config, from_mapping,
                        read_yaml, set_in)
from ..threads import add_threads_argument

__all__ = ["register_subcommands", "add_pretrain_parser", "add_finetune_parser", "cmd_pretrain", "cmd_finetune"]

PRETRAIN_HINT = "see examples/configs/pretrain_*.yaml"


def _set_given(d: Dict[str, Any], values: Dict[str, Any]) -> None:
    """The command-line options that were given (not None) into the config mapping ``d``."""
    for key, value in values.items():
        if value is not None:
            set_in(d, key, value)


# ---------------------------------------------------------------------------- pretrain
def cmd_pretrain(args: argparse.Namespace) -> int:
    from .distributed import cleanup, init_distributed
    from .trainer import Pretrainer, pretrain_config_from_dict
    out = Path(args.out)
    d = command_config(args.config, out, args.resume, hint=PRETRAIN_HINT)
    if args.corpus:
        from .corpus_pack import is_packed_corpus
        d["corpus"] = ({"packed": str(args.corpus)} if is_packed_corpus(args.corpus)
                       else read_yaml(args.corpus, "corpus", PRETRAIN_HINT))
    _set_given(d, {"objectives.method": args.method, "optim.max_steps": args.max_steps, "optim.device": args.device,
                   "optim.threads": args.threads})
    d = apply_overrides(d, args.set)
    if args.data_dir:
        d["corpus"] = dict(d["corpus"] if isinstance(d.get("corpus"), dict) else {"sources": d.get("corpus") or []},
                           data_dir=args.data_dir)
    cfg = pretrain_config_from_dict(d)
    if args.pack_corpus:
        return _pack_corpus(cfg, Path(args.pack_corpus))
    info = init_distributed(cfg.optim.device)
    try:
        result = Pretrainer(cfg, out, dist_info=info, progress=not args.no_progress,
                            state_file=args.state).fit(resume=args.resume)
    finally:
        cleanup(info)
    if info.is_main:
        print(json.dumps(result, indent=2))
    return 0


def _pack_corpus(cfg, path: Path) -> int:
    """``--pack-corpus FILE``: the corpus's sources that the method's objectives use, in one compact file."""
    from .corpus_pack import open_corpus, save_packed_corpus
    from .objectives import build_objectives, frames_used
    corpus = open_corpus(cfg.corpus)
    objectives = build_objectives(cfg.objectives, int(cfg.model.get("hidden", 128)))
    keep = corpus.sources_used(frames_used(objectives.values(), corpus.has_forces, corpus.frames.equilibrium))
    save_packed_corpus(corpus, path, sources=keep)
    left_out = [n for n, k in zip(corpus.names, keep) if not k]
    print(json.dumps({"packed": str(path), "megabytes": round(path.stat().st_size / 1e6, 2),
                      "frames": int(sum(len(corpus.source_frames(k)) for k in range(len(keep)) if keep[k])),
                      "left_out": left_out, "method": cfg.objectives.method}, indent=2))
    return 0


def add_pretrain_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pretrain", help="pretrain a model on a corpus of equilibrium and off-equilibrium data "
                                        "(ET-OREO, ET-ORO, 3D-EMGP, denoising)")
    p.add_argument("--config", help="pretraining YAML (corpus, model, objectives, optim); "
                                    "see examples/configs/pretrain_*.yaml")
    p.add_argument("--corpus", help="corpus YAML (a list of sources, or {sources, leakage}), or a packed corpus "
                                    "(.npz of --pack-corpus); replaces the config's corpus")
    p.add_argument("--pack-corpus", metavar="FILE.npz",
                   help="only build the corpus and write the sources the method's objectives use into FILE.npz "
                        "(float32, compressed), to pretrain where the data is not (--corpus FILE.npz there)")
    p.add_argument("--method", help="et-oreo | et-oro | 3d-emgp | denoise (overrides objectives.method)")
    p.add_argument("--out", default="runs/pretrain", help="output folder (last.pt, pretrained.pt, metrics.csv)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--device", help="auto | cpu | cuda")
    add_set_argument(p)
    add_state_argument(p)
    p.add_argument("--data-dir", help="data folder for relative source paths (default: $OREO_DATA_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    p.set_defaults(func=cmd_pretrain)
    return p


# ---------------------------------------------------------------------------- finetune
def cmd_finetune(args: argparse.Namespace) -> int:
    out = Path(args.out)
    d = dict(read_yaml(args.config, "config", PRETRAIN_HINT) or {}) if args.config else {}
    pretrained = args.pretrained or d.pop("from", None)
    d.pop("from", None)
    if args.property or "property" in d:
        return _finetune_property(args, d, pretrained, out)
    import yaml

    from ..files import atomic_write_text
    from ..train import config_from_dict
    from .finetune import FinetuneOptions, finetune_forcefield
    if args.resume and not args.config:
        d = command_config(None, out, True)                # what the run was started with
        if (out / "finetune.yaml").is_file():
            d.update(read_yaml(out / "finetune.yaml") or {})
        pretrained = pretrained or d.get("from")
        d.pop("from", None)
    if not pretrained:
        raise SystemExit("oreo finetune: say which pretrained model to start from: --from PATH (pretrained.pt)")
    _set_given(d, {"data.molecule": args.molecule, "data.train_size": args.train_size, "data.val_size": args.val_size,
                   "data.split_index": args.split_index, "data.data_dir": args.data_dir, "optim.epochs": args.epochs,
                   "optim.max_minutes": args.max_minutes})
    d = apply_overrides(d, args.set)                       # --set finetune.layer_decay=... too
    opts = dict(d.pop("finetune", None) or {})
    if args.layer_decay is not None:
        opts["layer_decay"] = args.layer_decay
    if args.backbone_lr_factor is not None:
        opts["backbone_lr_factor"] = args.backbone_lr_factor
    if args.reuse_head:
        opts["reuse_head"] = True
    d.pop("model", None)  # the architecture comes from the pretrained model
    cfg = config_from_dict(d)
    options = from_mapping(FinetuneOptions, opts, "finetune")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "finetune.yaml", yaml.safe_dump({"from": str(pretrained), "finetune": opts}, sort_keys=False))
    metrics = finetune_forcefield(pretrained, cfg, out, options, resume=args.resume, progress=not args.no_progress,
                                  state_file=args.state)
    print(json.dumps(metrics, indent=2))
    return 0


def _finetune_property(args, d: Dict[str, Any], pretrained, out: Path) -> int:
    from .property import PropertyConfig, finetune_property
    pc = dict(d.get("property") or {}) if isinstance(d.get("property"), dict) else {}
    if isinstance(d.get("property"), str):
        pc["property"] = d["property"]
    _set_given(pc, {"property": args.property, "train_size": args.train_size, "val_size": args.val_size,
                    "epochs": args.epochs, "max_minutes": args.max_minutes, "layer_decay": args.layer_decay,
                    "backbone_lr_factor": args.backbone_lr_factor, "source": args.qm9_source,
                    "data_dir": args.data_dir})
    pc = apply_overrides({"property": pc}, args.set)["property"]
    metrics = finetune_property(pretrained, PropertyConfig.from_dict(pc), out, resume=args.resume,
                                progress=not args.no_progress, state_file=args.state)
    print(json.dumps(metrics, indent=2))
    return 0


def add_finetune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="fine-tune a pretrained model on a force field (rMD17 molecule) or a "
                                        "QM9 property")
    p.add_argument("--from", dest="pretrained", help="pretrained.pt (or last.pt) of `oreo pretrain`; for "
                                                     "--property, leave out to train from scratch")
    p.add_argument("--config", help="YAML: a training config (data, optim) plus optional 'from' and 'finetune' "
                                    "(reuse_head, layer_decay, backbone_lr_factor); or 'property: {...}'")
    p.add_argument("--molecule", help="rMD17 molecule, e.g. aspirin")
    p.add_argument("--train-size", type=int, help="number of fine-tuning training frames (molecules for --property)")
    p.add_argument("--val-size", type=int)
    p.add_argument("--split-index", type=int, help="rMD17 split file 1..5")
    p.add_argument("--property", help="QM9 property instead of a force field: homo, lumo, gap, ...")
    p.add_argument("--qm9-source", help="QM9 data for --property (default: qm9pack or $OREO_DATA_DIR/qm9)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay, e.g. 0.8 (head: lr, first layer "
                                                     "smallest)")
    p.add_argument("--backbone-lr-factor", type=float, help="multiply every backbone lr by this")
    p.add_argument("--reuse-head", action="store_true", help="keep the pretrained energy head")
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--resume", action="store_true")
    add_set_argument(p)
    add_state_argument(p)
    p.add_argument("--data-dir")
    p.add_argument("--no-progress", action="store_true")
    add_threads_argument(p)
    p.set_defaults(func=cmd_finetune)
    return p


def register_subcommands(sub) -> None:
    """Add ``pretrain`` and ``finetune`` to the ``oreo`` sub-parsers."""
    add_pretrain_parser(sub)
    add_finetune_parser(sub)
