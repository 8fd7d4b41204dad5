"""Small shared builders for the tests: tiny models and hand-made molecules."""
import sys
from pathlib import Path

import numpy as np
import torch

from forcefield.io import cast_potential
from forcefield.potential import Potential

# a training config of tiny size on 24 ethanol frames (seconds per epoch)
TINY_TRAIN_CFG = {
    "data": {"molecule": "ethanol", "train_size": 24, "val_size": 8, "test_size": 16},
    "model": {"hidden": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff": 4.0},
    "optim": {"epochs": 6, "batch_size": 4, "lr": 5e-3, "lr_warmup_steps": 2, "ema_decay": 0.5, "seed": 3},
}


def tiny_train_config(**optim):
    """:data:`TINY_TRAIN_CFG` with ``optim`` overrides, as a training ``Config``."""
    import json
    from forcefield.train import config_from_dict
    d = json.loads(json.dumps(TINY_TRAIN_CFG))
    d["optim"].update(optim)
    return config_from_dict(d)


TINY = {"name": "et", "hidden": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff": 4.0}

# ethanol-like geometry (Å), atomic numbers C C O H H H H H H
ETHANOL_Z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
ETHANOL_R = np.array([
    [-0.0047, -0.5716, 0.0000], [1.5143, -0.5716, 0.0000], [1.9887, 0.7700, 0.0000],
    [-0.3874, 0.4505, 0.0000], [-0.3874, -1.0826, 0.8850], [-0.3874, -1.0826, -0.8850],
    [1.8970, -1.0826, 0.8850], [1.8970, -1.0826, -0.8850], [2.9500, 0.7700, 0.0000]])


def tiny_potential(dtype=torch.float64, seed=0, elements=(1, 6, 8), repulsion=True, molecule="ethanol",
                   **overrides) -> Potential:
    """A random-weight ET potential; ``overrides`` change the backbone config."""
    torch.manual_seed(seed)
    cfg = {**TINY, **overrides}
    pot = Potential(backbone=cfg, elements=list(elements), atomref={1: -13.6, 6: -1029.0, 8: -2041.0},
                    scale=0.7, shift=0.01, metadata={"molecule": molecule}, repulsion=repulsion)
    # random (non-zero) weights everywhere, so symmetry tests are not passed by a trivial model
    with torch.no_grad():
        for p in pot.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cast_potential(pot, "cpu", dtype).eval()


def random_rotation(seed=0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def import_campaign(name: str = "campaign"):
    """``benchmarks/<name>.py`` (the campaign runner, or ``campaign_gpu``) as a module (benchmarks/ is not a
    package)."""
    import importlib
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
