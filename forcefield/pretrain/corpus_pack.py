"""A pretraining corpus packed into one compact file, to take where the data is not (a GPU machine that has no
``$OREO_DATA_DIR``, no qm9pack, and a transfer limit).

    oreo pretrain --config examples/configs/pretrain_et_oro.yaml --corpus examples/configs/pretrain_corpus.yaml \\
        --pack-corpus corpus-et-oro.npz        # here, where the data is
    oreo pretrain --config examples/configs/pretrain_et_oro.yaml --corpus corpus-et-oro.npz --out ...   # there

What it holds: positions and forces as float32 (what pretraining collates: a float32 run on the packed corpus
sees exactly the numbers it sees on the built one), byte-shuffled and zlib-compressed; atomic numbers, frame
ids, per-frame flags and source indices; and the corpus's summary, elements and leakage report. Packing for a
method keeps only the sources its objectives use (ET-ORO draws no equilibrium frame, so QM9 stays behind), and
the packed corpus still reports the whole corpus's summary, elements and force scale: a run started on the built
corpus resumes on the packed one and back (the sampler skips unused sources either way, so the batches are the
same frames in the same order), and a run started on the packed one builds the same model.
"""
import json
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..data.conformations import ConformationSet
from ..files import atomic_write
from .corpus import Corpus, CorpusConfig, build_corpus, corpus_config_from_obj

PACK_FORMAT = "oreo-corpus-pack"
PACK_VERSION = 1


def _squeeze(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` as ``dtype`` (little-endian), its bytes shuffled by significance (the exponent bytes of neighbouring
    floats together), zlib-compressed: a uint8 array."""
    a = np.ascontiguousarray(np.asarray(a).reshape(-1), dtype=np.dtype(dtype).newbyteorder("<"))
    size = a.dtype.itemsize
    shuffled = a.view(np.uint8).reshape(-1, size).T.copy()
    return np.frombuffer(zlib.compress(shuffled.tobytes(), 6), dtype=np.uint8)


def _unsqueeze(buf: np.ndarray, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype).newbyteorder("<")
    raw = np.frombuffer(zlib.decompress(np.asarray(buf, dtype=np.uint8).tobytes()), dtype=np.uint8)
    return raw.reshape(dt.itemsize, -1).T.copy().view(dt).reshape(-1)


def save_packed_corpus(corpus: Corpus, path: Union[str, Path], sources: Optional[Sequence[bool]] = None) -> Path:
    """Write ``corpus`` (only the sources flagged in ``sources``, default all) to ``path`` (.npz), atomically."""
    keep = np.ones(len(corpus.names), dtype=bool) if sources is None else np.asarray(sources, dtype=bool)
    if len(keep) != len(corpus.names):
        raise ValueError(f"sources: {len(keep)} flags for {len(corpus.names)} corpus sources")
    if not keep.any():
        raise ValueError("no corpus source to pack: every source was left out")
    frames = np.flatnonzero(keep[corpus.source_index])
    sub = corpus.frames.subset(frames)
    meta = {"format": PACK_FORMAT, "version": PACK_VERSION, "names": corpus.names,
            "weights": [float(w) for w in corpus.weights], "packed_sources": [bool(k) for k in keep],
            "summary": corpus.summary(), "elements": [int(z) for z in corpus.elements],
            "force_rms": corpus.force_rms(),
            "report": corpus.report, "frames": int(len(frames)), "atoms": int(len(sub.numbers))}
    arrays = {"meta": np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8),
              "numbers": _squeeze(sub.numbers, "u1"), "sizes": _squeeze(np.diff(sub.ptr), "u4"),
              "positions": _squeeze(sub.positions, "f4"), "forces": _squeeze(sub.forces, "f4"),
              "frame_id": _squeeze(sub.frame_id, "i8"), "equilibrium": _squeeze(sub.equilibrium, "u1"),
              "has_forces": _squeeze(corpus.has_forces[frames], "u1"),
              "source_index": _squeeze(corpus.source_index[frames], "i2")}
    if sub.cell is not None:
        arrays["cell"] = _squeeze(sub.cell, "f4")
        arrays["pbc"] = _squeeze(sub.pbc, "u1")
    if int(np.max(sub.numbers, initial=0)) > 255:
        raise ValueError("atomic numbers above 255 cannot be packed")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return atomic_write(path, write)


def is_packed_corpus(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a file written by :func:`save_packed_corpus`."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".npz":
        return False
    try:
        with np.load(p) as z:
            return "meta" in z.files and json.loads(z["meta"].tobytes().decode()).get("format") == PACK_FORMAT
    except (OSError, ValueError):
        return False


def load_packed_corpus(path: Union[str, Path], log=print) -> Corpus:
    """The :class:`Corpus` of a packed file; sources left out when packing are present with no frames."""
    p = Path(path)
    if not is_packed_corpus(p):
        raise ValueError(f"{p} is not a packed oreo corpus (write one with `oreo pretrain ... --pack-corpus FILE`)")
    with np.load(p) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        if meta["version"] > PACK_VERSION:
            raise ValueError(f"{p} was packed by a newer oreo (pack version {meta['version']}); upgrade oreo")
        sizes = _unsqueeze(z["sizes"], "u4").astype(np.int64)
        n = len(sizes)
        ptr = np.concatenate([[0], np.cumsum(sizes)])
        cell = _unsqueeze(z["cell"], "f4").reshape(n, 3, 3) if "cell" in z.files else None
        pbc = _unsqueeze(z["pbc"], "u1").astype(bool).reshape(n, 3) if "pbc" in z.files else None
        frames = ConformationSet(numbers=_unsqueeze(z["numbers"], "u1"), ptr=ptr, cell=cell, pbc=pbc,
                                 positions=_unsqueeze(z["positions"], "f4").reshape(-1, 3),
                                 forces=_unsqueeze(z["forces"], "f4").reshape(-1, 3),
                                 frame_id=_unsqueeze(z["frame_id"], "i8"),
                                 equilibrium=_unsqueeze(z["equilibrium"], "u1").astype(bool), source="corpus")
        has_forces = _unsqueeze(z["has_forces"], "u1").astype(bool)
        source_index = _unsqueeze(z["source_index"], "i2").astype(np.int64)
    left_out = [name for name, kept in zip(meta["names"], meta["packed_sources"]) if not kept]
    log(f"corpus: {n} frames packed in {p}" + (f"; left out when packed: {', '.join(left_out)}" if left_out else ""))
    return Corpus.from_frames(frames, has_forces, source_index, names=meta["names"], weights=meta["weights"],
                              report=meta["report"], summary=meta["summary"], elements=meta["elements"],
                              force_rms=meta.get("force_rms"))


def open_corpus(cfg: Union[CorpusConfig, Dict, List], data_dir=None, log=print) -> Corpus:
    """The corpus a config names: its packed file (``packed: FILE.npz``), else built from its sources
    (:func:`~forcefield.pretrain.corpus.build_corpus`)."""
    cfg = corpus_config_from_obj(cfg)
    if cfg.packed:
        return load_packed_corpus(cfg.packed, log=log)
    return build_corpus(cfg, data_dir, log=log)
