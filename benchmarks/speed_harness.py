"""The speed benchmark's harness: the aspirin data, interleaved timing and the four workloads.

Every workload takes a list of contenders (:class:`speed_contenders.Contender`) and times them interleaved:
round-robin blocks, the order rotated every round, so load drift hits every contender alike; the first rounds
are warm-up. The batched MD workload integrates with :mod:`md`'s own state and Langevin (BAOAB) integrator, in
float64, the same loop for every contender.
"""
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from forcefield.units import KCAL_PER_MOL

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("single", "ase-md", "batched", "train")
UNITS = {"single": "ms/call", "ase-md": "ms/step", "batched": "atom-steps/s", "train": "samples/s"}


# --------------------------------------------------------------------------------------------- data
def data_dir() -> Path:
    env = os.environ.get("OREO_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def aspirin(n_frames: int = 64):
    """Numbers (N,), positions (F, N, 3) Å, energies (F,) eV, forces (F, N, 3) eV/Å from rMD17 (or a fallback)."""
    path = data_dir() / "rmd17" / "rmd17_aspirin_train_01.npz"
    if path.is_file():
        d = np.load(path)
        z = d["nuclear_charges"].astype(np.int64)
        r = d["coords"][:n_frames].astype(np.float64)
        e = d["energies"][:n_frames].astype(np.float64) * KCAL_PER_MOL
        f = d["forces"][:n_frames].astype(np.float64) * KCAL_PER_MOL
        return z, r, e - e.mean(), f
    from ase.build import molecule  # fallback: no labels of value, same size class
    a = molecule("CH3CH2OH")
    rng = np.random.default_rng(0)
    r = a.positions[None] + 0.05 * rng.standard_normal((n_frames, len(a), 3))
    return a.numbers.astype(np.int64), r, np.zeros(n_frames), np.zeros_like(r)


def with_batch(data, batch_size: int):
    """``(numbers, positions, energies, forces, training batch size)``: what contenders and workloads take."""
    return data + (batch_size,)


# --------------------------------------------------------------------------------------------- timing
def interleaved(contenders: List, fn: Callable[[object, int], Optional[float]], rounds: int,
                warmup: int = 2) -> Dict[str, List[float]]:
    """Round-robin: each round runs ``fn(c, k)`` (returns seconds per unit) for every contender, rotating
    the order; the first ``warmup`` rounds are dropped."""
    times: Dict[str, List[float]] = {c.name: [] for c in contenders}
    for k in range(rounds + warmup):
        order = contenders[k % len(contenders):] + contenders[:k % len(contenders)]
        for c in order:
            dt = fn(c, k)
            if k >= warmup and dt is not None:
                times[c.name].append(dt)
    return times


def check_not_exploded(name: str, x, x0, max_shift: float = 0.5) -> None:
    """A few MD steps move no atom by more than ``max_shift`` Å; otherwise the timing measured a broken
    geometry (atoms flown apart have no neighbours and cost nothing) and is refused."""
    shift = float((x - x0).norm(dim=-1).max())
    if not shift < max_shift:
        raise RuntimeError(f"{name}: an atom moved {shift:.3g} Å in one timing block; the MD is not physical "
                           f"(units or forces broken), so its timing would be meaningless")


# --------------------------------------------------------------------------------------------- workloads
def bench_single(contenders, data, rounds, per_block=5):
    pos = [torch.as_tensor(x) for x in data[1]]

    def fn(c, k):
        t = time.perf_counter()
        for m in range(per_block):
            c.single(pos[(k * per_block + m) % len(pos)])
        return (time.perf_counter() - t) / per_block
    return interleaved(contenders, fn, rounds)


def bench_ase_md(contenders, data, rounds, per_block=5):
    from ase import Atoms, units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    z, r = data[0], data[1]
    dyn, start = {}, {}
    for c in contenders:
        if c.ase_calculator is None:
            continue
        atoms = Atoms(numbers=z, positions=r[0])
        atoms.calc = c.ase_calculator()
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0), force_temp=True)
        start[c.name] = (atoms.positions.copy(), atoms.get_momenta().copy())
        dyn[c.name] = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, fixcm=False,
                               rng=np.random.default_rng(1))

    def fn(c, k):
        if c.name not in dyn:
            return None
        d = dyn[c.name]
        # every block starts from the same state: random-weight models must not drift to exploded geometries
        d.atoms.positions = start[c.name][0].copy()
        d.atoms.set_momenta(start[c.name][1].copy())
        t = time.perf_counter()
        d.run(per_block)
        dt_block = time.perf_counter() - t
        check_not_exploded(c.name, torch.as_tensor(d.atoms.positions), torch.as_tensor(start[c.name][0]))
        return dt_block / per_block
    return interleaved(contenders, fn, rounds)


class BatchedForces:
    """A contender's ``forces_batched(positions, batch)`` with the call signature of :class:`md.ForceField`,
    which :mod:`md.integrators` step with (energies are not needed for the timing)."""

    def __init__(self, forces_batched):
        self.forces_batched = forces_batched

    def __call__(self, positions, numbers, batch, n_systems, cell=None, pbc=None, active=None):
        return torch.zeros(n_systems, dtype=torch.float64), self.forces_batched(positions, batch)


def bench_batched(contenders, data, rounds, replicas, per_block=3, temperature=300.0, dt=0.5, friction=0.01):
    """Langevin BAOAB (:func:`md.integrators.langevin_step`, float64) of ``replicas`` aspirin copies; one
    batched model call per step."""
    from md.integrators import compute_forces, langevin_step
    from md.state import make_state, maxwell_boltzmann_velocities

    z, r = data[0], data[1]
    g = torch.Generator().manual_seed(0)
    start = make_state([z] * replicas, [r[k % len(r)] for k in range(replicas)], remove_com=False)
    initial, force_fields = {}, {}
    for c in contenders:
        if c.forces_batched is None:
            continue
        v = maxwell_boltzmann_velocities(start.masses, start.batch, start.n_systems, temperature, g, remove_com=False)
        force_fields[c.name] = BatchedForces(c.forces_batched)
        initial[c.name] = compute_forces(replace(start, velocities=v), force_fields[c.name])

    def fn(c, k):
        if c.name not in initial:
            return None
        state = initial[c.name]  # same start every block (random weights: no exploded geometries)
        t = time.perf_counter()
        for _ in range(per_block):
            state = langevin_step(state, force_fields[c.name], dt, temperature, friction, g)
        dt_block = time.perf_counter() - t
        check_not_exploded(c.name, state.positions, initial[c.name].positions)
        return dt_block / per_block / state.n_atoms  # seconds per atom-step
    return interleaved(contenders, fn, rounds)


def bench_train(contenders, data, rounds, per_block=2):
    batch_size = data[4]

    def fn(c, k):
        if c.train_step is None:
            return None
        t = time.perf_counter()
        for m in range(per_block):
            c.train_step(k * per_block + m)
        return (time.perf_counter() - t) / per_block / batch_size  # seconds per sample
    return interleaved(contenders, fn, rounds)


def run_all(contenders, data, args) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Every workload of ``args.workloads``: {contender: {workload: median, quartiles, n}} in the units of
    :data:`UNITS`."""
    res: Dict[str, Dict[str, Dict[str, float]]] = {}
    runners = {"single": lambda: bench_single(contenders, data, args.rounds),
               "ase-md": lambda: bench_ase_md(contenders, data, args.rounds),
               "batched": lambda: bench_batched(contenders, data, max(4, args.rounds // 2), args.replicas),
               "train": lambda: bench_train(contenders, data, max(4, args.rounds // 2))}
    for w in args.workloads:
        t = time.time()
        times = runners[w]()
        for name, ts in times.items():
            if not ts:
                continue
            med = float(np.median(ts))
            q1, q3 = (float(x) for x in np.percentile(ts, [25, 75]))
            if w in ("single", "ase-md"):
                value, lo, hi = med * 1e3, q1 * 1e3, q3 * 1e3
            else:  # rates: invert per-unit times
                value, lo, hi = 1.0 / med, 1.0 / q3, 1.0 / q1
            res.setdefault(name, {})[w] = {"median": value, "q1": lo, "q3": hi, "n": len(ts)}
        print(f"[{w}] {time.time() - t:.0f} s: " + ", ".join(
            f"{k}={v[w]['median']:.4g}" for k, v in res.items() if w in v), flush=True)
    return res
