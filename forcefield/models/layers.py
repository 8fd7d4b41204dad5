"""Building blocks shared by the backbones: cutoff, radial basis, gated equivariant blocks."""
import math

import torch
from torch import Tensor, nn


class CosineCutoff(nn.Module):
    """0.5 (cos(pi r / rc) + 1) for r < rc, else 0. Value and slope vanish at rc."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, r: Tensor) -> Tensor:
        return 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0) * (r < self.cutoff).to(r.dtype)


class ExpNormalSmearing(nn.Module):
    """ExpNormal radial basis (PhysNet / TorchMD-Net): exp(-beta (exp(-alpha r) - mu)^2).

    The basis is *not* multiplied by the cutoff here; callers multiply messages by it.
    """

    def __init__(self, cutoff: float, num_rbf: int):
        super().__init__()
        self.alpha = 5.0 / cutoff
        start = math.exp(-cutoff)
        self.register_buffer("means", torch.linspace(start, 1.0, num_rbf))
        self.register_buffer("betas", torch.full((num_rbf,), (2.0 / num_rbf * (1.0 - start)) ** -2))

    def forward(self, r: Tensor) -> Tensor:
        return torch.exp(-self.betas * (torch.exp(-self.alpha * r).unsqueeze(-1) - self.means) ** 2)


def safe_norm(v: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Euclidean norm with a finite gradient (and second derivative) at zero."""
    return torch.sqrt(v.pow(2).sum(dim) + eps)


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (Schütt et al., PaiNN): mixes scalars and vector norms,
    gates the vectors by scalars. Input x (N, F), vec (N, 3, F)."""

    def __init__(self, in_features: int, out_features: int, scalar_activation: bool):
        super().__init__()
        self.out_features = out_features
        self.vec_proj = nn.Linear(in_features, 2 * out_features, bias=False)
        self.update = nn.Sequential(nn.Linear(in_features + out_features, in_features), nn.SiLU(),
                                    nn.Linear(in_features, 2 * out_features))
        self.scalar_activation = scalar_activation
        self.act = nn.SiLU()
        nn.init.xavier_uniform_(self.vec_proj.weight)
        for m in self.update:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, vec: Tensor):
        v = self.vec_proj(vec)
        v1, v2 = torch.split(v, self.out_features, dim=-1)
        h = self.update(torch.cat([x, safe_norm(v1, 1)], dim=-1))
        x_out, gate = torch.split(h, self.out_features, dim=-1)
        vec_out = gate.unsqueeze(1) * v2
        if self.scalar_activation:
            x_out = self.act(x_out)
        return x_out, vec_out
