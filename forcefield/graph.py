"""Radius graphs for batches of molecules and periodic cells (pure PyTorch, TorchScript-able).

Convention: ``edge_index[0] = i`` is the receiving (centre) atom, ``edge_index[1] = j`` its
neighbour, and ``edge_vec = r_j - r_i (+ periodic shift)``. Edges are directed and both
directions are present. Neighbour search runs without gradients; ``edge_vec`` is rebuilt from
``positions`` so forces flow through it.

Layout ("symmetric"): the first E/2 edges are one direction of each pair, the last E/2 the same
pairs reversed in the same order, ``edge_vec[E/2:] == -edge_vec[:E/2]`` exactly. The backbone then
computes distance features once per pair (see ``models.et.is_symmetric_layout``); any other edge
order is still accepted by the model.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def _pairs_within(pos: Tensor, batch: Tensor, cutoff: float) -> Tensor:
    """Index pairs (2, P) ``i < j`` of atoms of the same graph closer than ``cutoff`` (one direction)."""
    with torch.no_grad():
        p = pos.detach()
        same = batch.unsqueeze(0) == batch.unsqueeze(1)
        d2 = (p.unsqueeze(0) - p.unsqueeze(1)).pow(2).sum(-1)
        mask = same & (d2 < cutoff * cutoff)
        return torch.triu(mask, diagonal=1).nonzero().t()  # i < j; the reversed half is added by the caller


def same_structure_pairs(batch: Tensor) -> Tensor:
    """Every pair (2, P), ``i < j``, of atoms of the same structure, whatever their distance (row-major order)."""
    same = batch.unsqueeze(0) == batch.unsqueeze(1)
    return torch.triu(same, diagonal=1).nonzero().t()


def minimum_image(vectors: Tensor, cell: Tensor, pbc: Tensor) -> Tensor:
    """Vectors (P, 3) moved to their nearest periodic image: fractional coordinates in ``cell`` ((P, 3, 3) or
    one (3, 3)) rounded along the periodic directions ``pbc`` ((P, 3) or (3,)). Exact for vectors shorter than
    half the cell width (bonds, pair potentials whose cutoff is below it); for all images within a cutoff use
    :func:`half_pairs`."""
    c = cell if cell.dim() == 3 else cell.unsqueeze(0).expand(vectors.shape[0], 3, 3)
    p = pbc if pbc.dim() == 2 else pbc.unsqueeze(0).expand(vectors.shape[0], 3)
    frac = torch.linalg.solve(c.transpose(1, 2), vectors.unsqueeze(-1)).squeeze(-1)
    frac = torch.where(p, frac - torch.round(frac), frac)
    return torch.bmm(frac.unsqueeze(1), c).squeeze(1)


def _search_cell(cell: Tensor, pbc: Tensor) -> Tensor:
    """A non-singular cell for the image search: zero rows of non-periodic directions (molecules in a batch
    with periodic frames, slabs with ``cell[2] = 0``) become unit vectors; they are never used for shifts."""
    zero_row = cell.abs().sum(-1) == 0                                     # (B, 3)
    if bool((zero_row & pbc).any()):
        raise ValueError("a periodic direction has a zero cell vector: give the structure a cell (Å) or set "
                         "pbc=False in that direction")
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).unsqueeze(0).expand_as(cell)
    safe = torch.where(zero_row.unsqueeze(-1), eye, cell)
    if bool((torch.linalg.det(safe).abs() < 1e-9).any()):
        raise ValueError("the cell vectors are linearly dependent (zero volume); check the cell given with pbc=True")
    return safe


def _periodic_pairs(pos: Tensor, batch: Tensor, cutoff: float, cell: Tensor,
                    pbc: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairs and integer image shifts for cells with periodic directions.

    Returns ``edge_index`` (2, P) and ``shifts`` (P, 3) in units of the cell vectors, one direction
    of each pair (the reverse of (i, j, shift) is (j, i, -shift)).
    Works for any cell that is at least as large as needed: the number of images per
    direction is ceil(cutoff / plane spacing).
    """
    with torch.no_grad():
        c = _search_cell(cell.detach(), pbc)
        # search with positions wrapped into the cell; ``offset`` (N, 3) integer cells each atom was moved by
        frac = torch.einsum("nx,nxk->nk", pos.detach(), torch.linalg.inv(c)[batch])
        offset = torch.floor(frac) * pbc[batch].to(frac.dtype)
        p = pos.detach() - torch.einsum("nk,nkx->nx", offset, c[batch])
        # plane spacings: volume / |a_j x a_k|
        vol = torch.linalg.det(c).abs()
        cross = torch.stack([torch.linalg.cross(c[:, 1], c[:, 2], dim=-1), torch.linalg.cross(c[:, 2], c[:, 0], dim=-1),
                             torch.linalg.cross(c[:, 0], c[:, 1], dim=-1)], dim=1)
        spacing = vol.unsqueeze(-1) / torch.linalg.norm(cross, dim=-1).clamp_min(1e-12)
        n_img = torch.where(pbc, torch.ceil(cutoff / spacing), torch.zeros_like(spacing)).to(torch.long)  # (B, 3)
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
        # one direction of each pair: i < j, or an image of the atom itself with a "positive" shift
        # (first non-zero component > 0); the reversed half (j, i, -shift) is added by the caller
        sgn = torch.sign(shifts)
        positive = (sgn[:, 0] > 0) | ((sgn[:, 0] == 0) & ((sgn[:, 1] > 0) | ((sgn[:, 1] == 0) & (sgn[:, 2] > 0))))
        ok = ok & ((ii < jj).unsqueeze(1) | ((ii == jj).unsqueeze(1) & positive.unsqueeze(0)))
        hit = ok.nonzero()
        pi, si = hit[:, 0], hit[:, 1]
        edge_index = torch.stack([ii[pi], jj[pi]])
        # shift for the unwrapped positions: r_j + (S - o_j + o_i) cell - r_i
        unwrapped = shifts[si] - offset[jj[pi]].to(torch.long) + offset[ii[pi]].to(torch.long)
        return edge_index, unwrapped


def half_pairs(positions: Tensor, batch: Tensor, cutoff: float, cell: Optional[Tensor] = None,
               pbc: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """One direction of each pair within ``cutoff`` (no gradients).

    Returns ``pairs`` (2, P) and, for periodic cells, ``shifts`` (P, 3) integer image shifts in units of
    the cell vectors (``None`` without periodic directions).
    """
    if cell is not None and pbc is not None and bool(pbc.any()):
        return _periodic_pairs(positions, batch, cutoff, cell, pbc)
    return _pairs_within(positions, batch, cutoff), None


def shift_vectors(pairs: Tensor, shifts: Tensor, cell: Tensor, batch: Tensor, dtype: torch.dtype) -> Tensor:
    """Cartesian image shifts (P, 3) Å of periodic pairs (differentiable in ``cell``)."""
    return torch.einsum("ek,ekx->ex", shifts.to(dtype), cell.index_select(0, batch.index_select(0, pairs[0])).to(dtype))


def edges_from_pairs(positions: Tensor, pairs: Tensor, cart: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Symmetric-layout ``edge_index`` (2, 2P) and differentiable ``edge_vec`` (2P, 3) from one-direction
    pairs and their Cartesian image shifts ``cart`` (P, 3) (``None``: no shifts)."""
    vec = positions.index_select(0, pairs[1]) - positions.index_select(0, pairs[0])
    if cart is not None:
        vec = vec + cart
    # reversed pairs second; -vec is bit-identical to computing r_i - r_j (- shift)
    return torch.cat([pairs, pairs.flip(0)], dim=1), torch.cat([vec, -vec])


def radius_graph(positions: Tensor, batch: Tensor, cutoff: float, cell: Optional[Tensor] = None,
                 pbc: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Neighbour list within ``cutoff`` (Å).

    Args:
        positions: (N, 3) Å.
        batch: (N,) graph index of each atom, values 0..B-1.
        cell: optional (B, 3, 3) cell vectors as rows (Å).
        pbc: optional (B, 3) bool periodic directions.
    Returns:
        edge_index (2, E) and edge_vec (E, 3) = r_j - r_i + shift (differentiable in positions and cell),
        in the symmetric layout (module docstring).
    """
    pairs, shifts = half_pairs(positions, batch, cutoff, cell, pbc)
    cart: Optional[Tensor] = None
    if shifts is not None and cell is not None:
        cart = shift_vectors(pairs, shifts, cell, batch, positions.dtype)
    return edges_from_pairs(positions, pairs, cart)

