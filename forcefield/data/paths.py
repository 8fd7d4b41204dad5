"""Where oreo looks for data, and the error raised when a file is not there.

The data directory is chosen, in order, from

1. an explicit ``data_dir`` argument,
2. the environment variable ``OREO_DATA_DIR``,
3. ``~/.cache/oreo/data``.

Files are then looked up below it (``<data_dir>/rmd17/...``, ``<data_dir>/md17/...``), as
written by ``oreo data download`` (:func:`forcefield.data.registry.download`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

ENV_VAR = "OREO_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/oreo/data")


def resolve_data_dir(data_dir: Optional[PathLike] = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$OREO_DATA_DIR``, else ``~/.cache/oreo/data``.

    The directory is not created and need not exist.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR.expanduser()


def data_dir_origin(data_dir: Optional[PathLike] = None) -> str:
    """Says where :func:`resolve_data_dir` took its answer from (for error messages)."""
    if data_dir is not None:
        return "the data_dir argument"
    if os.environ.get(ENV_VAR):
        return f"${ENV_VAR}"
    return f"the default, since ${ENV_VAR} is unset"


class DataNotFoundError(FileNotFoundError):
    """A data file is missing.

    The message names the missing file, every place that was searched, and how to get the
    file: the ``oreo data download`` command for registry datasets, or setting ``OREO_DATA_DIR``.

    Attributes: ``filename`` (the missing file), ``searched`` (list of paths looked at),
    ``dataset`` (registry name or None), ``data_dir``.
    """

    def __init__(self, missing: str, searched: Iterable[PathLike], dataset: Optional[str] = None,
                 data_dir: Optional[PathLike] = None, origin: Optional[str] = None,
                 hint: Optional[str] = None) -> None:
        self.searched = [Path(p) for p in searched]
        self.dataset = dataset
        self.data_dir = None if data_dir is None else Path(data_dir)
        lines = [f"data file not found: {missing}"]
        if self.data_dir is not None:
            lines.append(f"data directory: {self.data_dir}" + (f" (from {origin})" if origin else ""))
        lines.append("looked in:")
        lines += [f"  {p}" for p in self.searched]
        if dataset is not None:
            target = self.data_dir if self.data_dir is not None else resolve_data_dir()
            lines.append("to get it, run:")
            lines.append(f"  oreo data download {dataset} --data-dir {target}")
            lines.append(f"or set {ENV_VAR} to a directory that already holds it "
                         f"(e.g. export {ENV_VAR}=/path/to/data).")
        if hint:
            lines.append(hint)
        message = "\n".join(lines)
        super().__init__(message)
        self.filename = str(missing)

    def __str__(self) -> str:  # FileNotFoundError would otherwise prefix errno fields
        return self.args[0]


def read_npz(path: PathLike, keys: Iterable[str], optional: Iterable[str] = (), what: str = "npz",
             fix: str = "") -> dict:
    """The arrays ``keys`` (and those of ``optional`` that are there) of an npz file. A file that is not one (a
    truncated download, a Git LFS pointer, an HTML error page) or lacks a key is a ValueError that names the file
    and ``fix``, not numpy's or zipfile's own message."""
    import zipfile
    import zlib
    import numpy as np
    keys, optional = list(keys), list(optional)
    try:
        with np.load(path) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise ValueError(f"{path} is not an {what} file: missing keys {missing} (has {data.files}). {fix}")
            return {k: np.asarray(data[k]) for k in keys + [k for k in optional if k in data.files]}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {exc}): a truncated download or not an npz "
                         f"file. {fix}") from None
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path} is unreadable ({exc}): not an {what} file (a Git LFS pointer?). {fix}") from None
