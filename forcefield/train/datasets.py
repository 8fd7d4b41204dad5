"""Build the train / validation / test frames that a training config asks for."""
from dataclasses import dataclass
from typing import Dict

import numpy as np

from ..data import ConformationSet, load_ase, load_rmd17, random_split
from .config import DataConfig


@dataclass
class Splits:
    train: ConformationSet
    val: ConformationSet
    test: ConformationSet

    def frame_ids(self) -> Dict[str, list]:
        return {k: getattr(self, k).frame_id.tolist() for k in ("train", "val", "test")}


def build_splits(cfg: DataConfig, seed: int) -> Splits:
    """rMD17: train+val drawn (seeded) from the split's train file, test = its test file.
    ``path`` sources: one seeded random split of the file's frames."""
    if cfg.path:
        full = load_ase(cfg.path, energy_unit=cfg.energy_unit)
        sizes = {"train": cfg.train_size, "val": cfg.val_size}
        sizes["test"] = cfg.test_size if cfg.test_size is not None else len(full) - cfg.train_size - cfg.val_size
        idx = random_split(len(full), sizes, seed)
        return Splits(full.subset(idx["train"]), full.subset(idx["val"]), full.subset(idx["test"]))
    if not cfg.molecule:
        raise ValueError("data config needs either 'molecule' (an rMD17 molecule) or 'path' (a file ase.io reads)")
    pool = load_rmd17(cfg.molecule, split="train", split_index=cfg.split_index, data_dir=cfg.data_dir,
                      labels=cfg.labels)
    idx = random_split(len(pool), {"train": cfg.train_size, "val": cfg.val_size}, seed)
    test = load_rmd17(cfg.molecule, split="test", split_index=cfg.split_index, data_dir=cfg.data_dir,
                      labels=cfg.labels)
    if cfg.test_size is not None:
        test = test.subset(np.arange(min(cfg.test_size, len(test))))
    return Splits(pool.subset(idx["train"]), pool.subset(idx["val"]), test)
