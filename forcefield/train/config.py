"""Training configuration: dataclasses with defaults, loaded from YAML by :mod:`forcefield.settings` (unknown keys
are errors, values converted to the fields' types)."""
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..settings import from_mapping, read_yaml


@dataclass
class DataConfig:
    """Where the frames come from: an rMD17 ``molecule``, a ``path`` that ase.io reads, or
    ``dataset: poly24`` (splits by trajectory from the set's manifest; ``path`` = its folder)."""
    molecule: Optional[str] = "aspirin"
    path: Optional[str] = None
    dataset: Optional[str] = None    # "poly24"
    polymers: Optional[List[str]] = None      # poly24: subset (default all)
    temperatures: Optional[List[float]] = None  # poly24: subset (default all)
    energy_unit: str = "eV"          # for ``path`` sources
    labels: str = "revised"          # rMD17: "revised" or "original" (MD17) labels
    split_index: int = 1             # rMD17 split file 01..05
    train_size: Optional[int] = 950  # poly24: None = every training frame
    val_size: int = 50
    test_size: Optional[int] = None  # None: the whole rMD17 test file (or the rest of ``path``)
    data_dir: Optional[str] = None


@dataclass
class ModelConfig:
    name: str = "et"
    hidden: int = 128
    num_layers: int = 6
    num_heads: int = 8
    num_rbf: int = 32
    cutoff: float = 5.0


@dataclass
class OptimConfig:
    epochs: int = 3000
    batch_size: int = 8
    lr: float = 4e-4
    lr_warmup_steps: int = 1000
    lr_schedule: str = "plateau"     # plateau | cosine (to lr_min over the epochs: for a run of fixed length)
    lr_factor: float = 0.8           # reduce-on-plateau factor
    lr_patience: int = 15            # validations (epochs, with val_every 1) without improvement before the lr drops
    lr_min: float = 1e-7
    weight_decay: float = 0.0
    ema_decay: float = 0.99
    grad_clip: float = 10.0
    energy_weight: float = 0.05
    forces_weight: float = 0.95
    early_stop_patience: int = 150   # validations without improvement
    val_every: int = 1               # validate every N epochs (and the last): small sets have epochs of few steps
    seed: int = 1
    max_minutes: Optional[float] = None  # wall-clock budget of this invocation; --resume continues
    max_cpu_minutes: Optional[float] = None  # CPU-time budget of this invocation (equal-compute comparisons)
    dtype: str = "float32"
    threads: Optional[int] = None
    eval_batch_size: int = 64
    compile: bool = False            # fuse the double backward with torch.compile (ET; minutes to compile)
    device: str = "auto"             # auto (a GPU when torch sees one) | cpu | cuda | cuda:N


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def config_from_dict(d: Dict[str, Any]) -> Config:
    return from_mapping(Config, d, "")


def load_config(path: Union[str, Path]) -> Config:
    return config_from_dict(read_yaml(path) or {})
