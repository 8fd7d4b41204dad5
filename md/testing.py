"""Synthetic systems for tests and demos (no dataset files needed)."""
from __future__ import annotations

import numpy as np
import torch


def synthetic_frames(formula: str = "CH3CH2OH", n_frames: int = 20, noise: float = 0.03, seed: int = 0,
                     potential=None, source: str = "synthetic"):
    """``n_frames`` noisy copies (Gaussian, ``noise`` Å) of ``ase.build.molecule(formula)`` as a
    ConformationSet; labelled with energies/forces from ``potential`` when given."""
    from ase.build import molecule
    from forcefield.data.conformations import ConformationSet

    atoms = molecule(formula)
    rng = np.random.default_rng(seed)
    pos = atoms.positions[None] + noise * rng.standard_normal((n_frames, len(atoms), 3))
    energy = forces = None
    if potential is not None:
        n = len(atoms)
        out = potential(torch.as_tensor(np.tile(atoms.numbers, n_frames)),
                        torch.as_tensor(pos.reshape(-1, 3)),
                        torch.arange(n_frames).repeat_interleave(n))
        energy = out["energy"].detach().numpy()
        forces = out["forces"].detach().numpy().reshape(n_frames, n, 3)
    return ConformationSet.from_arrays(atoms.numbers, pos, energy=energy, forces=forces, source=source)


def lj_crystal(repeat: int = 2, a: float = 5.26, rattle: float = 0.05, seed: int = 0):
    """An argon fcc crystal (``repeat``³ conventional cells, lattice constant ``a`` Å) with rattled
    positions, as an ``ase.Atoms`` with a periodic cubic cell."""
    from ase.build import bulk
    atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    return atoms
