"""Build the train / validation / test frames that a training config asks for."""
from dataclasses import dataclass
from typing import Dict, Optional

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


def _draw(cset: ConformationSet, size: Optional[int], seed: int, what: str) -> ConformationSet:
    if size is None or size == len(cset):
        return cset
    if size > len(cset):
        raise ValueError(f"{what}: asked for {size} frames, the set has {len(cset)}; lower the size or set it to null "
                         f"(= all)")
    return cset.subset(np.sort(np.random.default_rng(seed).permutation(len(cset))[:size]))


def poly24_splits(cfg: DataConfig, seed: int) -> Splits:
    """oreo-poly24 (or a set in its layout): the manifest's trajectory splits, each optionally
    subsampled (seeded) to ``train_size`` / ``val_size`` / ``test_size`` frames."""
    from ..data.poly24 import load_poly24
    kw = dict(polymers=cfg.polymers, temperatures=cfg.temperatures, data_dir=cfg.data_dir, root=cfg.path)
    sets = {s: load_poly24(s, **kw) for s in ("train", "val", "test")}
    return Splits(_draw(sets["train"], cfg.train_size, seed, "poly24 train"),
                  _draw(sets["val"], cfg.val_size, seed + 1, "poly24 val"),
                  _draw(sets["test"], cfg.test_size, seed + 2, "poly24 test"))


def build_splits(cfg: DataConfig, seed: int) -> Splits:
    """rMD17: train+val drawn (seeded) from the split's train file, test = its test file.
    ``path`` sources: one seeded random split of the file's frames. poly24: by trajectory."""
    if cfg.dataset is not None:
        if cfg.dataset.lower() != "poly24":
            raise ValueError(f"unknown data.dataset '{cfg.dataset}'; the datasets with their own splits are: poly24")
        return poly24_splits(cfg, seed)
    if cfg.train_size is None:
        raise ValueError("data.train_size is null, which only a dataset with its own splits (poly24) allows; "
                         "give a number of frames")
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
