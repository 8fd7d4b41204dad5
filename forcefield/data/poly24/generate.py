"""Generate oreo-poly24 (``oreo data poly24 --out DIR``): oligomers, xTB MD sampling, labels, splits.

Layout of ``DIR``::

    generation.json                       the settings (a re-run must use the same ones)
    trajectories/<polymer>/T<K>_r<i>.extxyz   one sampling trajectory, every frame labelled
    trajectories/<polymer>/T<K>_r<i>.json     its record (seed, split, frames, level of theory, time)
    train.extxyz, val.extxyz, test.extxyz     all frames of each split, for any ase.io reader
    manifest.json, MANIFEST.md                polymers (SMILES, atoms), trajectories, counts, labeller

Splits are by trajectory, never by frame: for every polymer and temperature, replica 0 is the
test trajectory, replica 1 validation and the rest training (with 2 replicas: test and train).
A trajectory is written atomically once finished, so a killed run loses at most the trajectory in
progress and a re-run continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ...files import atomic_write_text
from .build import build_oligomer, geometry_problems, oligomer_smiles
from .catalog import POLYMERS, Polymer, select_polymers
from .loader import FRAMES_PER_TRAJECTORY_ID
from .sampling import SamplingError, SamplingSettings, frames_to_images, sample_trajectory, write_extxyz

FORMAT = "oreo-poly24"
VERSION = 1
SPLITS = ("train", "val", "test")
DATASET_NOTE = ("oreo-poly24: this project's own polymer set, generated with `oreo data poly24`; "
                "it is not the (unpublished) 24-polymer DFT set of the ET-OREO/PolyGET authors.")


@dataclass
class GenerationConfig:
    polymers: List[str] = field(default_factory=lambda: list(POLYMERS))
    temperatures: List[float] = field(default_factory=lambda: [300.0, 600.0])
    replicas: int = 4
    timestep_fs: float = 0.5
    friction: float = 0.02
    relax_steps: int = 50
    equilibration_steps: int = 200
    steps: int = 1000
    stride: int = 20
    seed: int = 0
    labels: str = "xtb"              # xtb | dft (PySCF, relabels kept frames)
    dft_xc: str = "pbe"
    dft_basis: str = "def2-svp"
    dft_frames: Optional[int] = None  # DFT: label only the first N kept frames of each trajectory

    def __post_init__(self):
        self.polymers = [p.name for p in select_polymers(self.polymers)]
        self.temperatures = [float(t) for t in self.temperatures]
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive (K), got {self.temperatures}")
        if self.stride < 1 or self.steps < self.stride:
            raise ValueError(f"need steps >= stride >= 1 to keep any frame (steps {self.steps}, stride {self.stride})")
        if self.labels not in ("xtb", "dft"):
            raise ValueError(f"labels must be 'xtb' (GFN2-xTB) or 'dft' (PySCF), got '{self.labels}'")
        if self.frames_per_trajectory() >= FRAMES_PER_TRAJECTORY_ID:
            raise ValueError(f"{self.frames_per_trajectory()} frames a trajectory (steps {self.steps} / stride "
                             f"{self.stride}): frame ids are {FRAMES_PER_TRAJECTORY_ID} x trajectory + frame, so a "
                             f"trajectory holds fewer than {FRAMES_PER_TRAJECTORY_ID}; raise the stride or add replicas")

    def sampling(self, temperature: float) -> SamplingSettings:
        return SamplingSettings(temperature=temperature, timestep_fs=self.timestep_fs, friction=self.friction,
                                relax_steps=self.relax_steps, equilibration_steps=self.equilibration_steps,
                                steps=self.steps, stride=self.stride)

    def frames_per_trajectory(self) -> int:
        n = self.steps // self.stride
        return min(n, self.dft_frames) if self.labels == "dft" and self.dft_frames else n

    def same_recipe(self, other: "GenerationConfig") -> List[str]:
        """Settings (other than the polymer list) where ``other`` differs."""
        return [f.name for f in fields(self) if f.name != "polymers" and getattr(self, f.name) != getattr(other, f.name)]


def split_of(replica: int, replicas: int) -> str:
    if replicas >= 3:
        return {0: "test", 1: "val"}.get(replica, "train")
    if replicas == 2:
        return "test" if replica == 0 else "train"
    return "train"


def trajectory_seed(seed: int, polymer: str, temperature: float, replica: int, attempt: int = 0) -> int:
    key = f"{seed}:{polymer}:{temperature:g}:{replica}:{attempt}".encode()
    return int(hashlib.sha256(key).hexdigest()[:7], 16)   # < 2**28: fits every RNG


def trajectory_name(temperature: float, replica: int) -> str:
    return f"T{temperature:g}_r{replica}"


def level_of_theory(config: GenerationConfig) -> str:
    from ...reference import dft_level, xtb_level
    if config.labels == "dft":
        return f"{dft_level(config.dft_xc, config.dft_basis)}; sampled by {xtb_level()} MD"
    return xtb_level()


def _relabel_dft(numbers, frames, config: GenerationConfig):
    from ...reference import dft_energy_forces
    if config.dft_frames:
        frames = frames[:config.dft_frames]
    for fr in frames:
        fr.energy, fr.forces = dft_energy_forces(numbers, fr.positions, config.dft_xc, config.dft_basis)
    return frames


def generate_trajectory(out: Path, polymer: Polymer, temperature: float, replica: int, config: GenerationConfig,
                        level: str, on_step: Optional[Callable[[int], None]] = None, max_attempts: int = 3) -> Dict:
    """Sample, label and write one trajectory; returns its record."""
    from ...reference import xtb_calculator
    name = trajectory_name(temperature, replica)
    folder = out / "trajectories" / polymer.name
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for attempt in range(max_attempts):
        seed = trajectory_seed(config.seed, polymer.name, temperature, replica, attempt)
        atoms, bond_list = build_oligomer(polymer, seed)
        problems = geometry_problems(atoms.numbers, atoms.positions, bond_list)
        if problems:
            raise RuntimeError(f"{polymer.name}: the built oligomer is not sound: {problems[:3]}")
        try:
            frames = sample_trajectory(atoms, config.sampling(temperature), seed, xtb_calculator(), on_step)
            break
        except SamplingError:
            if attempt == max_attempts - 1:
                raise
    if config.labels == "dft":
        frames = _relabel_dft(atoms.numbers, frames, config)
    split = split_of(replica, config.replicas)
    record = {"polymer": polymer.name, "temperature_K": temperature, "replica": replica, "seed": seed,
              "attempt": attempt, "split": split, "frames": len(frames), "n_atoms": len(atoms),
              "formula": atoms.get_chemical_formula(), "level_of_theory": level,
              "file": f"trajectories/{polymer.name}/{name}.extxyz",
              "seconds": round(time.perf_counter() - started, 2)}
    info = {"polymer": polymer.name, "temperature_K": temperature, "replica": replica, "split": split,
            "trajectory": f"{polymer.name}/{name}", "level_of_theory": level}
    write_extxyz(folder / f"{name}.extxyz", frames_to_images(atoms.numbers, frames, info))
    atomic_write_text(folder / f"{name}.json", json.dumps(record, indent=1))
    return record


def _load_or_store_config(out: Path, config: GenerationConfig) -> None:
    path = out / "generation.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        old = GenerationConfig(**{k: v for k, v in stored.items() if k != "polymers"}, polymers=config.polymers)
        diff = old.same_recipe(config)
        if diff:
            changes = ", ".join(f"{k}: {getattr(old, k)} -> {getattr(config, k)}" for k in diff)
            raise ValueError(f"{out} was generated with other settings ({changes}); use a new --out, or the same "
                             f"settings to continue it")
        stored_polymers = select_polymers(stored.get("polymers"))
        config_all = asdict(config)
        config_all["polymers"] = sorted({p.name for p in stored_polymers} | set(config.polymers),
                                        key=list(POLYMERS).index)
        atomic_write_text(path, json.dumps(config_all, indent=1))
    else:
        atomic_write_text(path, json.dumps(asdict(config), indent=1))


def records(out: Path) -> List[Dict]:
    """The records of every finished trajectory under ``out``, in catalogue order."""
    recs = [json.loads(p.read_text()) for p in sorted((out / "trajectories").glob("*/*.json"))]
    order = list(POLYMERS)
    return sorted(recs, key=lambda r: (order.index(r["polymer"]), r["temperature_K"], r["replica"]))


def write_manifest(out: Path) -> Dict:
    """manifest.json, MANIFEST.md and the three split files from the finished trajectories."""
    from ase.io import read
    recs = records(out)
    config = json.loads((out / "generation.json").read_text())
    polymers = {}
    for name in sorted({r["polymer"] for r in recs}, key=list(POLYMERS).index):
        p = POLYMERS[name]
        first = next(r for r in recs if r["polymer"] == name)
        polymers[name] = {"full_name": p.full_name, "family": p.family, "repeat_smiles": p.repeat_smiles,
                          "n_repeat": p.n_repeat, "oligomer_smiles": oligomer_smiles(p),
                          "n_atoms": first["n_atoms"], "formula": first["formula"]}
    counts = {s: {"trajectories": sum(r["split"] == s for r in recs),
                  "frames": sum(r["frames"] for r in recs if r["split"] == s)} for s in SPLITS}
    levels = sorted({r["level_of_theory"] for r in recs})
    manifest = {"format": FORMAT, "version": VERSION, "note": DATASET_NOTE, "level_of_theory": levels,
                "units": {"positions": "Å", "energy": "eV", "forces": "eV/Å"},
                "split_rule": "by trajectory: replica 0 test, replica 1 val, others train (per polymer and T)",
                "generation": config, "polymers": polymers, "counts": counts, "trajectories": recs}
    for split in SPLITS:
        images = [a for r in recs if r["split"] == split for a in read(str(out / r["file"]), index=":")]
        if images:
            write_extxyz(out / f"{split}.extxyz", images)
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    lines = ["# oreo-poly24", "", DATASET_NOTE, "",
             f"Labels: {'; '.join(levels)}. Units: Å, eV, eV/Å.", "",
             f"Sampling: Langevin MD at {config['temperatures']} K, {config['timestep_fs']} fs steps, "
             f"{config['equilibration_steps']} equilibration + {config['steps']} production steps, every "
             f"{config['stride']}th step kept; {config['replicas']} replicas per polymer and temperature; seed "
             f"{config['seed']}.", "",
             "| split | trajectories | frames |", "|---|---:|---:|"]
    lines += [f"| {s} | {counts[s]['trajectories']} | {counts[s]['frames']} |" for s in SPLITS]
    lines += ["", "| polymer | name | repeat unit | n | atoms | formula |", "|---|---|---|---:|---:|---|"]
    lines += [f"| {k} | {v['full_name']} | `{v['repeat_smiles']}` | {v['n_repeat']} | {v['n_atoms']} | "
              f"{v['formula']} |" for k, v in polymers.items()]
    atomic_write_text(out / "MANIFEST.md", "\n".join(lines) + "\n")
    return manifest


def generate(out, config: Optional[GenerationConfig] = None, progress: bool = True,
             log: Callable[[str], None] = print) -> Dict:
    """Generate (or continue) the set in ``out``; returns the manifest."""
    config = config or GenerationConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _load_or_store_config(out, config)
    level = level_of_theory(config)
    jobs = [(POLYMERS[name], t, r) for name in config.polymers for t in config.temperatures
            for r in range(config.replicas)]
    todo = [j for j in jobs if not (out / "trajectories" / j[0].name / f"{trajectory_name(j[1], j[2])}.json").is_file()]
    log(f"poly24: {len(jobs)} trajectories ({len(jobs) - len(todo)} already done), labels: {level}")
    per_traj = config.equilibration_steps + config.steps
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo) * per_traj, unit="step", desc="poly24 xTB MD")
    try:
        for polymer, t, r in todo:
            if bar is not None:
                bar.set_postfix_str(f"{polymer.name} {t:g} K r{r}")
            rec = generate_trajectory(out, polymer, t, r, config, level, bar.update if bar is not None else None)
            if bar is None:
                log(f"poly24: {polymer.name} {t:g} K replica {r}: {rec['frames']} frames ({rec['split']}), "
                    f"{rec['seconds']} s")
    finally:
        if bar is not None:
            bar.close()
    return write_manifest(out)
