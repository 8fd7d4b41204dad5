"""Equivariant Transformer (after Thölke & De Fabritiis, ICLR 2022 / TorchMD-Net "ET").

Representation only: atoms and edges in, per-atom scalars ``x`` (N, F) and vectors
``vec`` (N, 3, F) out. Knows nothing of energies, files or training.

Differences from TorchMD-Net, on purpose:
- every message (scalar *and* vector) is multiplied by the cosine cutoff, so the energy and
  its gradient are continuous when an atom crosses the cutoff;
- the q/k/v projections and the two distance projections are fused into one matrix each
  (fewer, larger ops: the model is overhead-bound on small molecules).
"""
from typing import Tuple

import torch
from torch import Tensor, nn

from .layers import CosineCutoff, ExpNormalSmearing


class NeighborEmbedding(nn.Module):
    """x_i <- W [emb(Z_i), sum_j cut(r_ij) W_r(rbf_ij) * emb'(Z_j)]."""

    def __init__(self, hidden: int, num_rbf: int, max_z: int):
        super().__init__()
        self.embedding = nn.Embedding(max_z, hidden)
        self.distance_proj = nn.Linear(num_rbf, hidden)
        self.combine = nn.Linear(2 * hidden, hidden)
        for lin in (self.distance_proj, self.combine):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, z: Tensor, edge_index: Tensor, rbf: Tensor, cut: Tensor) -> Tensor:
        i, j = edge_index[0], edge_index[1]
        w = self.distance_proj(rbf) * cut.unsqueeze(-1)
        msg = w * self.embedding(z)[j]
        agg = torch.zeros_like(x).index_add_(0, i, msg)
        return self.combine(torch.cat([x, agg], dim=-1))


class EquivariantAttention(nn.Module):
    """One ET interaction layer: multi-head attention over neighbours with vector features."""

    def __init__(self, hidden: int, num_heads: int, num_rbf: int):
        super().__init__()
        if hidden % num_heads != 0:
            raise ValueError(f"hidden size {hidden} must be divisible by the number of heads {num_heads}")
        self.hidden = hidden
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 5 * hidden)          # q, k, v (3 parts)
        self.vec_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.dkv = nn.Linear(num_rbf, 4 * hidden)        # dk, dv (3 parts)
        self.out = nn.Linear(hidden, 3 * hidden)
        self.act = nn.SiLU()
        for lin in (self.qkv, self.dkv, self.out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.xavier_uniform_(self.vec_proj.weight)

    def forward(self, x: Tensor, vec: Tensor, edge_index: Tensor, rbf: Tensor, cut: Tensor,
                unit: Tensor) -> Tuple[Tensor, Tensor]:
        n, h, nh, hd = x.shape[0], self.hidden, self.num_heads, self.head_dim
        i, j = edge_index[0], edge_index[1]
        e = i.shape[0]

        q, k, v = torch.split(self.qkv(self.norm(x)), [h, h, 3 * h], dim=-1)
        vec1, vec2, vec3 = torch.split(self.vec_proj(vec), h, dim=-1)
        vec_dot = (vec1 * vec2).sum(dim=1)

        dk, dv = torch.split(self.act(self.dkv(rbf)), [h, 3 * h], dim=-1)
        attn = (q[i] * k[j] * dk).view(e, nh, hd).sum(-1)                 # (E, heads)
        attn = self.act(attn) * cut.unsqueeze(-1)
        vj = (v[j] * dv).view(e, nh, 3 * hd)
        xm, v1, v2 = torch.split(vj, hd, dim=-1)                          # (E, heads, hd)
        xm = (xm * attn.unsqueeze(-1)).reshape(e, h)
        cut_e = cut.view(e, 1, 1)
        v1 = v1.reshape(e, 1, h) * cut_e
        v2 = v2.reshape(e, 1, h) * cut_e
        vm = vec[j] * v1 + v2 * unit.unsqueeze(-1)                        # (E, 3, h)

        x_agg = torch.zeros((n, h), dtype=x.dtype, device=x.device).index_add_(0, i, xm)
        vec_agg = torch.zeros((n, 3, h), dtype=x.dtype, device=x.device).index_add_(0, i, vm)

        o1, o2, o3 = torch.split(self.out(x_agg), h, dim=-1)
        dx = vec_dot * o2 + o3
        dvec = vec3 * o1.unsqueeze(1) + vec_agg
        return x + dx, vec + dvec


class EquivariantTransformer(nn.Module):
    """ET backbone. Input: atomic numbers (N,), edge_index (2, E), edge_vec (E, 3) Å.
    Output: scalars (N, hidden), vectors (N, 3, hidden)."""

    def __init__(self, hidden: int = 128, num_layers: int = 6, num_heads: int = 8, num_rbf: int = 32,
                 cutoff: float = 5.0, max_z: int = 100):
        super().__init__()
        self.hidden = hidden
        self.cutoff = cutoff
        self.embedding = nn.Embedding(max_z, hidden)
        self.rbf = ExpNormalSmearing(cutoff, num_rbf)
        self.cutoff_fn = CosineCutoff(cutoff)
        self.neighbor_embedding = NeighborEmbedding(hidden, num_rbf, max_z)
        self.layers = nn.ModuleList([EquivariantAttention(hidden, num_heads, num_rbf) for _ in range(num_layers)])
        self.out_norm = nn.LayerNorm(hidden)

    def forward(self, z: Tensor, edge_index: Tensor, edge_vec: Tensor) -> Tuple[Tensor, Tensor]:
        r = torch.sqrt(edge_vec.pow(2).sum(-1))
        unit = edge_vec / r.unsqueeze(-1)
        rbf = self.rbf(r)
        cut = self.cutoff_fn(r)
        x = self.embedding(z)
        x = self.neighbor_embedding(x, z, edge_index, rbf, cut)
        vec = torch.zeros((x.shape[0], 3, self.hidden), dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, vec = layer(x, vec, edge_index, rbf, cut, unit)
        return self.out_norm(x), vec
