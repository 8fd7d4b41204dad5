"""Radius graphs for batches of molecules and periodic cells (pure PyTorch, TorchScript-able).

Convention: ``edge_index[0] = i`` is the receiving (centre) atom, ``edge_index[1] = j`` its
neighbour, and ``edge_vec = r_j - r_i (+ periodic shift)``. Edges are directed and both
directions are present. Neighbour search runs without gradients; ``edge_vec`` is rebuilt from
``positions`` so forces flow through it.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def _pairs_within(pos: Tensor, batch: Tensor, cutoff: float) -> Tensor:
    """Index pairs (2, E) of distinct atoms of the same graph closer than ``cutoff``."""
    with torch.no_grad():
        p = pos.detach()
        same = batch.unsqueeze(0) == batch.unsqueeze(1)
        d2 = (p.unsqueeze(0) - p.unsqueeze(1)).pow(2).sum(-1)
        mask = same & (d2 < cutoff * cutoff)
        mask.fill_diagonal_(False)
        return mask.nonzero().t()


def _periodic_pairs(pos: Tensor, batch: Tensor, cutoff: float, cell: Tensor,
                    pbc: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairs and integer image shifts for cells with periodic directions.

    Returns ``edge_index`` (2, E) and ``shifts`` (E, 3) in units of the cell vectors.
    Works for any cell that is at least as large as needed: the number of images per
    direction is ceil(cutoff / plane spacing).
    """
    with torch.no_grad():
        c = cell.detach()
        # search with positions wrapped into the cell; ``offset`` (N, 3) integer cells each atom was moved by
        frac = torch.einsum("nx,nxk->nk", pos.detach(), torch.linalg.inv(c)[batch])
        offset = torch.floor(frac) * pbc[batch].to(frac.dtype)
        p = pos.detach() - torch.einsum("nk,nkx->nx", offset, c[batch])
        # plane spacings: volume / |a_j x a_k|
        vol = torch.linalg.det(c).abs()
        cross = torch.stack([torch.linalg.cross(c[:, 1], c[:, 2], dim=-1), torch.linalg.cross(c[:, 2], c[:, 0], dim=-1),
                             torch.linalg.cross(c[:, 0], c[:, 1], dim=-1)], dim=1)
        spacing = vol.unsqueeze(-1) / torch.linalg.norm(cross, dim=-1).clamp_min(1e-12)
        n_img = torch.ceil(cutoff / spacing).to(torch.long) * pbc.to(torch.long)  # (B, 3)
        nmax = n_img.max(dim=0).values
        rng = [torch.arange(-int(nmax[k]), int(nmax[k]) + 1, device=pos.device) for k in range(3)]
        shifts = torch.cartesian_prod(rng[0], rng[1], rng[2]).reshape(-1, 3)  # (S, 3)
        same = batch.unsqueeze(0) == batch.unsqueeze(1)  # (N, N)
        pairs = same.nonzero()
        ii, jj = pairs[:, 0], pairs[:, 1]
        g = batch[ii]
        # (P, S, 3) cartesian shift of each pair for each image
        cart = torch.einsum("sk,pkx->psx", shifts.to(p.dtype), c[g])
        d = p[jj].unsqueeze(1) + cart - p[ii].unsqueeze(1)
        ok = d.pow(2).sum(-1) < cutoff * cutoff
        allowed = (shifts.abs().unsqueeze(0) <= n_img[g].unsqueeze(1)).all(-1)
        self_pair = (ii == jj).unsqueeze(1) & (shifts == 0).all(-1).unsqueeze(0)
        ok = ok & allowed & ~self_pair
        hit = ok.nonzero()
        pi, si = hit[:, 0], hit[:, 1]
        edge_index = torch.stack([ii[pi], jj[pi]])
        # shift for the unwrapped positions: r_j + (S - o_j + o_i) cell - r_i
        unwrapped = shifts[si] - offset[jj[pi]].to(torch.long) + offset[ii[pi]].to(torch.long)
        return edge_index, unwrapped


def radius_graph(positions: Tensor, batch: Tensor, cutoff: float, cell: Optional[Tensor] = None,
                 pbc: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Neighbour list within ``cutoff`` (Å).

    Args:
        positions: (N, 3) Å.
        batch: (N,) graph index of each atom, values 0..B-1.
        cell: optional (B, 3, 3) cell vectors as rows (Å).
        pbc: optional (B, 3) bool periodic directions.
    Returns:
        edge_index (2, E) and edge_vec (E, 3) = r_j - r_i + shift (differentiable in positions).
    """
    if cell is not None and pbc is not None and bool(pbc.any()):
        edge_index, shifts = _periodic_pairs(positions, batch, cutoff, cell, pbc)
        i, j = edge_index[0], edge_index[1]
        cart = torch.einsum("ek,ekx->ex", shifts.to(positions.dtype), cell[batch[i]].to(positions.dtype))
        return edge_index, positions[j] - positions[i] + cart
    edge_index = _pairs_within(positions, batch, cutoff)
    return edge_index, positions[edge_index[1]] - positions[edge_index[0]]
