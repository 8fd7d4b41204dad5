"""PCQM4Mv2 3D structures (OGB-LSC): the SDF of DFT-relaxed (B3LYP/6-31G*) geometries of its training molecules.

The upstream file is ``pcqm4m-v2-train.sdf.tar.gz`` (one ``pcqm4m-v2-train.sdf`` inside, 3,378,606 records in
the order of the training indices). Read here: that archive (streamed, never unpacked to disk), a ``.sdf``,
or a ``.sdf.gz``. Records are MDL molfiles (V2000; V3000 atom blocks are understood too) separated by
``$$$$``; only atoms and coordinates (Å) are used. No RDKit needed.

``frame_id`` is the record number in the file, ``equilibrium`` is True, no energies or forces.
"""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy as np
from ase.data import atomic_numbers as _SYMBOL_TO_Z

from .conformations import ConformationSet
from .paths import DataNotFoundError, PathLike

__all__ = ["iter_sdf", "parse_molfile", "load_pcqm4mv2", "load_sdf"]

LEVEL_OF_THEORY = "B3LYP/6-31G* (PCQM4Mv2 3D structures)"


def _z(symbol: str, where: str) -> int:
    try:
        return _SYMBOL_TO_Z[symbol]
    except KeyError:
        raise ValueError(f"{where}: unknown element symbol '{symbol}'") from None


def parse_molfile(lines: Sequence[str], where: str = "<sdf>") -> Tuple[str, np.ndarray, np.ndarray]:
    """One molfile record -> (title, numbers (n,), positions (n, 3) Å)."""
    if len(lines) < 4:
        raise ValueError(f"{where}: record shorter than a molfile header")
    title = lines[0].strip()
    counts = lines[3]
    if "V3000" in counts:
        numbers, pos, inside = [], [], False
        for line in lines[4:]:
            s = line.strip()
            if s.startswith("M  V30 BEGIN ATOM"):
                inside = True
                continue
            if s.startswith("M  V30 END ATOM"):
                break
            if inside and s.startswith("M  V30"):
                tok = s.split()  # M V30 idx type x y z aamap ...
                numbers.append(_z(tok[3], where))
                pos.append([float(tok[4]), float(tok[5]), float(tok[6])])
        return title, np.asarray(numbers, np.int64), np.asarray(pos, np.float64).reshape(-1, 3)
    try:
        n_atoms = int(counts[0:3])
    except ValueError:
        raise ValueError(f"{where}: bad counts line '{counts.rstrip()}'") from None
    numbers = np.empty(n_atoms, dtype=np.int64)
    pos = np.empty((n_atoms, 3), dtype=np.float64)
    for a in range(n_atoms):
        line = lines[4 + a]
        try:
            pos[a] = [float(line[0:10]), float(line[10:20]), float(line[20:30])]
            symbol = line[31:34].strip()
        except (ValueError, IndexError):  # not fixed-width: fall back to whitespace split
            tok = line.split()
            pos[a] = [float(tok[0]), float(tok[1]), float(tok[2])]
            symbol = tok[3]
        numbers[a] = _z(symbol, where)
    return title, numbers, pos


def _open_text(path: Path) -> Tuple[TextIO, Optional[tarfile.TarFile]]:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        tar = tarfile.open(path, "r:*")
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".sdf"):
                return io.TextIOWrapper(tar.extractfile(member), encoding="utf-8", errors="replace"), tar
        tar.close()
        raise ValueError(f"{path}: no .sdf file inside the archive")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace"), None
    return open(path, "r", encoding="utf-8", errors="replace"), None


def iter_sdf(path: PathLike) -> Iterator[Tuple[int, str, np.ndarray, np.ndarray]]:
    """Yields (record number, title, numbers, positions Å) for every record of an SDF (plain, .gz or .tar.gz)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(str(path), [path.resolve()])
    fh, tar = _open_text(path)
    try:
        record: List[str] = []
        k = 0
        for line in fh:
            if line.startswith("$$$$"):
                if any(s.strip() for s in record):
                    title, z, r = parse_molfile(record, f"{path} record {k}")
                    yield k, title, z, r
                    k += 1
                record = []
            else:
                record.append(line.rstrip("\n"))
        if any(s.strip() for s in record) and len(record) >= 4:
            title, z, r = parse_molfile(record, f"{path} record {k}")
            yield k, title, z, r
    finally:
        fh.close()
        if tar is not None:
            tar.close()


def load_sdf(path: PathLike, max_molecules: Optional[int] = None, indices: Optional[Sequence[int]] = None,
             equilibrium: bool = True, source: Optional[str] = None, hydrogens: bool = True,
             dataset: str = "sdf") -> ConformationSet:
    """Geometries of an SDF as a :class:`ConformationSet` (record numbers as ``frame_id``)."""
    want = None if indices is None else set(int(i) for i in indices)
    numbers, pos, counts, ids = [], [], [], []
    last = max(want) if want else None
    for k, _title, z, r in iter_sdf(path):
        if max_molecules is not None and len(counts) >= max_molecules:
            break
        if last is not None and k > last:
            break
        if want is not None and k not in want:
            continue
        if not hydrogens:
            heavy = z != 1
            z, r = z[heavy], r[heavy]
        if len(z) == 0:
            continue
        numbers.append(z)
        pos.append(r)
        counts.append(len(z))
        ids.append(k)
    if not counts:
        raise ValueError(f"{path}: no molecule read")
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ConformationSet(numbers=np.concatenate(numbers), positions=np.concatenate(pos), ptr=ptr,
                           frame_id=np.asarray(ids, np.int64), equilibrium=np.full(len(counts), bool(equilibrium)),
                           source=source or Path(path).name,
                           meta={"dataset": dataset, "path": str(path), "units": {"positions": "Å"},
                                 "frame_id": "record number in the SDF"})


def load_pcqm4mv2(path: PathLike, max_molecules: Optional[int] = None,
                  indices: Optional[Sequence[int]] = None) -> ConformationSet:
    """PCQM4Mv2 training geometries (equilibrium; ``frame_id`` = record number = training index order)."""
    cset = load_sdf(path, max_molecules=max_molecules, indices=indices, equilibrium=True,
                    source="pcqm4mv2", dataset="pcqm4mv2")
    cset.meta["level_of_theory"] = LEVEL_OF_THEORY
    return cset
