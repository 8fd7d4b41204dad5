"""Files of a run directory: trajectories, thermo log, checkpoint, JSON records.

Layout of a run directory::

    run.json              settings + per-replica status (rewritten atomically)
    traj_000.extxyz ...   one extended-XYZ trajectory per replica (ase.io.read(path, ":"))
    thermo.csv            step,time_ps,replica,T,Epot,Ekin,Etot,Econs (committee models: and Fstd_max, eV/Å)
    checkpoint.pt         state + RNG state + step + file sizes (written atomically)
    summary.json, *.png   analysis results

Trajectory and log are appended and flushed at every log step. The checkpoint stores the
byte size of every appended file, so a resumed run truncates them back to the checkpoint
and continues the same files bit-for-bit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from ase.data import chemical_symbols

from forcefield.files import atomic_torch_save, write_json

__all__ = ["CHECKPOINT", "RUN_JSON", "THERMO_CSV", "SUMMARY_JSON", "THERMO_COLUMNS", "trajectory_path", "read_json",
           "write_json", "save_checkpoint", "load_checkpoint", "format_extxyz_frame", "read_trajectory", "RunFiles",
           "read_thermo"]

CHECKPOINT = "checkpoint.pt"
RUN_JSON = "run.json"
THERMO_CSV = "thermo.csv"
SUMMARY_JSON = "summary.json"
THERMO_COLUMNS = ("step", "time_ps", "replica", "T", "Epot", "Ekin", "Etot", "Econs")
#: the extra thermo column of a committee model: its force spread (forces_std_max, eV/Å)
SPREAD_COLUMN = "Fstd_max"


def trajectory_path(run_dir, replica: int) -> Path:
    return Path(run_dir) / f"traj_{replica:03d}.extxyz"


# ---------------------------------------------------------------------------------- records
def read_json(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def save_checkpoint(path, payload: dict) -> None:
    """``torch.save`` atomically, flushed to disk before the rename (a power cut keeps the previous one)."""
    atomic_torch_save(payload, path, fsync=True)


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------- extxyz
def format_extxyz_frame(numbers: np.ndarray, positions: np.ndarray, forces: Optional[np.ndarray] = None,
                        info: Optional[Dict[str, object]] = None, cell: Optional[np.ndarray] = None,
                        pbc: Optional[np.ndarray] = None) -> str:
    """One extended-XYZ frame as text (positions Å, forces eV/Å, ``info`` key=value pairs)."""
    props = "species:S:1:pos:R:3" + (":forces:R:3" if forces is not None else "")
    head = []
    if cell is not None:
        head.append('Lattice="' + " ".join(f"{v:.10f}" for v in np.asarray(cell).reshape(-1)) + '"')
    head.append(f"Properties={props}")
    for k, v in (info or {}).items():
        head.append(f"{k}={v:.10f}" if isinstance(v, float) else f"{k}={v}")
    p = np.zeros(3, bool) if pbc is None else np.asarray(pbc, bool)
    head.append('pbc="' + " ".join("T" if b else "F" for b in p) + '"')
    lines = [str(len(numbers)), " ".join(head)]
    for a in range(len(numbers)):
        row = f"{chemical_symbols[int(numbers[a])]:<2s} " + " ".join(f"{v:16.10f}" for v in positions[a])
        if forces is not None:
            row += " " + " ".join(f"{v:16.10f}" for v in forces[a])
        lines.append(row)
    return "\n".join(lines) + "\n"


def read_trajectory(path):
    """All frames of a trajectory file as a list of ``ase.Atoms`` (empty list if the file is empty)."""
    from ase.io import read
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return []
    return read(str(path), index=":", format="extxyz")


# ---------------------------------------------------------------------------------- appenders
class RunFiles:
    """Append-only trajectory (one per replica) and thermo-log files of a run directory."""

    def __init__(self, run_dir, n_replicas: int, columns: Sequence[str] = THERMO_COLUMNS):
        self.run_dir = Path(run_dir)
        self.columns = tuple(columns)
        self.paths: List[Path] = [trajectory_path(run_dir, r) for r in range(n_replicas)]
        self.paths.append(self.run_dir / THERMO_CSV)
        self._handles = None

    def sizes(self) -> Dict[str, int]:
        """Byte size of every file (0 when missing), keyed by file name."""
        return {p.name: (p.stat().st_size if p.exists() else 0) for p in self.paths}

    def truncate(self, sizes: Dict[str, int]) -> None:
        """Cut every file back to the recorded size (a resumed run continues from there)."""
        for p in self.paths:
            want = int(sizes.get(p.name, 0))
            have = p.stat().st_size if p.exists() else 0
            if have < want:
                raise RuntimeError(f"{p} has {have} bytes but the checkpoint recorded {want}; the run directory "
                                   f"was modified. Start a new run with --overwrite or another --out")
            with open(p, "ab") as fh:
                fh.truncate(want)

    def open(self) -> "RunFiles":
        self._handles = [open(p, "a", encoding="ascii", newline="\n") for p in self.paths]
        log = self._handles[-1]
        if log.tell() == 0:
            log.write(",".join(self.columns) + "\n")
        return self

    def write_frame(self, replica: int, text: str) -> None:
        self._handles[replica].write(text)

    def write_log_rows(self, rows: Iterable[Sequence]) -> None:
        fh = self._handles[-1]
        for row in rows:
            fh.write(",".join(_fmt(v) for v in row) + "\n")

    def flush(self, fsync: bool = False) -> None:
        for fh in self._handles or []:
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())

    def close(self) -> None:
        for fh in self._handles or []:
            fh.close()
        self._handles = None


def _fmt(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.10g}"


def read_thermo(path) -> Dict[str, np.ndarray]:
    """The thermo CSV as a dict of column arrays (``step``, ``replica`` int; the rest float)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return {c: np.zeros(0) for c in THERMO_COLUMNS}
    data = np.genfromtxt(path, delimiter=",", names=True, ndmin=1)
    out = {c: np.asarray(data[c]) for c in data.dtype.names}
    for c in ("step", "replica"):
        out[c] = out[c].astype(np.int64)
    return out
