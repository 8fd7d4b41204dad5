"""Read anything :mod:`ase.io` reads (extxyz, ASE databases, ...) into a :class:`ConformationSet`.

Labels are looked up per frame, first match wins:

* energy: ``atoms.info[energy_key]``, then the calculator results (extxyz files put a plain
  ``energy=`` into a single-point calculator); for ASE databases ``row.data[energy_key]``,
  then ``row.key_value_pairs`` / the stored calculator results (``row.energy``);
* forces: ``atoms.arrays[forces_key]``, then the calculator results; for databases
  ``row.data[forces_key]``, then the stored calculator results (``row.forces``).

A label missing in every frame gives ``None`` for the whole set; missing in only some frames
is an error naming them. Cells and pbc are kept only when some frame is periodic. Units are
converted to Å, eV and eV/Å (``energy_unit`` in eV, meV, kcal/mol, kJ/mol, Hartree, Rydberg;
``length_unit`` in Å, Bohr, nm).

``frame_id`` is the 0-based position of the frame in the file, or the row id for databases.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..units import energy_unit_factor, length_unit_factor
from .conformations import ConformationSet
from .paths import DataNotFoundError, PathLike

__all__ = ["load_ase", "read_structures"]

_DB_FORMATS = ("db", "json", "postgresql", "mysql")


def read_structures(path: PathLike) -> list:
    """Every frame of an ASE-readable structure file (a user's ``--structure``) as ``ase.Atoms``: a missing,
    unreadable or empty file is an error (FileNotFoundError / ValueError) that names it and what to pass."""
    from ase.io import read
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file '{path}' does not exist; pass an ASE-readable file "
                                f"(e.g. .xyz/.extxyz/.sdf/.cif/.traj)")
    try:
        images = read(str(path), index=":")
    except Exception as exc:  # ase raises many types for unreadable files
        raise ValueError(f"cannot read structure file '{path}' with ase.io.read: {exc}") from None
    if not images:
        raise ValueError(f"structure file '{path}' holds no frames")
    return images


class _Frame:
    """One frame's raw content, in the file's units."""
    __slots__ = ("numbers", "positions", "cell", "pbc", "energy", "forces", "frame_id", "info")

    def __init__(self, numbers, positions, cell, pbc, energy, forces, frame_id, info=None):
        self.numbers = np.asarray(numbers, dtype=np.int64)
        self.positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        self.cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.asarray(pbc, dtype=bool).reshape(3)
        self.energy = energy
        self.forces = forces
        self.frame_id = int(frame_id)
        self.info = info or {}


def _calc_results(atoms) -> Dict[str, Any]:
    results = getattr(atoms.calc, "results", None)
    return results if isinstance(results, dict) else {}


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _selection(index: Union[str, int, slice], n: int) -> np.ndarray:
    from ase.io.formats import string2index
    sel = string2index(index) if isinstance(index, str) else index
    try:
        return np.atleast_1d(np.arange(n)[sel])
    except IndexError:
        raise IndexError(f"index {index!r} out of range for a file with {n} frames") from None


def _read_with_ase_io(path: Path, index, fmt: Optional[str], energy_key: str, forces_key: str,
                      info_keys: Sequence[str] = ()) -> List[_Frame]:
    import ase.io
    images = ase.io.read(path, index=":", format=fmt)
    if not isinstance(images, list):
        images = [images]
    frames = []
    for i in _selection(index, len(images)):
        atoms = images[i]
        results = _calc_results(atoms)
        frames.append(_Frame(
            atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc,
            energy=_first(atoms.info.get(energy_key), results.get(energy_key)),
            forces=_first(atoms.arrays.get(forces_key), results.get(forces_key)),
            frame_id=i, info={k: atoms.info.get(k) for k in info_keys}))
    return frames


def _read_with_ase_db(path: Path, index, energy_key: str, forces_key: str,
                      info_keys: Sequence[str] = ()) -> List[_Frame]:
    import ase.db
    from ase.io.formats import string2index
    with ase.db.connect(path) as db:
        query = None
        if isinstance(index, str):
            try:
                string2index(index)
            except ValueError:
                query = index  # e.g. "natoms<10" or "id>5": an ASE database query
        if query is not None:
            rows = list(db.select(query))
        else:
            rows = list(db.select())
            rows = [rows[i] for i in _selection(index, len(rows))]
    frames = []
    for row in rows:
        data = getattr(row, "data", None) or {}
        frames.append(_Frame(
            row.numbers, row.positions, row.cell, row.pbc,
            energy=_first(data.get(energy_key), row.get(energy_key)),
            forces=_first(data.get(forces_key), row.get(forces_key)),
            frame_id=row.id, info={k: row.get(k) for k in info_keys}))
    return frames


def _collect(frames: Sequence[_Frame], attr: str, what: str, path: Path) -> Optional[List[Any]]:
    have = [getattr(f, attr) is not None for f in frames]
    if not any(have):
        return None
    if not all(have):
        lacking = [f.frame_id for f, h in zip(frames, have) if not h]
        shown = ", ".join(map(str, lacking[:10])) + (" ..." if len(lacking) > 10 else "")
        raise ValueError(f"{path}: {len(lacking)} of {len(frames)} frames have no {what}: frame id(s) {shown}")
    return [getattr(f, attr) for f in frames]


def load_ase(path: PathLike, index: Union[str, int, slice] = ":", energy_key: str = "energy",
             forces_key: str = "forces", energy_unit: str = "eV", length_unit: str = "Å",
             equilibrium: Union[bool, Sequence[bool], np.ndarray] = False, source: Optional[str] = None,
             format: Optional[str] = None, info_keys: Sequence[str] = ()) -> ConformationSet:
    """Reads the frames ``index`` of ``path`` into a :class:`ConformationSet` (Å, eV, eV/Å).

    Args:
        path: any file :func:`ase.io.read` understands (extxyz, ASE ``.db``/``.json`` databases, ...).
        index: ASE index string (``":"``, ``"10:20"``, ``"-1"``), int or slice; for databases
            also a query string such as ``"natoms<10"``.
        energy_key, forces_key: names of the labels (see the module docstring for where they are
            looked up), e.g. ``"total_energy"``/``"atomic_forces"`` for ISO17 databases.
        energy_unit, length_unit: units of the file; forces are taken as energy_unit/length_unit.
        equilibrium: marks frames as (near-)equilibrium geometries (bool or one per frame).
        source: name of the set (default: the file name, plus the index when not ``":"``).
        format: ASE format name, when the file name does not tell.
        info_keys: per-frame ``atoms.info`` (or database key) values to return, as
            ``meta["frame_info"][key]`` = one value per frame (None where missing), in frame order.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(str(path), [path.resolve()])
    e_factor, l_factor = energy_unit_factor(energy_unit), length_unit_factor(length_unit)
    from ase.io.formats import filetype

    try:
        fmt = format or filetype(str(path))
    except Exception as exc:
        raise ValueError(f"ase cannot tell the format of {path}: {type(exc).__name__}: {exc}; "
                         "pass format=... (e.g. 'extxyz')") from exc
    try:
        if fmt in _DB_FORMATS:
            frames = _read_with_ase_db(path, index, energy_key, forces_key, info_keys)
        else:
            frames = _read_with_ase_io(path, index, fmt, energy_key, forces_key, info_keys)
    except (IndexError, DataNotFoundError):
        raise
    except Exception as exc:
        raise ValueError(f"ase could not read {path} (format '{fmt}'): {type(exc).__name__}: {exc}") from exc

    energies = _collect(frames, "energy", f"energy '{energy_key}'", path)
    forces = _collect(frames, "forces", f"forces '{forces_key}'", path)
    n_frames = len(frames)
    counts = [len(f.numbers) for f in frames]
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    energy = None
    if energies is not None:
        flat = [np.asarray(e, dtype=np.float64).reshape(-1) for e in energies]
        bad = [f.frame_id for f, e in zip(frames, flat) if e.size != 1]
        if bad:
            raise ValueError(f"{path}: energy '{energy_key}' is not a scalar in frame id(s) {bad[:10]}")
        energy = np.concatenate(flat) * e_factor if flat else np.zeros(0)
    force_arr = None
    if forces is not None:
        arrays = [np.asarray(x, dtype=np.float64) for x in forces]
        bad = [f.frame_id for f, x in zip(frames, arrays) if x.shape != (len(f.numbers), 3)]
        if bad:
            raise ValueError(f"{path}: forces '{forces_key}' do not have shape (n_atoms, 3) in frame id(s) {bad[:10]}")
        force_arr = np.concatenate(arrays) * (e_factor / l_factor)

    cell = pbc = None
    if any(f.pbc.any() for f in frames):
        cell = np.stack([f.cell for f in frames]) * l_factor
        pbc = np.stack([f.pbc for f in frames])

    eq = np.asarray(equilibrium, dtype=bool)
    eq = np.full(n_frames, bool(eq)) if eq.ndim == 0 else eq.reshape(-1)
    if len(eq) != n_frames:
        raise ValueError(f"equilibrium has {len(eq)} entries for {n_frames} frames")

    positions = np.concatenate([f.positions for f in frames]) if frames else np.zeros((0, 3))
    numbers = np.concatenate([f.numbers for f in frames]) if frames else np.zeros(0, dtype=np.int64)
    if source is None:
        source = path.name if index == ":" else f"{path.name}[{index}]"
    meta = {
        "dataset": "ase",
        "path": str(path),
        "format": fmt,
        "index": index if isinstance(index, (str, int)) else repr(index),
        "energy_key": energy_key,
        "forces_key": forces_key,
        "file_units": {"energy": energy_unit, "length": length_unit},
        "units": {"positions": "Å", "energy": "eV", "forces": "eV/Å"},
        "frame_id": "database row id" if fmt in _DB_FORMATS
                    else "0-based position in the file",
    }
    if info_keys:
        meta["frame_info"] = {k: [f.info.get(k) for f in frames] for k in info_keys}
    return ConformationSet(
        numbers=numbers, positions=positions * l_factor, ptr=ptr, energy=energy, forces=force_arr,
        cell=cell, pbc=pbc, frame_id=np.array([f.frame_id for f in frames], dtype=np.int64),
        equilibrium=eq, source=source, meta=meta)
