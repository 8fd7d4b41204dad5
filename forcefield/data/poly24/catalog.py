"""The 24 polymers of oreo-poly24: repeat units as SMILES with two attachment points.

``[*:1]`` marks the head and ``[*:2]`` the tail of a repeat unit; an oligomer joins the tail of
unit *i* to the head of unit *i + 1* and caps both chain ends with hydrogen. ``n_repeat`` is
chosen so that every oligomer has 30-60 atoms: big enough to hold several backbone torsions,
small enough for GFN2-xTB sampling on a laptop.

This is oreo's own set, built to stand in for the 24-polymer DFT set of the ET-OREO / PolyGET
authors, which is not public. The loaders read that set as it is when a user has it
(:func:`forcefield.data.poly24.load_polymer_set`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional


@dataclass(frozen=True)
class Polymer:
    name: str            # short name used everywhere (files, CLI)
    full_name: str
    repeat_smiles: str   # repeat unit with [*:1] (head) and [*:2] (tail)
    n_repeat: int        # repeat units in the H-capped oligomer
    family: str


POLYMERS: Dict[str, Polymer] = {p.name: p for p in [
    Polymer("PE", "polyethylene", "[*:1]CC[*:2]", 6, "polyolefin"),
    Polymer("PP", "polypropylene", "[*:1]CC(C)[*:2]", 4, "polyolefin"),
    Polymer("PIB", "polyisobutylene", "[*:1]CC(C)(C)[*:2]", 3, "polyolefin"),
    Polymer("PBD", "cis-1,4-polybutadiene", "[*:1]C/C=C\\C[*:2]", 4, "polydiene"),
    Polymer("PS", "polystyrene", "[*:1]CC(c1ccccc1)[*:2]", 2, "vinyl"),
    Polymer("PVC", "poly(vinyl chloride)", "[*:1]CC(Cl)[*:2]", 6, "vinyl"),
    Polymer("PVA", "poly(vinyl alcohol)", "[*:1]CC(O)[*:2]", 5, "vinyl"),
    Polymer("PVAc", "poly(vinyl acetate)", "[*:1]CC(OC(C)=O)[*:2]", 3, "vinyl"),
    Polymer("PAN", "polyacrylonitrile", "[*:1]CC(C#N)[*:2]", 5, "vinyl"),
    Polymer("PMMA", "poly(methyl methacrylate)", "[*:1]CC(C)(C(=O)OC)[*:2]", 3, "acrylic"),
    Polymer("PTFE", "polytetrafluoroethylene", "[*:1]C(F)(F)C(F)(F)[*:2]", 6, "fluoropolymer"),
    Polymer("PVDF", "poly(vinylidene fluoride)", "[*:1]CC(F)(F)[*:2]", 6, "fluoropolymer"),
    Polymer("PEO", "poly(ethylene oxide)", "[*:1]CCO[*:2]", 5, "polyether"),
    Polymer("POM", "polyoxymethylene", "[*:1]CO[*:2]", 8, "polyether"),
    Polymer("PEEK", "poly(ether ether ketone)", "[*:1]Oc1ccc(cc1)Oc1ccc(cc1)C(=O)c1ccc(cc1)[*:2]", 1,
            "polyether"),
    Polymer("PET", "poly(ethylene terephthalate)", "[*:1]OCCOC(=O)c1ccc(cc1)C(=O)[*:2]", 2, "polyester"),
    Polymer("PBT", "poly(butylene terephthalate)", "[*:1]OCCCCOC(=O)c1ccc(cc1)C(=O)[*:2]", 2, "polyester"),
    Polymer("PLA", "poly(lactic acid)", "[*:1]OC(C)C(=O)[*:2]", 4, "polyester"),
    Polymer("PCL", "polycaprolactone", "[*:1]OCCCCCC(=O)[*:2]", 2, "polyester"),
    Polymer("PC", "bisphenol-A polycarbonate", "[*:1]Oc1ccc(cc1)C(C)(C)c1ccc(cc1)OC(=O)[*:2]", 1,
            "polycarbonate"),
    Polymer("PA6", "nylon-6", "[*:1]NCCCCCC(=O)[*:2]", 2, "polyamide"),
    Polymer("PA66", "nylon-6,6", "[*:1]NCCCCCCNC(=O)CCCCC(=O)[*:2]", 1, "polyamide"),
    Polymer("PI", "polyimide (PMDA-ODA, Kapton)",
            "[*:1]N1C(=O)c2cc3c(cc2C1=O)C(=O)N(c1ccc(Oc2ccc([*:2])cc2)cc1)C3=O", 1, "polyimide"),
    Polymer("PDMS", "polydimethylsiloxane", "[*:1]O[Si](C)(C)[*:2]", 4, "polysiloxane"),
]}

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
