"""Polymer MD on oreo-poly24 (``oreo-md simulate --dataset poly24 --polymer PE``): frames and default model.

Frames come from ``forcefield.data.poly24.load_poly24`` (the set written by ``oreo data poly24``,
default folder ``$OREO_DATA_DIR/poly24``):

- held-out frames (initial conditions, force MAE) = the polymer's **test** split, every temperature;
- reference frames (bond lengths, h(r)) = the polymer's test frames at the simulation temperature
  when the set has that temperature, else all its test frames. Which one was used is recorded in
  ``reference.meta["md_reference"]`` and reported in the run's log and ``summary.json``.

The default model is the shipped model named ``poly24`` when the package has one; otherwise
``--model`` is required.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from .errors import MDInputError

DATASET = "poly24"
SHIPPED_MODEL = "poly24"   #: name of the shipped poly24 model used when --model is not given
_TEMPERATURE_TOL = 1e-6


def polymer_names() -> List[str]:
    from forcefield.data.poly24.catalog import POLYMERS
    return list(POLYMERS)


def canonical_polymer(name: str) -> str:
    """The catalogue name of ``name`` (case-insensitive, aliases) or an error listing the valid names."""
    from forcefield.data.poly24 import canonical_polymer as _canonical
    try:
        return _canonical(name)
    except ValueError as exc:
        raise MDInputError(f"{exc}; pass one of them to --polymer") from None


def shipped_model_available() -> bool:
    try:
        from forcefield.io import shipped_models
    except ImportError:
        return False
    return SHIPPED_MODEL in shipped_models()


def require_default_model() -> str:
    """``"poly24"`` when a shipped model of that name exists; else an error naming the fix."""
    if shipped_model_available():
        return SHIPPED_MODEL
    raise MDInputError(f"--dataset poly24 needs --model PATH: this installation ships no model named "
                       f"'{SHIPPED_MODEL}'. Train one on the set (oreo train --config examples/configs/poly24.yaml "
                       f"--out runs/poly24) and pass its checkpoint or export, e.g. --model runs/poly24/best.pt")


def poly24_folder(poly24_dir=None, data_dir=None) -> Path:
    """The set's folder: ``poly24_dir``, else ``<data_dir or $OREO_DATA_DIR>/poly24``."""
    from forcefield.data.poly24 import poly24_root
    return poly24_root(data_dir, poly24_dir)


def load_manifest(poly24_dir=None, data_dir=None) -> dict:
    """The set's manifest.json, or an error saying how to generate the set."""
    from forcefield.data.poly24 import read_manifest
    try:
        return read_manifest(data_dir, poly24_dir)
    except FileNotFoundError as exc:     # DataNotFoundError: names the folder and how to generate the set
        raise MDInputError(f"oreo-poly24 set not found (choose its folder with --poly24-dir DIR or --data-dir DIR)."
                           f"\n{exc}") from None


def held_out_temperatures(polymer: str, poly24_dir=None, data_dir=None) -> List[float]:
    """Temperatures (K) of the polymer's test trajectories in the set."""
    manifest = load_manifest(poly24_dir, data_dir)
    polymer = canonical_polymer(polymer)
    if polymer not in manifest.get("polymers", {}):
        folder = poly24_folder(poly24_dir, data_dir)
        raise MDInputError(f"polymer {polymer} is not in the poly24 set at {folder} (it has "
                           f"{', '.join(manifest.get('polymers', {})) or 'none'}); generate it with: oreo data poly24 "
                           f"--polymers {polymer} --out {folder}")
    return sorted({float(r["temperature_K"]) for r in manifest["trajectories"]
                   if r["polymer"] == polymer and r["split"] == "test"})


def _load(polymer: str, temperatures, poly24_dir, data_dir):
    from forcefield.data.poly24 import load_poly24
    try:
        return load_poly24("test", polymers=[polymer], temperatures=temperatures, data_dir=data_dir,
                           root=poly24_dir)
    except FileNotFoundError as exc:
        raise MDInputError(f"oreo-poly24 set not found.\n{exc}") from None
    except ValueError as exc:
        raise MDInputError(f"cannot load poly24 test frames of {polymer}: {exc}") from None


def load_polymer_frames(polymer: str, temperature: float, poly24_dir=None, data_dir=None) -> Tuple[object, object]:
    """``(held_out, reference)`` ConformationSets of ``polymer`` (see the module docstring)."""
    polymer = canonical_polymer(polymer)
    temps = held_out_temperatures(polymer, poly24_dir, data_dir)
    if not temps:
        raise MDInputError(f"the poly24 set at {poly24_folder(poly24_dir, data_dir)} has no test trajectory of "
                           f"{polymer}; generate the set with at least 2 replicas per temperature "
                           f"(oreo data poly24 --replicas 4)")
    from forcefield.data.conformations import ConformationSet
    # one read per temperature; the held-out set is their concatenation (the manifest orders trajectories by T)
    per_t = [_load(polymer, [t], poly24_dir, data_dir) for t in temps]
    held_out = per_t[0] if len(per_t) == 1 else ConformationSet.concatenate(per_t, source=f"poly24/test/{polymer}")
    held_out.meta = {**per_t[0].meta}
    kelvin = ", ".join(f"{t:g}" for t in temps)
    hit = next((i for i, t in enumerate(temps) if abs(t - float(temperature)) < _TEMPERATURE_TOL), None)
    if hit is not None:
        reference = per_t[hit]
        note = f"poly24 {polymer} test split at {temps[hit]:g} K ({len(reference)} frames)"
    else:
        reference = held_out
        note = (f"poly24 {polymer} test split, all temperatures ({len(reference)} frames; the set has no "
                f"{float(temperature):g} K test trajectory, only {kelvin} K)")
    held_out.meta["md_held_out"] = f"poly24 {polymer} test split ({len(held_out)} frames, {kelvin} K)"
    reference.meta["md_reference"] = note
    return held_out, reference
