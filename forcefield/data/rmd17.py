"""Revised MD17 (rMD17) loader.

Two on-disk layouts are understood, both below ``<data_dir>/rmd17/`` (or ``data_dir`` itself
when it already is the ``rmd17`` folder):

per-split (``oreo data download rmd17``, GitHub andersx/rmd17-npz)
    ``rmd17_<mol>_<train|test>_<0N>.npz`` with 1000 frames each.
upstream (``oreo data download rmd17-figshare``, the figshare tarball)
    ``npz_data/rmd17_<mol>.npz`` (100k frames) and ``splits/index_<train|test>_<0N>.csv``
    (one row index into the npz per line).

Both npz kinds hold ``nuclear_charges``, ``coords`` (Å), ``energies`` (kcal/mol),
``forces`` (kcal/mol/Å), ``old_indices`` (frame index in the original MD17 trajectory) and
``old_energies``/``old_forces`` (the original MD17 labels of the same geometries). Energies
and forces are converted to eV and eV/Å with ``ase.units.kcal / ase.units.mol``.
``frame_id`` is ``old_indices``, so frames from either layout (and from original MD17) can be
matched to each other.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .conformations import ConformationSet
from .paths import DataNotFoundError, PathLike, data_dir_origin, read_npz, resolve_data_dir
from ..units import KCAL_PER_MOL
from .registry import RMD17_MOLECULES, molecule_key

__all__ = ["RMD17_MOLECULES", "load_rmd17", "canonical_molecule", "find_rmd17_files"]

LEVEL_OF_THEORY = {"revised": "PBE/def2-SVP", "original": "PBE+vdW-TS (original MD17, FHI-aims)"}
_SPLITS = ("train", "test", "all", "distinct")
_N_SPLITS = 5
_KEYS = ("nuclear_charges", "coords", "energies", "forces", "old_indices", "old_energies", "old_forces")


def canonical_molecule(molecule: str) -> str:
    """Canonical rMD17 molecule name (case-insensitive, ``salicylic acid`` -> ``salicylic``)."""
    key = molecule_key(molecule)
    if key not in RMD17_MOLECULES:
        raise ValueError(f"unknown rMD17 molecule '{molecule}'; valid: {', '.join(RMD17_MOLECULES)} "
                         "(aliases: 'salicylic acid', 'salicylic_acid')")
    return key


# ---------------------------------------------------------------------------- cached readers
def _stat_key(path: Path) -> Tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=6)
def _read_npz_cached(path: str, mtime_ns: int, size: int) -> Dict[str, np.ndarray]:
    out = read_npz(path, _KEYS, what="rMD17 npz", fix="Fetch it again: oreo data download rmd17 (re-fetches every "
                                                    "file whose checksum differs)")
    for arr in out.values():
        arr.flags.writeable = False  # cached: callers must copy, never modify
    return out


def _read_npz(path: Path) -> Dict[str, np.ndarray]:
    """All rMD17 arrays of one npz file; cached on (path, mtime, size)."""
    return _read_npz_cached(*_stat_key(path))


@functools.lru_cache(maxsize=64)
def _read_index_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip().split(",")[0].strip()
            if not text or text.startswith("#"):
                continue
            try:
                value = float(text)
            except ValueError:
                if not rows:  # tolerate one header line
                    continue
                raise ValueError(f"{path}:{lineno}: expected an integer row index, got '{line.strip()}'")
            if value != int(value):
                raise ValueError(f"{path}:{lineno}: expected an integer row index, got '{line.strip()}'")
            rows.append(int(value))
    out = np.asarray(rows, dtype=np.int64)
    out.flags.writeable = False
    return out


def _read_index(path: Path) -> np.ndarray:
    """Row indices of one upstream split file; cached on (path, mtime, size)."""
    return _read_index_cached(*_stat_key(path))


# ---------------------------------------------------------------------------- file lookup
def _roots(base: Path) -> List[Path]:
    """Candidate rMD17 folders: ``base/rmd17`` and ``base`` itself (if it is the rmd17 folder)."""
    return [base / "rmd17", base]


def find_rmd17_files(molecule: str, split: str, split_index: int, data_dir: Optional[PathLike] = None):
    """Locates the data for one (molecule, split, split_index).

    Returns ``("per-split", npz_path, None)`` or ``("upstream", npz_path, index_csv_path)``.
    Raises :class:`DataNotFoundError` naming every path searched.
    """
    mol = canonical_molecule(molecule)
    base = resolve_data_dir(data_dir)
    split_name = f"{split}_{split_index:02d}"
    searched: List[Path] = []
    for root in _roots(base):
        per_split = root / f"rmd17_{mol}_{split_name}.npz"
        searched.append(per_split)
        if per_split.is_file():
            return "per-split", per_split, None
    for root in _roots(base):
        full, index = root / "npz_data" / f"rmd17_{mol}.npz", root / "splits" / f"index_{split_name}.csv"
        searched += [full, index]
        if full.is_file() and index.is_file():
            return "upstream", full, index
    raise DataNotFoundError(f"rmd17_{mol}_{split_name}.npz", searched, dataset="rmd17", data_dir=base,
                            origin=data_dir_origin(data_dir),
                            hint="(the upstream layout rmd17/npz_data + rmd17/splits from "
                                 "'oreo data download rmd17-figshare' is read as well)")


def _load_arrays(molecule: str, split: str, split_index: int, data_dir) -> Tuple[Dict[str, np.ndarray], dict]:
    layout, path, index_path = find_rmd17_files(molecule, split, split_index, data_dir)
    data = _read_npz(path)
    n = len(data["energies"])
    if layout == "per-split":
        rows = np.arange(n, dtype=np.int64)
    else:
        rows = _read_index(index_path)
        bad = rows[(rows < 0) | (rows >= n)]
        if len(bad):
            raise ValueError(f"{index_path}: row indices {bad[:5].tolist()} out of range for {path} ({n} frames)")
    info = {"layout": layout, "path": str(path)}
    if index_path is not None:
        info["index_path"] = str(index_path)
    return {k: data[k] for k in _KEYS} | {"rows": rows}, info


# ---------------------------------------------------------------------------- public loader
def load_rmd17(molecule: str, split: str = "train", split_index: int = 1,
               data_dir: Optional[PathLike] = None, labels: str = "revised") -> ConformationSet:
    """Loads one rMD17 split as a :class:`ConformationSet` in Å, eV, eV/Å.

    Args:
        molecule: one of :data:`RMD17_MOLECULES` (``"salicylic acid"`` is accepted).
        split: ``"train"``, ``"test"``, ``"all"`` (union of ``train_0N`` and ``test_0N``,
            unique frame ids, train frames first) or ``"distinct"`` (every distinct frame of all 10
            published split files, 9,633 per molecule: the union over ``split_index`` 1-5, in the order
            train_01, test_01, train_02, ...; ``split_index`` is then ignored).
        split_index: which of the 5 published splits (1-5).
        data_dir: data directory (see :func:`resolve_data_dir`) or the ``rmd17`` folder itself.
        labels: ``"revised"`` (rMD17, PBE/def2-SVP) or ``"original"`` (original MD17 labels of
            the same geometries).

    ``frame_id`` holds ``old_indices`` (index into the original MD17 trajectory); ``meta``
    records molecule, split, split_index, labels, layout, file path(s), level of theory, units.
    Parsed files are cached (``functools.lru_cache`` on path, mtime and size), so repeated
    calls are cheap; the returned arrays are fresh copies.
    """
    mol = canonical_molecule(molecule)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got '{split}'")
    if isinstance(split_index, bool) or not isinstance(split_index, (int, np.integer)) \
            or not 1 <= split_index <= _N_SPLITS:
        raise ValueError(f"split_index must be an integer 1..{_N_SPLITS}, got {split_index!r}")
    split_index = int(split_index)
    if labels not in LEVEL_OF_THEORY:
        raise ValueError(f"labels must be 'revised' or 'original', got '{labels}'")

    if split == "distinct":
        parts = [(part, k) for k in range(1, _N_SPLITS + 1) for part in ("train", "test")]
    else:
        parts = [(part, split_index) for part in (["train", "test"] if split == "all" else [split])]
    loaded = [_load_arrays(mol, part, k, data_dir) for part, k in parts]
    e_key, f_key = ("energies", "forces") if labels == "revised" else ("old_energies", "old_forces")

    numbers = loaded[0][0]["nuclear_charges"]
    coords, energy, forces, frame_id = [], [], [], []
    for arrays, info in loaded:
        if not np.array_equal(arrays["nuclear_charges"], numbers):
            raise ValueError(f"{info['path']}: atomic numbers differ from the other split file")
        rows = arrays["rows"]
        coords.append(arrays["coords"][rows])  # fancy indexing copies: the cache stays untouched
        energy.append(arrays[e_key][rows])
        forces.append(arrays[f_key][rows])
        frame_id.append(arrays["old_indices"][rows])
    coords, energy, forces, frame_id = map(np.concatenate, (coords, energy, forces, frame_id))
    if split in ("all", "distinct"):
        _, first = np.unique(frame_id, return_index=True)
        keep = np.sort(first)
        coords, energy, forces, frame_id = coords[keep], energy[keep], forces[keep], frame_id[keep]

    infos = [info for _, info in loaded]
    meta = {
        "dataset": "rmd17",
        "molecule": mol,
        "split": split,
        "split_index": split_index if split != "distinct" else list(range(1, _N_SPLITS + 1)),
        "labels": labels,
        "layout": infos[0]["layout"],
        "path": infos[0]["path"] if len(infos) == 1 else [i["path"] for i in infos],
        "level_of_theory": LEVEL_OF_THEORY[labels],
        "units": {"positions": "Å", "energy": "eV", "forces": "eV/Å"},
        "frame_id": "old_indices (index into the original MD17 trajectory)",
    }
    if "index_path" in infos[0]:
        meta["index_path"] = [i["index_path"] for i in infos] if len(infos) > 1 else infos[0]["index_path"]
    source = f"rmd17/{mol}/" + ("distinct" if split == "distinct" else f"{split}_{split_index:02d}") \
        + ("" if labels == "revised" else "/original")
    return ConformationSet.from_arrays(
        numbers=numbers, positions=coords,
        energy=energy * KCAL_PER_MOL, forces=forces * KCAL_PER_MOL,
        frame_id=frame_id, source=source, meta=meta)
