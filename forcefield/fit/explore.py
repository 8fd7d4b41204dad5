"""Committee MD of ``oreo fit`` (exploration): where does the model not know yet?

Each round runs ``md_replicas`` Langevin trajectories with the round's committee (ASE, through
:class:`~forcefield.calculator.OreoCalculator`, which gives the committee mean forces and their spread
``forces_std_max``), with the poly24 sampler :func:`forcefield.data.poly24.sampling.sample_trajectory` (no
relaxation, no equilibration: every ``md_stride``-th step is a candidate frame). Replica ``i`` starts from a
labelled training frame (seeded choice) at temperature ``md_temperatures[i % len]``.

A replica stops early when (checked every step):

- its bonds deviate more than ``bond_threshold`` (0.5 Å) from their reference lengths (MDsim's stability
  criterion: bonds from ASE natural cutoffs on the first conformer, reference length = mean over the xTB pool):
  unstable, the frame is not a candidate (an unphysical structure is not worth a DFT label);
- its committee spread passes ``md_max_std`` eV/Å: the model is extrapolating; that frame is a candidate;
- its energy or forces are not finite, or it is hotter than 10 x its temperature: unstable.

This is ASE MD rather than the project's batched ``md`` harness because ``forcefield`` never imports ``md`` (the
layering of the packages); the stability criterion is the same definition as ``md.metrics``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .progress import Progress

STOP_UNCERTAIN = "uncertain"
STOP_UNSTABLE = "unstable"


@dataclass
class ExploreSettings:
    steps: int = 1000
    replicas: int = 4
    temperatures: Sequence[float] = (300.0, 600.0)
    stride: int = 10
    timestep_fs: float = 0.5
    friction: float = 0.02
    max_std: float = 1.0
    bond_threshold: float = 0.5
    max_temperature_factor: float = 10.0


def max_bond_deviation(positions: np.ndarray, bonds: np.ndarray, reference: np.ndarray) -> float:
    """Largest |bond length - reference| (Å) of one frame (n, 3): :func:`forcefield.bonds.max_bond_deviation`."""
    from ..bonds import max_bond_deviation as per_frame
    return float(per_frame(np.asarray(positions)[None], bonds, reference)[0])


def run_replica(calc, start, temperature: float, settings: ExploreSettings, seed: int, bonds: np.ndarray,
                reference: np.ndarray, on_step: Optional[Callable[[int], None]] = None) -> Tuple[list, Dict]:
    """One committee trajectory: (kept frames, record {temperature_K, steps, time_ps, stop_reason, stop_kind})."""
    from ..data.poly24.sampling import SamplingSettings, sample_trajectory
    atoms = start.copy()
    sampling = SamplingSettings(temperature=temperature, timestep_fs=settings.timestep_fs,
                                friction=settings.friction, relax_steps=0, equilibration_steps=0,
                                steps=settings.steps, stride=settings.stride, max_force=np.inf)

    def info(a) -> Dict[str, float]:
        return {"forces_std_max": float(a.calc.results["forces_std_max"]),
                "energy_std": float(a.calc.results["energy_std"]),
                "bond_deviation": max_bond_deviation(a.positions, bonds, reference),
                "temperature": float(a.get_temperature())}

    def stop(a) -> Optional[str]:
        res = a.calc.results
        if not np.isfinite(res["energy"]) or not np.all(np.isfinite(res["forces"])) \
                or not np.all(np.isfinite(a.positions)):
            return f"{STOP_UNSTABLE}: non-finite energy, forces or positions"
        dev = max_bond_deviation(a.positions, bonds, reference)
        if dev > settings.bond_threshold:
            return f"{STOP_UNSTABLE}: max bond deviation {dev:.3f} Å > {settings.bond_threshold:g} Å"
        if a.get_temperature() > settings.max_temperature_factor * temperature:
            return f"{STOP_UNSTABLE}: temperature {a.get_temperature():.0f} K > " \
                   f"{settings.max_temperature_factor:g} x {temperature:g} K"
        if res["forces_std_max"] > settings.max_std:
            return f"{STOP_UNCERTAIN}: committee force spread {res['forces_std_max']:.3f} eV/Å > " \
                   f"{settings.max_std:g} eV/Å"
        return None

    frames = sample_trajectory(atoms, sampling, seed, calc, on_step, frame_info=info, stop_when=stop)
    reason = frames[-1].info.get("stop_reason") if frames else None
    steps = frames[-1].step if frames and reason else settings.steps
    if on_step is not None and reason:
        on_step(settings.steps - steps)
    record = {"temperature_K": float(temperature), "steps": int(steps),
              "time_ps": steps * settings.timestep_fs / 1000.0, "stop_reason": reason,
              "stop_kind": reason.split(":")[0] if reason else None}
    return frames, record


def _safe_calculator(committee_path):
    """An :class:`OreoCalculator` of the committee whose failures (e.g. atoms on top of each other, which the
    potential refuses) give non-finite results instead of an exception, so the replica stops and keeps its frames."""
    from ase.calculators.calculator import all_changes
    from ..calculator import OreoCalculator

    class SafeCalculator(OreoCalculator):
        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            try:
                super().calculate(atoms, properties, system_changes)
            except (ValueError, RuntimeError):
                n = len(atoms if atoms is not None else self.atoms)
                self.results = {"energy": np.nan, "free_energy": np.nan, "forces": np.full((n, 3), np.nan),
                                "energy_std": np.nan, "forces_std": np.full((n, 3), np.nan), "forces_std_max": np.nan}

    return SafeCalculator(str(committee_path), dtype="float32")


def explore(committee_path, starts: Sequence, settings: ExploreSettings, seed: int, bonds: np.ndarray,
            reference: np.ndarray, log: Callable[[str], None] = print, what: str = "committee MD"):
    """Run every replica; returns (candidate frames as ase.Atoms with their info, replica records)."""
    from ase import Atoms
    calc = _safe_calculator(committee_path)
    progress = Progress(what, settings.replicas * settings.steps, "step", log)
    candidates, records = [], []
    for i in range(settings.replicas):
        start = starts[i % len(starts)]
        temperature = settings.temperatures[i % len(settings.temperatures)]
        frames, rec = run_replica(calc, start, temperature, settings, seed * 1000 + i, bonds, reference,
                                  progress.advance)
        rec.update(replica=i, start_frame_id=int(start.info.get("frame_id", -1)),
                   spread_max=max((f.info["forces_std_max"] for f in frames), default=None),
                   spread_median=float(np.median([f.info["forces_std_max"] for f in frames])) if frames else None)
        records.append(rec)
        if rec["stop_reason"]:
            log(f"{what}: replica {i} ({temperature:g} K) stopped at {rec['time_ps']:.3f} ps: {rec['stop_reason']}")
        for f in frames:
            if f.info.get("stop_reason", "").startswith(STOP_UNSTABLE):
                continue
            a = Atoms(numbers=start.numbers, positions=f.positions)
            a.info.update({k: v for k, v in f.info.items() if k != "stop_reason"}, replica=i, step=f.step,
                          time_fs=f.time_fs, temperature_K=float(temperature))
            candidates.append(a)
    progress.finish()
    return candidates, records
