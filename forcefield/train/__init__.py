"""Training: configs, data splits, statistics, the training-loop skeleton and the trainer.

- :mod:`.config` - the training config (loaded by :mod:`forcefield.settings`)
- :mod:`.datasets` - train / validation / test frames of a config
- :mod:`.statistics` - reference energies, energy scale, a new potential fitted to frames
- :mod:`.loop` - :class:`~.loop.TrainingRun` and :class:`~.loop.EpochTrainer`: checkpoints, compact run state,
  CSV log, learning curve, CPU time, warm-up, early stopping - shared by every trainer
- :mod:`.trainer` - :class:`Trainer` (energies + forces, EMA); :mod:`.compiled_step` - ``optim.compile``
- :mod:`.runstate` - the compact, committable run state

Imports the layers below (data, potential, io, evaluate, traced, settings, files); imported by
:mod:`forcefield.pretrain`, the CLI, the benchmarks and the release scripts (``md`` does not need it).
"""
from .config import Config, DataConfig, ModelConfig, OptimConfig, config_from_dict, load_config
from .trainer import Trainer

__all__ = ["Config", "DataConfig", "ModelConfig", "OptimConfig", "config_from_dict", "load_config", "Trainer"]
