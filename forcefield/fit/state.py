"""The run folder of ``oreo fit`` and its manifest ``fit.json`` (what is done, what it cost).

Layout of ``DIR``::

    fit.json                    settings, molecule, stages done (with wall times), rounds, stop reason
    pool/conformers.extxyz      the starting conformers (RDKit ETKDG + MMFF, or the --structure frames)
    pool/T<K>_c<i>.extxyz       one GFN2-xTB Langevin trajectory per temperature and conformer (xTB labels)
    pool/pool.extxyz            every pool frame (info: frame_id, temperature_K, conformer, step)
    labels/<frame_id>.npz       one file per labelled frame: numbers, positions, energy, forces, level, seconds
    labels/<frame_id>.failed.json   a frame whose calculation failed (counted in the budget, never retried)
    rounds/rNN/members/mK/      member K's training run (the oreo train layout: best.pt, last.pt, metrics.csv)
    rounds/rNN/committee.pt     the round's committee; rounds/rNN/test.json its held-out errors
    rounds/rNN/md/candidates.extxyz   the committee MD's frames (info: forces_std_max, replica, step, ...)
    rounds/rNN/md/md.json       per replica: temperature, length, stop reason; spread statistics
    committee.pt                the final committee (the last round's)
    check/labels/, check/check.json, check/parity.png   labels along the final model's MD and its errors there
    report.md, report/*.png     the report

Frame ids: pool frames 0 .. P-1; frames of round r's committee MD (r + 1) * 1,000,000 + k. A stage is recorded
in ``fit.json`` only after its files are written (atomically), so a rerun redoes at most the stage in progress,
and within it keeps every finished label and the training checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..files import write_json
from ..version import __version__
from .config import FitConfig, merge_settings

MANIFEST = "fit.json"
FORMAT = "oreo-fit"
ROUND_ID_BASE = 1_000_000


def round_dir(out: Path, r: int) -> Path:
    return out / "rounds" / f"r{r:02d}"


def md_frame_id(r: int, k: int) -> int:
    """The id of candidate ``k`` of round ``r``'s committee MD."""
    return (r + 1) * ROUND_ID_BASE + k


class FitState:
    """``fit.json`` in memory; :meth:`save` writes it atomically."""

    def __init__(self, out: Path, data: Dict[str, Any]):
        self.out = Path(out)
        self.data = data

    @classmethod
    def open(cls, out, given: Dict[str, Any]) -> Tuple["FitState", FitConfig]:
        """The run in ``out`` (settings checked against ``given``) or a new one."""
        out = Path(out)
        path = out / MANIFEST
        stored = None
        data: Dict[str, Any] = {"format": FORMAT, "oreo_version": __version__, "stages": {}, "rounds": []}
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"{path} is not an oreo fit manifest; choose another --out")
            # a run that has not finished any stage yet (e.g. stopped at a bad SMILES) takes the new settings
            stored = data.get("settings") if data.get("stages") or data.get("rounds") else None
        elif out.is_dir() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty and holds no {MANIFEST}: choose a new --out folder for "
                                  f"oreo fit")
        cfg = merge_settings(stored, given)
        data["settings"] = cfg.to_dict()
        state = cls(out, data)
        out.mkdir(parents=True, exist_ok=True)
        state.save()
        return state, cfg

    @property
    def resumed(self) -> bool:
        return bool(self.data["stages"]) or bool(self.data["rounds"])

    def save(self) -> None:
        write_json(self.out / MANIFEST, self.data)

    # ------------------------------------------------------------------ stages
    def done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def stage(self, stage: str) -> Dict[str, Any]:
        return self.data["stages"].setdefault(stage, {})

    def finish(self, stage: str, seconds: float, **record: Any) -> None:
        self.data["stages"][stage] = {**self.stage(stage), **record, "done": True, "seconds": round(seconds, 2)}
        self.save()

    # ------------------------------------------------------------------ rounds
    def round(self, r: int) -> Dict[str, Any]:
        rounds = self.data["rounds"]
        while len(rounds) <= r:
            rounds.append({"round": len(rounds), "seconds": {}})
        return rounds[r]

    def round_seconds(self, r: int, stage: str, seconds: float) -> None:
        sec = self.round(r)["seconds"]
        sec[stage] = round(sec.get(stage, 0.0) + seconds, 2)

    @property
    def n_rounds(self) -> int:
        return len(self.data["rounds"])

    def get(self, key: str, default: Optional[Any] = None) -> Any:
        return self.data.get(key, default)
