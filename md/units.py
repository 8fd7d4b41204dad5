"""Unit constants used by :mod:`md` (internal units: Å, eV, eV/Å, fs, amu, K).

Velocities are stored in Å/fs, so a kinetic energy ``0.5 * m * v**2`` (amu Å²/fs²) is
converted to eV with :data:`MVV2E`, and an acceleration ``F / m`` (eV/Å/amu) to Å/fs² by
dividing by :data:`MVV2E`.
"""
from ase import units

#: Boltzmann constant in eV/K.
KB: float = float(units.kB)
#: amu·Å²/fs² -> eV (about 103.6427).
MVV2E: float = float(1.0 / units.fs ** 2)
#: eV/Å -> meV/Å
MEV: float = 1000.0
