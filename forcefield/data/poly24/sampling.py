"""One sampling trajectory: GFN2-xTB Langevin MD of an oligomer, keeping labelled frames.

The dynamics run on GFN2-xTB forces (tblite); every kept frame carries the energy and forces
of the step it was taken at, so labelling is free. Seeded: the same seed gives the same frames
(to floating-point reproducibility of tblite on one machine).

:func:`sample_trajectory` takes any ASE calculator: ``oreo fit`` (:mod:`forcefield.fit`) runs its xTB candidate
pool and its committee MD through it too, with ``frame_info`` (e.g. the committee's spread of each kept frame) and
``stop_when`` (end a trajectory early, keeping its frames, instead of raising).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np


@dataclass
class SampledFrame:
    positions: np.ndarray   # (n, 3) Å
    energy: float           # eV
    forces: np.ndarray      # (n, 3) eV/Å
    step: int               # MD step (0 = first production step)
    time_fs: float
    info: Dict[str, Any] = field(default_factory=dict)   # frame_info's values; "stop_reason" on a stopping frame


@dataclass
class SamplingSettings:
    temperature: float = 300.0          # K
    timestep_fs: float = 0.5
    friction: float = 0.02              # 1/fs
    relax_steps: int = 50               # FIRE steps on xTB before the dynamics (0: none)
    equilibration_steps: int = 200
    steps: int = 1000                   # production steps
    stride: int = 20                    # keep every stride-th production step
    max_force: float = 50.0             # eV/Å: a larger force means the trajectory blew up
    # 1/fs during equilibration (None: ``friction``). Momenta drawn at T from a near-minimum geometry lose about
    # half their energy to the potential; at 0.02/fs (50 fs) the thermostat refills that too slowly for short
    # equilibrations (qm9-xtb's 50 fs left its frames at 700-740 K for 800 K)
    equilibration_friction: Optional[float] = None


class SamplingError(RuntimeError):
    """The xTB trajectory became unphysical (huge forces or non-finite labels)."""


def sample_trajectory(atoms, settings: SamplingSettings, seed: int, calculator,
                      on_step: Optional[Callable[[int], None]] = None,
                      frame_info: Optional[Callable[[Any], Dict[str, Any]]] = None,
                      stop_when: Optional[Callable[[Any], Optional[str]]] = None) -> List[SampledFrame]:
    """Run relaxation, equilibration and production on ``atoms`` (modified in place) with the
    ASE ``calculator``; returns the kept production frames.

    ``frame_info(atoms)``: extra values stored in each kept frame's ``info`` (called right after the step's
    calculation, so ``atoms.calc.results`` are that step's). ``stop_when(atoms)``: checked every step before the
    unphysical-force check; a reason (text) ends the trajectory there: the frames kept so far are returned, plus
    that step's frame with ``info["stop_reason"]``, and no :class:`SamplingError` is raised."""
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md import velocitydistribution as vd
    from ase.optimize import FIRE

    atoms.calc = calculator
    if settings.relax_steps > 0:
        FIRE(atoms, logfile=None).run(fmax=0.5, steps=settings.relax_steps)
    rng = np.random.RandomState(int(seed) % (2 ** 32))
    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution   # ASE >= 3.29 / older
    thermalize(atoms, temperature_K=settings.temperature, rng=rng)
    vd.Stationary(atoms)
    vd.ZeroRotation(atoms)
    atoms.set_constraint(FixCom())
    first = settings.equilibration_friction if settings.equilibration_friction is not None else settings.friction
    dyn = Langevin(atoms, timestep=settings.timestep_fs * units.fs, temperature_K=settings.temperature,
                   friction=first / units.fs, fixcm=False, rng=rng)
    frames: List[SampledFrame] = []
    total = settings.equilibration_steps + settings.steps
    for i in range(total):
        if i == settings.equilibration_steps and first != settings.friction:
            dyn.set_friction(settings.friction / units.fs)
        dyn.run(1)
        forces = atoms.get_forces(apply_constraint=False)   # the labels: raw xTB forces, not FixCom's projection
        energy = atoms.get_potential_energy()
        prod = i + 1 - settings.equilibration_steps
        reason = stop_when(atoms) if stop_when is not None else None
        if reason:
            frames.append(_frame(atoms, energy, forces, prod, settings, frame_info, stop_reason=reason))
            return frames
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)) or np.abs(forces).max() > settings.max_force:
            raise SamplingError(f"xTB trajectory became unphysical at step {i + 1} of {total} "
                                f"(max |F| = {np.abs(forces).max():.1f} eV/Å); lower the temperature or timestep")
        if prod > 0 and prod % settings.stride == 0:
            frames.append(_frame(atoms, energy, forces, prod, settings, frame_info))
        if on_step is not None:
            on_step(1)
    return frames


def _frame(atoms, energy, forces, step: int, settings: SamplingSettings, frame_info, **extra) -> SampledFrame:
    info = dict(frame_info(atoms)) if frame_info is not None else {}
    info.update(extra)
    return SampledFrame(positions=atoms.positions.copy(), energy=float(energy),
                        forces=np.array(forces, dtype=np.float64), step=step, time_fs=step * settings.timestep_fs,
                        info=info)


def frames_to_images(numbers, frames: List[SampledFrame], info: Dict[str, Any]) -> list:
    """Kept frames as ``ase.Atoms`` with their energy and forces (a single-point calculator), ``info`` plus the
    step and time of each: what the sampled trajectories are written as."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    images = []
    for fr in frames:
        atoms = Atoms(numbers=numbers, positions=fr.positions)
        atoms.info.update(info, step=fr.step, time_fs=fr.time_fs)
        atoms.calc = SinglePointCalculator(atoms, energy=fr.energy, forces=fr.forces)
        images.append(atoms)
    return images


def write_extxyz(path, images) -> None:
    """Write ``images`` to ``path`` as extended XYZ, atomically (a killed run leaves the old file or none)."""
    from ase.io import write
    from ...files import atomic_write
    atomic_write(path, lambda tmp: write(str(tmp), images, format="extxyz"))

