"""Backbones (representations: atoms and edges in, per-atom scalar and vector features out) and output heads,
kept apart as in TorchMD-Net. ``create_backbone`` builds one from a config dict.

Imports nothing of oreo (torch only); :mod:`forcefield.potential` puts backbone and head together, the
pretraining objectives add heads of their own, and the speed reference in the tests mirrors them.
"""
from typing import Any, Dict

from torch import nn

from .egnn import EGNN
from .et import EquivariantTransformer
from .heads import EquivariantScalarHead, EquivariantVectorHead

BACKBONES = {"et": EquivariantTransformer, "egnn": EGNN}


def create_backbone(config: Dict[str, Any]) -> nn.Module:
    """Build a backbone from ``{"name": "et", **hyperparameters}``."""
    cfg = dict(config)
    name = cfg.pop("name", "et").lower()
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](**cfg)


__all__ = ["EquivariantTransformer", "EGNN", "EquivariantScalarHead", "EquivariantVectorHead", "create_backbone",
           "BACKBONES"]
