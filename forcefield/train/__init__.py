"""Training: configs, data splits, statistics, the trainer."""
from .config import Config, DataConfig, ModelConfig, OptimConfig, config_from_dict, load_config
from .trainer import Trainer

__all__ = ["Config", "DataConfig", "ModelConfig", "OptimConfig", "config_from_dict", "load_config", "Trainer"]
