"""Settings of one ``oreo fit`` run: one dataclass with defaults, checked in one place, stored in ``DIR/fit.json``.

A rerun of the same command (or plain ``oreo fit --out DIR``) continues the run in ``DIR`` with the stored
settings; only the settings in :data:`RESUMABLE` may change between invocations (a larger ``--dft-frames`` budget
continues the active learning, more ``--workers`` label faster); any other difference is an error that names it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from ..settings import from_mapping

#: settings that may change when a run is continued (everything else must match DIR/fit.json)
RESUMABLE = ("workers", "dft_frames", "stop_std", "check_frames", "frames_per_round", "train_minutes")
LABELS = ("dft", "xtb")
SELECT = ("uncertainty", "random")
RETRAIN = ("warm", "fresh")
#: ``backbone`` value that means: the shipped pretrained backbone when it knows the molecule's elements, else scratch
AUTO = "auto"
SCRATCH = "scratch"
DEFAULT_BACKBONE = "pretrained-et-oro"
#: the architecture trained from scratch (``--from scratch``): the shipped backbone's, so both start equal
SCRATCH_MODEL = {"name": "et", "hidden": 64, "num_layers": 3, "num_heads": 4, "num_rbf": 32, "cutoff": 5.0}


@dataclass
class FitConfig:
    """Everything ``oreo fit`` needs (units: Å, eV, eV/Å, fs, ps, K). Defaults in brackets in ``oreo fit -h``."""
    # the molecule
    smiles: Optional[str] = None            #: SMILES (conformers: RDKit ETKDG + MMFF)
    structure: Optional[str] = None         #: or an ASE-readable file; its frames are the conformers
    name: Optional[str] = None              #: the model's "molecule" metadata (e.g. ethanol); default none
    # labels and the budget
    labels: str = "dft"                     #: dft (PySCF) | xtb (GFN2-xTB, fast)
    xc: str = "pbe"
    basis: str = "def2-svp"
    workers: int = 1                        #: label processes in parallel
    dft_frames: int = 100                   #: label budget: every label computed (training, validation, held-out)
    test_frames: Optional[int] = None       #: held-out labelled frames (default max(1, N // 10))
    initial_frames: Optional[int] = None    #: first batch, chosen for diversity (default max(2, N // 4))
    frames_per_round: Optional[int] = None  #: labels per active-learning round (default max(1, N // 10))
    select: str = "uncertainty"             #: uncertainty (FPS, then largest committee spread) | random
    stop_std: float = 0.05                  #: eV/Å: stop when the spread along every MD run stays below this
    check_frames: int = 10                  #: final-model MD frames labelled as a check (not in the budget; 0: none)
    # the candidate pool: GFN2-xTB Langevin MD from each conformer at each temperature
    conformers: int = 2
    temperatures: List[float] = field(default_factory=lambda: [300.0, 600.0])
    pool_steps: int = 1000
    pool_equilibration: int = 100
    pool_stride: int = 10
    pool_relax_steps: int = 50
    timestep: float = 0.5                   #: fs (pool and committee MD)
    friction: float = 0.02                  #: Langevin friction, 1/fs
    # the committee
    backbone: str = AUTO                    #: auto | scratch | a pretrained model (shipped name or file)
    committee: int = 3
    retrain: str = "warm"                   #: warm: each round continues the members; fresh: from the backbone
    epochs: int = 300                       #: per member and round (early stopping may end it sooner)
    train_minutes: Optional[float] = None   #: wall-clock limit per member and round
    batch_size: int = 4
    lr: float = 5e-4
    train_set: List[str] = field(default_factory=list)   #: --set overrides of the training config (model., optim.)
    val_every: int = 5                      #: every N-th labelled frame (in the order chosen) validates instead
    # committee MD (exploration)
    md_ps: float = 0.5                      #: per replica and round
    md_replicas: int = 4
    md_temperatures: Optional[List[float]] = None   #: default: ``temperatures``
    md_stride: int = 10                     #: steps between candidate frames
    md_max_std: float = 1.0                 #: eV/Å: a replica whose spread passes this stops (a candidate frame)
    bond_threshold: float = 0.5             #: Å: a replica whose bonds deviate more is unstable (MDsim's criterion)
    seed: int = 0

    # ------------------------------------------------------------------ derived
    def resolve(self) -> "FitConfig":
        """Fill the defaults that depend on the budget; check every value (ValueError naming the fix)."""
        n = self.dft_frames
        if self.test_frames is None:
            self.test_frames = max(1, n // 10)
        if self.initial_frames is None:
            self.initial_frames = max(2, n // 4)
        if self.frames_per_round is None:
            self.frames_per_round = max(1, n // 10)
        if self.md_temperatures is None:
            self.md_temperatures = list(self.temperatures)
        self.temperatures = [float(t) for t in self.temperatures]
        self.md_temperatures = [float(t) for t in self.md_temperatures]
        self.check()
        return self

    def check(self) -> None:
        if bool(self.smiles) == bool(self.structure):
            raise ValueError("give the molecule as exactly one of --smiles SMILES or --structure FILE")
        checks = [
            (self.labels in LABELS, f"--labels must be one of {', '.join(LABELS)}, got '{self.labels}'"),
            (self.select in SELECT, f"--select must be one of {', '.join(SELECT)}, got '{self.select}'"),
            (self.retrain in RETRAIN, f"--retrain must be one of {', '.join(RETRAIN)}, got '{self.retrain}'"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.test_frames >= 1, f"--test-frames must be >= 1 (the held-out frames every round is scored on), "
                                    f"got {self.test_frames}"),
            (self.initial_frames >= 2, f"--initial-frames must be >= 2 (a training and a validation frame), got "
                                       f"{self.initial_frames}"),
            (self.frames_per_round >= 1, f"--frames-per-round must be >= 1, got {self.frames_per_round}"),
            (self.test_frames + self.initial_frames <= self.dft_frames,
             f"--dft-frames {self.dft_frames} is smaller than the held-out ({self.test_frames}) plus the first batch "
             f"({self.initial_frames}) of labels; raise --dft-frames or lower --test-frames / --initial-frames"),
            (self.committee >= 2, f"--committee must be >= 2 (the spread of the members is the uncertainty), got "
                                  f"{self.committee}"),
            (self.stop_std > 0, f"--stop-std must be > 0 eV/Å, got {self.stop_std}"),
            (self.md_max_std > 0, f"--md-max-std must be > 0 eV/Å, got {self.md_max_std}"),
            (self.check_frames >= 0, f"--check-frames must be >= 0, got {self.check_frames}"),
            (self.conformers >= 1, f"--conformers must be >= 1, got {self.conformers}"),
            (bool(self.temperatures) and all(t > 0 for t in self.temperatures),
             f"--temperatures must be positive (K), got {self.temperatures}"),
            (bool(self.md_temperatures) and all(t > 0 for t in self.md_temperatures),
             f"--md-temperatures must be positive (K), got {self.md_temperatures}"),
            (self.pool_stride >= 1 and self.pool_steps >= self.pool_stride,
             f"need --pool-steps >= --pool-stride >= 1 to keep any frame (got {self.pool_steps}, {self.pool_stride})"),
            (self.md_stride >= 1 and self.md_steps >= self.md_stride,
             f"--md-ps {self.md_ps} is shorter than one candidate stride ({self.md_stride} steps of "
             f"{self.timestep} fs); raise --md-ps or lower --md-stride"),
            (self.md_replicas >= 1, f"--md-replicas must be >= 1, got {self.md_replicas}"),
            (self.timestep > 0 and self.friction > 0, "--timestep (fs) and --friction (1/fs) must be > 0"),
            (self.val_every >= 2, f"--val-every must be >= 2 (1 would leave nothing to train on), got "
                                  f"{self.val_every}"),
            (self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "--epochs, --batch-size and --lr must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def md_steps(self) -> int:
        return int(round(self.md_ps * 1000.0 / self.timestep))

    @property
    def system_name(self) -> str:
        if self.name:
            return self.name
        if self.smiles:
            return self.smiles
        from pathlib import Path
        return Path(self.structure).stem

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FitConfig":
        return from_mapping(cls, d, "fit")


def merge_settings(stored: Optional[Dict[str, Any]], given: Dict[str, Any]) -> FitConfig:
    """The settings of this invocation: ``given`` (what the command line named; None = not given) on top of the
    ``stored`` ones of the run in DIR (or the defaults). A changed setting outside :data:`RESUMABLE` is an error."""
    given = {k: v for k, v in given.items() if v is not None}
    if stored is None:
        return FitConfig.from_dict(given).resolve()
    names = {f.name for f in fields(FitConfig)}
    old = FitConfig.from_dict({k: v for k, v in stored.items() if k in names})
    new = FitConfig.from_dict({**old.to_dict(), **given})
    changed = [k for k in given if k not in RESUMABLE and getattr(new, k) != getattr(old, k)]
    if changed:
        diff = ", ".join(f"{k}: {getattr(old, k)!r} -> {getattr(new, k)!r}" for k in changed)
        raise ValueError(f"the fit in this folder was started with other settings ({diff}); rerun with the same "
                         f"settings (or just `oreo fit --out DIR`) to continue it, or use a new --out. Settings "
                         f"that may change: {', '.join(RESUMABLE)}")
    return new.resolve()
