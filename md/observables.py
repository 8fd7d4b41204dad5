"""What the analysis of a run needs, accumulated as the run goes.

A 300 ps run of 5 replicas logs 30,000 frames; its metrics need far less: per replica the h(r) histogram of its
stable frames and each logged frame's largest bond deviation, plus a small sample of stable frames from the end of
the run (positions and the model's forces) for the DFT check along the trajectory (``oreo-md dft-check``). :class:`Observables` holds exactly that, is updated
at every logged frame by the simulation, saved in every checkpoint (a few hundred kB at 300 ps), and is what the
analysis reads. A run continued from its compact state on a fresh clone (``oreo-md simulate --state``), whose
earlier trajectory files are gone, is therefore analysed as completely as one whose files are all on disk.

Definitions (MDsim, as :mod:`md.analysis` states them): a replica is stable until the first logged frame whose
largest |bond length - reference length| exceeds the threshold; h(r) is the histogram of all pair distances of
its stable frames (500 bins on (0, 10] Å), and needs at least one stable frame after t = 0.

:func:`replay_trajectories` rebuilds the observables from a run's trajectory files, for checkpoints written before
they existed: the same function accumulates both ways, so the two cannot disagree.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .metrics import HR_BINS, HR_RMAX, hr_bins, max_bond_deviation, pair_distances

FORMAT = "oreo-md-observables"
VERSION = 1
#: frames kept for the DFT check: a uniform sample of the stable frames logged in the last ``SAMPLE_WINDOW_PS``
SAMPLE_SIZE = 24
SAMPLE_WINDOW_PS = 100.0


def _priority(replica: int, step: int) -> float:
    """A fixed pseudo-random number in [0, 1) per (replica, step): keeping the frames with the smallest ones is a
    uniform sample that needs no RNG state and comes out the same however the run was split into pieces."""
    x = (replica * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mult) & 0xFFFFFFFFFFFFFFFF
    return ((x ^ (x >> 31)) >> 11) / float(1 << 53)


class Observables:
    """Per-replica accumulators: h(r) counts of stable frames, the logged steps and their max bond deviation.

    ``threshold``: bond deviation (Å) above which a replica is unstable from that frame on.
    """

    def __init__(self, n_replicas: int, threshold: float, n_bins: int = HR_BINS, rmax: float = HR_RMAX,
                 sample_size: int = SAMPLE_SIZE):
        self.threshold = float(threshold)
        self.sample_size = int(sample_size)
        self.sample: List[Dict[str, object]] = []    #: kept frames: replica, step, priority, positions, forces
        self.n_bins, self.rmax = int(n_bins), float(rmax)
        self.hr_counts = np.zeros((n_replicas, self.n_bins), dtype=np.float64)
        self.hr_frames = np.zeros(n_replicas, dtype=np.int64)        #: stable frames counted in h(r)
        self.hr_simulated = np.zeros(n_replicas, dtype=np.int64)     #: of those, frames after step 0
        self.first_unstable_step = np.full(n_replicas, -1, dtype=np.int64)
        self.steps: List[List[int]] = [[] for _ in range(n_replicas)]
        self.max_dev: List[List[float]] = [[] for _ in range(n_replicas)]

    @property
    def n_replicas(self) -> int:
        return len(self.hr_frames)

    def stable(self, replica: int) -> bool:
        return int(self.first_unstable_step[replica]) < 0

    def add_frame(self, replica: int, step: int, positions: np.ndarray, bonds: np.ndarray, ref_len: np.ndarray,
                  cell=None, pbc=None, forces: Optional[np.ndarray] = None, sample_from_step: Optional[int] = None
                  ) -> float:
        """Record one logged frame (positions (n, 3) Å) of ``replica``; returns its max bond deviation (Å).
        A stable frame with ``forces`` (the model's, eV/Å) at or after ``sample_from_step`` is a candidate for
        the frame sample (:meth:`sampled_frames`)."""
        positions = np.asarray(positions, dtype=np.float64)
        dev = float(max_bond_deviation(positions[None], bonds, ref_len, cell, pbc)[0])
        self.steps[replica].append(int(step))
        self.max_dev[replica].append(dev)
        if not self.stable(replica):
            return dev
        if dev > self.threshold:
            self.first_unstable_step[replica] = int(step)
            return dev
        d = pair_distances(positions[None], cell, pbc)
        d = d[(d > 0) & (d <= self.rmax)]
        self.hr_counts[replica] += np.histogram(d, bins=hr_bins(self.rmax, self.n_bins))[0]
        self.hr_frames[replica] += 1
        self.hr_simulated[replica] += int(step > 0)
        if forces is not None and sample_from_step is not None and step > 0 and step >= sample_from_step:
            self._offer(replica, step, positions, forces, sample_from_step)
        return dev

    def _offer(self, replica: int, step: int, positions: np.ndarray, forces: np.ndarray,
               window_start: int) -> None:
        self.sample = [f for f in self.sample if f["step"] >= window_start]   # the window moves when --ps grows
        prio = _priority(replica, step)
        if len(self.sample) >= self.sample_size and prio >= max(f["priority"] for f in self.sample):
            return
        self.sample.append({"replica": int(replica), "step": int(step), "priority": prio,
                            "positions": np.array(positions, dtype=np.float64),
                            "forces": np.array(forces, dtype=np.float64)})
        if len(self.sample) > self.sample_size:
            self.sample.remove(max(self.sample, key=lambda f: f["priority"]))

    def sampled_frames(self, from_step: int = 0) -> List[Dict[str, object]]:
        """The kept frames at or after ``from_step``, in (replica, step) order: dicts with replica, step,
        positions (n, 3) Å and forces (n, 3) eV/Å of the model."""
        return sorted((f for f in self.sample if f["step"] >= from_step), key=lambda f: (f["replica"], f["step"]))

    def hr(self, replica: int) -> Optional[np.ndarray]:
        """Normalised h(r) (density) of the replica's stable frames; None without a stable frame after t = 0 or
        without any distance in range (an empty histogram is no h(r))."""
        counts = self.hr_counts[replica]
        total = counts.sum()
        if self.hr_simulated[replica] == 0 or not total > 0:
            return None
        return counts / (total * (self.rmax / self.n_bins))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, object]:
        """Compact arrays (steps int32, deviations float32: 8 bytes per logged frame)."""
        lengths = np.array([len(s) for s in self.steps], dtype=np.int64)
        return {"format": FORMAT, "version": VERSION, "threshold": self.threshold, "n_bins": self.n_bins,
                "rmax": self.rmax, "hr_counts": self.hr_counts.copy(), "hr_frames": self.hr_frames.copy(),
                "hr_simulated": self.hr_simulated.copy(), "first_unstable_step": self.first_unstable_step.copy(),
                "lengths": lengths,
                "steps": np.concatenate([np.asarray(s, dtype=np.int32) for s in self.steps]) if lengths.sum()
                else np.zeros(0, np.int32),
                "max_dev": np.concatenate([np.asarray(d, dtype=np.float32) for d in self.max_dev]) if lengths.sum()
                else np.zeros(0, np.float32),
                "sample_size": self.sample_size, "sample": [dict(f) for f in self.sample]}

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "Observables":
        if d.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} record")
        obs = cls(len(d["hr_frames"]), d["threshold"], d["n_bins"], d["rmax"], d.get("sample_size", SAMPLE_SIZE))
        obs.sample = [dict(f) for f in d.get("sample", [])]
        obs.hr_counts = np.array(d["hr_counts"], dtype=np.float64)
        obs.hr_frames = np.array(d["hr_frames"], dtype=np.int64)
        obs.hr_simulated = np.array(d["hr_simulated"], dtype=np.int64)
        obs.first_unstable_step = np.array(d["first_unstable_step"], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(d["lengths"])]).astype(np.int64)
        steps, dev = np.asarray(d["steps"]), np.asarray(d["max_dev"])
        obs.steps = [steps[a:b].astype(np.int64).tolist() for a, b in zip(bounds, bounds[1:])]
        obs.max_dev = [dev[a:b].astype(np.float64).tolist() for a, b in zip(bounds, bounds[1:])]
        return obs


def sample_window_start(config) -> int:
    """First step of the window the DFT-check frames are sampled from (``config``: a SimulationConfig): the last
    ``SAMPLE_WINDOW_PS`` of the run (the whole run when it is shorter)."""
    return max(0, config.n_steps - int(round(SAMPLE_WINDOW_PS * 1000.0 / config.timestep)))


def replay_trajectories(trajectories: Sequence[Sequence], bonds: Sequence, threshold: float,
                        timestep_fs: float) -> Observables:
    """Observables of trajectories already on disk: ``trajectories[r]`` is replica r's list of ``ase.Atoms``
    (``info['step']`` or ``info['time_ps']`` per frame), ``bonds[r]`` its ``(bonds, reference lengths)``."""
    obs = Observables(len(trajectories), threshold)
    for r, frames in enumerate(trajectories):
        for atoms in frames:
            step = atoms.info.get("step")
            if step is None:
                step = round(float(atoms.info.get("time_ps", 0.0)) * 1000.0 / timestep_fs)
            cell = atoms.cell.array if atoms.pbc.any() else None
            pbc = atoms.pbc if atoms.pbc.any() else None
            obs.add_frame(r, int(step), atoms.positions, bonds[r][0], bonds[r][1], cell, pbc)
    return obs


def sampling_floor(reference: np.ndarray, n_frames: int, seed: int = 0, cell=None, pbc=None,
                   draws: int = 3) -> Optional[float]:
    """The h(r) MAE that sampling alone gives with ``n_frames`` frames against the whole reference (F, n, 3), as a
    replica's h(r) is compared with it: ``m = min(n_frames, F // 2)`` random frames of the reference against the
    disjoint rest, the mean over ``draws`` seeded draws, scaled from the noise of that comparison (m against F - m
    frames) to that of n_frames against all F: by sqrt((1/n + 1/F) / (1/m + 1/(F - m))). Unscaled, a full-length run
    (n = 6,001 against F = 9,633) got a floor 24 % above what an ideal sampler scores.

    An MD trajectory's frames are correlated, so its own sampling noise at the same frame count is larger: the
    floor is a lower bound on what any model can score against this reference with that many frames."""
    from .metrics import distance_histogram, hr_mae
    total = len(reference)
    n = min(int(n_frames), total // 2)
    if n < 1:
        return None
    scale = float(np.sqrt((1.0 / int(n_frames) + 1.0 / total) / (1.0 / n + 1.0 / (total - n))))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        perm = rng.permutation(len(reference))
        drawn = distance_histogram(reference[perm[:n]], cell=cell, pbc=pbc)[1]
        rest = distance_histogram(reference[perm[n:]], cell=cell, pbc=pbc)[1]
        values.append(hr_mae(drawn, rest))
    return scale * float(np.mean(values))
