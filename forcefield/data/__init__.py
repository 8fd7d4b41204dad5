"""Data loading for oreo: conformation sets, dataset loaders, downloads and splits.

Units everywhere: positions Å, energies eV, forces eV/Å.

- :func:`load_rmd17` - revised MD17 (per-split npz or upstream figshare layout)
- :func:`load_md17` - original MD17 npz files
- :func:`load_ase` - anything :mod:`ase.io` reads (extxyz, ASE databases)
- :func:`download` / :func:`verify` - registry of downloadable datasets with SHA-256 checksums
- :func:`random_split`, :func:`select_by_frame_id` - reproducible splits

Data files are looked up under :func:`resolve_data_dir` (argument, ``$OREO_DATA_DIR`` or
``~/.cache/oreo/data``); a missing file raises :class:`DataNotFoundError` saying how to get it.

Imports from oreo only ``forcefield.units`` and ``forcefield.files`` (plus numpy, torch, ase); every layer above
(potential's callers, train, pretrain, md, benchmarks) may import it.
"""
from .ase_reader import load_ase
from .conformations import Batch, ConformationSet
from .md17 import MD17_MOLECULES, load_md17
from .paths import DataNotFoundError, resolve_data_dir
from .registry import DATASETS, ChecksumError, DownloadError, download, verify
from .rmd17 import RMD17_MOLECULES, load_rmd17
from .splits import random_split, select_by_frame_id

__all__ = [
    "ConformationSet", "Batch",
    "load_rmd17", "load_md17", "load_ase",
    "resolve_data_dir", "DataNotFoundError",
    "RMD17_MOLECULES", "MD17_MOLECULES",
    "random_split", "select_by_frame_id",
    "download", "verify", "DATASETS", "DownloadError", "ChecksumError",
]
