"""Read polymer conformation sets: oreo-poly24 as generated, or any poly24-style extxyz / ASE db.

- :func:`load_poly24` reads a folder written by ``oreo data poly24`` (default
  ``$OREO_DATA_DIR/poly24``) through its manifest: a split, some polymers, some temperatures.
- :func:`load_polymer_set` reads one extxyz / ASE database file whose frames name their polymer
  in ``atoms.info`` (key ``polymer`` by default) - the form in which the original 24-polymer set
  or a user's own polymer data can be used as is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

from ..ase_reader import load_ase
from ..conformations import ConformationSet
from ..paths import DataNotFoundError, data_dir_origin, resolve_data_dir
from .catalog import canonical_polymer

#: frame ids are FRAMES_PER_TRAJECTORY_ID * (the trajectory's index in the manifest) + the frame's index in it
FRAMES_PER_TRAJECTORY_ID = 10000
GENERATE_HINT = ("generate it with:  oreo data poly24 --out {root}   (needs: pip install 'oreo[poly24]'; "
                 "about an hour on one CPU core with the README's settings; the manifest is written when every "
                 "trajectory is done, and re-running the command continues an unfinished set), or pass the folder "
                 "of an existing set")


def poly24_root(data_dir=None, root=None) -> Path:
    """The folder of the set: ``root`` if given, else ``<data_dir>/poly24``."""
    return Path(root).expanduser() if root is not None else resolve_data_dir(data_dir) / "poly24"


def read_manifest(data_dir=None, root=None) -> dict:
    folder = poly24_root(data_dir, root)
    path = folder / "manifest.json"
    if not path.is_file():
        raise DataNotFoundError(str(path), [path], data_dir=None if root else resolve_data_dir(data_dir),
                                origin=None if root else data_dir_origin(data_dir),
                                hint=GENERATE_HINT.format(root=folder))
    return json.loads(path.read_text())


def _names(polymers: Optional[Iterable[str]], available: Sequence[str]) -> List[str]:
    if polymers is None or [str(p).lower() for p in polymers] == ["all"]:
        return list(available)
    names = []
    for p in polymers:
        name = canonical_polymer(p)
        if name not in available:
            raise ValueError(f"polymer {name} is not in this set (it has {', '.join(available)}); generate it with "
                             f"oreo data poly24 --polymers {name} --out <the same folder>")
        names.append(name)
    return names


def load_poly24(split: Union[str, Sequence[str]] = "train", polymers: Optional[Iterable[str]] = None,
                temperatures: Optional[Iterable[float]] = None, data_dir=None, root=None) -> ConformationSet:
    """Frames of ``split`` ("train", "val", "test", "all" or a list) for ``polymers`` (default all) and
    ``temperatures`` (K, default all). Frame ids are ``10000 * trajectory index + frame``, stable
    across calls; ``meta`` carries the level of theory and the polymers."""
    manifest = read_manifest(data_dir, root)
    folder = poly24_root(data_dir, root)
    splits = {"train", "val", "test"} if split == "all" else ({split} if isinstance(split, str) else set(split))
    bad = splits - {"train", "val", "test"}
    if bad:
        raise ValueError(f"unknown split(s) {sorted(bad)}; use train, val, test or all")
    names = _names(polymers, list(manifest["polymers"]))
    temps = None if temperatures is None else {float(t) for t in temperatures}
    sets = []
    for index, rec in enumerate(manifest["trajectories"]):
        if rec["split"] not in splits or rec["polymer"] not in names:
            continue
        if temps is not None and float(rec["temperature_K"]) not in temps:
            continue
        cset = load_ase(folder / rec["file"], source=rec["file"])
        if len(cset) >= FRAMES_PER_TRAJECTORY_ID:     # the ids of two trajectories would collide
            raise ValueError(f"{folder / rec['file']}: {len(cset)} frames; frame ids are "
                             f"{FRAMES_PER_TRAJECTORY_ID} x trajectory + frame, so a trajectory holds fewer than "
                             f"{FRAMES_PER_TRAJECTORY_ID}; regenerate it with a larger stride (oreo data poly24)")
        cset.frame_id = FRAMES_PER_TRAJECTORY_ID * index + np.arange(len(cset), dtype=np.int64)
        sets.append(cset)
    if not sets:
        have = sorted({float(r["temperature_K"]) for r in manifest["trajectories"]})
        raise ValueError(f"no poly24 frames for split {sorted(splits)}, polymers {names}, temperatures "
                         f"{None if temps is None else sorted(temps)} (the set has temperatures {have})")
    out = ConformationSet.concatenate(sets, source=f"poly24/{'+'.join(sorted(splits))}")
    out.meta.update(level_of_theory="; ".join(manifest.get("level_of_theory", [])), polymers=names)
    return out


def load_polymer_set(path, polymers: Optional[Iterable[str]] = None, polymer_key: str = "polymer",
                     energy_key: str = "energy", forces_key: str = "forces", energy_unit: str = "eV",
                     split: Optional[str] = None, split_key: str = "split") -> ConformationSet:
    """Frames of an extxyz / ASE-db polymer set, optionally only ``polymers`` (matched on
    ``atoms.info[polymer_key]``, exact names) and one ``split`` (on ``atoms.info[split_key]``).
    A folder with an oreo-poly24 ``manifest.json`` is read with :func:`load_poly24`."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        return load_poly24(split or "all", polymers, root=path)
    if not path.is_file():
        raise DataNotFoundError(str(path), [path], hint="pass an extxyz file or ASE database of polymer frames")
    full = load_ase(path, energy_key=energy_key, forces_key=forces_key, energy_unit=energy_unit,
                    info_keys=(polymer_key, split_key))
    names, splits = full.meta.pop("frame_info").values()
    keep = np.arange(len(full))
    if polymers is not None:
        wanted = set(polymers)
        missing_key = [i for i, name in enumerate(names) if name is None]
        if missing_key:
            raise ValueError(f"{path}: {len(missing_key)} frames lack info['{polymer_key}']; pass polymer_key= "
                             f"the key that names the polymer")
        keep = np.array([i for i in keep if names[i] in wanted], dtype=np.int64)
        if len(keep) == 0:
            raise ValueError(f"{path}: no frames of {sorted(wanted)}; the file has {sorted({str(n) for n in names})}")
    if split is not None:
        keep = np.array([i for i in keep if splits[i] == split], dtype=np.int64)
        if len(keep) == 0:
            raise ValueError(f"{path}: no frames with info['{split_key}'] == '{split}'")
    out = full.subset(keep) if len(keep) != len(full) else full
    out.meta["polymers"] = sorted({str(names[i] if names[i] is not None else "?") for i in keep})
    return out
