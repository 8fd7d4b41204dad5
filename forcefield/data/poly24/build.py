"""H-capped oligomers from repeat-unit SMILES, with a 3D structure (RDKit ETKDG + MMFF/UFF).

RDKit is needed here only (``pip install 'oreo[poly24]'``). The atom order of an oligomer does
not depend on the seed, so every conformation of one polymer has the same atoms in the same
order (what MD analysis and h(r) comparisons need); stereocentres left open in the repeat unit
(atactic vinyl polymers) are drawn at random per seed.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .catalog import Polymer

INSTALL_HINT = "pip install 'oreo[poly24]'  (or: pip install rdkit tblite)"
_JOIN_TAG = 1000


def require_rdkit():
    try:
        from rdkit import Chem  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"building polymer oligomers needs RDKit, which is not installed ({exc}). "
                          f"Install it with: {INSTALL_HINT}") from exc


def oligomer_mol(polymer: Polymer, n_repeat: Optional[int] = None):
    """The H-capped oligomer of ``n_repeat`` units (default: the catalogue's) as an RDKit molecule
    with explicit hydrogens and no conformer."""
    require_rdkit()
    from rdkit import Chem

    n = int(n_repeat or polymer.n_repeat)
    if n < 1:
        raise ValueError(f"n_repeat must be at least 1, got {n}")
    unit = Chem.MolFromSmiles(polymer.repeat_smiles)
    if unit is None:
        raise ValueError(f"RDKit cannot parse the repeat unit of {polymer.name}: {polymer.repeat_smiles}")
    tags = sorted(a.GetAtomMapNum() for a in unit.GetAtoms() if a.GetAtomicNum() == 0)
    if tags != [1, 2]:
        raise ValueError(f"repeat unit of {polymer.name} needs exactly one [*:1] (head) and one [*:2] (tail), "
                         f"found map numbers {tags}")
    combined = None
    for i in range(n):
        piece = Chem.RWMol(unit)
        for atom in piece.GetAtoms():
            if atom.GetAtomicNum() != 0:
                continue
            head = atom.GetAtomMapNum() == 1
            end = (i == 0) if head else (i == n - 1)
            if end:                                   # chain end: hydrogen cap
                atom.SetAtomicNum(1)
                atom.SetAtomMapNum(0)
            else:                                     # joins unit i-1 (head) or i+1 (tail)
                atom.SetAtomMapNum(_JOIN_TAG + (i if head else i + 1))
        combined = piece.GetMol() if combined is None else Chem.CombineMols(combined, piece.GetMol())
    mol = Chem.molzip(combined) if n > 1 else combined
    mol = Chem.RWMol(mol)
    Chem.SanitizeMol(mol)
    return Chem.AddHs(mol)


def oligomer_smiles(polymer: Polymer, n_repeat: Optional[int] = None) -> str:
    from rdkit import Chem
    return Chem.MolToSmiles(Chem.RemoveHs(oligomer_mol(polymer, n_repeat)))


def embed(mol, seed: int, max_attempts: int = 5) -> np.ndarray:
    """Positions (n, 3) in Å of one conformer of ``mol``: ETKDGv3 with ``seed``, then MMFF94
    (UFF where MMFF lacks parameters) relaxation."""
    from rdkit.Chem import AllChem

    mol = type(mol)(mol)
    for attempt in range(max_attempts):
        params = AllChem.ETKDGv3()
        params.randomSeed = (int(seed) + 7919 * attempt) % (2 ** 31 - 1)
        params.useRandomCoords = attempt > 0
        if AllChem.EmbedMolecule(mol, params) == 0:
            break
    else:
        raise RuntimeError(f"RDKit could not embed a 3D structure after {max_attempts} attempts (seed {seed})")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    else:
        AllChem.UFFOptimizeMolecule(mol, maxIters=2000)
    return np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)


def bonds(mol) -> np.ndarray:
    """Covalent bonds (M, 2) of the molecular graph."""
    return np.array([[b.GetBeginAtomIdx(), b.GetEndAtomIdx()] for b in mol.GetBonds()], dtype=np.int64)


def build_oligomer(polymer: Polymer, seed: int, n_repeat: Optional[int] = None) -> Tuple["object", np.ndarray]:
    """``(atoms, bonds)``: an ``ase.Atoms`` conformer of the oligomer and its bond list."""
    from ase import Atoms

    mol = oligomer_mol(polymer, n_repeat)
    positions = embed(mol, seed)
    atoms = Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=positions)
    return atoms, bonds(mol)


def geometry_problems(numbers: np.ndarray, positions: np.ndarray, bond_list: np.ndarray,
                      bond_range: Tuple[float, float] = (0.85, 2.0), min_nonbonded: float = 1.0) -> List[str]:
    """What is chemically wrong with a structure: bonds outside ``bond_range`` Å, or atoms that
    are not bonded (nor share a neighbour) closer than ``min_nonbonded`` Å. Empty when sound."""
    problems = []
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    for i, j in bond_list:
        if not bond_range[0] <= d[i, j] <= bond_range[1]:
            problems.append(f"bond {i}-{j} (Z {numbers[i]}-{numbers[j]}) is {d[i, j]:.2f} Å")
    n = len(numbers)
    adj = np.zeros((n, n), dtype=bool)
    if len(bond_list):
        adj[bond_list[:, 0], bond_list[:, 1]] = adj[bond_list[:, 1], bond_list[:, 0]] = True
    near = adj | (adj.astype(int) @ adj.astype(int) > 0) | np.eye(n, dtype=bool)
    close = np.argwhere(np.triu(~near & (d < min_nonbonded)))
    problems += [f"atoms {i} and {j} are {d[i, j]:.2f} Å apart without a bond" for i, j in close]
    return problems
