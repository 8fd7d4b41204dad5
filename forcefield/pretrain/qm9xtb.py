"""oreo-qm9-xtb: off-equilibrium conformations of QM9 molecules with GFN2-xTB energies and forces.

``oreo data qm9-xtb --out DIR --molecules N [--start K]`` generates (or continues) the set; a pretraining
corpus reads it as ``{reader: qm9-xtb, kind: off-equilibrium}`` (path: the folder, default
``<data_dir>/qm9xtb``).

Sampling: short GFN2-xTB Langevin MD (tblite) of each molecule from its QM9 geometry, with the MD of
oreo-poly24 (:func:`forcefield.data.poly24.sampling.sample_trajectory`): ``equilibration_steps`` steps, then
every ``stride``-th of ``frames_per_molecule * stride`` production steps is kept, labelled with the xTB energy
and forces of that step. MD rather than normal-mode sampling: both pay a fixed number of xTB gradients per
molecule before the first frame (MD: the equilibration, 100 steps by default; normal modes: an xTB relaxation of
the B3LYP geometry, 40-60 BFGS steps on the QM9 molecules tried, then a finite-difference Hessian, 6N gradients,
about 110 for QM9's median 18 atoms), so at the few frames per molecule that spread a few hundred thousand frames
over QM9's ~105k training molecules they cost about the same per frame (normal modes win only at many frames
per molecule). MD needs no relaxation and no care for imaginary modes, reuses the tested poly24 machinery, and
its frames are anharmonic (torsions, large-amplitude motion) where normal-mode displacements are not.

Molecules: the QM9 ``split`` (train by default: QM9's property test molecules never enter pretraining), in one
fixed order (QM9 indices ranked by a seeded permutation of 1..133885, whatever form QM9 is read from), so
``--start K --molecules N`` names positions K..K+N-1 of that order and any prefix is a random sample of QM9.
Molecules whose bond graph equals a fine-tuning target's (``targets``; the strict leakage protocol of
:mod:`.leakage`, by its graph hashing) are skipped and recorded as skipped. A frame whose bond graph no longer
equals its molecule's (a bond broke or formed in the hot MD; :func:`bonds_intact`) is dropped and counted.

Layout of ``DIR``::

    generation.json                 the recipe (a re-run continues with it; other settings are refused)
    shards/qm9xtb_<block>.npz       molecules of order positions [block * shard_size, (block + 1) * shard_size)
    pending/<block>/<index>.npz     molecules finished in a run whose shard is not yet written
    manifest.json                   counts, skipped and failed molecules, cost, shards, level of theory

Each molecule is written atomically when finished (``pending/``); a shard is written atomically (merging an
earlier shard file of the block, if any) once the run has no molecule of its block left to do, so a killed run
loses at most the molecules in progress and a re-run skips every finished one. Shards are npz (no pickles):
per molecule ``mol_*`` (QM9 index, order position, status 0 sampled / 1 skipped / 2 failed, seed, attempts,
frames, dropped frames, xTB energy at the QM9 geometry, seconds, note), per frame ``frame_id`` (QM9 index *
1000 + frame number), ``frame_mol``, ``frame_step``, ``frame_temperature``, ``energy`` (eV), ``level`` (level
of theory), ``n_atoms``, per atom ``numbers``, ``positions`` (Å), ``forces`` (eV/Å).

Seeds: molecule ``i``'s MD seed is ``sha256("{seed}:{i}:{attempt}")`` (first 28 bits), stored per molecule,
so the frames depend on the seed and the molecule only, not on the number of workers or the order of work.

Energies: GFN2-xTB total energies (eV); they are not on the DFT scale of the other sources, and the corpus drops
every source's energies anyway (no pretraining objective uses them). :func:`load_qm9_xtb` gives either the total
energy or, with ``energy="relative"``, the energy relative to the molecule's xTB energy at its QM9 geometry.
Forces are in eV/Å like every other source.

Part of :mod:`forcefield.pretrain` (imports :mod:`.leakage`, ``forcefield.data`` (QM9, the poly24 MD),
``forcefield.reference`` and ``forcefield.files``); imported by :mod:`.corpus` (reader ``qm9-xtb``) and the
``oreo data qm9-xtb`` command.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..data.conformations import ConformationSet
from ..data.paths import DataNotFoundError, resolve_data_dir
from ..data.qm9 import QM9_SPLIT
from ..files import atomic_write, write_json
from ..settings import from_mapping

__all__ = ["QM9XTBConfig", "generate_qm9_xtb", "load_qm9_xtb", "qm9_xtb_root", "molecule_order",
           "molecule_seed", "bonds_intact", "FORMAT", "DEFAULT_FOLDER"]

FORMAT = "oreo-qm9-xtb"
VERSION = 1
DEFAULT_FOLDER = "qm9xtb"
ORDER_SEED = 13                  # fixed: the order of QM9 molecules (positions K..K+N-1) never changes
MAX_FRAMES = 1000                # frame_id = QM9 index * MAX_FRAMES + frame number
SAMPLED, SKIPPED, FAILED = 0, 1, 2
STATUS = {SAMPLED: "sampled", SKIPPED: "skipped", FAILED: "failed"}
MAX_ATTEMPTS = 3
DATASET_NOTE = ("oreo-qm9-xtb: off-equilibrium conformations of QM9 molecules from short GFN2-xTB Langevin MD, "
                "labelled with GFN2-xTB (tblite) energies and forces; generated with `oreo data qm9-xtb`.")

MOL_KEYS = ("mol_index", "mol_position", "mol_status", "mol_seed", "mol_attempts", "mol_frames", "mol_dropped",
            "mol_energy_ref", "mol_seconds", "mol_note")
FRAME_KEYS = ("frame_id", "frame_mol", "frame_step", "frame_temperature", "energy", "level", "n_atoms")
ATOM_KEYS = ("numbers", "positions", "forces")


@dataclass
class QM9XTBConfig:
    """The recipe of a set (stored in ``generation.json``)."""
    temperature: float = 800.0          # K
    frames_per_molecule: int = 4
    stride: int = 10                    # MD steps between kept frames
    equilibration_steps: int = 100
    timestep_fs: float = 0.5
    friction: float = 0.02              # 1/fs
    # 1/fs while equilibrating (None: friction): 0.1/fs brings the frames to the temperature they are labelled with
    equilibration_friction: Optional[float] = 0.1
    seed: int = 0
    split: str = "train"                # QM9 split the molecules come from
    split_scheme: str = QM9_SPLIT       # which molecules that split holds (forcefield.data.qm9)
    qm9: Optional[str] = None           # QM9 source (None: the data dir's archive/db, else qm9pack)
    targets: List[str] = field(default_factory=lambda: ["aspirin", "ethanol", "naphthalene", "salicylic"])
    shard_size: int = 500               # molecules per shard

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (K), got {self.temperature}")
        if not 1 <= self.frames_per_molecule < MAX_FRAMES:
            raise ValueError(f"frames_per_molecule must be 1..{MAX_FRAMES - 1}, got {self.frames_per_molecule}")
        if self.stride < 1 or self.equilibration_steps < 0 or self.shard_size < 1:
            raise ValueError("stride and shard_size must be at least 1 and equilibration_steps at least 0")
        if self.split not in ("train", "val", "test", "all"):
            raise ValueError(f"split must be train, val, test or all, got '{self.split}'")

    def sampling(self):
        from ..data.poly24.sampling import SamplingSettings
        return SamplingSettings(temperature=self.temperature, timestep_fs=self.timestep_fs, friction=self.friction,
                                relax_steps=0, equilibration_steps=self.equilibration_steps,
                                steps=self.frames_per_molecule * self.stride, stride=self.stride,
                                equilibration_friction=self.equilibration_friction)

    def steps_per_molecule(self) -> int:
        return self.equilibration_steps + self.frames_per_molecule * self.stride


# ---------------------------------------------------------------------------- molecules, seeds
def molecule_order(index: np.ndarray) -> np.ndarray:
    """Positions of QM9 indices ``index`` sorted into the set's fixed order (a seeded rank of 1..133885)."""
    from ..data.qm9 import QM9_N_MOLECULES
    perm = np.random.default_rng(ORDER_SEED).permutation(QM9_N_MOLECULES)
    rank = np.empty(QM9_N_MOLECULES, dtype=np.int64)
    rank[perm] = np.arange(QM9_N_MOLECULES)
    return np.argsort(rank[np.asarray(index, dtype=np.int64) - 1], kind="stable")


def molecule_seed(seed: int, qm9_index: int, attempt: int = 0) -> int:
    key = f"{seed}:{int(qm9_index)}:{attempt}".encode()
    return int(hashlib.sha256(key).hexdigest()[:7], 16)   # < 2**28: fits every RNG


def _qm9_molecules(config: QM9XTBConfig, data_dir) -> ConformationSet:
    """The split's molecules in the set's order."""
    from ..data.qm9 import load_qm9
    cset = load_qm9(config.qm9, split=config.split, data_dir=data_dir, properties=(), split_scheme=config.split_scheme)
    return cset.subset(molecule_order(cset.frame_id))


def _target_of(cset: ConformationSet, targets: Sequence[str], data_dir) -> List[Optional[str]]:
    """For each molecule, the fine-tuning target whose bond graph it has (strict leakage protocol), or None."""
    from .leakage import LeakageConfig, apply_leakage_filter, resolve_targets
    out: List[Optional[str]] = [None] * len(cset)
    if not targets or len(cset) == 0:
        return out
    cfg = LeakageConfig(protocol="strict", targets=list(targets))
    for t in resolve_targets(cfg, data_dir):
        keep, _ = apply_leakage_filter(cset, cfg, [t])
        for k in np.flatnonzero(~keep):
            out[k] = out[k] or t.name
    return out


# ---------------------------------------------------------------------------- one molecule
def _empty_record() -> Dict[str, np.ndarray]:
    return {"frame_id": np.zeros(0, np.int64), "frame_mol": np.zeros(0, np.int64),
            "frame_step": np.zeros(0, np.int64), "frame_temperature": np.zeros(0), "energy": np.zeros(0),
            "level": np.zeros(0, dtype="<U1"), "n_atoms": np.zeros(0, np.int64),
            "numbers": np.zeros(0, np.int8), "positions": np.zeros((0, 3)), "forces": np.zeros((0, 3))}


def _molecule_fields(index: int, position: int, status: int, seed: int = -1, attempts: int = 0, frames: int = 0,
                     dropped: int = 0, energy_ref: float = np.nan, seconds: float = 0.0, note: str = ""):
    values = (index, position, status, seed, attempts, frames, dropped, energy_ref, seconds, note)
    dtypes = (np.int64, np.int64, np.int8, np.int64, np.int16, np.int32, np.int32, np.float64, np.float64, None)
    return {k: np.asarray([v], dtype=d) for k, v, d in zip(MOL_KEYS, values, dtypes)}


def bonds_intact(numbers: np.ndarray, reference: np.ndarray, positions: np.ndarray, bond_factor: float = 1.25,
                 broken: float = 1.5, formed: float = 1.0) -> bool:
    """Whether a frame of an MD trajectory (same atom order) still has the bond graph of ``reference``: no bond
    (distance < ``bond_factor`` x the sum of the ASE covalent radii at the reference geometry, as :mod:`.leakage`
    defines it) stretched past ``broken`` x that sum, no other pair closer than ``formed`` x it. The gap between
    the thresholds keeps a long bond or a close contact of a strained molecule from counting as a change."""
    from ase.data import covalent_radii
    numbers = np.asarray(numbers, dtype=np.int64)
    limit = np.asarray(covalent_radii)[numbers]
    limit = limit[:, None] + limit[None, :]
    dist = lambda r: np.linalg.norm(r[:, None, :] - r[None, :, :], axis=-1)
    bond = dist(np.asarray(reference, np.float64)) < bond_factor * limit
    np.fill_diagonal(bond, False)
    d = dist(np.asarray(positions, np.float64))
    np.fill_diagonal(d, np.inf)
    return not (np.any(bond & (d > broken * limit)) or np.any(~bond & (d < formed * limit)))


def skipped_record(index: int, position: int, target: str) -> Dict[str, np.ndarray]:
    return {**_molecule_fields(index, position, SKIPPED, note=f"leakage: bond graph of {target}"), **_empty_record()}


def sample_molecule(task) -> Dict[str, np.ndarray]:
    """MD of one QM9 molecule; ``task`` = (position, qm9 index, numbers, positions, recipe dict, level)."""
    from ase import Atoms
    from ase.calculators.calculator import CalculationFailed
    from ..data.poly24.sampling import SamplingError, sample_trajectory
    from ..reference import xtb_calculator
    position, index, numbers, positions, recipe, level = task
    config = QM9XTBConfig(**recipe)
    started = time.perf_counter()
    numbers = np.asarray(numbers, dtype=np.int64)
    error = ""
    for attempt in range(MAX_ATTEMPTS):
        seed = molecule_seed(config.seed, index, attempt)
        atoms = Atoms(numbers=numbers, positions=np.array(positions, dtype=np.float64))
        calc = xtb_calculator()
        try:
            atoms.calc = calc
            energy_ref = float(atoms.get_potential_energy())        # xTB at the QM9 (B3LYP) geometry
            with warnings.catch_warnings():   # ASE's ZeroRotation divides by a zero moment of linear molecules
                warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
                frames = sample_trajectory(atoms, config.sampling(), seed, calc)
            break
        except (SamplingError, CalculationFailed) as exc:
            error = f"{type(exc).__name__}: {exc}"
    else:
        return {**_molecule_fields(index, position, FAILED, seed, MAX_ATTEMPTS, seconds=time.perf_counter() - started,
                                   note=error[:300]), **_empty_record()}
    # a frame whose bond graph changed (bond broken or formed) is not a conformation of this molecule
    intact = [bonds_intact(numbers, positions, fr.positions) for fr in frames]
    kept = [fr for fr, ok in zip(frames, intact) if ok]
    n, m = len(numbers), len(kept)
    rec = _molecule_fields(index, position, SAMPLED, seed, attempt + 1, m, len(frames) - m, energy_ref,
                           time.perf_counter() - started)
    rec.update({
        "frame_id": index * MAX_FRAMES + np.array([k for k, ok in enumerate(intact) if ok], dtype=np.int64),
        "frame_mol": np.full(m, index, np.int64),
        "frame_step": np.array([fr.step for fr in kept], dtype=np.int64),
        "frame_temperature": np.full(m, config.temperature),
        "energy": np.array([fr.energy for fr in kept], dtype=np.float64),
        "level": np.array([level] * m, dtype=str) if m else np.zeros(0, dtype="<U1"),
        "n_atoms": np.full(m, n, np.int64),
        "numbers": np.tile(numbers, m).astype(np.int8),
        "positions": np.concatenate([fr.positions for fr in kept]) if m else np.zeros((0, 3)),
        "forces": np.concatenate([fr.forces for fr in kept]) if m else np.zeros((0, 3)),
    })
    return rec


# ---------------------------------------------------------------------------- files
def _save_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:          # a file object: np.savez would append .npz to a path
            np.savez_compressed(fh, **arrays)
    atomic_write(path, write)


def _load_npz(path: Path, keys: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in (keys or z.files)}


def _concat(records: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {k: np.concatenate([r[k] for r in records]) for k in MOL_KEYS + FRAME_KEYS + ATOM_KEYS}


def _split_by_molecule(rec: Dict[str, np.ndarray]) -> Dict[int, Dict[str, np.ndarray]]:
    """A shard's arrays -> one record per molecule (keyed by QM9 index)."""
    out = {}
    f0 = a0 = 0
    for k in range(len(rec["mol_index"])):
        nf = int(rec["mol_frames"][k])
        na = int(rec["n_atoms"][f0:f0 + nf].sum())
        one = {key: rec[key][k:k + 1] for key in MOL_KEYS}
        one.update({key: rec[key][f0:f0 + nf] for key in FRAME_KEYS})
        one.update({key: rec[key][a0:a0 + na] for key in ATOM_KEYS})
        out[int(rec["mol_index"][k])] = one
        f0, a0 = f0 + nf, a0 + na
    return out


def shard_name(block: int) -> str:
    return f"qm9xtb_{block:05d}.npz"


def qm9_xtb_root(data_dir=None, root=None) -> Path:
    """The set's folder: ``root`` if given, else ``<data_dir>/qm9xtb``."""
    return Path(root).expanduser() if root is not None else resolve_data_dir(data_dir) / DEFAULT_FOLDER


def _resolve_config(out: Path, options: Dict[str, Any]) -> QM9XTBConfig:
    """The stored recipe updated with ``options`` (given values only); a change of recipe is an error."""
    path = out / "generation.json"
    options = {k: v for k, v in options.items() if v is not None}
    if not path.is_file():
        return from_mapping(QM9XTBConfig, options, "qm9-xtb")
    stored = json.loads(path.read_text())
    if stored.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} recipe")
    recipe = dict(stored["recipe"])
    if "split_scheme" not in recipe:          # sets begun before the recipe named it: their order is unknown now
        raise ValueError(f"{out} was begun before qm9-xtb recorded its QM9 split scheme, and the default scheme has "
                         f"changed since (its molecules may include today's QM9 test molecules): generate a new set "
                         f"in another --out")
    recipe.setdefault("equilibration_friction", None)      # sets begun before it: equilibrated at `friction`
    old = from_mapping(QM9XTBConfig, recipe, "qm9-xtb")
    new = from_mapping(QM9XTBConfig, {**asdict(old), **options}, "qm9-xtb")
    diff = [f.name for f in fields(QM9XTBConfig) if getattr(old, f.name) != getattr(new, f.name)]
    if diff:
        changes = ", ".join(f"{k}: {getattr(old, k)} -> {getattr(new, k)}" for k in diff)
        raise ValueError(f"{out} was generated with other settings ({changes}); use a new --out, or the same "
                         f"settings (or none) to continue it")
    return old


def _done_molecules(out: Path) -> Dict[int, int]:
    """QM9 index -> status of every finished molecule (in shards or pending)."""
    done: Dict[int, int] = {}
    for p in sorted((out / "shards").glob("qm9xtb_*.npz")):
        z = _load_npz(p, ("mol_index", "mol_status"))
        done.update(zip(z["mol_index"].tolist(), z["mol_status"].tolist()))
    for p in sorted((out / "pending").glob("*/*.npz")):
        done.setdefault(int(p.stem), -1)
    return done


def _flush_block(out: Path, block: int) -> None:
    """Write shard ``block`` from its earlier shard file and its pending molecules, then drop those."""
    pending_dir = out / "pending" / f"{block:05d}"
    files = sorted(pending_dir.glob("*.npz")) if pending_dir.is_dir() else []
    if not files:
        return
    shard = out / "shards" / shard_name(block)
    mols = _split_by_molecule(_load_npz(shard)) if shard.is_file() else {}
    for p in files:
        mols.setdefault(int(p.stem), _load_npz(p))
    records = sorted(mols.values(), key=lambda r: int(r["mol_position"][0]))
    _save_npz(shard, _concat(records))
    for p in files:
        p.unlink()
    for tmp in pending_dir.glob(".*.tmp"):     # a write a killed run left unfinished: its molecule runs again
        tmp.unlink()
    pending_dir.rmdir()


def write_manifest(out: Path, n_molecules_split: Optional[int] = None) -> Dict[str, Any]:
    """manifest.json from the shards (counts, skipped and failed molecules, cost, shards, levels)."""
    gen = json.loads((out / "generation.json").read_text())
    recipe = gen["recipe"]
    n_split = n_molecules_split if n_molecules_split is not None else gen.get("molecules_in_split")
    shards, skipped, failed, levels = [], [], [], set()
    per_frame_seconds = []
    totals = {"molecules": 0, "sampled": 0, "skipped": 0, "failed": 0, "frames": 0, "frames_dropped": 0}
    seconds = 0.0
    for p in sorted((out / "shards").glob("qm9xtb_*.npz")):
        z = _load_npz(p, MOL_KEYS + ("level",))
        block = int(p.stem.split("_")[1])
        st = z["mol_status"]
        size = recipe["shard_size"] if n_split is None else min(recipe["shard_size"], n_split - block * recipe["shard_size"])
        shards.append({"file": f"shards/{p.name}", "block": block,
                       "positions": [block * recipe["shard_size"], (block + 1) * recipe["shard_size"] - 1],
                       "molecules": int(len(st)), "frames": int(z["mol_frames"].sum()),
                       "complete": bool(len(st) == size)})
        totals["molecules"] += int(len(st))
        for code, name in STATUS.items():
            totals[name] += int((st == code).sum())
        totals["frames"] += int(z["mol_frames"].sum())
        totals["frames_dropped"] += int(z["mol_dropped"].sum())
        seconds += float(z["mol_seconds"].sum())
        ok = (st == SAMPLED) & (z["mol_frames"] > 0)
        per_frame_seconds += (z["mol_seconds"][ok] / z["mol_frames"][ok]).tolist()
        skipped += [{"qm9_index": int(i), "reason": str(n)} for i, n in
                    zip(z["mol_index"][st == SKIPPED], z["mol_note"][st == SKIPPED])]
        failed += [{"qm9_index": int(i), "error": str(n)} for i, n in
                   zip(z["mol_index"][st == FAILED], z["mol_note"][st == FAILED])]
        levels.update(np.unique(z["level"]).tolist())
    pending = sorted(int(p.stem) for p in (out / "pending").glob("*/*.npz"))
    manifest = {
        "format": FORMAT, "version": VERSION, "note": DATASET_NOTE, "level_of_theory": sorted(levels),
        "units": {"positions": "Å", "energy": "eV (GFN2-xTB total energy)", "forces": "eV/Å"},
        "sampling": (f"GFN2-xTB Langevin MD from the QM9 geometry at {recipe['temperature']:g} K, "
                     f"{recipe['timestep_fs']:g} fs steps, friction {recipe['friction']:g}/fs, "
                     f"{recipe['equilibration_steps']} equilibration steps, then every {recipe['stride']}th of "
                     f"{recipe['frames_per_molecule'] * recipe['stride']} production steps kept"),
        "seeds": "per molecule: sha256('{seed}:{qm9_index}:{attempt}')[:7 hex digits]; stored as mol_seed",
        "order": f"QM9 indices ranked by numpy default_rng({ORDER_SEED}).permutation(133885)",
        "recipe": recipe, "molecules_in_split": n_split, "counts": totals,
        "cost": {"sampling_seconds": round(seconds, 1),
                 "seconds_per_frame": round(seconds / totals["frames"], 4) if totals["frames"] else None,
                 "median_seconds_per_frame": round(float(np.median(per_frame_seconds)), 4)
                 if per_frame_seconds else None,
                 "note": "wall seconds of each molecule's sampling in its worker (one thread each)"},
        "skipped": skipped, "failed": failed, "pending_molecules": pending, "shards": shards,
    }
    write_json(out / "manifest.json", manifest, ensure_ascii=False)
    return manifest


# ---------------------------------------------------------------------------- the command
def generate_qm9_xtb(out, molecules: Optional[int] = None, start: int = 0, workers: int = 1,
                     data_dir=None, log: Optional[Callable[[str], None]] = None, progress_seconds: float = 30.0,
                     **options) -> Dict[str, Any]:
    """Generate (or continue) the set in ``out``: molecules at order positions ``start .. start+molecules-1``
    (all to the end when ``molecules`` is None). ``options``: fields of :class:`QM9XTBConfig`; those not given
    come from the folder's stored recipe (or the defaults). Returns the manifest."""
    from ..reference import xtb_level
    log = log or (lambda line: print(line, flush=True))     # progress lines also reach a log file at once
    out = Path(out)
    config = _resolve_config(out, options)
    level = xtb_level()
    cset = _qm9_molecules(config, data_dir)
    n_split = len(cset)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "generation.json", {"format": FORMAT, "version": VERSION, "recipe": asdict(config),
                                         "molecules_in_split": n_split})
    start = max(int(start), 0)
    stop = n_split if molecules is None else min(n_split, start + int(molecules))
    positions = np.arange(start, stop)
    done = _done_molecules(out)
    index = cset.frame_id
    todo = [int(p) for p in positions if int(index[p]) not in done]
    size = config.shard_size
    left = {}
    for p in todo:
        left[p // size] = left.get(p // size, 0) + 1
    # leftovers of a killed run whose block has nothing left to do
    for d in sorted((out / "pending").glob("*")) if (out / "pending").is_dir() else []:
        if d.is_dir() and left.get(int(d.name), 0) == 0:
            _flush_block(out, int(d.name))
    log(f"qm9-xtb: positions {start}..{stop - 1} of {n_split} QM9 {config.split} molecules: {len(todo)} to do, "
        f"{len(positions) - len(todo)} already done; {config.frames_per_molecule} frames each at "
        f"{config.temperature:g} K; labels {level}; {workers} worker(s)")

    def finished(rec: Dict[str, np.ndarray]) -> None:
        p = int(rec["mol_position"][0])
        _save_npz(out / "pending" / f"{p // size:05d}" / f"{int(rec['mol_index'][0])}.npz", rec)
        left[p // size] -= 1
        if left[p // size] == 0:
            _flush_block(out, p // size)
            write_manifest(out, n_split)

    # leakage: molecules with a target's bond graph are recorded as skipped, never sampled
    sel = cset.subset(np.asarray(todo, dtype=np.int64))
    hit = _target_of(sel, config.targets, data_dir)
    tasks = []
    for k, p in enumerate(todo):
        if hit[k] is not None:
            finished(skipped_record(int(index[p]), p, hit[k]))
        else:
            tasks.append((p, int(index[p]), sel.frame_numbers(k).copy(), sel.frame_positions(k).copy(),
                          asdict(config), level))
    if hit.count(None) != len(hit):
        log(f"qm9-xtb: skipped {len(hit) - hit.count(None)} molecule(s) with a fine-tuning target's bond graph")
    started = last = time.perf_counter()
    n_done = frames = 0
    for rec in _run(tasks, workers):
        finished(rec)
        n_done += 1
        frames += int(rec["mol_frames"][0])
        now = time.perf_counter()
        if now - last >= progress_seconds or n_done == len(tasks):
            last = now
            rate = (now - started) / n_done
            log(f"qm9-xtb: {n_done}/{len(tasks)} molecules, {frames} frames, {rate:.2f} s/molecule "
                f"({(now - started) / max(frames, 1):.3f} s/frame wall), elapsed {(now - started) / 60:.1f} min, "
                f"ETA {rate * (len(tasks) - n_done) / 60:.1f} min")
    for block in sorted(b for b, n in left.items() if n == 0):
        _flush_block(out, block)   # no-op where already written
    return write_manifest(out, n_split)


def _run(tasks, workers: int):
    """Results of :func:`sample_molecule` over ``tasks``, in this process or in ``workers`` processes."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield sample_molecule(t)
        return
    import multiprocessing
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")     # one thread per worker, set before it starts
    try:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            yield from pool.imap_unordered(sample_molecule, tasks)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------- loading
def load_qm9_xtb(root=None, data_dir=None, energy: str = "total", level: Optional[str] = None) -> ConformationSet:
    """Every frame in the set's shards (pending molecules of a killed run are not read: re-run the command).

    ``energy``: ``"total"`` (GFN2-xTB total energy, eV) or ``"relative"`` (minus the molecule's xTB energy at
    its QM9 geometry). ``level``: keep only frames whose level of theory starts with this text. ``frame_id`` is
    QM9 index * 1000 + frame number; ``meta["level_of_theory"]`` lists the levels of the frames read."""
    if energy not in ("total", "relative"):
        raise ValueError(f"energy must be 'total' or 'relative', got '{energy}'")
    root = qm9_xtb_root(data_dir, root)
    files = sorted((root / "shards").glob("qm9xtb_*.npz"))
    if not files:
        raise DataNotFoundError(str(root / "shards" / shard_name(0)), [root / "shards"],
                                hint=f"generate the set with: oreo data qm9-xtb --out {root} --molecules N")
    gen = root / "generation.json"
    recipe = json.loads(gen.read_text())["recipe"] if gen.is_file() else {}
    split, scheme = recipe.get("split"), recipe.get("split_scheme")
    parts = [_load_npz(p) for p in files]
    rec = {k: np.concatenate([r[k] for r in parts]) for k in FRAME_KEYS + ATOM_KEYS}
    e = rec["energy"].copy()
    if energy == "relative":
        ref = dict(zip(np.concatenate([r["mol_index"] for r in parts]).tolist(),
                       np.concatenate([r["mol_energy_ref"] for r in parts]).tolist()))
        e -= np.array([ref[int(i)] for i in rec["frame_mol"]])
    cset = ConformationSet(numbers=rec["numbers"].astype(np.int64), positions=rec["positions"],
                           ptr=np.concatenate([[0], np.cumsum(rec["n_atoms"])]), energy=e, forces=rec["forces"],
                           frame_id=rec["frame_id"], equilibrium=np.zeros(len(e), dtype=bool), source="qm9-xtb",
                           meta={"dataset": FORMAT, "path": str(root), "energy": energy, "qm9_split": split,
                                 "qm9_split_scheme": scheme,
                                 "units": {"positions": "Å", "energy": "eV", "forces": "eV/Å"},
                                 "frame_id": "QM9 index * 1000 + frame number"})
    if level is not None:
        cset = cset.subset(np.flatnonzero(np.char.startswith(rec["level"].astype(str), level)))
        rec["level"] = rec["level"][np.char.startswith(rec["level"].astype(str), level)]
    cset.meta["level_of_theory"] = sorted(np.unique(rec["level"]).tolist())
    return cset
