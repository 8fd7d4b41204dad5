"""The pretraining corpus: many sources, each tagged equilibrium or off-equilibrium, in one frame table.

A corpus file is YAML, either a plain list of sources or a mapping with ``sources`` and ``leakage``::

    leakage: {protocol: strict, targets: [aspirin, ethanol, naphthalene, salicylic]}
    sources:
      - {reader: qm9, kind: equilibrium, split: train}                     # qm9pack, or path: archive/db
      - {reader: rmd17, kind: off-equilibrium, molecules: all, split: train, split_indices: [1]}
      - {reader: ase, kind: off-equilibrium, path: botnet/dataset_3BPA/train_300K.xyz}
      - {reader: ani, kind: off-equilibrium, path: alkane_goodpaster/C2H6_DFT+Force_NMS.h5,
         forces_unit: hartree/bohr}
      - {reader: pcqm, kind: equilibrium, path: pcqm4m-v2-train.sdf.tar.gz, max_frames: 200000}
      - {reader: qm9-xtb, kind: off-equilibrium}                          # `oreo data qm9-xtb`; path: its folder

Relative paths are taken below the data directory (``--data-dir`` / ``$OREO_DATA_DIR``). Readers: ``qm9``,
``rmd17``, ``md17``, ``ase`` (extxyz, ASE db, anything ase.io reads), ``ani`` (ANI-1/ANI-1x HDF5), ``pcqm``
(PCQM4Mv2 SDF), ``sdf``, ``poly24`` (oreo-poly24), ``qm9-xtb`` (oreo-qm9-xtb: QM9 molecules, GFN2-xTB MD
frames; default path ``qm9xtb``; ``level`` keeps the frames of one level of theory).

Energies are dropped: sources come from different levels of theory and no pretraining objective needs them.
Off-equilibrium sources must have forces. ``weight`` scales how often a source's frames are drawn per epoch
(1: each frame once; 0.25: a quarter of them, redrawn every epoch; 3: each three times).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..data.conformations import Batch, ConformationSet
from ..data.qm9 import QM9_SPLIT
from ..data.paths import resolve_data_dir
from ..settings import from_mapping
from .leakage import LeakageConfig, apply_leakage_filter, resolve_targets

__all__ = ["SourceConfig", "CorpusConfig", "Corpus", "PretrainBatch", "EpochSampler", "load_source",
           "build_corpus", "corpus_config_from_obj", "KINDS", "READERS"]

KINDS = ("equilibrium", "off-equilibrium")
READERS = ("qm9", "rmd17", "md17", "ase", "ani", "pcqm", "sdf", "poly24", "qm9-xtb")


@dataclass
class SourceConfig:
    reader: str
    kind: str
    name: Optional[str] = None
    path: Optional[str] = None
    molecules: Optional[Union[str, List[str]]] = None   # rmd17 / md17: names or "all"; poly24: polymers
    split: Optional[str] = None                         # rmd17: train|test|all; qm9, poly24: train|val|test|all
    split_indices: List[int] = field(default_factory=lambda: [1])   # rmd17 split files 1..5
    labels: str = "revised"                             # rmd17
    index: str = ":"                                    # ase
    energy_unit: str = "eV"                             # ase (ani: hartree)
    length_unit: str = "Å"
    forces_unit: Optional[str] = None                   # ani: ENERGY/LENGTH
    forces_key: str = "forces"
    level: Optional[str] = None                         # ani-1x level of theory; qm9-xtb: prefix of it
    max_frames: Optional[int] = None                    # random subset (seeded)
    stride: int = 1
    weight: float = 1.0


@dataclass
class CorpusConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    packed: Optional[str] = None          # a file of corpus_pack.save_packed_corpus instead of the sources
    leakage: LeakageConfig = field(default_factory=LeakageConfig)
    data_dir: Optional[str] = None
    seed: int = 0


def corpus_config_from_obj(obj: Any) -> CorpusConfig:
    """A YAML-loaded corpus: a list of sources, or {sources, leakage, data_dir, seed}."""
    if isinstance(obj, CorpusConfig):
        return obj
    if isinstance(obj, list):
        obj = {"sources": obj}
    if not isinstance(obj, dict):
        raise ValueError("a corpus is a list of sources or a mapping with 'sources'")
    cfg = from_mapping(CorpusConfig, {**obj, "sources": obj.get("sources") or []}, "corpus")
    for k, src in enumerate(cfg.sources):
        if src.reader not in READERS:
            raise ValueError(f"corpus source {k}: reader must be one of {READERS}, got '{src.reader}'")
        if src.kind not in KINDS:
            raise ValueError(f"corpus source {k}: kind must be 'equilibrium' or 'off-equilibrium', got '{src.kind}'")
    return cfg


# ---------------------------------------------------------------------------- sources
def _path(spec: SourceConfig, data_dir) -> Path:
    if not spec.path:
        raise ValueError(f"corpus source '{spec.name or spec.reader}' needs a 'path'")
    p = Path(spec.path).expanduser()
    return p if p.is_absolute() else resolve_data_dir(data_dir) / p


def load_source(spec: SourceConfig, data_dir=None, seed: int = 0) -> ConformationSet:
    """One source as a :class:`ConformationSet` with ``equilibrium`` set from its kind and no energies."""
    from ..data import load_ase, load_md17, load_rmd17
    r = spec.reader
    if r == "qm9":
        from ..data.qm9 import load_qm9
        split = spec.split or "train"
        cset = load_qm9(spec.path if spec.path in (None, "qm9pack") else str(_path(spec, data_dir)),
                        split=split, data_dir=data_dir, properties=())
    elif r in ("rmd17", "md17"):
        mols = spec.molecules or "all"
        if r == "rmd17":
            from ..data.rmd17 import RMD17_MOLECULES
            names = list(RMD17_MOLECULES) if mols == "all" else ([mols] if isinstance(mols, str) else list(mols))
            parts = []
            for m in names:
                per = [load_rmd17(m, spec.split or "train", k, data_dir=data_dir, labels=spec.labels)
                       for k in spec.split_indices]
                one = ConformationSet.concatenate(per, source=f"rmd17/{m}")
                _, first = np.unique(one.frame_id, return_index=True)  # split files overlap: unique frames
                parts.append(one.subset(np.sort(first)))
        else:
            from ..data.md17 import MD17_MOLECULES
            names = list(MD17_MOLECULES) if mols == "all" else ([mols] if isinstance(mols, str) else list(mols))
            parts = [load_md17(m, data_dir=data_dir) for m in names]
        cset = ConformationSet.concatenate(parts, source=f"{r}/" + ",".join(names))
    elif r == "ase":
        cset = load_ase(_path(spec, data_dir), index=spec.index, energy_unit=spec.energy_unit,
                        length_unit=spec.length_unit, forces_key=spec.forces_key)
    elif r == "poly24":   # oreo-poly24 by its manifest; path = the set's folder (default <data_dir>/poly24)
        from ..data.poly24 import load_poly24
        mols = spec.molecules
        cset = load_poly24(spec.split or "train", polymers=None if mols in (None, "all") else
                           ([mols] if isinstance(mols, str) else list(mols)), data_dir=data_dir,
                           root=None if spec.path is None else _path(spec, data_dir))
    elif r == "qm9-xtb":  # oreo-qm9-xtb shards; path = the set's folder (default <data_dir>/qm9xtb)
        from .qm9xtb import load_qm9_xtb
        cset = load_qm9_xtb(None if spec.path is None else _path(spec, data_dir), data_dir=data_dir,
                            level=spec.level)
    elif r == "ani":
        from ..data.ani import load_ani
        cset = load_ani(_path(spec, data_dir), level=spec.level,
                        energy_unit=spec.energy_unit if spec.energy_unit != "eV" else "hartree",
                        forces_unit=spec.forces_unit,
                        forces=spec.kind == "off-equilibrium" or "auto")
    elif r in ("pcqm", "sdf"):
        from ..data.pcqm import load_pcqm4mv2, load_sdf
        loader = load_pcqm4mv2 if r == "pcqm" else load_sdf
        # read only what is needed when a random subset is asked for: a prefix large enough, then subsample
        cset = loader(_path(spec, data_dir), max_molecules=None if spec.max_frames is None else 4 * spec.max_frames)
    else:
        raise ValueError(f"unknown reader '{r}'; valid: {READERS}")
    if spec.kind == "off-equilibrium" and cset.forces is None:
        raise ValueError(f"corpus source '{spec.name or cset.source}' is tagged off-equilibrium but has no forces")
    frames = np.arange(0, len(cset), max(int(spec.stride), 1))
    if spec.max_frames is not None and len(frames) > spec.max_frames:
        rng = np.random.default_rng([seed, zlib.crc32((spec.name or cset.source).encode())])
        frames = np.sort(rng.choice(frames, size=spec.max_frames, replace=False))
    cset = cset.subset(frames)
    cset.energy = None
    cset.equilibrium = np.full(len(cset), spec.kind == "equilibrium")
    cset.source = spec.name or cset.source
    return cset


# ---------------------------------------------------------------------------- batches
@dataclass
class PretrainBatch(Batch):
    """A collated :class:`~forcefield.data.conformations.Batch` of corpus frames (``forces`` zeros where a frame
    has none, no energies) with per-frame ``has_forces`` (B,) bool and ``source`` (B,) source index."""
    has_forces: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None

    @property
    def num_graphs(self) -> int:
        return int(self.has_forces.shape[0])


class Corpus:
    """All sources in one :class:`ConformationSet` plus per-frame ``source_index`` and ``has_forces``."""

    def __init__(self, sets: Sequence[ConformationSet], weights: Optional[Sequence[float]] = None,
                 names: Optional[Sequence[str]] = None, report: Optional[Dict[str, Any]] = None):
        sets = list(sets)
        if not sets or all(len(s) == 0 for s in sets):
            raise ValueError("the pretraining corpus is empty (every source is empty or was filtered out)")
        self.names = list(names) if names is not None else [s.source for s in sets]
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(sets), dtype=np.float64)
        filled, has_f, src = [], [], []
        for k, s in enumerate(sets):
            f = s.forces if s.forces is not None else np.zeros_like(s.positions)
            filled.append(ConformationSet(numbers=s.numbers, positions=s.positions, ptr=s.ptr, forces=f,
                                          cell=s.cell, pbc=s.pbc, frame_id=s.frame_id,
                                          equilibrium=s.equilibrium, source=s.source))
            has_f.append(np.full(len(s), s.forces is not None))
            src.append(np.full(len(s), k, dtype=np.int64))
        self.frames = ConformationSet.concatenate([s for s in filled if len(s)], source="corpus") \
            if any(len(s) for s in filled) else filled[0]
        self.has_forces = np.concatenate(has_f)
        self.source_index = np.concatenate(src)
        self.report = report or {}
        self._declared = None     # a packed corpus: the summary and elements of the corpus it was packed from

    @classmethod
    def from_frames(cls, frames: ConformationSet, has_forces: np.ndarray, source_index: np.ndarray,
                    names: Sequence[str], weights: Sequence[float], report: Optional[Dict[str, Any]] = None,
                    summary: Optional[List[Dict[str, Any]]] = None, elements: Optional[Sequence[int]] = None,
                    force_rms: Optional[float] = None):
        """A corpus from frames already assembled (a packed corpus, :mod:`.corpus_pack`); ``summary``,
        ``elements`` and ``force_rms``: those of the whole corpus when some sources were left out (a resumed run
        checks the summary; the model's element table and force scale come from the others)."""
        self = cls.__new__(cls)
        self.names, self.weights = list(names), np.asarray(weights, dtype=np.float64)
        self.frames, self.report = frames, report or {}
        self.has_forces = np.asarray(has_forces, dtype=bool)
        self.source_index = np.asarray(source_index, dtype=np.int64)
        if len(self.frames) == 0:
            raise ValueError("the pretraining corpus is empty (every source is empty or was filtered out)")
        self._declared = None if summary is None else {"summary": [dict(s) for s in summary],
                                                       "elements": sorted(int(z) for z in elements or []),
                                                       "force_rms": force_rms}
        return self

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return len(self.frames)

    @property
    def elements(self) -> List[int]:
        if self._declared is not None and self._declared["elements"]:
            return list(self._declared["elements"])
        return self.frames.elements

    def source_frames(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.source_index == k)

    def sources_used(self, used_frames: np.ndarray) -> List[bool]:
        """For each source, whether any of its frames is flagged in ``used_frames`` (per frame, e.g. the
        objectives' :func:`~forcefield.pretrain.objectives.frames_used`): the sources a method draws from."""
        used_frames = np.asarray(used_frames, dtype=bool)
        return [bool(used_frames[self.source_frames(k)].any()) for k in range(len(self.names))]

    def force_rms(self) -> Optional[float]:
        """RMS force component over frames with forces (eV/Å), or None."""
        if self._declared is not None and self._declared.get("force_rms") is not None:
            return float(self._declared["force_rms"])
        if not self.has_forces.any():
            return None
        atoms = self.frames.atom_index(np.flatnonzero(self.has_forces))
        return float(np.sqrt(np.mean(self.frames.forces[atoms] ** 2)))

    def summary(self) -> List[Dict[str, Any]]:
        if self._declared is not None:
            return [dict(d) for d in self._declared["summary"]]
        out = []
        for k, name in enumerate(self.names):
            idx = self.source_frames(k)
            out.append({"name": name, "frames": int(len(idx)),
                        "kind": "equilibrium" if len(idx) and self.frames.equilibrium[idx[0]] else "off-equilibrium",
                        "forces": bool(len(idx) and self.has_forces[idx[0]]), "weight": float(self.weights[k])})
        return out

    # ------------------------------------------------------------------ batches
    def collate(self, frames, dtype: torch.dtype = torch.float32, device="cpu") -> PretrainBatch:
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        b = self.frames.collate(frames, dtype=dtype, device=device)
        t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)
        return PretrainBatch(**{name: getattr(b, name) for name in b.__dataclass_fields__},
                             has_forces=t(self.has_forces[frames], torch.bool),
                             source=t(self.source_index[frames], torch.long))


def _without_target_molecules(spec: SourceConfig, targets) -> tuple:
    """An rMD17 / MD17 source without the fine-tuning targets among its molecules, by name (the strict protocol
    also drops every frame whose bond graph is a target's; a frame with a shared proton can escape that, so the
    name decides first) -> (source, names left out)."""
    from dataclasses import replace
    from ..data.md17 import MD17_MOLECULES
    from ..data.rmd17 import RMD17_MOLECULES, canonical_molecule
    mols = spec.molecules or "all"
    names = list(RMD17_MOLECULES if spec.reader == "rmd17" else MD17_MOLECULES) if mols == "all" else \
        ([mols] if isinstance(mols, str) else list(mols))
    out = [m for m in names if canonical_molecule(m) in targets]
    if out and len(out) == len(names):
        raise ValueError(f"corpus source '{spec.name or spec.reader}' holds only fine-tuning targets ({', '.join(out)}), "
                         f"which the strict leakage protocol keeps out of pretraining; remove the source")
    return (replace(spec, molecules=[m for m in names if m not in out]) if out else spec), out


def build_corpus(cfg: Union[CorpusConfig, Dict, List], data_dir=None, log=print) -> Corpus:
    """Load every source, apply the leakage protocol, and assemble the :class:`Corpus`."""
    cfg = corpus_config_from_obj(cfg)
    data_dir = data_dir or cfg.data_dir
    if cfg.packed:
        raise ValueError(f"the corpus is packed ({cfg.packed}): open it with forcefield.pretrain.corpus_pack."
                         f"open_corpus, which reads packed files and builds the others")
    if not cfg.sources:
        raise ValueError("the corpus lists no sources")
    for s in cfg.sources:
        if s.reader == "qm9" and (s.split or "train") in ("test", "all") and cfg.leakage.protocol != "none":
            raise ValueError("QM9 source with split '%s' would put QM9 test molecules into pretraining; use "
                             "split: train (or leakage protocol 'none' on purpose)" % (s.split or "train"))
    targets = resolve_targets(cfg.leakage, data_dir) if cfg.leakage.protocol != "none" else []
    sets, report = [], {"leakage": asdict(cfg.leakage), "sources": []}
    for k, spec in enumerate(cfg.sources):
        by_name = []
        if cfg.leakage.protocol == "strict" and spec.reader in ("rmd17", "md17"):
            spec, by_name = _without_target_molecules(spec, {t.name for t in targets})
            if by_name:
                log(f"corpus: {spec.name or spec.reader}: target molecule(s) {', '.join(by_name)} left out by name "
                    f"(strict protocol)")
        cset = load_source(spec, data_dir, cfg.seed)
        if cset.meta.get("qm9_split") in ("test", "all") and cfg.leakage.protocol != "none":
            raise ValueError(f"corpus source '{spec.name or cset.source}' was generated from QM9 split "
                             f"'{cset.meta['qm9_split']}', which holds QM9 test molecules; generate it from the "
                             f"train split (or use leakage protocol 'none' on purpose)")
        scheme = cset.meta.get("qm9_split_scheme", QM9_SPLIT) or "unrecorded"
        if cset.meta.get("qm9_split") and scheme != QM9_SPLIT and cfg.leakage.protocol != "none":
            raise ValueError(f"corpus source '{spec.name or cset.source}' drew its molecules from the train part of "
                             f"QM9 split scheme '{scheme}', whose train part holds molecules of today's QM9 test "
                             f"split ('{QM9_SPLIT}'); generate it anew (another --out), or use leakage protocol "
                             f"'none' on purpose")
        keep, rep = apply_leakage_filter(cset, cfg.leakage, targets)
        name = spec.name or cset.source
        sets.append(cset.subset(np.flatnonzero(keep)))
        report["sources"].append({"name": name, "reader": spec.reader, "kind": spec.kind, **rep,
                                  **({"target_molecules_left_out": by_name} if by_name else {})})
        log(f"corpus: {name}: {rep['kept']} of {rep['frames']} frames kept ({spec.kind})"
            + (f", dropped {rep['dropped']}" if any(rep["dropped"].values()) else ""))
    return Corpus(sets, [s.weight for s in cfg.sources], [s.name or c.source for s, c in zip(cfg.sources, sets)],
                  report)


# ---------------------------------------------------------------------------- sampler
class EpochSampler:
    """Deterministic batches of corpus frames per epoch, sharded over ranks.

    Epoch ``e`` draws ``weight * n_s`` frames of each source ``s`` (whole copies plus a random remainder),
    shuffles them all together with ``default_rng([seed, e])`` and cuts batches of ``batch_size`` frames; the
    batch list is truncated to a multiple of ``world_size`` and rank ``r`` takes batches ``r, r + W, ...``, so
    every rank runs the same number of steps and no frame is seen twice in one epoch (for weights <= 1).
    """

    def __init__(self, corpus: Corpus, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, weights: Optional[Sequence[float]] = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.corpus, self.batch_size, self.seed = corpus, int(batch_size), int(seed)
        self.weights = np.asarray(corpus.weights if weights is None else weights, dtype=np.float64)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), drop_last
        n_total = sum(self._count(k) for k in range(len(corpus.names)))
        n_batches = n_total // self.batch_size if drop_last else math.ceil(n_total / self.batch_size)
        if n_batches < world_size:
            raise ValueError(f"the corpus gives {n_batches} batches of {batch_size} frames per epoch, fewer than "
                             f"the {world_size} processes; lower batch_size or add data")

    def _count(self, k: int) -> int:
        return int(round(self.weights[k] * len(self.corpus.source_frames(k))))

    def epoch_frames(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(epoch)])
        chosen = []
        for k in range(len(self.corpus.names)):
            idx = self.corpus.source_frames(k)
            w = float(self.weights[k])
            if len(idx) == 0 or w <= 0:
                continue
            whole, frac = int(math.floor(w)), w - math.floor(w)
            parts = [idx] * whole
            n_extra = int(round(frac * len(idx)))
            if n_extra:
                parts.append(rng.choice(idx, size=n_extra, replace=False))
            chosen.extend(parts)
        frames = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
        return frames[rng.permutation(len(frames))]

    def epoch_batches(self, epoch: int) -> List[np.ndarray]:
        frames = self.epoch_frames(epoch)
        n = len(frames) // self.batch_size if self.drop_last else math.ceil(len(frames) / self.batch_size)
        n -= n % self.world_size
        batches = [frames[b * self.batch_size:(b + 1) * self.batch_size] for b in range(n)]
        return batches[self.rank::self.world_size]

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(self.epoch_batches(0))
