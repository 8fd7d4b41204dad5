"""The optimised model computes the same function as the original one.

``_Ref*`` below is a frozen copy of the math of ``forcefield/models/{et,layers,heads}.py``,
``forcefield/graph.py`` and ``Potential.forward`` as they were before the speed work (commit
42d352f). Module and parameter names are identical, so a reference model loads the optimised
model's state dict as is. Energies and forces must agree to ~1e-10 (float64); the optimised
code may sum in another order, nothing else.
"""
import math
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from forcefield.io import cast_potential
from forcefield.potential import Potential
from tests.helpers import ETHANOL_R, ETHANOL_Z

# ---------------------------------------------------------------------------------------------------------------
# frozen reference (original code; do not optimise)
# ---------------------------------------------------------------------------------------------------------------


def _ref_pairs_within(pos: Tensor, batch: Tensor, cutoff: float) -> Tensor:
    with torch.no_grad():
        p = pos.detach()
        same = batch.unsqueeze(0) == batch.unsqueeze(1)
        d2 = (p.unsqueeze(0) - p.unsqueeze(1)).pow(2).sum(-1)
        mask = same & (d2 < cutoff * cutoff)
        mask.fill_diagonal_(False)
        return mask.nonzero().t()


def _ref_periodic_pairs(pos, batch, cutoff, cell, pbc):
    with torch.no_grad():
        c = cell.detach()
        frac = torch.einsum("nx,nxk->nk", pos.detach(), torch.linalg.inv(c)[batch])
        offset = torch.floor(frac) * pbc[batch].to(frac.dtype)
        p = pos.detach() - torch.einsum("nk,nkx->nx", offset, c[batch])
        vol = torch.linalg.det(c).abs()
        cross = torch.stack([torch.linalg.cross(c[:, 1], c[:, 2], dim=-1), torch.linalg.cross(c[:, 2], c[:, 0], dim=-1),
                             torch.linalg.cross(c[:, 0], c[:, 1], dim=-1)], dim=1)
        spacing = vol.unsqueeze(-1) / torch.linalg.norm(cross, dim=-1).clamp_min(1e-12)
        n_img = torch.ceil(cutoff / spacing).to(torch.long) * pbc.to(torch.long)
        nmax = n_img.max(dim=0).values
        rng = [torch.arange(-int(nmax[k]), int(nmax[k]) + 1, device=pos.device) for k in range(3)]
        shifts = torch.cartesian_prod(rng[0], rng[1], rng[2]).reshape(-1, 3)
        same = batch.unsqueeze(0) == batch.unsqueeze(1)
        pairs = same.nonzero()
        ii, jj = pairs[:, 0], pairs[:, 1]
        g = batch[ii]
        cart = torch.einsum("sk,pkx->psx", shifts.to(p.dtype), c[g])
        d = p[jj].unsqueeze(1) + cart - p[ii].unsqueeze(1)
        ok = d.pow(2).sum(-1) < cutoff * cutoff
        allowed = (shifts.abs().unsqueeze(0) <= n_img[g].unsqueeze(1)).all(-1)
        self_pair = (ii == jj).unsqueeze(1) & (shifts == 0).all(-1).unsqueeze(0)
        ok = ok & allowed & ~self_pair
        hit = ok.nonzero()
        pi, si = hit[:, 0], hit[:, 1]
        edge_index = torch.stack([ii[pi], jj[pi]])
        unwrapped = shifts[si] - offset[jj[pi]].to(torch.long) + offset[ii[pi]].to(torch.long)
        return edge_index, unwrapped


def _ref_radius_graph(positions, batch, cutoff, cell=None, pbc=None):
    if cell is not None and pbc is not None and bool(pbc.any()):
        edge_index, shifts = _ref_periodic_pairs(positions, batch, cutoff, cell, pbc)
        i, j = edge_index[0], edge_index[1]
        cart = torch.einsum("ek,ekx->ex", shifts.to(positions.dtype), cell[batch[i]].to(positions.dtype))
        return edge_index, positions[j] - positions[i] + cart
    edge_index = _ref_pairs_within(positions, batch, cutoff)
    return edge_index, positions[edge_index[1]] - positions[edge_index[0]]


class _RefCosineCutoff(nn.Module):
    def __init__(self, cutoff):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, r):
        return 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0) * (r < self.cutoff).to(r.dtype)


class _RefExpNormalSmearing(nn.Module):
    def __init__(self, cutoff, num_rbf):
        super().__init__()
        self.alpha = 5.0 / cutoff
        start = math.exp(-cutoff)
        self.register_buffer("means", torch.linspace(start, 1.0, num_rbf))
        self.register_buffer("betas", torch.full((num_rbf,), (2.0 / num_rbf * (1.0 - start)) ** -2))

    def forward(self, r):
        return torch.exp(-self.betas * (torch.exp(-self.alpha * r).unsqueeze(-1) - self.means) ** 2)


def _ref_safe_norm(v, dim, eps=1e-8):
    return torch.sqrt(v.pow(2).sum(dim) + eps)


class _RefGatedEquivariantBlock(nn.Module):
    def __init__(self, in_features, out_features, scalar_activation):
        super().__init__()
        self.out_features = out_features
        self.vec_proj = nn.Linear(in_features, 2 * out_features, bias=False)
        self.update = nn.Sequential(nn.Linear(in_features + out_features, in_features), nn.SiLU(),
                                    nn.Linear(in_features, 2 * out_features))
        self.scalar_activation = scalar_activation
        self.act = nn.SiLU()

    def forward(self, x, vec):
        v = self.vec_proj(vec)
        v1, v2 = torch.split(v, self.out_features, dim=-1)
        h = self.update(torch.cat([x, _ref_safe_norm(v1, 1)], dim=-1))
        x_out, gate = torch.split(h, self.out_features, dim=-1)
        vec_out = gate.unsqueeze(1) * v2
        if self.scalar_activation:
            x_out = self.act(x_out)
        return x_out, vec_out


class _RefHead(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.block1 = _RefGatedEquivariantBlock(hidden, hidden // 2, scalar_activation=True)
        self.block2 = _RefGatedEquivariantBlock(hidden // 2, 1, scalar_activation=False)

    def forward(self, x, vec):
        x, vec = self.block1(x, vec)
        x, vec = self.block2(x, vec)
        return x.squeeze(-1) + 0.0 * vec.sum(dim=(1, 2))


class _RefNeighborEmbedding(nn.Module):
    def __init__(self, hidden, num_rbf, max_z):
        super().__init__()
        self.embedding = nn.Embedding(max_z, hidden)
        self.distance_proj = nn.Linear(num_rbf, hidden)
        self.combine = nn.Linear(2 * hidden, hidden)

    def forward(self, x, z, edge_index, rbf, cut):
        i, j = edge_index[0], edge_index[1]
        w = self.distance_proj(rbf) * cut.unsqueeze(-1)
        msg = w * self.embedding(z)[j]
        agg = torch.zeros_like(x).index_add_(0, i, msg)
        return self.combine(torch.cat([x, agg], dim=-1))


class _RefEquivariantAttention(nn.Module):
    def __init__(self, hidden, num_heads, num_rbf):
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 5 * hidden)
        self.vec_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.dkv = nn.Linear(num_rbf, 4 * hidden)
        self.out = nn.Linear(hidden, 3 * hidden)
        self.act = nn.SiLU()

    def forward(self, x, vec, edge_index, rbf, cut, unit):
        n, h, nh, hd = x.shape[0], self.hidden, self.num_heads, self.head_dim
        i, j = edge_index[0], edge_index[1]
        e = i.shape[0]
        q, k, v = torch.split(self.qkv(self.norm(x)), [h, h, 3 * h], dim=-1)
        vec1, vec2, vec3 = torch.split(self.vec_proj(vec), h, dim=-1)
        vec_dot = (vec1 * vec2).sum(dim=1)
        dk, dv = torch.split(self.act(self.dkv(rbf)), [h, 3 * h], dim=-1)
        attn = (q[i] * k[j] * dk).view(e, nh, hd).sum(-1)
        attn = self.act(attn) * cut.unsqueeze(-1)
        vj = (v[j] * dv).view(e, nh, 3 * hd)
        xm, v1, v2 = torch.split(vj, hd, dim=-1)
        xm = (xm * attn.unsqueeze(-1)).reshape(e, h)
        cut_e = cut.view(e, 1, 1)
        v1 = v1.reshape(e, 1, h) * cut_e
        v2 = v2.reshape(e, 1, h) * cut_e
        vm = vec[j] * v1 + v2 * unit.unsqueeze(-1)
        x_agg = torch.zeros((n, h), dtype=x.dtype, device=x.device).index_add_(0, i, xm)
        vec_agg = torch.zeros((n, 3, h), dtype=x.dtype, device=x.device).index_add_(0, i, vm)
        o1, o2, o3 = torch.split(self.out(x_agg), h, dim=-1)
        dx = vec_dot * o2 + o3
        dvec = vec3 * o1.unsqueeze(1) + vec_agg
        return x + dx, vec + dvec


class _RefET(nn.Module):
    def __init__(self, hidden=128, num_layers=6, num_heads=8, num_rbf=32, cutoff=5.0, max_z=100, name="et"):
        super().__init__()
        self.hidden = hidden
        self.cutoff = cutoff
        self.embedding = nn.Embedding(max_z, hidden)
        self.rbf = _RefExpNormalSmearing(cutoff, num_rbf)
        self.cutoff_fn = _RefCosineCutoff(cutoff)
        self.neighbor_embedding = _RefNeighborEmbedding(hidden, num_rbf, max_z)
        self.layers = nn.ModuleList([_RefEquivariantAttention(hidden, num_heads, num_rbf) for _ in range(num_layers)])
        self.out_norm = nn.LayerNorm(hidden)

    def forward(self, z, edge_index, edge_vec):
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


class _RefPotential(nn.Module):
    """Same names and buffers as ``Potential``; forward = the original ``Potential.forward``."""

    def __init__(self, backbone: Dict, max_z: int = 100):
        super().__init__()
        cfg = {k: v for k, v in backbone.items() if k != "name"}
        cfg.setdefault("max_z", max_z)
        self.backbone = _RefET(**cfg)
        self.head = _RefHead(self.backbone.hidden)
        self.cutoff = float(self.backbone.cutoff)
        mz = int(cfg["max_z"])
        self.register_buffer("known_elements", torch.zeros(mz, dtype=torch.bool))
        self.register_buffer("atomref", torch.zeros(mz, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(0.0, dtype=torch.float64))

    def forward(self, numbers, positions, batch=None, cell=None, pbc=None, with_reference=True,
                compute_forces=True):
        if batch is None:
            batch = torch.zeros(numbers.shape[0], dtype=torch.long, device=numbers.device)
        num_graphs = int(batch.max()) + 1
        create_graph = self.training
        positions = positions.detach().requires_grad_(True)
        edge_index, edge_vec = _ref_radius_graph(positions, batch, self.cutoff, cell, pbc)
        x, vec = self.backbone(numbers, edge_index, edge_vec)
        y = self.head(x, vec)
        e_atom = y * self.scale.to(y.dtype) + self.shift.to(y.dtype)
        energy = torch.zeros(num_graphs, dtype=e_atom.dtype).index_add_(0, batch, e_atom)
        out = {}
        if compute_forces:
            g = torch.autograd.grad([energy.sum()], [positions], create_graph=create_graph, allow_unused=True)[0]
            out["forces"] = -g if g is not None else torch.zeros_like(positions)
        if with_reference:
            ref = torch.zeros(num_graphs, dtype=torch.float64).index_add_(0, batch, self.atomref[numbers].to(torch.float64))
            energy = energy.to(torch.float64) + ref
        out["energy"] = energy
        return out


def reference_of(pot: Potential) -> _RefPotential:
    """A frozen-reference model with ``pot``'s weights (state dict loaded strictly: names and shapes match)."""
    ref = _RefPotential(pot.config["backbone"])
    ref.load_state_dict(pot.state_dict(), strict=True)
    dtype = next(pot.parameters()).dtype
    return cast_potential(ref, "cpu", dtype).train(pot.training)
