"""Atomic file writes: the one way oreo writes a file that a killed process must never leave half-written.

Every writer puts its bytes into a temporary file in the destination's folder and renames it over the
destination (``os.replace``, atomic on POSIX and Windows): a reader sees the old file or the new one, never a
part. :func:`atomic_write` is the mechanism; the others are its common uses (bytes, text, JSON, ``torch.save``).
Models, checkpoints, run states, MD checkpoints and records, dataset files and exports all go through here.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, Path]

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "write_json", "atomic_torch_save"]


def atomic_write(path: PathLike, write: Callable[[Path], None], fsync: bool = False, keep_name: bool = False) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then rename it to ``path``.

    ``fsync``: flush the data to disk before the rename (checkpoints that must survive a power cut).
    ``keep_name``: the temporary file has ``path``'s own name, inside a temporary folder (formats that record
    their file name inside, e.g. AOTInductor packages). If ``write`` raises, nothing is left behind and
    ``path`` is unchanged. The file gets the permissions of a normally created file (umask applied)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = None
    if keep_name:
        tmpdir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
        tmp = Path(tmpdir) / path.name
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: PathLike, data: bytes, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: PathLike, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def _json_default(o):
    import numpy as np
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: PathLike, obj: Any, indent: int = 2, fsync: bool = False, **kwargs) -> Path:
    """``obj`` as JSON (numpy scalars and arrays, paths allowed), atomically, ending with a newline."""
    kwargs.setdefault("default", _json_default)
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n", fsync=fsync)


def on_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts, lists and tuples of tensors and plain values) with every tensor on the CPU: what a
    checkpoint holds, so that it loads and packs the same whichever device wrote it."""
    import torch
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def atomic_torch_save(obj: Any, path: PathLike, jit: bool = False, fsync: bool = False, **jit_kwargs) -> Path:
    """``torch.save`` (or ``torch.jit.save`` of a scripted module, with ``jit_kwargs``), atomically."""
    import torch

    def write(tmp: Path) -> None:
        if jit:
            torch.jit.save(obj, str(tmp), **jit_kwargs)
        else:
            torch.save(obj, str(tmp))
    return atomic_write(path, write, fsync=fsync)
