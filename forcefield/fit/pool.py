"""The candidate pool of ``oreo fit``: conformers of the molecule, then GFN2-xTB Langevin MD from each of them at
each temperature (the poly24 sampler, :func:`forcefield.data.poly24.sampling.sample_trajectory`).

Conformers: from SMILES, RDKit ETKDGv3 + MMFF94 (:func:`forcefield.data.poly24.build.embed`), one per seed; from
a structure file, its frames. Seeded: the same seed gives the same pool (to the floating-point reproducibility of
tblite on one machine). Each trajectory is written atomically when done (``pool/T<K>_c<i>.extxyz``), so a killed
pool stage redoes at most one trajectory; ``pool/pool.extxyz`` holds them all, with ``frame_id`` in each frame's
info. Only neutral closed-shell molecules are supported (the xTB and DFT labels assume them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..data.poly24.sampling import frames_to_images, write_extxyz
from .label import FIT_HINT
from .progress import Progress


@dataclass
class PoolSettings:
    temperatures: Sequence[float] = (300.0, 600.0)
    steps: int = 1000               # production steps per trajectory
    equilibration: int = 100
    stride: int = 10                # keep every stride-th production step
    relax_steps: int = 50           # FIRE steps on xTB first
    timestep_fs: float = 0.5
    friction: float = 0.02          # 1/fs
    seed: int = 0


# ---------------------------------------------------------------------------- conformers
def molecule_from_smiles(smiles: str):
    """An RDKit molecule with explicit hydrogens; a clear error for bad, charged or open-shell input."""
    try:
        from rdkit import Chem, RDLogger
    except ImportError as exc:
        raise RuntimeError(f"conformers from SMILES need RDKit, which is not installed ({exc}). Install it with: "
                           f"{FIT_HINT}") from None
    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse the SMILES '{smiles}'; check it (e.g. ethanol is CCO, water O), or pass "
                         f"a 3D structure with --structure FILE")
    charge = Chem.GetFormalCharge(mol)
    if charge != 0:
        raise ValueError(f"SMILES '{smiles}' has a net charge of {charge:+d}; oreo fit supports neutral molecules only")
    if any(a.GetNumRadicalElectrons() for a in mol.GetAtoms()):
        raise ValueError(f"SMILES '{smiles}' has unpaired electrons; oreo fit supports closed-shell molecules only")
    return Chem.AddHs(mol)


def conformers_from_smiles(smiles: str, n: int, seed: int = 0) -> List["object"]:
    """``n`` conformers (ase.Atoms) of ``smiles``: ETKDGv3 with seeds ``seed``, ``seed + 1``, ..., each relaxed
    with MMFF94 (UFF where MMFF lacks parameters)."""
    from ase import Atoms
    from ..data.poly24.build import embed
    mol = molecule_from_smiles(smiles)
    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    return [Atoms(numbers=numbers, positions=embed(mol, seed + k)) for k in range(n)]


def conformers_from_file(path) -> List["object"]:
    """Every frame of an ASE-readable file (one molecule, same atoms in every frame)."""
    from ..data.ase_reader import read_structures
    path = Path(path)
    try:
        images = read_structures(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} to --structure, or give the molecule as --smiles") from None
    if any(a.pbc.any() for a in images):
        raise ValueError(f"{path} is periodic; oreo fit supports isolated molecules only")
    first = images[0].numbers
    if any(not np.array_equal(a.numbers, first) for a in images):
        raise ValueError(f"the frames of {path} are not all the same molecule (atoms in the same order)")
    if int(first.sum()) % 2:
        raise ValueError(f"{path} has an odd number of electrons as a neutral molecule; oreo fit supports neutral "
                         f"closed-shell molecules only")
    from ase import Atoms
    return [Atoms(numbers=a.numbers, positions=a.positions) for a in images]


# ---------------------------------------------------------------------------- xTB MD
def trajectory_name(temperature: float, conformer: int) -> str:
    return f"T{temperature:g}_c{conformer}"


def sample_pool_trajectory(conformer, temperature: float, index: int, settings: PoolSettings,
                           on_step: Optional[Callable[[int], None]] = None, max_attempts: int = 3):
    """The kept frames of one xTB trajectory from ``conformer`` (a new seed per attempt if xTB blows up)."""
    from ..data.poly24.generate import trajectory_seed
    from ..data.poly24.sampling import SamplingError, SamplingSettings, sample_trajectory
    from ..reference import xtb_calculator
    sampling = SamplingSettings(temperature=temperature, timestep_fs=settings.timestep_fs,
                                friction=settings.friction, relax_steps=settings.relax_steps,
                                equilibration_steps=settings.equilibration, steps=settings.steps,
                                stride=settings.stride)
    for attempt in range(max_attempts):
        seed = trajectory_seed(settings.seed, "oreo-fit", temperature, index, attempt)
        atoms = conformer.copy()
        try:
            return sample_trajectory(atoms, sampling, seed, xtb_calculator(), on_step), seed
        except SamplingError:
            if attempt == max_attempts - 1:
                raise


def build_pool(folder, conformers: Sequence, settings: PoolSettings, log: Callable[[str], None] = print) -> list:
    """Every pool frame (ase.Atoms with xTB energy/forces and ``frame_id``), sampling what is not on disk yet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(t, c) for t in settings.temperatures for c in range(len(conformers))]
    todo = [(t, c) for t, c in jobs if not (folder / f"{trajectory_name(t, c)}.extxyz").is_file()]
    per_traj = settings.equilibration + settings.steps
    if todo:
        log(f"pool: GFN2-xTB Langevin MD, {len(jobs)} trajectories ({len(jobs) - len(todo)} already done) of "
            f"{per_traj} steps at {', '.join(f'{t:g}' for t in settings.temperatures)} K")
    progress = Progress("pool xTB MD", len(todo) * per_traj, "step", log)
    for t, c in todo:
        index = jobs.index((t, c))
        frames, seed = sample_pool_trajectory(conformers[c], t, index, settings, progress.advance)
        info = {"temperature_K": t, "conformer": c, "seed": seed}
        images = frames_to_images(conformers[c].numbers, frames, info)
        write_extxyz(folder / f"{trajectory_name(t, c)}.extxyz", images)
    if todo:
        progress.finish()
    from ase.io import read
    pool = []
    for t, c in jobs:
        for a in read(str(folder / f"{trajectory_name(t, c)}.extxyz"), index=":"):
            a.info["frame_id"] = len(pool)
            pool.append(a)
    write_extxyz(folder / "pool.extxyz", pool)
    return pool


def read_pool(folder) -> list:
    from ase.io import read
    return read(str(Path(folder) / "pool.extxyz"), index=":")
