"""Integrators as plain functions over an :class:`~md.state.MDState`.

Each ``*_step(state, forcefield, dt, ...)`` advances all *active* systems by one step of
``dt`` fs and returns a new state (``state.step`` + 1). Stopped systems (``state.active`` False)
keep their positions, velocities and thermostat variables. ``forcefield`` is a
:class:`~md.potential.ForceField` (or anything with its call signature); it is called once
per step for the whole batch.

- :func:`nve_step` — velocity Verlet (NVE).
- :func:`nose_hoover_step` — Nosé–Hoover (single thermostat per system), symmetric Trotter
  splitting; conserves ``Epot + Ekin + p_eta²/2Q + dof kB T eta``.
- :func:`langevin_step` — Langevin BAOAB (Leimkuhler–Matthews) with friction in 1/fs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from forcefield.units import KB, MVV2E

from .state import MDState, kinetic_energy, wrap_positions

THERMOSTATS = ("nose-hoover", "langevin", "nve")


def compute_forces(state: MDState, forcefield) -> MDState:
    """Evaluate energy (B,) and forces (N, 3) at the current positions."""
    e, f = forcefield(state.positions, state.numbers, state.batch, state.n_systems,
                      state.cell, state.pbc, state.active)
    return replace(state, energy=e, forces=f)


def _accel(forces: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """Acceleration (N, 3) in Å/fs² from forces eV/Å and masses amu."""
    return forces / (masses.unsqueeze(1) * MVV2E)


def _drift(state: MDState, positions: torch.Tensor) -> torch.Tensor:
    if state.periodic:
        positions = wrap_positions(positions, state.batch, state.cell, state.pbc)
    return positions


def _masked(state: MDState, new: MDState) -> MDState:
    """Keep the old per-atom/per-system values of inactive systems."""
    if bool(state.active.all()):
        return new
    a = state.atom_active.unsqueeze(1)
    s = state.active
    thermo = {k: torch.where(s, v, state.thermostat[k]) if v.shape[:1] == s.shape else v
              for k, v in new.thermostat.items()}
    return replace(new,
                   positions=torch.where(a, new.positions, state.positions),
                   velocities=torch.where(a, new.velocities, state.velocities),
                   forces=torch.where(a, new.forces, state.forces),
                   energy=torch.where(s, new.energy, state.energy),
                   thermostat=thermo)


# ---------------------------------------------------------------------------------- NVE
def nve_step(state: MDState, forcefield, dt: float) -> MDState:
    """One velocity-Verlet step of ``dt`` fs."""
    v = state.velocities + 0.5 * dt * _accel(state.forces, state.masses)
    x = _drift(state, state.positions + dt * v)
    e, f = forcefield(x, state.numbers, state.batch, state.n_systems, state.cell, state.pbc, state.active)
    v = v + 0.5 * dt * _accel(f, state.masses)
    new = replace(state, positions=x, velocities=v, forces=f, energy=e, step=state.step + 1)
    return _masked(state, new)


# ---------------------------------------------------------------------------------- Nosé–Hoover
def nose_hoover_mass(n_atoms: torch.Tensor, temperature: float, tau: float) -> torch.Tensor:
    """Thermostat mass Q (B,) in eV·fs² = 3 N kB T tau², tau in fs (MDsim's tau = 20 dt). MDsim's own integrator
    writes the friction as dzeta/dt = (K - 3 N kB T / 2) / Q with this Q, which in the form used here
    (dp_eta/dt = 2 K - g kB T) is a mass of 6 N kB T tau²: this thermostat is twice as stiff (its period shorter
    by sqrt(2)); the ensemble it samples is the same."""
    return 3.0 * n_atoms.to(torch.float64) * KB * temperature * tau ** 2


def nose_hoover_init(state: MDState, temperature: float, tau: float) -> MDState:
    """Add Nosé–Hoover variables: ``eta`` (B,), ``p_eta`` (B,) eV·fs and ``Q`` (B,) eV·fs²."""
    zeros = torch.zeros(state.n_systems, dtype=torch.float64, device=state.device)
    q = nose_hoover_mass(state.atoms_per_system, temperature, tau).to(state.device)
    return replace(state, thermostat={"eta": zeros.clone(), "p_eta": zeros.clone(), "Q": q})


def _nh_half_step(state: MDState, v: torch.Tensor, thermo, dt: float, kt: float):
    """Propagate thermostat and velocity scaling by dt/2 (exact sub-flow of the NH equations)."""
    q, p, eta = thermo["Q"], thermo["p_eta"], thermo["eta"]
    kin = kinetic_energy(v, state.masses, state.batch, state.n_systems)
    p = p + 0.25 * dt * (2.0 * kin - state.dof * kt)
    scale = torch.exp(-0.5 * dt * p / q)
    v = v * scale[state.batch].unsqueeze(1)
    kin = kin * scale * scale
    eta = eta + 0.5 * dt * p / q
    p = p + 0.25 * dt * (2.0 * kin - state.dof * kt)
    return v, {"eta": eta, "p_eta": p, "Q": q}


def nose_hoover_step(state: MDState, forcefield, dt: float, temperature: float) -> MDState:
    """One Nosé–Hoover step of ``dt`` fs at ``temperature`` K (needs :func:`nose_hoover_init`)."""
    kt = KB * temperature
    v, thermo = _nh_half_step(state, state.velocities, state.thermostat, dt, kt)
    v = v + 0.5 * dt * _accel(state.forces, state.masses)
    x = _drift(state, state.positions + dt * v)
    e, f = forcefield(x, state.numbers, state.batch, state.n_systems, state.cell, state.pbc, state.active)
    v = v + 0.5 * dt * _accel(f, state.masses)
    v, thermo = _nh_half_step(state, v, thermo, dt, kt)
    new = replace(state, positions=x, velocities=v, forces=f, energy=e, thermostat=thermo, step=state.step + 1)
    return _masked(state, new)


# ---------------------------------------------------------------------------------- Langevin
def langevin_step(state: MDState, forcefield, dt: float, temperature: float, friction: float,
                  generator: torch.Generator) -> MDState:
    """One BAOAB Langevin step of ``dt`` fs; ``friction`` gamma in 1/fs.

    Noise is drawn for every atom (active or not), so the random stream does not depend on
    which systems were stopped.
    """
    c1 = torch.exp(torch.tensor(-friction * dt, dtype=torch.float64))
    c2 = torch.sqrt(1.0 - c1 * c1)
    sigma = torch.sqrt(KB * temperature / (state.masses * MVV2E)).unsqueeze(1)      # (N, 1) Å/fs
    v = state.velocities + 0.5 * dt * _accel(state.forces, state.masses)             # B
    x = state.positions + 0.5 * dt * v                                                # A
    noise = torch.randn(state.n_atoms, 3, generator=generator, dtype=torch.float64,
                        device=generator.device).to(state.device)
    v = c1.to(state.device) * v + c2.to(state.device) * sigma * noise                 # O
    x = _drift(state, x + 0.5 * dt * v)                                               # A
    e, f = forcefield(x, state.numbers, state.batch, state.n_systems, state.cell, state.pbc, state.active)
    v = v + 0.5 * dt * _accel(f, state.masses)                                        # B
    new = replace(state, positions=x, velocities=v, forces=f, energy=e, step=state.step + 1)
    return _masked(state, new)


# ---------------------------------------------------------------------------------- bundle
def conserved_energy(state: MDState, temperature: Optional[float] = None) -> torch.Tensor:
    """(B,) eV: ``Epot + Ekin`` plus, for Nosé–Hoover, the thermostat energy
    ``p_eta²/2Q + dof kB T eta`` (constant for exact dynamics; drift measures integration error)."""
    total = state.energy + state.kinetic_energy()
    th = state.thermostat
    if "p_eta" in th and temperature is not None:
        total = total + th["p_eta"] ** 2 / (2.0 * th["Q"]) + state.dof * KB * temperature * th["eta"]
    return total


@dataclass
class Integrator:
    """``init(state) -> state`` (adds thermostat variables) and ``step(state) -> state``."""
    name: str
    init: Callable[[MDState], MDState]
    step: Callable[[MDState], MDState]


def make_integrator(name: str, forcefield, dt: float, temperature: float, tau: Optional[float] = None,
                    friction: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Integrator:
    """Bundle one of :data:`THERMOSTATS` with its parameters.

    ``dt`` fs; ``temperature`` K; ``tau`` fs is the Nosé–Hoover coupling time (default 20 dt);
    ``friction`` 1/fs for Langevin (default 0.01); ``generator`` is the Langevin noise source.
    """
    if dt <= 0:
        raise ValueError(f"timestep must be > 0 fs, got {dt}")
    if name == "nve":
        return Integrator(name, lambda s: replace(s, thermostat={}), lambda s: nve_step(s, forcefield, dt))
    if name == "nose-hoover":
        tau = 20.0 * dt if tau is None else tau
        return Integrator(name, lambda s: nose_hoover_init(s, temperature, tau),
                          lambda s: nose_hoover_step(s, forcefield, dt, temperature))
    if name == "langevin":
        friction = 0.01 if friction is None else friction
        if generator is None:
            raise ValueError("the Langevin integrator needs a torch.Generator for its noise")
        return Integrator(name, lambda s: replace(s, thermostat={}),
                          lambda s: langevin_step(s, forcefield, dt, temperature, friction, generator))
    raise ValueError(f"unknown thermostat '{name}'; choose one of {', '.join(THERMOSTATS)}")
