"""In-memory conformation sets and batching.

A :class:`ConformationSet` stores many conformations as flat arrays (atoms of all
frames concatenated, with ``ptr`` offsets), which makes slicing and collating cheap.
Units everywhere: positions Å, energies eV, forces eV/Å.

Shapes (``F`` frames, ``A`` atoms in total over all frames):

- ``numbers``   (A,)    int64 atomic numbers
- ``positions`` (A, 3)  float64 Å
- ``ptr``       (F+1,)  int64 offsets; frame ``f`` owns atoms ``ptr[f]:ptr[f+1]``
- ``energy``    (F,)    float64 eV, or ``None``
- ``forces``    (A, 3)  float64 eV/Å, or ``None``
- ``cell``      (F, 3, 3) float64 Å, or ``None`` (molecules)
- ``pbc``       (F, 3)  bool, or ``None``
- ``frame_id``  (F,)    int64 identifier of each frame in its upstream file (for rMD17 the
  ``old_indices``, i.e. the index into the original MD17 trajectory)
- ``equilibrium`` (F,) bool: True for (near-)equilibrium geometries, e.g. QM9
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class ConformationSet:
    numbers: np.ndarray
    positions: np.ndarray
    ptr: np.ndarray
    energy: Optional[np.ndarray] = None
    forces: Optional[np.ndarray] = None
    cell: Optional[np.ndarray] = None
    pbc: Optional[np.ndarray] = None
    frame_id: Optional[np.ndarray] = None
    equilibrium: Optional[np.ndarray] = None
    source: str = ""
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.ptr = np.asarray(self.ptr, dtype=np.int64)
        n_frames = len(self.ptr) - 1
        if self.ptr[0] != 0 or self.ptr[-1] != len(self.numbers) or len(self.positions) != len(self.numbers):
            raise ValueError(
                f"inconsistent conformation set '{self.source}': ptr ends at {self.ptr[-1]}, "
                f"{len(self.numbers)} atomic numbers, {len(self.positions)} positions")
        if self.energy is not None:
            self.energy = np.asarray(self.energy, dtype=np.float64).reshape(-1)
            if len(self.energy) != n_frames:
                raise ValueError(f"'{self.source}': {len(self.energy)} energies for {n_frames} frames")
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(-1, 3)
            if len(self.forces) != len(self.numbers):
                raise ValueError(f"'{self.source}': {len(self.forces)} force rows for {len(self.numbers)} atoms")
        if self.frame_id is None:
            self.frame_id = np.arange(n_frames, dtype=np.int64)
        self.frame_id = np.asarray(self.frame_id, dtype=np.int64)
        if self.equilibrium is None:
            self.equilibrium = np.zeros(n_frames, dtype=bool)
        self.equilibrium = np.asarray(self.equilibrium, dtype=bool).reshape(-1)
        if self.cell is not None:
            self.cell = np.asarray(self.cell, dtype=np.float64).reshape(n_frames, 3, 3)
            self.pbc = (np.zeros((n_frames, 3), dtype=bool) if self.pbc is None
                        else np.asarray(self.pbc, dtype=bool).reshape(n_frames, 3))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(cls, numbers: np.ndarray, positions: np.ndarray, energy=None, forces=None,
                    frame_id=None, source: str = "", **kw) -> "ConformationSet":
        """All frames share one molecule: ``numbers`` (n,), ``positions`` (F, n, 3)."""
        positions = np.asarray(positions, dtype=np.float64)
        n_frames, n_atoms = positions.shape[0], positions.shape[1]
        numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
        if len(numbers) != n_atoms:
            raise ValueError(f"'{source}': {len(numbers)} atomic numbers but positions have {n_atoms} atoms")
        return cls(numbers=np.tile(numbers, n_frames), positions=positions.reshape(-1, 3),
                   ptr=np.arange(n_frames + 1, dtype=np.int64) * n_atoms,
                   energy=energy, forces=None if forces is None else np.asarray(forces).reshape(-1, 3),
                   frame_id=frame_id, source=source, **kw)

    @classmethod
    def concatenate(cls, sets: Sequence["ConformationSet"], source: str = "") -> "ConformationSet":
        sets = [s for s in sets if len(s) > 0]
        if not sets:
            raise ValueError("nothing to concatenate: every conformation set is empty")
        def cat(name):
            vals = [getattr(s, name) for s in sets]
            return None if any(v is None for v in vals) else np.concatenate(vals)
        offsets = np.cumsum([0] + [s.n_atoms_total for s in sets])
        ptr = np.concatenate([[0]] + [s.ptr[1:] + o for s, o in zip(sets, offsets[:-1])])
        has_cell = any(s.cell is not None for s in sets)
        cell = pbc = None
        if has_cell:
            cell = np.concatenate([s.cell if s.cell is not None else np.zeros((len(s), 3, 3)) for s in sets])
            pbc = np.concatenate([s.pbc if s.pbc is not None else np.zeros((len(s), 3), bool) for s in sets])
        return cls(numbers=cat("numbers"), positions=cat("positions"), ptr=ptr, energy=cat("energy"),
                   forces=cat("forces"), cell=cell, pbc=pbc, frame_id=cat("frame_id"),
                   equilibrium=cat("equilibrium"), source=source or "+".join(s.source for s in sets))

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.ptr) - 1

    @property
    def n_atoms_total(self) -> int:
        return int(self.ptr[-1])

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.ptr)

    @property
    def elements(self) -> List[int]:
        return sorted(set(int(z) for z in np.unique(self.numbers)))

    @property
    def formula(self) -> Optional[str]:
        """The chemical formula (Hill order, e.g. ``C2H6O``) when every frame holds the same atoms, else None
        (an empty set or several molecules): what identifies the molecule of data read from a file."""
        sizes = self.n_atoms
        if len(sizes) == 0 or (sizes != sizes[0]).any():
            return None
        per_frame = np.sort(self.numbers.reshape(len(sizes), int(sizes[0])), axis=1)
        if (per_frame != per_frame[0]).any():
            return None
        from ase.formula import Formula
        from ase.data import chemical_symbols
        return Formula.from_list([chemical_symbols[z] for z in per_frame[0]]).format("hill")

    def atom_index(self, frames: np.ndarray) -> np.ndarray:
        """Flat atom indices of the given frames, in order."""
        frames = np.asarray(frames, dtype=np.int64)
        starts, counts = self.ptr[frames], self.n_atoms[frames]
        if len(frames) == 0:
            return np.zeros(0, dtype=np.int64)
        rep = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return np.arange(counts.sum(), dtype=np.int64) + rep

    def subset(self, frames) -> "ConformationSet":
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        if len(frames) and (frames.min() < -len(self) or frames.max() >= len(self)):
            raise IndexError(f"frame index out of range for '{self.source}' with {len(self)} frames")
        frames = frames % max(len(self), 1)
        atoms = self.atom_index(frames)
        ptr = np.concatenate([[0], np.cumsum(self.n_atoms[frames])])
        pick = lambda a, idx: None if a is None else a[idx]
        return replace(self, numbers=self.numbers[atoms], positions=self.positions[atoms], ptr=ptr,
                       energy=pick(self.energy, frames), forces=pick(self.forces, atoms),
                       cell=pick(self.cell, frames), pbc=pick(self.pbc, frames),
                       frame_id=self.frame_id[frames], equilibrium=self.equilibrium[frames],
                       meta=dict(self.meta))

    def frame_positions(self, f: int) -> np.ndarray:
        return self.positions[self.ptr[f]:self.ptr[f + 1]]

    def frame_numbers(self, f: int) -> np.ndarray:
        return self.numbers[self.ptr[f]:self.ptr[f + 1]]

    def to_atoms(self, f: int):
        """One frame as an :class:`ase.Atoms` (with a single-point calculator holding the labels)."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator
        atoms = Atoms(numbers=self.frame_numbers(f), positions=self.frame_positions(f))
        if self.cell is not None:
            atoms.cell = self.cell[f]
            atoms.pbc = self.pbc[f]
        results = {}
        if self.energy is not None:
            results["energy"] = float(self.energy[f])
        if self.forces is not None:
            results["forces"] = self.forces[self.ptr[f]:self.ptr[f + 1]].copy()
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    def collate(self, frames, dtype: torch.dtype = torch.float32, device="cpu") -> "Batch":
        """Frames -> one :class:`Batch` of flat tensors."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        atoms = self.atom_index(frames)
        counts = self.n_atoms[frames]
        t = lambda a, dt=dtype: torch.as_tensor(a, dtype=dt, device=device)
        return Batch(
            numbers=t(self.numbers[atoms], torch.long),
            positions=t(self.positions[atoms]),
            batch=t(np.repeat(np.arange(len(frames)), counts), torch.long),
            energy=None if self.energy is None else t(self.energy[frames]),
            forces=None if self.forces is None else t(self.forces[atoms]),
            cell=None if self.cell is None else t(self.cell[frames]),
            pbc=None if self.pbc is None else t(self.pbc[frames], torch.bool),
            equilibrium=t(self.equilibrium[frames], torch.bool),
            frame_id=t(self.frame_id[frames], torch.long),
        )


@dataclass
class Batch:
    """Flat tensors of several conformations; ``batch[i]`` is the frame of atom ``i``."""
    numbers: torch.Tensor
    positions: torch.Tensor
    batch: torch.Tensor
    energy: Optional[torch.Tensor] = None
    forces: Optional[torch.Tensor] = None
    cell: Optional[torch.Tensor] = None
    pbc: Optional[torch.Tensor] = None
    equilibrium: Optional[torch.Tensor] = None
    frame_id: Optional[torch.Tensor] = None

    #: per-atom fields (the others, but ``batch``, are per frame)
    ATOM_FIELDS = ("numbers", "positions", "forces")

    @property
    def num_graphs(self) -> int:
        return int(self.batch.max()) + 1 if self.batch.numel() else 0

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Batch":
        return tensors_to(self, device, dtype)

    def select(self, frame_mask: torch.Tensor) -> "Batch":
        """The frames where ``frame_mask`` (B,) is True, renumbered 0..B'-1 (every field, of subclasses too)."""
        atom_mask = frame_mask[self.batch]
        new_index = torch.cumsum(frame_mask.to(torch.long), 0) - 1
        kw = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is None:
                kw[name] = None
            elif name == "batch":
                kw[name] = new_index[self.batch[atom_mask]]
            else:
                kw[name] = value[atom_mask if name in self.ATOM_FIELDS else frame_mask]
        return replace(self, **kw)


def tensors_to(obj, device=None, dtype: Optional[torch.dtype] = None):
    """A copy of a dataclass of tensors moved to ``device``; floating tensors cast to ``dtype`` (None fields stay)."""
    def mv(x):
        if x is None:
            return None
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    return replace(obj, **{k: mv(getattr(obj, k)) for k in obj.__dataclass_fields__})
