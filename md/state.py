"""The batched molecular-dynamics state.

One :class:`MDState` holds ``B`` systems (replicas) with ``N`` atoms in total, stored flat:
atom ``i`` belongs to system ``batch[i]``. Per-atom fields have a leading ``N`` dimension,
per-system fields a leading ``B`` dimension. Everything that is integrated is float64.

Units: positions Å, velocities Å/fs, forces eV/Å, energies eV, masses amu, time fs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from forcefield.units import KB, MVV2E


@dataclass
class MDState:
    """Batched MD state.

    Per atom (``N``): ``positions`` (N, 3) Å, ``velocities`` (N, 3) Å/fs, ``forces`` (N, 3) eV/Å,
    ``masses`` (N,) amu, ``numbers`` (N,) int64, ``batch`` (N,) int64 system index.

    Per system (``B``): ``energy`` (B,) eV potential energy, ``active`` (B,) bool (stopped
    systems are not integrated any more), ``dof`` (B,) float64 kinetic degrees of freedom
    used for the temperature, ``cell`` (B, 3, 3) Å rows = lattice vectors or ``None``,
    ``pbc`` (B, 3) bool or ``None``.

    ``thermostat`` holds per-system integrator variables (e.g. Nosé–Hoover ``eta`` and
    ``p_eta``, each (B,)); ``step`` counts completed integration steps.
    """

    positions: torch.Tensor
    velocities: torch.Tensor
    forces: torch.Tensor
    masses: torch.Tensor
    numbers: torch.Tensor
    batch: torch.Tensor
    energy: torch.Tensor
    active: torch.Tensor
    dof: torch.Tensor
    cell: Optional[torch.Tensor] = None
    pbc: Optional[torch.Tensor] = None
    thermostat: Dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0

    # ------------------------------------------------------------------ sizes
    @property
    def n_systems(self) -> int:
        return int(self.energy.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def atoms_per_system(self) -> torch.Tensor:
        """(B,) int64 number of atoms of each system."""
        return torch.bincount(self.batch, minlength=self.n_systems)

    @property
    def atom_active(self) -> torch.Tensor:
        """(N,) bool: the atom's system is still being integrated."""
        return self.active[self.batch]

    @property
    def periodic(self) -> bool:
        return self.cell is not None and self.pbc is not None and bool(self.pbc.any())

    # ------------------------------------------------------------------ observables
    def system_sum(self, per_atom: torch.Tensor) -> torch.Tensor:
        """Sum a per-atom quantity (N, ...) over the atoms of each system -> (B, ...)."""
        out = torch.zeros((self.n_systems,) + tuple(per_atom.shape[1:]), dtype=per_atom.dtype,
                          device=per_atom.device)
        return out.index_add_(0, self.batch, per_atom)

    def kinetic_energy(self) -> torch.Tensor:
        """(B,) kinetic energy in eV."""
        return kinetic_energy(self.velocities, self.masses, self.batch, self.n_systems)

    def temperature(self) -> torch.Tensor:
        """(B,) instantaneous temperature in K, ``2 Ekin / (dof kB)``."""
        return 2.0 * self.kinetic_energy() / (self.dof * KB)

    def system_positions(self, b: int) -> torch.Tensor:
        """(n_b, 3) positions of system ``b``."""
        return self.positions[self.batch == b]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, object]:
        """Plain dict of CPU tensors (for checkpoints); inverse of :meth:`from_dict`."""
        out: Dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().clone()
            elif isinstance(v, dict):
                v = {k: t.detach().cpu().clone() for k, t in v.items()}
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, object], device="cpu") -> "MDState":
        kw = {}
        for f in fields(cls):
            v = d.get(f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device)
            elif isinstance(v, dict):
                v = {k: t.to(device) for k, t in v.items()}
            kw[f.name] = v
        return cls(**kw)


def kinetic_energy(velocities: torch.Tensor, masses: torch.Tensor, batch: torch.Tensor,
                   n_systems: int) -> torch.Tensor:
    """Kinetic energy per system (B,) in eV from velocities (N, 3) Å/fs and masses (N,) amu."""
    per_atom = 0.5 * MVV2E * masses * (velocities * velocities).sum(dim=1)
    return torch.zeros(n_systems, dtype=per_atom.dtype, device=per_atom.device).index_add_(0, batch, per_atom)


def remove_com_velocity(velocities: torch.Tensor, masses: torch.Tensor, batch: torch.Tensor,
                        n_systems: int) -> torch.Tensor:
    """Subtract each system's centre-of-mass velocity so its total momentum is zero. (N, 3)."""
    m = masses.unsqueeze(1)
    p = torch.zeros(n_systems, 3, dtype=velocities.dtype, device=velocities.device).index_add_(0, batch, m * velocities)
    mtot = torch.zeros(n_systems, dtype=masses.dtype, device=masses.device).index_add_(0, batch, masses)
    return velocities - (p / mtot.unsqueeze(1))[batch]


def maxwell_boltzmann_velocities(masses: torch.Tensor, batch: torch.Tensor, n_systems: int,
                                 temperature: float, generator: torch.Generator,
                                 remove_com: bool = True) -> torch.Tensor:
    """Draw velocities (N, 3) Å/fs from the Maxwell–Boltzmann distribution at ``temperature`` K.

    Each component is normal with variance ``kB T / m``; with ``remove_com`` the centre-of-mass
    momentum of each system is removed afterwards. No rescaling to the exact temperature.
    """
    sigma = torch.sqrt(KB * temperature / (masses * MVV2E)).unsqueeze(1)  # Å/fs
    noise = torch.randn(masses.shape[0], 3, generator=generator, dtype=torch.float64,
                        device=generator.device).to(masses.device)
    v = sigma * noise
    if remove_com:
        v = remove_com_velocity(v, masses, batch, n_systems)
    return v


def wrap_positions(positions: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor,
                   pbc: torch.Tensor) -> torch.Tensor:
    """Wrap positions (N, 3) into the unit cell along periodic directions.

    ``cell`` (B, 3, 3) rows are lattice vectors; ``pbc`` (B, 3) bool. Non-periodic directions
    are left unchanged.
    """
    cell_a = cell[batch]                                       # (N, 3, 3)
    frac = torch.linalg.solve(cell_a.transpose(1, 2), positions.unsqueeze(-1)).squeeze(-1)
    frac = torch.where(pbc[batch], frac - torch.floor(frac), frac)
    return torch.bmm(frac.unsqueeze(1), cell_a).squeeze(1)


def overlapping_atoms(positions: torch.Tensor, batch: torch.Tensor, cell: Optional[torch.Tensor] = None,
                      pbc: Optional[torch.Tensor] = None) -> Dict[int, Tuple[int, int, float]]:
    """Systems with two atoms (or an atom and a periodic image) closer than
    ``forcefield.potential.MIN_PAIR_DISTANCE`` (0.1 Å, the threshold the potentials refuse): ``{system: (i, j,
    distance Å)}`` with the closest such pair, ``i <= j`` counted from 0 within the system. ``{}`` when none
    (non-finite positions never count as close)."""
    from forcefield.graph import half_pairs, shift_vectors
    from forcefield.potential import MIN_PAIR_DISTANCE

    pos = positions.detach().to(torch.float64)
    c = None if cell is None else cell.detach().to(torch.float64)
    pairs, shifts = half_pairs(pos, batch, MIN_PAIR_DISTANCE, c, pbc)
    if pairs.shape[1] == 0:
        return {}
    vec = pos.index_select(0, pairs[1]) - pos.index_select(0, pairs[0])
    if shifts is not None and c is not None:
        vec = vec + shift_vectors(pairs, shifts, c, batch, torch.float64)
    dist = vec.norm(dim=1)
    out: Dict[int, Tuple[int, int, float]] = {}
    for k in torch.argsort(dist).tolist():
        i, j = int(pairs[0, k]), int(pairs[1, k])
        g = int(batch[i])
        if g not in out:
            li, lj = int((batch[:i] == g).sum()), int((batch[:j] == g).sum())
            out[g] = (min(li, lj), max(li, lj), float(dist[k]))
    return out


def make_state(numbers: Sequence[np.ndarray], positions: Sequence[np.ndarray],
               cells: Optional[Sequence[np.ndarray]] = None, pbcs: Optional[Sequence[np.ndarray]] = None,
               masses: Optional[Sequence[np.ndarray]] = None, remove_com: bool = True,
               device="cpu") -> MDState:
    """Build an :class:`MDState` (zero velocities/forces) from per-system arrays.

    ``numbers[b]`` (n_b,), ``positions[b]`` (n_b, 3) Å, optional ``cells[b]`` (3, 3),
    ``pbcs[b]`` (3,), ``masses[b]`` (n_b,) amu (default: ASE atomic masses).
    ``dof`` is ``3 n_b - 3`` when the centre-of-mass motion is removed, else ``3 n_b``.
    """
    from ase.data import atomic_masses

    if len(numbers) != len(positions) or len(numbers) == 0:
        raise ValueError(f"make_state needs the same non-zero number of numbers and positions arrays, "
                         f"got {len(numbers)} and {len(positions)}")
    nums = [np.asarray(z, dtype=np.int64).reshape(-1) for z in numbers]
    pos = [np.asarray(x, dtype=np.float64).reshape(-1, 3) for x in positions]
    for b, (z, x) in enumerate(zip(nums, pos)):
        if len(z) != len(x):
            raise ValueError(f"system {b}: {len(z)} atomic numbers but {len(x)} positions")
    if masses is None:
        mass = [atomic_masses[z] for z in nums]
    else:
        mass = [np.asarray(m, dtype=np.float64).reshape(-1) for m in masses]
    counts = np.array([len(z) for z in nums])
    t = lambda a, dt=torch.float64: torch.as_tensor(np.concatenate(a), dtype=dt, device=device)
    n_sys = len(nums)
    cell = pbc = None
    if cells is not None:
        cell = torch.as_tensor(np.stack([np.asarray(c, dtype=np.float64).reshape(3, 3) for c in cells]),
                               device=device)
        pbc = torch.as_tensor(np.stack([np.asarray(p, dtype=bool).reshape(3) for p in pbcs])
                              if pbcs is not None else np.ones((n_sys, 3), bool), device=device)
    dof = torch.as_tensor(3.0 * counts - (3.0 if remove_com else 0.0), dtype=torch.float64, device=device)
    positions_t = t(pos)
    return MDState(
        positions=positions_t,
        velocities=torch.zeros_like(positions_t),
        forces=torch.zeros_like(positions_t),
        masses=t(mass),
        numbers=t(nums, torch.long),
        batch=torch.as_tensor(np.repeat(np.arange(n_sys), counts), dtype=torch.long, device=device),
        energy=torch.zeros(n_sys, dtype=torch.float64, device=device),
        active=torch.ones(n_sys, dtype=torch.bool, device=device),
        dof=dof, cell=cell, pbc=pbc,
    )
