"""Simulation settings: one dataclass with MDsim's MD17 defaults, validated in one place."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from forcefield.devices import resolve_device
from forcefield.settings import from_mapping

from .errors import MDInputError
from .integrators import THERMOSTATS

#: settings that may change when a run is resumed (everything else must match the run directory)
#: (``compile`` like ``device``: the same function, other kernels; trajectories differ only by float rounding)
RESUMABLE_CHANGES = ("ps", "device", "data_dir", "poly24_dir", "checkpoint_every", "analyze", "force_frames",
                     "compile")
#: datasets besides rMD17 (--molecule) that ``--dataset`` names
DATASETS = ("poly24",)


@dataclass
class SimulationConfig:
    """Settings of one ``oreo-md simulate`` run (units: ps, fs, K, 1/fs, Å).

    Defaults follow MDsim for MD17: 500 K, 0.5 fs, Nosé–Hoover with coupling time 20 steps,
    5 replicas started from held-out frames, a frame logged every 100 steps (0.05 ps).
    """
    molecule: Optional[str] = None        #: rMD17 molecule (initial + reference frames)
    structure: Optional[str] = None       #: or: an ASE-readable file (initial + reference frames)
    dataset: Optional[str] = None         #: or: "poly24" (with ``polymer``); None = rMD17 / structure file
    polymer: Optional[str] = None         #: oreo-poly24 polymer (initial frames: its test split)
    poly24_dir: Optional[str] = None      #: the poly24 set's folder (default <data_dir>/poly24)
    model: Optional[str] = None           #: checkpoint/export path, shipped name, or py:module:factory
    allow_other_molecule: bool = False    #: run a model whose metadata names another molecule than ``molecule``
    ps: float = 300.0                     #: simulated time per replica
    replicas: int = 5
    temperature: float = 500.0            #: K (thermostat target and Maxwell–Boltzmann start)
    timestep: float = 0.5                 #: fs
    thermostat: str = "nose-hoover"       #: nose-hoover | langevin | nve
    tau_steps: float = 20.0               #: Nosé–Hoover coupling time in steps (Q = 3 N kT (tau_steps dt)²; see
                                          #: md.integrators.nose_hoover_mass for how that compares with MDsim's)
    friction: float = 0.01                #: Langevin friction, 1/fs
    seed: int = 123
    log_every: int = 100                  #: steps between logged frames
    checkpoint_every: Optional[int] = None  #: steps between checkpoints (multiple of log_every; default 10 x log_every)
    stop_unstable: bool = True            #: stop replicas whose bonds deviate > bond_threshold
    bond_threshold: float = 0.5           #: Å
    max_temperature_factor: float = 10.0  #: stop replicas hotter than this × temperature
    max_force_std: Optional[float] = None  #: eV/Å: stop replicas whose committee force spread exceeds it (committee models)
    split_index: int = 1                  #: rMD17 split (held-out = test split of this index)
    data_dir: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"                #: dtype the potential is called in
    compile: bool = False                 #: run the model through its AOTInductor export (built once per run dir)
    analyze: bool = True                  #: run the analysis at the end
    force_frames: int = 1000              #: held-out frames for the force MAE in the analysis

    # ------------------------------------------------------------------ derived
    @property
    def n_steps(self) -> int:
        return int(round(self.ps * 1000.0 / self.timestep))

    @property
    def checkpoint_interval(self) -> int:
        return int(self.checkpoint_every or 10 * self.log_every)

    @property
    def system_name(self) -> str:
        if self.molecule:
            return self.molecule
        if self.polymer:
            return self.polymer
        from pathlib import Path
        return Path(self.structure).stem if self.structure else "system"

    @property
    def model_spec(self) -> str:
        if self.model:
            return self.model
        if self.polymer:
            from .poly24 import SHIPPED_MODEL
            return SHIPPED_MODEL
        return self.molecule or ""

    # ------------------------------------------------------------------ checks
    def validate(self) -> "SimulationConfig":
        """Raise :class:`MDInputError` naming the bad setting and the fix; returns self."""
        from .frames import canonical_molecule
        self._validate_system()
        if self.molecule:
            self.molecule = canonical_molecule(self.molecule)
        if self.structure and not self.model:
            raise MDInputError("--structure needs --model (there is no shipped model for your own system)")
        try:
            self.device = str(resolve_device(self.device, "--device"))
        except ValueError as err:
            raise MDInputError(str(err)) from None
        if self.thermostat not in THERMOSTATS:
            raise MDInputError(f"unknown thermostat '{self.thermostat}'; use --thermostat "
                               f"{' | '.join(THERMOSTATS)}")
        checks = [
            (self.ps > 0, f"--ps must be > 0 (simulated picoseconds), got {self.ps}"),
            (self.replicas >= 1, f"--replicas must be >= 1, got {self.replicas}"),
            (self.timestep > 0, f"--timestep must be > 0 fs, got {self.timestep}"),
            (self.temperature > 0 or self.thermostat == "nve",
             f"--temperature must be > 0 K for {self.thermostat}, got {self.temperature}"),
            (self.temperature >= 0, f"--temperature must be >= 0 K, got {self.temperature}"),
            (self.tau_steps > 0, f"--tau-steps must be > 0, got {self.tau_steps}"),
            (self.friction > 0 or self.thermostat != "langevin",
             f"--friction must be > 0 (1/fs) for Langevin, got {self.friction}"),
            (self.log_every >= 1, f"--log-every must be >= 1 step, got {self.log_every}"),
            (self.bond_threshold > 0, f"--bond-threshold must be > 0 Å, got {self.bond_threshold}"),
            (self.max_temperature_factor > 1, f"--max-temperature-factor must be > 1, got {self.max_temperature_factor}"),
            (self.force_frames >= 0, f"--force-frames must be >= 0, got {self.force_frames}"),
            (self.max_force_std is None or self.max_force_std > 0,
             f"--max-force-std must be > 0 eV/Å, got {self.max_force_std}"),
            (self.dtype in ("float32", "float64"), f"--dtype must be float32 or float64, got {self.dtype}"),
            (self.n_steps >= 1, f"--ps {self.ps} is shorter than one timestep of {self.timestep} fs"),
            (1 <= self.split_index <= 5, f"--split-index must be 1..5 (the published rMD17 splits), "
                                         f"got {self.split_index}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MDInputError(msg)
        if self.checkpoint_every is not None and (self.checkpoint_every < self.log_every
                                                  or self.checkpoint_every % self.log_every):
            raise MDInputError(f"--checkpoint-every ({self.checkpoint_every}) must be a multiple of "
                               f"--log-every ({self.log_every})")
        return self

    def _validate_system(self) -> None:
        if self.polymer and not self.dataset:
            self.dataset = "poly24"
        if self.dataset is not None and self.dataset not in DATASETS:
            raise MDInputError(f"unknown dataset '{self.dataset}'; use --dataset {' | '.join(DATASETS)} "
                               f"(rMD17 molecules: --molecule NAME)")
        systems = [flag for flag, v in (("--molecule", self.molecule), ("--structure", self.structure),
                                        ("--polymer", self.polymer)) if v]
        if self.dataset == "poly24" and (self.molecule or self.structure):
            raise MDInputError("--dataset poly24 takes --polymer NAME, not --molecule (rMD17) or --structure FILE")
        if self.dataset == "poly24" and not self.polymer:
            from .poly24 import polymer_names
            raise MDInputError(f"--dataset poly24 needs --polymer NAME (one of {', '.join(polymer_names())})")
        if len(systems) != 1:
            raise MDInputError("give exactly one of --molecule NAME (rMD17), --dataset poly24 --polymer NAME, "
                               f"or --structure FILE (got {' and '.join(systems) or 'none'})")
        if self.polymer:
            from .poly24 import canonical_polymer, require_default_model
            self.polymer = canonical_polymer(self.polymer)
            if not self.model:
                require_default_model()

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "SimulationConfig":
        """A stored config (run.json, checkpoint): unknown keys and wrong types raise :class:`MDInputError`."""
        return from_mapping(cls, d, "simulation", error=MDInputError)
