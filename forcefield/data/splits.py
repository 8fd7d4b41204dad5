"""Reproducible splits: seeded random partitions and rebuilding a split from recorded frame ids."""
from __future__ import annotations

from typing import Dict, Iterable, Mapping

import numpy as np

from .conformations import ConformationSet

__all__ = ["random_split", "select_by_frame_id"]


def random_split(n_frames: int, sizes: Mapping[str, int], seed: int) -> Dict[str, np.ndarray]:
    """Disjoint random subsets of ``range(n_frames)``, one per entry of ``sizes``.

    ``sizes`` maps split names to frame counts (e.g. ``{"train": 950, "valid": 50}``); they may
    sum to less than ``n_frames`` (the rest is left out) but not to more. The result depends
    only on ``(n_frames, sizes, seed)``: splits are carved, in the order of ``sizes``, from one
    permutation drawn with ``numpy.random.default_rng(seed)``. Each index array is sorted.
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 0:
        raise ValueError(f"n_frames must be a non-negative integer, got {n_frames!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"size of split '{name}' must be a non-negative integer, got {size!r}")
    total = int(sum(sizes.values()))
    if total > n_frames:
        raise ValueError(f"split sizes {dict(sizes)} add up to {total}, more than the {n_frames} frames available")
    perm = np.random.default_rng(seed).permutation(int(n_frames))
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = np.sort(perm[start:start + int(size)]).astype(np.int64)
        start += int(size)
    return out


def select_by_frame_id(cset: ConformationSet, ids: Iterable[int]) -> ConformationSet:
    """The frames of ``cset`` whose ``frame_id`` is in ``ids``, in the order of ``ids``.

    Use it to rebuild a split from the frame ids recorded with a model. Raises ``ValueError``
    naming the ids that are not in ``cset``, or that match more than one frame (possible when
    sets of different molecules were concatenated; select per molecule then).
    """
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
    frame_id = np.asarray(cset.frame_id, dtype=np.int64)
    order = np.argsort(frame_id, kind="stable")
    sorted_ids = frame_id[order]
    left = np.searchsorted(sorted_ids, ids, side="left")
    right = np.searchsorted(sorted_ids, ids, side="right")
    missing = ids[left == right]
    if len(missing):
        shown = ", ".join(map(str, missing[:20].tolist())) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"{len(missing)} frame id(s) not found in '{cset.source}': {shown}")
    ambiguous = np.unique(ids[right - left > 1])
    if len(ambiguous):
        raise ValueError(f"frame id(s) {ambiguous[:20].tolist()} occur more than once in '{cset.source}'; "
                         "frame ids are ambiguous there")
    return cset.subset(order[left])
