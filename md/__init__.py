"""oreo molecular dynamics: batched integrators, a resumable simulation driver and MDsim-style analysis.

Library entry points (the CLI ``oreo-md`` in :mod:`md.cli` only parses arguments and calls these):

- :class:`~md.state.MDState`, :func:`~md.state.make_state` — the batched state;
- :mod:`md.integrators` — ``nve_step``, ``nose_hoover_step``, ``langevin_step`` (plain functions);
- :class:`~md.potential.ForceField`, :func:`~md.potential.load_model` — potential adapter;
- :class:`~md.config.SimulationConfig`, :func:`~md.simulate.run_simulation` — a full run;
- :mod:`md.frames` — where initial and reference frames come from; :mod:`md.rundir` — the run directory and
  the resume policy; :mod:`md.io` — its files;
- :func:`~md.analysis.analyze_run` — stability, h(r), force MAE, speed;
- :mod:`md.metrics` — the observables as pure functions.

Imports :mod:`forcefield` (models through ``forcefield.io``, frames through ``forcefield.data``, units, files,
settings, graph); ``forcefield`` never imports ``md``. Imported by the benchmarks, examples and tests.
"""
from .config import SimulationConfig
from .errors import MDInputError
from .integrators import (Integrator, conserved_energy, langevin_step, make_integrator, nose_hoover_init,
                          nose_hoover_step, nve_step)
from .potential import ForceField, load_model
from .state import MDState, make_state, maxwell_boltzmann_velocities


def run_simulation(*args, **kwargs):
    """See :func:`md.simulate.run_simulation` (imported lazily: it pulls in tqdm and the data loaders)."""
    from .simulate import run_simulation as _run
    return _run(*args, **kwargs)


def analyze_run(*args, **kwargs):
    """See :func:`md.analysis.analyze_run`."""
    from .analysis import analyze_run as _analyze
    return _analyze(*args, **kwargs)


__all__ = ["SimulationConfig", "MDInputError", "Integrator", "conserved_energy", "langevin_step", "make_integrator",
           "nose_hoover_init", "nose_hoover_step", "nve_step", "ForceField", "load_model", "MDState", "make_state",
           "maxwell_boltzmann_velocities", "run_simulation", "analyze_run"]
