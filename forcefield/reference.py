"""Reference electronic-structure labels: energies (eV) and forces (eV/Å) of one molecule.

- GFN2-xTB through the ``tblite`` wheel: fast (tens of ms for 40 atoms), used to sample and
  label the polymer set; a semi-empirical level, documented as such wherever it is used.
- Kohn–Sham DFT through PySCF, by default PBE/def2-SVP (the revised-MD17 level).

Both are optional dependencies; a missing one raises an ImportError that says how to install it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

XTB_HINT = "pip install tblite  (or: pip install 'oreo[poly24]')"
PYSCF_HINT = "pip install 'oreo[dft]'  (or: pip install pyscf)"


def _require(modules, what: str, hint: str):
    """Import ``modules`` (the first is returned) or raise an ImportError naming ``what`` needs and the fix."""
    import importlib
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise ImportError(f"{what}, which is not installed ({exc}). Install it with: {hint}") from exc
    return loaded[0]


def require_tblite():
    return _require(("tblite", "tblite.ase"), "GFN2-xTB labels need tblite", XTB_HINT)


def require_pyscf():
    return _require(("pyscf", "pyscf.dft", "pyscf.gto"), "DFT labels need PySCF", PYSCF_HINT)


def xtb_level() -> str:
    """``"GFN2-xTB (tblite X.Y.Z)"``."""
    require_tblite()
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("tblite")
    except PackageNotFoundError:
        v = "unknown version"
    return f"GFN2-xTB (tblite {v})"


def xtb_calculator(electronic_temperature: float = 300.0, accuracy: float = 1.0):
    """An ASE calculator for GFN2-xTB (neutral, closed-shell unless the electron count is odd)."""
    require_tblite()
    from tblite.ase import TBLite
    return TBLite(method="GFN2-xTB", accuracy=accuracy, electronic_temperature=electronic_temperature,
                  verbosity=0)


def xtb_energy_forces(numbers: np.ndarray, positions: np.ndarray) -> Tuple[float, np.ndarray]:
    """GFN2-xTB energy (eV) and forces (n, 3) eV/Å of one neutral molecule."""
    from ase import Atoms
    atoms = Atoms(numbers=np.asarray(numbers), positions=np.asarray(positions, dtype=np.float64))
    atoms.calc = xtb_calculator()
    return float(atoms.get_potential_energy()), np.asarray(atoms.get_forces(), dtype=np.float64)


class SCFNotConverged(RuntimeError):
    """PySCF's SCF did not converge for a geometry (also with the second-order solver): no label for it."""


def dft_level(xc: str = "pbe", basis: str = "def2-svp") -> str:
    pyscf = require_pyscf()
    return f"{xc.upper()}/{basis} (PySCF {pyscf.__version__})"


def dft_energy_forces(numbers: np.ndarray, positions: np.ndarray, xc: str = "pbe", basis: str = "def2-svp",
                      charge: int = 0, grid_level: int = 4, conv_tol: float = 1e-10,
                      max_memory: Optional[int] = None) -> Tuple[float, np.ndarray]:
    """Kohn–Sham energy (eV) and forces (n, 3) eV/Å of one molecule with PySCF (RKS for even
    electron counts, UKS doublet etc. otherwise)."""
    require_pyscf()
    from ase.units import Bohr, Hartree
    from pyscf import dft, gto

    numbers = np.asarray(numbers, dtype=np.int64)
    n_elec = int(numbers.sum()) - charge
    spin = n_elec % 2
    mol = gto.M(atom=[(int(z), tuple(float(c) for c in p)) for z, p in zip(numbers, positions)],
                basis=basis, unit="Angstrom", charge=charge, spin=spin, verbose=0)
    if max_memory:
        mol.max_memory = int(max_memory)
    mf = dft.RKS(mol) if spin == 0 else dft.UKS(mol)
    mf.xc = xc
    mf.grids.level = grid_level
    mf.conv_tol = conv_tol
    energy = mf.kernel()
    if not mf.converged:          # a second try: the second-order (Newton) solver, from where the first stopped
        mf = mf.newton()
        energy = mf.kernel(mf.mo_coeff, mf.mo_occ)
    if not mf.converged:
        raise SCFNotConverged(f"PySCF's SCF ({xc.upper()}/{basis}) did not converge for this geometry, also with the "
                              f"second-order solver")
    grad = mf.nuc_grad_method().kernel()           # Hartree/Bohr
    return float(energy * Hartree), -np.asarray(grad) * Hartree / Bohr
