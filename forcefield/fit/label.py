"""Labels for ``oreo fit``: PySCF DFT (default PBE/def2-SVP, the revised-MD17 level) or GFN2-xTB, one file per
frame, written the moment the frame is done, computed in parallel processes.

- :class:`Level` - the level of theory (``dft`` with functional and basis, or ``xtb``); its text is stored with
  every label (``level_of_theory``) and in the model's metadata.
- :class:`LabelStore` - ``DIR/labels/<frame_id>.npz`` (numbers, positions Å, energy eV, forces eV/Å, level,
  seconds), each written atomically as soon as its calculation returns: a killed run loses at most the frames in
  flight, and a rerun never recomputes a saved label (a saved label of other positions or another level is an
  error, not silently reused). A calculation that fails (e.g. an SCF that does not converge) leaves
  ``<frame_id>.failed.json`` with the error; that frame is skipped from then on and counts in the budget.
- ``workers`` > 1: a pool of that many processes (spawned, one thread each); the parent saves each result.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..files import atomic_write, write_json
from .progress import Progress

#: positions of a saved label must equal the requested ones to this tolerance (Å)
SAME_POSITIONS_TOL = 1e-6
FIT_HINT = "pip install 'oreo[fit]'  (rdkit, tblite, pyscf)"


@dataclass(frozen=True)
class Level:
    """A level of theory: ``method`` "dft" (PySCF Kohn-Sham, ``xc``/``basis``) or "xtb" (GFN2-xTB, tblite)."""
    method: str = "dft"
    xc: str = "pbe"
    basis: str = "def2-svp"

    def require(self) -> None:
        """Import the code this level needs now, or raise a RuntimeError that says how to install it."""
        from .. import reference
        try:
            reference.require_pyscf() if self.method == "dft" else reference.require_tblite()
        except ImportError as exc:
            raise RuntimeError(f"{exc}") from None

    def describe(self) -> str:
        """``"PBE/def2-svp (PySCF 2.x)"`` or ``"GFN2-xTB (tblite 0.x)"``."""
        from ..reference import dft_level, xtb_level
        return dft_level(self.xc, self.basis) if self.method == "dft" else xtb_level()

    def to_dict(self) -> Dict[str, str]:
        return asdict(self)


def compute_label(level: Dict[str, str], numbers: np.ndarray, positions: np.ndarray) -> Tuple[float, np.ndarray]:
    """Energy (eV) and forces (n, 3) eV/Å of one frame at ``level`` (a :meth:`Level.to_dict`)."""
    from ..reference import dft_energy_forces, xtb_energy_forces
    if level["method"] == "xtb":
        return xtb_energy_forces(numbers, positions)
    return dft_energy_forces(numbers, positions, level["xc"], level["basis"])


def _run_one(level: Dict[str, str], fid: int, numbers: np.ndarray, positions: np.ndarray):
    """(frame id, energy, forces, seconds, error text or None): what a worker returns."""
    t0 = time.perf_counter()
    try:
        energy, forces = compute_label(level, numbers, positions)
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            raise RuntimeError("non-finite energy or forces")
        return fid, float(energy), np.asarray(forces, dtype=np.float64), time.perf_counter() - t0, None
    except Exception as exc:  # one frame's failure must not lose the others
        return fid, None, None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        from pyscf import lib
        lib.num_threads(threads)
    except ImportError:
        pass


class LabelStore:
    """The per-frame label files of one folder at one level of theory."""

    def __init__(self, folder, level: Level, level_text: Optional[str] = None):
        self.folder = Path(folder)
        self.level = level
        self.level_text = level_text or level.describe()

    def path(self, fid: int) -> Path:
        return self.folder / f"{int(fid)}.npz"

    def failed_path(self, fid: int) -> Path:
        return self.folder / f"{int(fid)}.failed.json"

    def has(self, fid: int) -> bool:
        return self.path(fid).is_file() or self.failed_path(fid).is_file()

    def failed(self, fid: int) -> bool:
        return self.failed_path(fid).is_file()

    def ids(self) -> List[int]:
        """Every frame with a label file or a failure record."""
        if not self.folder.is_dir():
            return []
        return sorted({int(p.name.split(".")[0]) for p in self.folder.iterdir()
                       if p.name.endswith((".npz", ".failed.json")) and p.name.split(".")[0].isdigit()})

    def load(self, fid: int) -> Dict[str, object]:
        with np.load(self.path(fid)) as z:
            return {"numbers": z["numbers"], "positions": z["positions"], "energy": float(z["energy"]),
                    "forces": z["forces"], "level_of_theory": str(z["level_of_theory"]),
                    "method": str(z["method"]), "seconds": float(z["seconds"])}

    def conformation_set(self, ids: Sequence[int], source: str = ""):
        """The labelled frames ``ids`` (one molecule) as a ConformationSet (``frame_id`` = the ids; the level of
        theory in ``meta``)."""
        from ..data.conformations import ConformationSet
        recs = [self.load(fid) for fid in ids]
        return ConformationSet.from_arrays(recs[0]["numbers"], np.stack([r["positions"] for r in recs]),
                                           energy=np.array([r["energy"] for r in recs]),
                                           forces=np.stack([r["forces"] for r in recs]),
                                           frame_id=np.asarray(ids, dtype=np.int64), source=source,
                                           meta={"level_of_theory": self.level_text})

    def _check(self, fid: int, numbers: np.ndarray, positions: np.ndarray) -> None:
        """A saved label must be of these positions and this level."""
        if not self.path(fid).is_file():
            return
        rec = self.load(fid)
        same = np.array_equal(rec["numbers"], numbers) and rec["positions"].shape == positions.shape \
            and np.abs(rec["positions"] - positions).max() <= SAME_POSITIONS_TOL
        if not same:
            raise ValueError(f"{self.path(fid)} holds the label of another structure than frame {fid} of this run: "
                             f"the folder belongs to another fit. Use a new --out")
        if rec["method"] != self.level.method or (self.level.method == "dft" and not rec["level_of_theory"].upper()
                                                  .startswith(f"{self.level.xc}/{self.level.basis}".upper())):
            raise ValueError(f"{self.path(fid)} was computed at {rec['level_of_theory']}, not at {self.level_text}; "
                             f"use a new --out for another level of theory")

    def _save(self, fid: int, numbers, positions, energy: float, forces, seconds: float) -> None:
        arrays = dict(numbers=np.asarray(numbers, dtype=np.int64), positions=np.asarray(positions, np.float64),
                      energy=np.float64(energy), forces=np.asarray(forces, np.float64),
                      level_of_theory=np.str_(self.level_text), method=np.str_(self.level.method),
                      seconds=np.float64(seconds))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        atomic_write(self.path(fid), write)

    def _save_failure(self, fid: int, error: str, seconds: float) -> None:
        write_json(self.failed_path(fid), {"frame_id": int(fid), "error": error, "level_of_theory": self.level_text,
                                           "seconds": round(seconds, 2)})

    def label(self, frames: Dict[int, Tuple[np.ndarray, np.ndarray]], workers: int = 1,
              log: Callable[[str], None] = print, what: str = "labels") -> Dict[str, float]:
        """Label every frame of ``frames`` (frame id -> (numbers, positions)) that has no file yet; returns
        ``{"computed", "failed", "reused", "seconds"}`` of this call."""
        frames = {int(k): (np.asarray(v[0], np.int64), np.asarray(v[1], np.float64)) for k, v in frames.items()}
        for fid, (numbers, positions) in frames.items():
            self._check(fid, numbers, positions)
        todo = [fid for fid in frames if not self.has(fid)]
        stats = {"computed": 0, "failed": 0, "reused": len(frames) - len(todo), "seconds": 0.0}
        if not todo:
            return stats
        self.folder.mkdir(parents=True, exist_ok=True)
        log(f"{what}: {len(todo)} frame(s) at {self.level_text}"
            + (f", {stats['reused']} already saved" if stats["reused"] else "")
            + (f", {workers} worker processes" if workers > 1 and len(todo) > 1 else ""))
        progress = Progress(what, len(todo), "frame", log)

        def handle(result) -> None:
            fid, energy, forces, seconds, error = result
            numbers, positions = frames[fid]
            if error is None:
                self._save(fid, numbers, positions, energy, forces, seconds)
                stats["computed"] += 1
            else:
                self._save_failure(fid, error, seconds)
                stats["failed"] += 1
                log(f"{what}: frame {fid} failed ({error}); it is skipped (remove {self.failed_path(fid)} to retry)")
            stats["seconds"] += seconds
            progress.advance()

        level = self.level.to_dict()
        if workers <= 1 or len(todo) == 1:
            for fid in todo:
                handle(_run_one(level, fid, *frames[fid]))
        else:
            self._label_parallel(level, todo, frames, min(workers, len(todo)), handle)
        progress.finish()
        return stats

    @staticmethod
    def _label_parallel(level, todo: Sequence[int], frames, workers: int, handle) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = multiprocessing.get_context("spawn")      # no forked torch/OpenMP state in the workers
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(1,))
        try:
            futures = [pool.submit(_run_one, level, fid, *frames[fid]) for fid in todo]
            for fut in as_completed(futures):
                handle(fut.result())          # saved in this process, the moment each frame is done
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)   # killed: do not wait for the frames in flight
            raise
        pool.shutdown()


def read_failures(folder) -> Dict[int, str]:
    """Frame id -> error of every failed calculation in ``folder``."""
    out = {}
    for p in sorted(Path(folder).glob("*.failed.json")):
        rec = json.loads(p.read_text())
        out[int(rec["frame_id"])] = rec["error"]
    return out
