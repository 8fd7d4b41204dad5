"""Original MD17 loader (sGDML npz files from quantum-machine.org).

The npz files hold ``R`` (F, n, 3) Å, ``z`` (n,), ``E`` (F, 1) kcal/mol and ``F`` (F, n, 3)
kcal/mol/Å. They are looked up as ``<data_dir>/md17/md17_<mol>.npz`` (benzene:
``md17_benzene2017.npz``; the older ``<mol>_dft.npz`` names are accepted too), or read from
an explicit path. ``frame_id`` is the row index in the file, which is the index rMD17 calls
``old_indices``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .conformations import ConformationSet
from .paths import DataNotFoundError, PathLike, data_dir_origin, read_npz, resolve_data_dir
from ..units import KCAL_PER_MOL
from .registry import MD17_MOLECULES, md17_filename, molecule_key

__all__ = ["MD17_MOLECULES", "load_md17"]

LEVEL_OF_THEORY = "PBE+vdW-TS (FHI-aims)"


def _candidates(root: Path, molecule: str) -> List[Path]:
    names = [md17_filename(molecule), f"md17_{molecule}.npz", f"{molecule}_dft.npz"]
    if molecule == "benzene":
        names.append("benzene2017_dft.npz")
    unique = list(dict.fromkeys(names))
    return [root / "md17" / n for n in unique] + [root / n for n in unique]


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, mtime_ns: int, size: int) -> Dict[str, np.ndarray]:
    out = read_npz(path, ("R", "z", "E", "F"), optional=("name", "theory"), what="MD17/sGDML npz",
                   fix="Fetch it again: oreo data download md17 (re-fetches every file whose checksum differs)")
    for arr in out.values():
        arr.flags.writeable = False
    return out


def _resolve(molecule_or_path: Union[str, PathLike], data_dir: Optional[PathLike]) -> Tuple[Path, Optional[str]]:
    text = str(molecule_or_path)
    key = molecule_key(text)
    looks_like_path = text.endswith(".npz") or "/" in text or "\\" in text
    if not looks_like_path:
        if key not in MD17_MOLECULES:
            raise ValueError(f"unknown MD17 molecule '{molecule_or_path}'; valid: {', '.join(MD17_MOLECULES)} "
                             "(or pass the path of an .npz file)")
        base = resolve_data_dir(data_dir)
        searched = _candidates(base, key)
        for path in searched:
            if path.is_file():
                return path, key
        raise DataNotFoundError(f"md17/{md17_filename(key)}", searched, dataset="md17", data_dir=base,
                                origin=data_dir_origin(data_dir))
    path = Path(text).expanduser()
    if not path.is_file():
        raise DataNotFoundError(str(path), [path])
    return path, None


def load_md17(molecule_or_path: Union[str, PathLike], data_dir: Optional[PathLike] = None) -> ConformationSet:
    """Loads an original MD17 trajectory (all frames) in Å, eV, eV/Å.

    ``molecule_or_path`` is a molecule name (see :data:`MD17_MOLECULES`; looked up under
    ``<data_dir>/md17/``) or the path of an sGDML-format npz file.
    """
    path, molecule = _resolve(molecule_or_path, data_dir)
    st = path.stat()
    data = _read_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)
    R, z = data["R"], data["z"]
    n_frames = R.shape[0]
    energy = np.asarray(data["E"], dtype=np.float64).reshape(-1)
    if len(energy) != n_frames:
        raise ValueError(f"{path}: {len(energy)} energies for {n_frames} frames")
    if molecule is None and "name" in data:
        molecule = str(data["name"])
    meta = {
        "dataset": "md17",
        "molecule": molecule,
        "path": str(path),
        "level_of_theory": str(data["theory"]) if "theory" in data else LEVEL_OF_THEORY,
        "units": {"positions": "Å", "energy": "eV", "forces": "eV/Å"},
        "frame_id": "row index in the MD17 file (= rMD17 old_indices)",
    }
    return ConformationSet.from_arrays(
        numbers=z, positions=np.array(R, dtype=np.float64),
        energy=energy * KCAL_PER_MOL, forces=np.asarray(data["F"], dtype=np.float64) * KCAL_PER_MOL,
        frame_id=np.arange(n_frames, dtype=np.int64), source=f"md17/{molecule or path.stem}", meta=meta)
