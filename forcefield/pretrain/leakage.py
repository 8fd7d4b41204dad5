"""Leakage control between the pretraining corpus and the fine-tuning targets.

Protocols (``LeakageConfig.protocol``):

``strict``
    drop every frame of every molecule that is later a fine-tuning target, whatever its geometry (MD frames,
    QM9's copy of the molecule, BOTNet's copy of rMD17 ethanol ...).
``paper``
    the ET-OREO paper's protocol: target molecules stay in, but never a frame that is in one of their
    fine-tuning *test* sets (rMD17 ``test_0k`` files for the configured split indices), wherever it comes from;
    rMD17 training frames are allowed.
``none``
    no filtering.

Molecules are identified by their covalent bond graph (bond: distance < ``bond_factor`` x the sum of the ASE
covalent radii), hashed with Weisfeiler-Lehman refinement on element labels, so conformers and atom orderings
of one molecule match and isomers (ethanol vs dimethyl ether) do not. A corpus frame counts as the target when
its graph at any of ``frame_bond_factors`` equals the target's (hot MD frames stretch bonds past one threshold:
one rMD17 aspirin frame in 4895 has a C-H bond at 1.26 x the covalent sum). Only frames whose composition equals a
target's are graph-hashed. ``match="composition"`` drops every isomer too. Test frames are matched by a
rotation-, translation- and permutation-invariant fingerprint (sorted interatomic distances) within ``tol`` Å.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.conformations import ConformationSet

__all__ = ["LeakageConfig", "LeakageTarget", "graph_hash", "frame_graph_hashes", "composition_counts",
           "distance_fingerprint", "resolve_targets", "apply_leakage_filter", "PROTOCOLS"]

PROTOCOLS = ("strict", "paper", "none")


@dataclass
class LeakageConfig:
    protocol: str = "strict"
    targets: List[str] = field(default_factory=lambda: ["aspirin", "ethanol", "naphthalene", "salicylic"])
    split_indices: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    match: str = "graph"          # graph | composition
    bond_factor: float = 1.25     # bond graph of the target's reference geometry
    frame_bond_factors: List[float] = field(default_factory=lambda: [1.15, 1.25, 1.4])  # tried on corpus frames
    tol: float = 1e-3             # Å, for test-frame matching (paper protocol)


@dataclass
class LeakageTarget:
    """One fine-tuning target: a reference geometry (for its graph) and the frames it is tested on."""
    name: str
    numbers: np.ndarray
    positions: np.ndarray
    test_frames: Optional[ConformationSet] = None


# ---------------------------------------------------------------------------- molecule identity
def _covalent_radii() -> np.ndarray:
    from ase.data import covalent_radii
    return np.asarray(covalent_radii, dtype=np.float64)


def _adjacency(numbers: np.ndarray, positions: np.ndarray, bond_factor: float) -> np.ndarray:
    """(..., n, n) bool bond matrices for positions (..., n, 3)."""
    rad = _covalent_radii()[numbers]
    limit = bond_factor * (rad[:, None] + rad[None, :])
    d = np.linalg.norm(positions[..., :, None, :] - positions[..., None, :, :], axis=-1)
    adj = d < limit
    n = len(numbers)
    adj[..., np.arange(n), np.arange(n)] = False
    return adj


def _wl_hash(numbers: np.ndarray, adj: np.ndarray, iterations: int = 4) -> str:
    labels = [str(int(z)) for z in numbers]
    nbrs = [np.flatnonzero(adj[a]) for a in range(len(numbers))]
    for _ in range(iterations):
        labels = [hashlib.sha1((labels[a] + "|" + ",".join(sorted(labels[b] for b in nbrs[a]))).encode()
                               ).hexdigest()[:16] for a in range(len(numbers))]
    return hashlib.sha1(("%d:" % len(numbers) + ",".join(sorted(labels))).encode()).hexdigest()


def graph_hash(numbers: np.ndarray, positions: np.ndarray, bond_factor: float = 1.25) -> str:
    """Conformer- and ordering-independent identity of a molecule from one geometry."""
    numbers = np.asarray(numbers, dtype=np.int64)
    return _wl_hash(numbers, _adjacency(numbers, np.asarray(positions, np.float64), bond_factor))


def same_atom_groups(cset: ConformationSet, frames: np.ndarray) -> List[Tuple[np.ndarray, List[int]]]:
    """The listed frames grouped by atom sequence: ``(numbers, positions in frames)`` per group."""
    groups: Dict[bytes, List[int]] = {}
    for k, f in enumerate(frames):
        groups.setdefault(cset.frame_numbers(int(f)).tobytes(), []).append(k)
    return [(np.frombuffer(key, dtype=np.int64), members) for key, members in groups.items()]


def frame_graph_hashes(cset: ConformationSet, frames: np.ndarray, bond_factor: float = 1.25,
                       chunk: int = 256) -> np.ndarray:
    """Graph hash of each listed frame. Frames sharing an atom sequence are handled together, and each distinct
    bond matrix is hashed once (MD trajectories of one molecule cost one hash)."""
    frames = np.asarray(frames, dtype=np.int64)
    out = np.empty(len(frames), dtype=object)
    for numbers, members in same_atom_groups(cset, frames):
        cache: Dict[bytes, str] = {}
        for s in range(0, len(members), chunk):
            part = members[s:s + chunk]
            pos = np.stack([cset.frame_positions(int(frames[k])) for k in part])
            adj = _adjacency(numbers, pos, bond_factor)
            for k, a in zip(part, adj):
                packed = np.packbits(a).tobytes()
                if packed not in cache:
                    cache[packed] = _wl_hash(numbers, a)
                out[k] = cache[packed]
    return out


def composition_counts(cset: ConformationSet) -> np.ndarray:
    """(F, 119) count of each element in each frame."""
    frame_of_atom = np.repeat(np.arange(len(cset)), cset.n_atoms)
    counts = np.zeros((len(cset), 119), dtype=np.int16)
    np.add.at(counts, (frame_of_atom, cset.numbers), 1)
    return counts


def _composition(numbers: np.ndarray) -> np.ndarray:
    counts = np.zeros(119, dtype=np.int16)
    np.add.at(counts, np.asarray(numbers, np.int64), 1)
    return counts


def distance_fingerprint(numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Sorted interatomic distances per element pair (invariant to rotation, translation and atom order).
    ``positions`` (..., n, 3) -> (..., n(n-1)/2)."""
    numbers = np.asarray(numbers, dtype=np.int64)
    iu, ju = np.triu_indices(len(numbers), 1)
    d = np.linalg.norm(positions[..., iu, :] - positions[..., ju, :], axis=-1)
    pair = np.minimum(numbers[iu], numbers[ju]) * 1000 + np.maximum(numbers[iu], numbers[ju])
    # sort by (pair type, distance): a large offset per pair type keeps the types apart
    key = pair.astype(np.float64) * 1e4 + d
    return np.sort(key, axis=-1)


# ---------------------------------------------------------------------------- targets
def resolve_targets(cfg: LeakageConfig, data_dir=None) -> List[LeakageTarget]:
    """rMD17 molecule names (test frames: ``test_0k`` for ``cfg.split_indices``) or paths of files ase reads
    (every frame counts as a test frame)."""
    from ..data import load_ase, load_rmd17
    from ..data.rmd17 import RMD17_MOLECULES, canonical_molecule
    out = []
    for t in cfg.targets:
        try:
            name = canonical_molecule(t)
        except ValueError:
            name = None
        if name in RMD17_MOLECULES:
            tests = []
            if cfg.protocol == "paper":
                tests = [load_rmd17(name, "test", k, data_dir=data_dir) for k in cfg.split_indices]
            ref = tests[0] if tests else load_rmd17(name, "test", cfg.split_indices[0] if cfg.split_indices else 1,
                                                    data_dir=data_dir)
            test = ConformationSet.concatenate(tests, source=f"rmd17/{name}/test") if tests else None
            out.append(LeakageTarget(name, ref.frame_numbers(0).copy(), ref.frame_positions(0).copy(), test))
        else:
            cs = load_ase(t)
            out.append(LeakageTarget(str(t), cs.frame_numbers(0).copy(), cs.frame_positions(0).copy(), cs))
    return out


def _test_frame_mask(cset: ConformationSet, frames: np.ndarray, target: LeakageTarget, tol: float) -> np.ndarray:
    """Which of ``frames`` (all of the target's molecule) coincide with one of its test frames."""
    from scipy.spatial import cKDTree
    tf = target.test_frames
    if tf is None or len(tf) == 0 or len(frames) == 0:
        return np.zeros(len(frames), dtype=bool)
    n = tf.n_atoms[0]
    ref = distance_fingerprint(tf.frame_numbers(0), tf.positions.reshape(len(tf), n, 3))
    tree = cKDTree(ref)
    hit = np.zeros(len(frames), dtype=bool)
    for numbers, members in same_atom_groups(cset, frames):
        if len(numbers) != n:
            continue
        pos = np.stack([cset.frame_positions(int(frames[k])) for k in members])
        fp = distance_fingerprint(numbers, pos)
        dist, _ = tree.query(fp, k=1)
        hit[np.asarray(members)] = dist < tol * np.sqrt(fp.shape[-1])
    return hit


def apply_leakage_filter(cset: ConformationSet, cfg: LeakageConfig, targets: Sequence[LeakageTarget]
                         ) -> Tuple[np.ndarray, Dict[str, object]]:
    """Frames of ``cset`` to keep under ``cfg.protocol``, and a report (how many were dropped for which target)."""
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"leakage protocol must be one of {PROTOCOLS}, got '{cfg.protocol}'")
    if cfg.match not in ("graph", "composition"):
        raise ValueError(f"leakage match must be 'graph' or 'composition', got '{cfg.match}'")
    keep = np.ones(len(cset), dtype=bool)
    report: Dict[str, object] = {"protocol": cfg.protocol, "frames": len(cset), "dropped": {}}
    if cfg.protocol == "none" or not targets or len(cset) == 0:
        report["kept"] = int(keep.sum())
        return keep, report
    comp = composition_counts(cset)
    for t in targets:
        cand = np.flatnonzero((comp == _composition(t.numbers)).all(axis=1))
        if len(cand) and cfg.match == "graph":
            # a hot MD frame may stretch a bond past one threshold: it is the target if any threshold agrees
            want = graph_hash(t.numbers, t.positions, cfg.bond_factor)
            same = np.zeros(len(cand), dtype=bool)
            for bf in sorted(set(cfg.frame_bond_factors) | {cfg.bond_factor}):
                rest = ~same
                same[rest] = frame_graph_hashes(cset, cand[rest], bf) == want
            cand = cand[same]
        if cfg.protocol == "paper":
            cand = cand[_test_frame_mask(cset, cand, t, cfg.tol)]
        keep[cand] = False
        report["dropped"][t.name] = int(len(cand))
    report["kept"] = int(keep.sum())
    return keep, report
