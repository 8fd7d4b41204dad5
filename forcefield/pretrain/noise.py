"""Perturbations of molecular geometries and their score targets.

Shapes: ``pos``/``perturbed`` (N, 3) Å of a flat batch, ``batch`` (N,) graph index, ``sigma`` a float, a (B,)
per-graph or an (N, 1) per-atom tensor. Everything is differentiable (tests take finite differences) but the
training code calls these under ``torch.no_grad()``.

Gaussian noise (coordinate denoising, Zaidi et al. 2023; force denoising of ET-OREO)
    x~ = x + eps, eps ~ N(0, sigma^2). Score: -eps / sigma^2.

Riemann-Gaussian noise (3D-EMGP, Jiao et al., AAAI 2023)
    p_sigma(x~ | x) ∝ exp(-d^2(x~, x) / (4 sigma^2)) with the E(3)-invariant distance
    d^2 = || X~ X~^T - X X^T ||_F^2 of the centred coordinates (N x N Gram matrices), which equals
    ||X~^T X~||^2 - 2 ||X^T X~||^2 + ||X^T X||^2 with 3 x 3 matrices. Its score is
    grad log p = -(X~ (X~^T X~) - X (X^T X~)) / sigma^2. The paper regresses a normalised version,
    -2 (X~ (X~^T X~) - X (X^T X~)) / (||X~^T X~||_F + ||X^T X~||_F) / sigma, which is O(1) for every sigma;
    :func:`riemann_force_target` returns that. Samples come from Langevin steps on p (:func:`riemann_perturb`;
    one step from x~ = x is plain Gaussian noise, since the score vanishes at x~ = x).
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["sigma_schedule", "per_atom_sigma", "center", "gaussian_perturb", "gaussian_score",
           "riemann_gram", "riemann_distance_sq", "riemann_log_density", "riemann_score", "riemann_force_target",
           "riemann_perturb"]


def sigma_schedule(begin: float = 10.0, end: float = 0.01, num: int = 50, dtype=torch.float64) -> Tensor:
    """Geometric sequence of ``num`` noise levels from ``begin`` to ``end`` (Å)."""
    if begin <= 0 or end <= 0 or num < 1:
        raise ValueError(f"noise levels must be positive and num >= 1, got begin={begin}, end={end}, num={num}")
    return torch.exp(torch.linspace(math.log(begin), math.log(end), num, dtype=dtype))


def per_atom_sigma(sigma, batch: Tensor, dtype: torch.dtype) -> Tensor:
    """``sigma`` (float, (B,) or (N, 1)) -> (N, 1)."""
    if not torch.is_tensor(sigma):
        return torch.full((batch.shape[0], 1), float(sigma), dtype=dtype, device=batch.device)
    if sigma.dim() == 2:
        return sigma.to(dtype)
    return sigma.to(dtype)[batch].unsqueeze(-1)


def _num_graphs(batch: Tensor) -> int:
    return int(batch.max()) + 1 if batch.numel() else 0


def center(pos: Tensor, batch: Tensor, num_graphs: Optional[int] = None) -> Tensor:
    """Positions minus their per-graph mean."""
    b = _num_graphs(batch) if num_graphs is None else num_graphs
    total = torch.zeros((b, 3), dtype=pos.dtype, device=pos.device).index_add_(0, batch, pos)
    count = torch.zeros(b, dtype=pos.dtype, device=pos.device).index_add_(0, batch, torch.ones_like(pos[:, 0]))
    return pos - (total / count.clamp_min(1).unsqueeze(-1))[batch]


def gaussian_perturb(pos: Tensor, sigma, batch: Tensor, generator: Optional[torch.Generator] = None
                     ) -> Tuple[Tensor, Tensor]:
    """(x + eps, eps) with eps ~ N(0, sigma^2) per component."""
    s = per_atom_sigma(sigma, batch, pos.dtype)
    eps = torch.randn(pos.shape, generator=generator, dtype=pos.dtype, device="cpu").to(pos.device) * s
    return pos + eps, eps


def gaussian_score(perturbed: Tensor, pos: Tensor, sigma, batch: Tensor) -> Tensor:
    """grad_{x~} log N(x~; x, sigma^2) = -(x~ - x) / sigma^2."""
    s = per_atom_sigma(sigma, batch, pos.dtype)
    return -(perturbed - pos) / s ** 2


def riemann_gram(perturbed: Tensor, pos: Tensor, batch: Tensor, num_graphs: Optional[int] = None
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Centred coordinates and the per-graph 3x3 products: (X~c, Xc, X~^T X~ (B,3,3), X^T X~ (B,3,3), X^T X)."""
    b = _num_graphs(batch) if num_graphs is None else num_graphs
    pc = center(perturbed, batch, b)
    xc = center(pos, batch, b)
    outer = lambda a, c: (a.unsqueeze(-1) * c.unsqueeze(-2)).reshape(-1, 9)  # a_i^T c_i per atom
    zeros = torch.zeros((b, 9), dtype=pos.dtype, device=pos.device)
    ptp = zeros.index_add(0, batch, outer(pc, pc)).view(b, 3, 3)
    otp = zeros.index_add(0, batch, outer(xc, pc)).view(b, 3, 3)
    oto = zeros.index_add(0, batch, outer(xc, xc)).view(b, 3, 3)
    return pc, xc, ptp, otp, oto


def riemann_distance_sq(perturbed: Tensor, pos: Tensor, batch: Tensor, num_graphs: Optional[int] = None) -> Tensor:
    """(B,) d^2 = ||X~ X~^T - X X^T||_F^2 of the centred coordinates (invariant to rotations of either)."""
    _, _, ptp, otp, oto = riemann_gram(perturbed, pos, batch, num_graphs)
    sq = lambda m: m.pow(2).sum(dim=(1, 2))
    return sq(ptp) - 2.0 * sq(otp) + sq(oto)


def riemann_log_density(perturbed: Tensor, pos: Tensor, sigma, batch: Tensor,
                        num_graphs: Optional[int] = None) -> Tensor:
    """(B,) log p_sigma(x~ | x) up to its normaliser: -d^2 / (4 sigma^2). ``sigma``: float or (B,)."""
    s = torch.as_tensor(sigma, dtype=pos.dtype, device=pos.device)
    return -riemann_distance_sq(perturbed, pos, batch, num_graphs) / (4.0 * s ** 2)


def riemann_score(perturbed: Tensor, pos: Tensor, sigma, batch: Tensor, num_graphs: Optional[int] = None) -> Tensor:
    """(N, 3) exact grad_{x~} log p_sigma(x~ | x) = -(X~c (X~^T X~) - Xc (X^T X~)) / sigma^2."""
    pc, xc, ptp, otp, _ = riemann_gram(perturbed, pos, batch, num_graphs)
    s = per_atom_sigma(sigma, batch, pos.dtype)
    g = torch.einsum("nk,nkl->nl", pc, ptp[batch]) - torch.einsum("nk,nkl->nl", xc, otp[batch])
    return -g / s ** 2


def riemann_force_target(perturbed: Tensor, pos: Tensor, sigma, batch: Tensor,
                         num_graphs: Optional[int] = None) -> Tensor:
    """(N, 3) the 3D-EMGP regression target: the score normalised per graph,
    -2 (X~c X~^T X~ - Xc X^T X~) / (||X~^T X~||_F + ||X^T X~||_F) / sigma
    = riemann_score * 2 sigma / (||X~^T X~||_F + ||X^T X~||_F)."""
    pc, xc, ptp, otp, _ = riemann_gram(perturbed, pos, batch, num_graphs)
    s = per_atom_sigma(sigma, batch, pos.dtype)
    g = torch.einsum("nk,nkl->nl", pc, ptp[batch]) - torch.einsum("nk,nkl->nl", xc, otp[batch])
    norm = torch.linalg.matrix_norm(ptp) + torch.linalg.matrix_norm(otp)
    return -2.0 * g / norm.clamp_min(1e-12)[batch].unsqueeze(-1) / s


def riemann_perturb(pos: Tensor, sigma, batch: Tensor, steps: int = 1, generator: Optional[torch.Generator] = None,
                    num_graphs: Optional[int] = None) -> Tensor:
    """Samples of the Riemann-Gaussian by ``steps`` Langevin steps from x (step sizes 1/2, 1/4, ...), driven by
    the normalised score as in the paper: x~ <- x~ + a s + sqrt(2 a) sigma eps."""
    s = per_atom_sigma(sigma, batch, pos.dtype)
    out = pos
    for t in range(1, steps + 1):
        alpha = 1.0 / 2 ** t
        drift = riemann_force_target(out, pos, s, batch, num_graphs) * s  # the paper's un-divided target
        eps = torch.randn(pos.shape, generator=generator, dtype=pos.dtype, device="cpu").to(pos.device)
        out = out + alpha * drift + math.sqrt(2 * alpha) * s * eps
    return out
