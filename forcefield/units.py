"""Units: the one table of conversions and constants. Inside oreo: Å, eV, eV/Å, fs, amu, K.

Readers convert at the edge with :func:`energy_unit_factor`, :func:`length_unit_factor` and
:func:`forces_unit_factor` (names case-insensitive: ``kcal/mol``, ``Hartree``, ``bohr``, ``Å``...); MD uses
:data:`KB` and :data:`MVV2E`; reports use :data:`MEV`.
"""
from typing import Dict

from ase import units as _u

#: eV per (kcal/mol) (0.0433641...)
KCAL_PER_MOL: float = float(_u.kcal / _u.mol)
#: Boltzmann constant in eV/K
KB: float = float(_u.kB)
#: amu·Å²/fs² -> eV (about 103.6427): velocities are in Å/fs, so ``0.5 m v²`` needs it, and ``F / m`` (eV/Å/amu)
#: is an acceleration in Å/fs² after dividing by it
MVV2E: float = float(1.0 / _u.fs ** 2)
#: meV per eV (errors are reported in meV and meV/Å)
MEV: float = 1000.0

#: Energy units accepted by the readers, as factors to eV (keys are lower case).
ENERGY_UNITS: Dict[str, float] = {
    "ev": 1.0,
    "mev": 1e-3,
    "kcal/mol": KCAL_PER_MOL,
    "kj/mol": _u.kJ / _u.mol,
    "hartree": _u.Hartree, "ha": _u.Hartree, "eh": _u.Hartree,
    "rydberg": _u.Rydberg, "ry": _u.Rydberg,
}

#: Length units accepted by the readers, as factors to Å (keys are lower case).
LENGTH_UNITS: Dict[str, float] = {
    "å": 1.0, "a": 1.0, "ang": 1.0, "angstrom": 1.0,
    "bohr": _u.Bohr, "a0": _u.Bohr,
    "nm": 10.0,
}


def _factor(table: Dict[str, float], unit: str, kind: str) -> float:
    key = str(unit).strip().lower().replace("ångström", "angstrom").replace(" ", "")
    if key not in table:
        raise ValueError(f"unknown {kind} unit '{unit}'; known: {', '.join(sorted(table))}")
    return table[key]


def energy_unit_factor(unit: str) -> float:
    """Factor converting ``unit`` to eV."""
    return _factor(ENERGY_UNITS, unit, "energy")


def length_unit_factor(unit: str) -> float:
    """Factor converting ``unit`` to Å."""
    return _factor(LENGTH_UNITS, unit, "length")


def forces_unit_factor(unit: str) -> float:
    """Factor converting a force unit written ``ENERGY/LENGTH`` (e.g. ``hartree/bohr``, ``kcal/mol/Å``) to eV/Å."""
    text = str(unit).strip()
    if "/" not in text:
        raise ValueError(f"force unit must look like ENERGY/LENGTH (e.g. hartree/bohr), got '{unit}'")
    energy, length = text.rsplit("/", 1)
    return energy_unit_factor(energy) / length_unit_factor(length)
