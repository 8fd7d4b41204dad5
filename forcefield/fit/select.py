"""Which frames ``oreo fit`` labels: a diverse first batch, then the frames its committee disagrees on most.

- Descriptors (one vector per frame, all frames of one molecule):
  :func:`backbone_descriptors` - the pretrained backbone's scalar per-atom features, mean-pooled over the atoms
  (used when the run fine-tunes a backbone); :func:`geometric_descriptors` - inverse interatomic distances,
  sorted within each element pair (H-H, C-H, ...), so permuting equivalent atoms (a methyl rotation) does not
  change them (used with ``--from scratch``). Both are standardised per dimension before distances are taken.
- :func:`farthest_point_sampling` - greedy FPS: start at the frame nearest the mean, then always the frame
  farthest from every frame chosen so far.
- :func:`select_uncertain` - the ``k`` candidates with the largest committee force spread (``forces_std_max``,
  eV/Å; :mod:`forcefield.committee`), ties in candidate order; :func:`select_random` - ``k`` at random (the
  ``--select random`` baseline at the same budget).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch


def geometric_descriptors(numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(F, n(n-1)/2) inverse distances (1/Å) of frames ``positions`` (F, n, 3) of one molecule ``numbers`` (n,),
    grouped by element pair and sorted (descending) within each group."""
    numbers = np.asarray(numbers)
    pos = np.asarray(positions, dtype=np.float64)
    i, j = np.triu_indices(len(numbers), k=1)
    inv = 1.0 / np.linalg.norm(pos[:, i] - pos[:, j], axis=-1)               # (F, P)
    pair = np.stack([np.minimum(numbers[i], numbers[j]), np.maximum(numbers[i], numbers[j])], axis=1)
    blocks = []
    for key in sorted({tuple(p) for p in pair.tolist()}):
        cols = np.where((pair == key).all(axis=1))[0]
        blocks.append(-np.sort(-inv[:, cols], axis=1))
    return np.concatenate(blocks, axis=1)


@torch.no_grad()
def backbone_descriptors(potential, numbers: np.ndarray, positions: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(F, hidden) mean over atoms of the backbone's scalar features (``Potential.atomic_energies_and_features``)
    of frames ``positions`` (F, n, 3) of one molecule."""
    numbers = torch.as_tensor(np.asarray(numbers), dtype=torch.long)
    pos = np.asarray(positions, dtype=np.float64)
    n = len(numbers)
    dtype = next(potential.parameters()).dtype
    out = []
    for s in range(0, len(pos), batch_size):
        chunk = torch.as_tensor(pos[s:s + batch_size], dtype=dtype)
        b = chunk.shape[0]
        batch = torch.arange(b).repeat_interleave(n)
        _, x, _ = potential.atomic_energies_and_features(numbers.repeat(b), chunk.reshape(-1, 3), batch,
                                                         learned_only=True)
        out.append(x.reshape(b, n, -1).mean(1).double().numpy())
    return np.concatenate(out)


def standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)


def farthest_point_sampling(x: np.ndarray, k: int, candidates: Optional[Sequence[int]] = None,
                            chosen: Sequence[int] = ()) -> List[int]:
    """``k`` row indices of ``x`` (F, D) by greedy farthest-point sampling among ``candidates`` (default all),
    given the rows already ``chosen`` (they count as picked, are not returned). Without ``chosen`` it starts at the
    candidate nearest the mean."""
    x = np.asarray(x, dtype=np.float64)
    cand = np.arange(len(x)) if candidates is None else np.asarray(list(candidates), dtype=np.int64)
    k = min(int(k), len(cand))
    if k <= 0:
        return []
    picks: List[int] = []
    if len(chosen):
        dist = np.min(np.linalg.norm(x[cand][:, None] - x[np.asarray(chosen)][None], axis=-1), axis=1)
    else:
        first = int(np.argmin(np.linalg.norm(x[cand] - x[cand].mean(0), axis=1)))
        picks.append(int(cand[first]))
        dist = np.linalg.norm(x[cand] - x[cand[first]], axis=1)
    while len(picks) < k:
        nxt = int(np.argmax(dist))
        picks.append(int(cand[nxt]))
        dist = np.minimum(dist, np.linalg.norm(x[cand] - x[cand[nxt]], axis=1))
    return picks


def select_uncertain(spread: Sequence[float], k: int, trajectory: Optional[Sequence[int]] = None,
                     step: Optional[Sequence[int]] = None, min_gap: int = 0) -> List[int]:
    """Indices of the ``k`` largest values of ``spread`` (largest first; ties: the earlier candidate first).

    With ``trajectory`` and ``step`` (each candidate's replica and MD step), a candidate within ``min_gap`` steps of
    a pick of its own trajectory is passed over for the next largest: the spread peaks over a few consecutive
    frames, which are near copies (one label's worth). Passed-over candidates fill up the ``k`` only if too few
    others are left."""
    s = np.asarray(spread, dtype=np.float64)
    order = [int(i) for i in np.argsort(-s, kind="stable")]
    k = min(int(k), len(s))
    if trajectory is None or step is None or min_gap <= 0:
        return order[:k]
    picked, passed = [], []
    for i in order:
        if len(picked) == k:
            break
        near = any(trajectory[j] == trajectory[i] and abs(int(step[j]) - int(step[i])) <= min_gap for j in picked)
        (passed if near else picked).append(i)
    return picked + passed[:k - len(picked)]


def select_random(n: int, k: int, rng: np.random.Generator) -> List[int]:
    """``k`` of ``range(n)`` at random, without replacement, in increasing order."""
    return sorted(int(i) for i in rng.choice(n, size=min(int(k), n), replace=False))
