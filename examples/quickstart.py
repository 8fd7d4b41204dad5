"""Quick start: the shipped aspirin model through ASE — energy, forces, a geometry optimisation, 0.1 ps of MD.

    python examples/quickstart.py            # needs the rMD17 aspirin file: oreo data download rmd17 --molecules aspirin
"""
import time

import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.constraints import FixCom
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.optimize import BFGS

from forcefield import OreoCalculator
from forcefield.data import load_rmd17

atoms = load_rmd17("aspirin", split="test").to_atoms(0)   # a held-out DFT frame (Å), labels in eV
e_dft, f_dft = atoms.get_potential_energy(), atoms.get_forces()

atoms.calc = OreoCalculator("aspirin.pt")
e, f = atoms.get_potential_energy(), atoms.get_forces()
print(f"aspirin, held-out frame: E = {e:.3f} eV (DFT {e_dft:.3f}); "
      f"force MAE vs DFT = {1000 * np.abs(f - f_dft).mean():.1f} meV/Å")

opt = BFGS(atoms, logfile=None)
opt.run(fmax=0.05, steps=200)
print(f"relaxed in {opt.nsteps} BFGS steps: E = {atoms.get_potential_energy():.3f} eV, "
      f"max |F| = {np.linalg.norm(atoms.get_forces(), axis=1).max():.3f} eV/Å")

thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
Stationary(atoms)
atoms.set_constraint(FixCom())
dyn = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, fixcm=False,
               rng=np.random.default_rng(1))
t0 = time.perf_counter()
dyn.run(200)
ms = 1000 * (time.perf_counter() - t0) / 200
print(f"0.1 ps Langevin MD at 300 K: T = {atoms.get_temperature():.0f} K, {ms:.1f} ms/step on this machine")
