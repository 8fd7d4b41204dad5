"""Pretraining objectives: small loss modules over one shared model and one mixed batch stream.

The model is a :class:`~forcefield.potential.Potential` (its backbone gives per-atom ``x`` (N, F) and ``vec``
(N, 3, F); its energy head and ``F = -dE/dr`` give forces) plus the heads the objectives own. Every objective
picks the frames of the batch it applies to (frames with forces, equilibrium frames, or all), so one batch can
mix sources; an objective with no frame in a batch contributes nothing.

=========================  ====================================================================  =========
objective                  loss                                                                  frames
=========================  ====================================================================  =========
``force_matching``         mean_{atoms,xyz} (F(x) - F_DFT)^2                                     forces
``zero_force``             mean (F(x_eq))^2                                                      equil.
``force_denoising``        mean (F(x_eq + eps) - (-k_B T / sigma^2) eps)^2, eps ~ N(0, sigma^2)  equil.
``riemann_score``          3D-EMGP: mean_graphs sum_{atoms,xyz} (F(x~) - s_RG(x~, x))^2           all
``noise_level``            3D-EMGP: cross-entropy of the sigma index from [pool(x), pool(x~)]    all
``coord_denoising``        Zaidi et al.: mean (v(x + eps) - eps / sigma)^2, v a vector head      all
=========================  ====================================================================  =========

The force-denoising target is the harmonic force whose Boltzmann distribution at temperature T has the noise's
width: a spring constant k_B T / sigma^2 (16 eV/Å^2 at 300 K and 0.04 Å), so the target has the size of
real forces and points back along -eps. Methods (:data:`METHODS`): ``et-oreo`` (force matching + zero force +
force denoising), ``et-oro`` (force matching only, the ablation), ``3d-emgp`` (riemann_score 1.0 +
noise_level 0.2), ``denoise`` (coord_denoising).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from ase import units
from torch import Tensor, nn

from ..models.heads import EquivariantVectorHead
from ..potential import forces_from_energy, graph_sum
from .corpus import PretrainBatch
from .noise import gaussian_perturb, per_atom_sigma, riemann_force_target, riemann_perturb, sigma_schedule

__all__ = ["ObjectivesConfig", "Outputs", "potential_outputs", "StepContext", "Objective", "ForceMatching",
           "ZeroForce", "ForceDenoising", "RiemannPerturbation", "RiemannScoreMatching", "NoiseLevelClassification",
           "CoordinateDenoising", "PretrainTask", "build_objectives", "METHODS", "OBJECTIVE_NAMES"]

METHODS: Dict[str, Dict[str, float]] = {
    "et-oreo": {"force_matching": 1.0, "zero_force": 1.0, "force_denoising": 1.0},
    "et-oro": {"force_matching": 1.0},
    "3d-emgp": {"riemann_score": 1.0, "noise_level": 0.2},
    "denoise": {"coord_denoising": 1.0},
}
OBJECTIVE_NAMES = ("force_matching", "zero_force", "force_denoising", "riemann_score", "noise_level",
                   "coord_denoising")


@dataclass
class ObjectivesConfig:
    method: Union[str, List[str]] = "et-oreo"   # a preset of METHODS or a list of objective names
    weights: Dict[str, float] = field(default_factory=dict)   # overrides of the preset weights
    force_denoise_sigma: float = 0.04           # Å
    force_denoise_temperature: float = 300.0    # K: spring constant k_B T / sigma^2
    denoise_sigma: float = 0.04                 # Å (Zaidi et al.)
    denoise_frames: str = "all"                 # all | equilibrium
    emgp_sigma_begin: float = 10.0              # Å
    emgp_sigma_end: float = 0.01
    emgp_num_levels: int = 50
    emgp_steps: int = 1                         # Langevin steps of the Riemann-Gaussian sampler
    emgp_frames: str = "all"                    # all | equilibrium

    def resolved_weights(self) -> Dict[str, float]:
        if isinstance(self.method, str):
            key = self.method.lower()
            if key not in METHODS:
                raise ValueError(f"unknown pretraining method '{self.method}'; presets: {', '.join(METHODS)} "
                                 f"(or a list of objectives from {', '.join(OBJECTIVE_NAMES)})")
            w = dict(METHODS[key])
        else:
            w = {name: 1.0 for name in self.method}
        for k, v in self.weights.items():
            w[k] = float(v)
        bad = [k for k in w if k not in OBJECTIVE_NAMES]
        if bad:
            raise ValueError(f"unknown objective(s) {bad}; valid: {', '.join(OBJECTIVE_NAMES)}")
        return {k: v for k, v in w.items() if v != 0}


# ---------------------------------------------------------------------------- model outputs
class Outputs:
    """Backbone features, energies and (lazily) forces of one forward pass over a batch."""

    def __init__(self, x: Tensor, vec: Tensor, e_atom: Tensor, energy: Tensor, positions: Tensor,
                 create_graph: bool, forces: Optional[Tensor] = None):
        self.x, self.vec, self.e_atom, self.energy, self.positions = x, vec, e_atom, energy, positions
        self._create_graph = create_graph
        self._forces: Optional[Tensor] = forces

    @property
    def forces(self) -> Tensor:
        """(N, 3) eV/Å, -dE/dr by autograd (kept in the graph while training)."""
        if self._forces is None:
            if not self.positions.requires_grad:
                raise RuntimeError("forces were not prepared for this forward pass (forces=False)")
            self._forces = forces_from_energy(self.energy, self.positions, self._create_graph)
        return self._forces


def potential_outputs(potential, numbers: Tensor, positions: Tensor, batch: Tensor, num_graphs: int,
                      cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None, forces: bool = True,
                      create_graph: bool = True) -> Outputs:
    """One forward pass of the :class:`~forcefield.potential.Potential` keeping its features. The learned part
    only: no reference energies (pretraining never fits energies), no ZBL repulsion and no close-atoms check
    (noisy coordinates may put atoms on top of each other)."""
    if forces:
        positions = positions.detach().requires_grad_(True)
    e_atom, x, vec = potential.atomic_energies_and_features(numbers, positions, batch, cell, pbc, learned_only=True)
    return Outputs(x, vec, e_atom, graph_sum(e_atom, batch, num_graphs), positions, create_graph)


class StepContext:
    """What the objectives of one step share: the batch, the noise generator, cached forward passes."""

    def __init__(self, potential, batch: PretrainBatch, generator: Optional[torch.Generator], training: bool,
                 runner: Optional[Callable[[PretrainBatch, Tensor, bool], Outputs]] = None):
        self.potential, self.batch, self.generator, self.training = potential, batch, generator, training
        self.runner = runner   # replaces the potential (tests use analytic models)
        self.clean_frames: Optional[Tensor] = None   # (B,) frames the clean pass covers (None: all)
        self._cache: Dict[object, object] = {}

    def run(self, sub: PretrainBatch, positions: Optional[Tensor] = None, forces: bool = True) -> Outputs:
        pos = sub.positions if positions is None else positions
        if self.runner is not None:
            return self.runner(sub, pos, forces)
        return potential_outputs(self.potential, sub.numbers, pos, sub.batch, sub.num_graphs, sub.cell, sub.pbc,
                                 forces=forces, create_graph=self.training)

    def clean(self) -> Outputs:
        """Forward pass at the batch's own geometries over ``clean_frames`` (forces on demand)."""
        if "clean" not in self._cache:
            sub = self.batch if self.clean_frames is None else self.batch.select(self.clean_frames)
            self._cache["clean"] = self.run(sub, forces=True)
        return self._cache["clean"]

    def clean_atoms(self, frames: Tensor) -> Tensor:
        """Mask over the clean pass's atoms of the atoms of ``frames`` (B,) bool (a subset of ``clean_frames``)."""
        atoms = frames[self.batch.batch]
        if self.clean_frames is None:
            return atoms
        return atoms[self.clean_frames[self.batch.batch]]

    def cached(self, key, fn: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def frames(self, which: str) -> Tensor:
        b = self.batch
        if which == "all":
            return torch.ones_like(b.equilibrium)
        if which == "equilibrium":
            return b.equilibrium
        if which == "forces":
            return b.has_forces
        if which == "off-equilibrium":
            return ~b.equilibrium
        raise ValueError(f"frame selection must be all, equilibrium, forces or off-equilibrium, got '{which}'")


# ---------------------------------------------------------------------------- objectives
class Objective(nn.Module):
    """``forward(ctx)`` -> {name: loss} (unweighted; empty when no frame of the batch applies) and optional
    metrics under ``name/...`` (not part of the loss). ``which``: the frames it applies to (all, equilibrium,
    forces); ``uses_clean``: whether it reads the forward pass at the clean geometries; ``needs_features``:
    whether it reads the backbone's features (``x``, ``vec``), not only energies and forces (a compiled step,
    ``optim.compile``, gives only those). A subclass implements :meth:`loss` on the selected frames (or
    ``forward`` itself)."""
    name = "objective"
    which = "all"
    uses_clean = False
    needs_features = False

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    def forward(self, ctx: StepContext) -> Dict[str, Tensor]:
        frames = ctx.frames(self.which)
        return self.loss(ctx, frames) if bool(frames.any()) else {}

    def loss(self, ctx: StepContext, frames: Tensor) -> Dict[str, Tensor]:
        """The loss on the batch's ``frames`` (B,) bool (at least one)."""
        raise NotImplementedError


class ForceMatching(Objective):
    name = "force_matching"
    which = "forces"
    uses_clean = True

    def loss(self, ctx: StepContext, frames: Tensor) -> Dict[str, Tensor]:
        err = ctx.clean().forces[ctx.clean_atoms(frames)] - ctx.batch.forces[frames[ctx.batch.batch]]
        return {self.name: err.pow(2).mean()}


class ZeroForce(Objective):
    name = "zero_force"
    which = "equilibrium"
    uses_clean = True

    def loss(self, ctx: StepContext, frames: Tensor) -> Dict[str, Tensor]:
        return {self.name: ctx.clean().forces[ctx.clean_atoms(frames)].pow(2).mean()}


class ForceDenoising(Objective):
    """Forces at x_eq + eps should be the harmonic restoring force -(k_B T / sigma^2) eps."""
    name = "force_denoising"

    def __init__(self, weight: float = 1.0, sigma: float = 0.04, temperature: float = 300.0,
                 frames: str = "equilibrium"):
        super().__init__(weight)
        self.sigma, self.temperature, self.which = float(sigma), float(temperature), frames
        self.stiffness = units.kB * self.temperature / self.sigma ** 2   # eV/Å^2

    def target(self, eps: Tensor) -> Tensor:
        return -self.stiffness * eps

    def loss(self, ctx: StepContext, frames: Tensor) -> Dict[str, Tensor]:
        sub = ctx.batch.select(frames)
        with torch.no_grad():
            noisy, eps = gaussian_perturb(sub.positions, self.sigma, sub.batch, ctx.generator)
        out = ctx.run(sub, noisy, forces=True)
        return {self.name: (out.forces - self.target(eps)).pow(2).mean()}


@dataclass
class RiemannSample:
    sub: PretrainBatch
    level: Tensor          # (B',) noise-level index
    sigma: Tensor          # (N', 1) Å
    perturbed: Tensor      # (N', 3)
    target: Tensor         # (N', 3) normalised score (3D-EMGP)
    frames: Tensor         # (B,) which frames of the batch


class RiemannPerturbation(nn.Module):
    """The 3D-EMGP noise (shared by its two objectives, drawn once per step): a noise level per graph from a
    geometric schedule, Riemann-Gaussian samples, and the normalised score target."""

    def __init__(self, sigma_begin: float = 10.0, sigma_end: float = 0.01, num_levels: int = 50, steps: int = 1,
                 frames: str = "all"):
        super().__init__()
        self.register_buffer("sigmas", sigma_schedule(sigma_begin, sigma_end, num_levels, torch.float64),
                             persistent=False)
        self.steps, self.which = int(steps), frames

    @property
    def num_levels(self) -> int:
        return int(self.sigmas.shape[0])

    def sample(self, ctx: StepContext) -> Optional[RiemannSample]:
        frames = ctx.frames(self.which)
        if not bool(frames.any()):
            return None
        sub = ctx.batch.select(frames)
        with torch.no_grad():
            level = torch.randint(0, self.num_levels, (sub.num_graphs,), generator=ctx.generator).to(
                sub.positions.device)
            sigma = per_atom_sigma(self.sigmas.to(sub.positions.dtype)[level], sub.batch, sub.positions.dtype)
            pert = riemann_perturb(sub.positions, sigma, sub.batch, self.steps, ctx.generator, sub.num_graphs)
            target = riemann_force_target(pert, sub.positions, sigma, sub.batch, sub.num_graphs)
        return RiemannSample(sub, level, sigma, pert, target, frames)

    def get(self, ctx: StepContext) -> Tuple[Optional[RiemannSample], Optional[Outputs]]:
        def make():
            s = self.sample(ctx)
            return (s, None) if s is None else (s, ctx.run(s.sub, s.perturbed, forces=True))
        return ctx.cached(("riemann", id(self)), make)


class RiemannScoreMatching(Objective):
    """3D-EMGP: the model's forces at x~ regress the normalised Riemann-Gaussian score (sum over a graph's atoms
    and components, mean over graphs, as in the paper)."""
    name = "riemann_score"

    def __init__(self, perturbation: RiemannPerturbation, weight: float = 1.0):
        super().__init__(weight)
        self.perturbation = perturbation
        self.which = perturbation.which

    def forward(self, ctx: StepContext) -> Dict[str, Tensor]:
        s, out = self.perturbation.get(ctx)
        if s is None:
            return {}
        per_atom = (out.forces - s.target).pow(2).sum(-1)
        return {self.name: graph_sum(per_atom, s.sub.batch, s.sub.num_graphs).mean()}


class NoiseLevelClassification(Objective):
    """3D-EMGP: which noise level produced x~, from invariant pooled features of the clean and the perturbed
    geometry (node MLP, sum over atoms, concatenation, MLP -> logits over the levels)."""
    name = "noise_level"
    uses_clean = True
    needs_features = True

    def __init__(self, perturbation: RiemannPerturbation, hidden: int, weight: float = 0.2):
        super().__init__(weight)
        self.perturbation = perturbation
        self.which = perturbation.which
        self.node_dec = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.classifier = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(),
                                        nn.Linear(hidden, perturbation.num_levels))

    def pool(self, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        return graph_sum(self.node_dec(x), batch, num_graphs)

    def logits(self, x_clean: Tensor, x_noisy: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """(B, levels) from per-atom invariant features of the clean and the perturbed geometry."""
        return self.classifier(torch.cat([self.pool(x_clean, batch, num_graphs),
                                          self.pool(x_noisy, batch, num_graphs)], dim=-1))

    def forward(self, ctx: StepContext) -> Dict[str, Tensor]:
        s, out = self.perturbation.get(ctx)
        if s is None:
            return {}
        x_clean = ctx.clean().x[ctx.clean_atoms(s.frames)]
        logits = self.logits(x_clean, out.x, s.sub.batch, s.sub.num_graphs)
        loss = F.cross_entropy(logits, s.level)
        acc = (logits.argmax(-1) == s.level).to(logits.dtype).mean().detach()
        return {self.name: loss, self.name + "/accuracy": acc}


class CoordinateDenoising(Objective):
    """Zaidi et al.: a vector head on the features of x + eps predicts eps / sigma."""
    name = "coord_denoising"
    needs_features = True

    def __init__(self, hidden: int, weight: float = 1.0, sigma: float = 0.04, frames: str = "all"):
        super().__init__(weight)
        self.sigma, self.which = float(sigma), frames
        self.head = EquivariantVectorHead(hidden)

    def loss(self, ctx: StepContext, frames: Tensor) -> Dict[str, Tensor]:
        sub = ctx.batch.select(frames)
        with torch.no_grad():
            noisy, eps = gaussian_perturb(sub.positions, self.sigma, sub.batch, ctx.generator)
        out = ctx.run(sub, noisy, forces=False)
        pred = self.head(out.x, out.vec)
        return {self.name: (pred - eps / self.sigma).pow(2).mean()}


def frames_used(objectives, has_forces, equilibrium):
    """Which frames any of ``objectives`` uses, from per-frame ``has_forces`` and ``equilibrium`` (bool arrays or
    tensors)."""
    used = has_forces & False
    for obj in objectives:
        used = used | {"all": has_forces | True, "forces": has_forces, "equilibrium": equilibrium,
                       "off-equilibrium": ~equilibrium}[obj.which]
    return used


def build_objectives(cfg: ObjectivesConfig, hidden: int) -> Dict[str, Objective]:
    weights = cfg.resolved_weights()
    objs: Dict[str, Objective] = {}
    pert = None
    if "riemann_score" in weights or "noise_level" in weights:
        pert = RiemannPerturbation(cfg.emgp_sigma_begin, cfg.emgp_sigma_end, cfg.emgp_num_levels, cfg.emgp_steps,
                                   cfg.emgp_frames)
    for name, w in weights.items():
        if name == "force_matching":
            objs[name] = ForceMatching(w)
        elif name == "zero_force":
            objs[name] = ZeroForce(w)
        elif name == "force_denoising":
            objs[name] = ForceDenoising(w, cfg.force_denoise_sigma, cfg.force_denoise_temperature)
        elif name == "riemann_score":
            objs[name] = RiemannScoreMatching(pert, w)
        elif name == "noise_level":
            objs[name] = NoiseLevelClassification(pert, hidden, w)
        elif name == "coord_denoising":
            objs[name] = CoordinateDenoising(hidden, w, cfg.denoise_sigma, cfg.denoise_frames)
    return objs


# ---------------------------------------------------------------------------- the task
class PretrainTask(nn.Module):
    """Potential + objectives; ``forward(batch, generator)`` -> (weighted total loss, {part: detached value}).
    This is the module that DistributedDataParallel wraps."""

    def __init__(self, potential, objectives: Dict[str, Objective]):
        super().__init__()
        if not objectives:
            raise ValueError("no pretraining objective selected")
        self.potential = potential
        self.objectives = nn.ModuleDict(objectives)

    def frames_used(self, has_forces, equilibrium):
        """Which frames any objective uses (:func:`frames_used`); the sampler skips sources no objective uses."""
        return frames_used(self.objectives.values(), has_forces, equilibrium)

    def forward(self, batch: PretrainBatch, generator: Optional[torch.Generator] = None,
                runner=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        ctx = StepContext(self.potential, batch, generator, self.training, runner)
        clean = [o for o in self.objectives.values() if o.uses_clean]
        if clean:
            mask = ctx.frames(clean[0].which)
            for o in clean[1:]:
                mask = mask | ctx.frames(o.which)
            ctx.clean_frames = None if bool(mask.all()) else mask
        dtype = batch.positions.dtype
        total = torch.zeros((), dtype=dtype, device=batch.positions.device)
        parts: Dict[str, Tensor] = {}
        for name, obj in self.objectives.items():
            for key, value in obj(ctx).items():
                if "/" in key:
                    parts[key] = value.detach()
                    continue
                total = total + obj.weight * value
                parts[key] = value.detach()
        # every parameter takes part in every step (with zero gradient when its objective had no frame), so
        # DistributedDataParallel needs no unused-parameter search and the ranks never wait on each other
        total = total + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad).to(dtype)
        return total, parts

    def heads_state(self) -> Dict[str, Tensor]:
        """State of the objectives' own heads (everything but the potential)."""
        return {k: v.detach().cpu() for k, v in self.objectives.state_dict().items()}
