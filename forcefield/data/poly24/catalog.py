"""The 24 polymers of oreo-poly24: repeat units as SMILES with two attachment points.

``[*:1]`` marks the head and ``[*:2]`` the tail of a repeat unit; an oligomer joins the tail of
unit *i* to the head of unit *i + 1* and caps both chain ends with hydrogen. ``n_repeat`` is
chosen so that every oligomer has 30-60 atoms: big enough to hold several backbone torsions,
small enough for GFN2-xTB sampling on a laptop.

The table itself is ``catalog.csv`` (name, full name, repeat-unit SMILES, repeat units, family).

This is oreo's own set, built to stand in for the 24-polymer DFT set of the ET-OREO / PolyGET
authors, which is not public. The loaders read that set as it is when a user has it
(:func:`forcefield.data.poly24.load_polymer_set`).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional


@dataclass(frozen=True)
class Polymer:
    name: str            # short name used everywhere (files, CLI)
    full_name: str
    repeat_smiles: str   # repeat unit with [*:1] (head) and [*:2] (tail)
    n_repeat: int        # repeat units in the H-capped oligomer
    family: str


#: the catalogue, one row per polymer, in ``catalog.csv`` beside this module (a table, kept as data)
CATALOG_FILE = Path(__file__).resolve().parent / "catalog.csv"


def _read_catalog(path: Path = CATALOG_FILE) -> Dict[str, Polymer]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {r["name"]: Polymer(r["name"], r["full_name"], r["repeat_smiles"], int(r["n_repeat"]), r["family"])
            for r in rows}


POLYMERS: Dict[str, Polymer] = _read_catalog()

_ALIASES = {"NYLON-6": "PA6", "NYLON6": "PA6", "NYLON-6,6": "PA66", "NYLON-66": "PA66", "NYLON66": "PA66",
            "KAPTON": "PI", "PVAC": "PVAc"}


def canonical_polymer(name: str) -> str:
    """The catalogue name of ``name`` (case-insensitive, nylon/Kapton aliases) or a clear error."""
    key = str(name).strip()
    for candidate in (key, key.upper(), _ALIASES.get(key.upper(), "")):
        if candidate in POLYMERS:
            return candidate
    for p in POLYMERS.values():
        if key.lower() == p.full_name.lower():
            return p.name
    raise ValueError(f"unknown polymer '{name}'; oreo-poly24 has {', '.join(POLYMERS)}")


def select_polymers(names: Optional[Iterable[str]]) -> List[Polymer]:
    """Catalogue entries for ``names`` (all 24 for None or ``["all"]``), in catalogue order."""
    if names is None:
        return list(POLYMERS.values())
    names = list(names)
    if not names or [n.lower() for n in names] == ["all"]:
        return list(POLYMERS.values())
    wanted = {canonical_polymer(n) for n in names}
    return [p for p in POLYMERS.values() if p.name in wanted]
