"""Unit conversions used at the edges (readers, calculator, reports). Inside: Å, eV, eV/Å, fs, amu, K."""
from ase import units as _u

KCAL_PER_MOL = _u.kcal / _u.mol        # eV per (kcal/mol)
HARTREE = _u.Hartree                   # eV per Hartree
BOHR = _u.Bohr                         # Å per Bohr
MEV = 1000.0                           # meV per eV

ENERGY_UNITS = {"eV": 1.0, "meV": 1e-3, "kcal/mol": KCAL_PER_MOL, "kJ/mol": _u.kJ / _u.mol, "Hartree": HARTREE,
                "Ha": HARTREE}
LENGTH_UNITS = {"Å": 1.0, "A": 1.0, "Angstrom": 1.0, "Bohr": BOHR, "nm": 10.0}


def energy_factor(unit: str) -> float:
    """Factor that converts an energy in ``unit`` to eV."""
    try:
        return ENERGY_UNITS[unit]
    except KeyError:
        raise ValueError(f"unknown energy unit '{unit}'; use one of {', '.join(ENERGY_UNITS)}") from None


def length_factor(unit: str) -> float:
    """Factor that converts a length in ``unit`` to Å."""
    try:
        return LENGTH_UNITS[unit]
    except KeyError:
        raise ValueError(f"unknown length unit '{unit}'; use one of {', '.join(LENGTH_UNITS)}") from None
