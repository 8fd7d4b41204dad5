"""ANI-style HDF5 files: ANI-1x / ANI-2x releases and the ANI-1 layout (also used by the Goodpaster alkane set).

Layouts understood (groups may be nested at any depth; every group that holds a ``coordinates`` dataset is one
molecule with F conformations):

ANI-1x / ANI-2x (``ani1x-release.h5``)
    ``atomic_numbers`` (n,), ``coordinates`` (F, n, 3) Å, ``<level>.energy`` (F,) Hartree and
    ``<level>.forces`` (F, n, 3) Hartree/Å, e.g. ``level="wb97x_dz"`` (the default) or ``"ccsd(t)_cbs"``
    (energies only). Conformations whose requested label is NaN are dropped.
ANI-1 (``ani_gdb_s0N.h5``, Goodpaster ``gdb11_s02``)
    ``species`` (n,) bytes (element symbols), ``coordinates`` (F, n, 3) Å, ``energies`` (F,) Hartree and,
    in some files, ``forces``. The force unit is not part of the format: pass ``forces_unit``. For the
    Goodpaster ethane normal-mode file ``C2H6_DFT+Force_NMS.h5`` it is ``"hartree/bohr"`` (checked against
    finite differences of its energies: dE / (-F . dR) = 1.88 ~ 1 / 0.529).

Output in Å, eV, eV/Å. ``frame_id`` is the running conformation number in file order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from ase.data import atomic_numbers as _SYMBOL_TO_Z

from ..units import energy_unit_factor, forces_unit_factor
from .conformations import ConformationSet
from .paths import DataNotFoundError, PathLike

__all__ = ["load_ani", "forces_unit_factor", "ANI1X_DEFAULT_LEVEL"]

ANI1X_DEFAULT_LEVEL = "wb97x_dz"


def _molecule_groups(h5) -> List[str]:
    import h5py
    found: List[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "coordinates" in obj:
            found.append(name)
    h5.visititems(visit)
    return found


def _numbers(group, where: str) -> np.ndarray:
    if "atomic_numbers" in group:
        return np.asarray(group["atomic_numbers"][()], dtype=np.int64).reshape(-1)
    if "species" in group:
        raw = group["species"][()]
        try:
            return np.array([_SYMBOL_TO_Z[s.decode() if isinstance(s, bytes) else str(s)] for s in raw], np.int64)
        except KeyError as exc:
            raise ValueError(f"{where}: unknown element symbol {exc}") from None
    raise ValueError(f"{where}: neither 'atomic_numbers' nor 'species'")


def load_ani(path: PathLike, level: Optional[str] = None, energy_unit: str = "hartree",
             forces_unit: Optional[str] = None, forces: Union[bool, str] = "auto",
             groups: Optional[Sequence[str]] = None, max_frames: Optional[int] = None,
             equilibrium: bool = False, source: Optional[str] = None) -> ConformationSet:
    """Reads an ANI-style HDF5 file into a :class:`ConformationSet` (Å, eV, eV/Å).

    Args:
        level: ANI-1x level of theory prefix (``"wb97x_dz"``, ``"wb97x_tz"``, ``"ccsd(t)_cbs"`` ...). ``None``:
            ``energies``/``forces`` for ANI-1 files, ``wb97x_dz`` for ANI-1x files.
        energy_unit: unit of the stored energies (Hartree in every ANI release).
        forces_unit: ``ENERGY/LENGTH``; default ``hartree/Å`` for ANI-1x files, required for ANI-1-style files.
        forces: ``"auto"`` (read them when every selected molecule has them), ``True`` (required) or ``False``.
        groups: only these molecule groups (paths inside the file), in that order.
        max_frames: stop after this many conformations.
    """
    import h5py
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(str(path), [path.resolve()])
    e_fac = energy_unit_factor(energy_unit)
    numbers_l: List[np.ndarray] = []
    pos_l: List[np.ndarray] = []
    e_l: List[np.ndarray] = []
    f_l: List[Optional[np.ndarray]] = []
    counts: List[int] = []
    names: List[str] = []
    layout = None
    with h5py.File(path, "r") as h5:
        chosen = list(groups) if groups is not None else _molecule_groups(h5)
        if not chosen:
            raise ValueError(f"{path}: no group with a 'coordinates' dataset: not an ANI-style HDF5 file")
        total = 0
        for name in chosen:
            if max_frames is not None and total >= max_frames:
                break
            if name not in h5:
                raise KeyError(f"{path}: no group '{name}'")
            g = h5[name]
            where = f"{path}:{name}"
            is_1x = "atomic_numbers" in g
            layout = layout or ("ani-1x" if is_1x else "ani-1")
            lvl = level or (ANI1X_DEFAULT_LEVEL if is_1x else None)
            e_key = f"{lvl}.energy" if lvl else "energies"
            f_key = f"{lvl}.forces" if lvl else "forces"
            if e_key not in g:
                raise KeyError(f"{where}: no '{e_key}' (has {sorted(g.keys())})")
            z = _numbers(g, where)
            R = np.asarray(g["coordinates"][()], dtype=np.float64).reshape(-1, len(z), 3)
            E = np.asarray(g[e_key][()], dtype=np.float64).reshape(-1)
            F = None
            want_f = forces is True or (forces == "auto")
            if want_f and f_key in g:
                unit = forces_unit or ("hartree/Å" if is_1x else None)
                if unit is None:
                    raise ValueError(f"{where}: this ANI-1-style file has forces but their unit is not part of the "
                                     "format; pass forces_unit (e.g. 'hartree/bohr' for the Goodpaster ethane "
                                     "normal-mode file), or forces=False")
                F = np.asarray(g[f_key][()], dtype=np.float64).reshape(R.shape) * forces_unit_factor(unit)
            elif forces is True:
                raise KeyError(f"{where}: no '{f_key}' but forces=True")
            ok = np.isfinite(E)
            if F is not None:
                ok &= np.isfinite(F).all(axis=(1, 2))
            idx = np.flatnonzero(ok)
            if max_frames is not None:
                idx = idx[:max_frames - total]
            if len(idx) == 0:
                continue
            total += len(idx)
            numbers_l.append(np.tile(z, len(idx)))
            pos_l.append(R[idx].reshape(-1, 3))
            e_l.append(E[idx] * e_fac)
            f_l.append(None if F is None else F[idx].reshape(-1, 3))
            counts += [len(z)] * len(idx)
            names.append(name)
    if not counts:
        raise ValueError(f"{path}: no conformation with finite labels in the selected groups")
    have_f = [f is not None for f in f_l]
    if forces == "auto" and not all(have_f):
        f_l = [None] * len(f_l)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    meta: Dict[str, object] = {"dataset": "ani", "layout": layout, "path": str(path), "groups": names,
                               "level": level, "file_units": {"energy": energy_unit, "forces": forces_unit},
                               "units": {"positions": "Å", "energy": "eV", "forces": "eV/Å"},
                               "frame_id": "running conformation number in file order"}
    return ConformationSet(numbers=np.concatenate(numbers_l), positions=np.concatenate(pos_l), ptr=ptr,
                           energy=np.concatenate(e_l),
                           forces=None if f_l[0] is None else np.concatenate(f_l),
                           frame_id=np.arange(len(counts), dtype=np.int64),
                           equilibrium=np.full(len(counts), bool(equilibrium)),
                           source=source or path.name, meta=meta)
