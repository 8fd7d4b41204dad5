"""The potential: backbone + energy head + per-element reference energies; forces = -dE/dr.

``Potential`` is TorchScript-able and is the one interface that training, the ASE calculator,
the TorchScript export and the MD integrators all use::

    out = potential(numbers, positions, batch, cell, pbc)
    out["energy"]  # (B,)   eV
    out["forces"]  # (N, 3) eV/Å

Inputs: ``numbers`` (N,) int64, ``positions`` (N, 3) Å (any floating dtype: cast to the module's dtype
inside; forces come back in the dtype of ``positions``), ``batch`` (N,) graph index (None: one structure),
optional ``cell`` (B, 3, 3) Å and ``pbc`` (B, 3) bool.

The energy is the learned part (backbone + head, scaled and shifted, plus reference energies) plus a fixed
short-range ZBL repulsion (:func:`zbl_pair_energy`) that is exactly zero beyond ``r_off`` = 0.6 Å, well
inside every training distance, so it changes nothing the model was fitted on and only keeps atoms from
fusing. Model config key ``repulsion``: ``true`` (default; also for model files written before it existed),
``false``, or ``{"r_on": Å, "r_off": Å}``. Atoms closer than :data:`MIN_PAIR_DISTANCE` are an input error.
"""
import json
import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .graph import radius_graph
from .models import EquivariantScalarHead, create_backbone

MAX_Z = 100


def check_inputs(numbers: Tensor, positions: Tensor, batch: Tensor, known_elements: Tensor) -> None:
    """Clear errors for malformed input, NaN positions and elements the model never saw."""
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError("positions must have shape (N, 3) in Å")
    if not positions.is_floating_point():
        raise ValueError("positions must be float32 or float64 (Å), not an integer tensor")
    if numbers.shape[0] != positions.shape[0] or batch.shape[0] != positions.shape[0]:
        raise ValueError("numbers, positions and batch must have the same number of atoms")
    if not bool(torch.isfinite(positions).all()):
        raise ValueError("positions contain NaN or inf: the structure is broken (an exploded MD run?); "
                         "pass finite coordinates in Å")
    bad = numbers[(numbers <= 0) | (numbers >= known_elements.shape[0])]
    if bad.numel() == 0:
        bad = numbers[~known_elements[numbers]]
    if bad.numel() > 0:
        raise ValueError("element with atomic number " + str(int(bad[0])) + " was not in this model's "
                         "training data; use a model trained on it (see the model card for its elements)")


# ---------------------------------------------------------------------------------- close atoms
#: Å. Two atoms closer than this are an input error (:func:`check_pair_distances`), never evaluated. No bond is
#: shorter than 0.74 Å (H2) and the shortest distance in rMD17 is 0.876 Å (O-H, ethanol; every frame of the 10
#: molecules' published splits). With the ZBL repulsion two atoms at 0.1 Å cost 93 eV (H-H) to 2.8 keV (C-C),
#: far out of reach of MD at any sensible temperature; closer atoms mean a broken input (a duplicated atom, a
#: periodic cell smaller than the structure, wrong length units) or a run that already exploded. At r = 0 the
#: model's edge directions r_ij / |r_ij| are undefined (NaN energies and forces, no error), hence the check.
MIN_PAIR_DISTANCE = 0.1


def format_distance(d: float) -> str:
    """``d`` Å with three decimals (TorchScript's ``str(float)`` prints every digit)."""
    m = int(d * 1000.0 + 0.5)
    frac = str(m % 1000)
    while len(frac) < 3:
        frac = "0" + frac
    return str(m // 1000) + "." + frac


def close_pair_text(i: int, j: int, d: float, min_distance: float = MIN_PAIR_DISTANCE) -> str:
    """The words every close-atoms error uses (potential, calculator, MD)."""
    return ("atoms " + str(i) + " and " + str(j) + " are " + format_distance(d) + " Å apart (closer than "
            + format_distance(min_distance) + " Å)")


def check_pair_distances(edge_index: Tensor, edge_vec: Tensor, batch: Tensor,
                         min_distance: float = MIN_PAIR_DISTANCE) -> float:
    """Raise a clear error when two atoms (or an atom and a periodic image) are closer than
    :data:`MIN_PAIR_DISTANCE`; returns the shortest edge length in Å (inf without edges).

    Atom indices in the message count from 0 within their structure (``batch`` value)."""
    if edge_vec.shape[0] == 0:
        return math.inf
    d = edge_vec.detach().pow(2).sum(-1)
    shortest = math.sqrt(float(d.min()))      # one device sync on the normal path
    if shortest >= min_distance:
        return shortest
    k = int(torch.argmin(d))
    i, j = int(edge_index[0, k]), int(edge_index[1, k])
    g = int(batch[i])
    li, lj = int((batch[:i] == g).sum()), int((batch[:j] == g).sum())
    where = " of structure " + str(g) if bool((batch != 0).any()) else ""
    raise ValueError(close_pair_text(min(li, lj), max(li, lj), shortest, min_distance) + where + ": two atoms on "
                     "top of each other (a duplicated atom? a periodic cell smaller than the structure? coordinates "
                     "not in Å?); remove the duplicate or fix the coordinates - the model cannot evaluate "
                     "overlapping atoms")


# ---------------------------------------------------------------------------------- short-range repulsion
# ZBL universal screened nuclear repulsion (Ziegler, Biersack, Littmark 1985), eV and Å:
#   E(r) = k Zi Zj / r * phi(r / a),  k = e^2 / (4 pi eps0) = 14.399645 eV Å,
#   a = 0.8854 a0 / (Zi^0.23 + Zj^0.23) = 0.46850 Å / (Zi^0.23 + Zj^0.23),
#   phi(x) = 0.18175 exp(-3.19980 x) + 0.50986 exp(-0.94229 x) + 0.28022 exp(-0.40290 x) + 0.02817 exp(-0.20162 x)
# (the numbers are literals in zbl_pair_energy: TorchScript cannot read module-level floats)
# The switch s(r) takes the ZBL energy from full strength below r_on to exactly zero (value, first and second
# derivative) at r_off. r_off = 0.6 Å sits well inside the shortest distance of the training data: 0.876 Å in
# rMD17 (O-H ethanol; C-H 0.94, C-C 1.24 Å) and in the BOTNet ethanol / 3BPA / acac training sets (0.876-0.94),
# so the repulsion is exactly zero at every training frame and no fitted energy or force changes. Between
# r_on = 0.3 Å and r_off it still rises steeply (C-C: ~165 eV at 0.4 Å, H-H: ~7 eV), enough to stop fusion.
REPULSION_R_ON = 0.3
REPULSION_R_OFF = 0.6


def zbl_pair_energy(zi: Tensor, zj: Tensor, r: Tensor, r_on: float, r_off: float) -> Tensor:
    """Switched ZBL energy (eV) of pairs with atomic numbers ``zi``, ``zj`` (float) at distances ``r`` (Å).

    ``E(r) s(r)`` with ``s`` = 1 below ``r_on`` and the quintic smootherstep ``1 - t^3 (10 - 15 t + 6 t^2)``,
    ``t = (r - r_on) / (r_off - r_on)``, between: exactly 0 (value and gradient) for ``r >= r_off``. No branch
    on the data, so the same code runs eager, in TorchScript and in the traced (compiled) graphs."""
    inside = r < r_off
    rs = r.clamp(max=r_off)               # the masked-out pairs see r_off: finite values, zero gradient
    x = rs * ((zi.pow(0.23) + zj.pow(0.23)) / 0.46850)
    phi = (0.18175 * torch.exp(-3.19980 * x) + 0.50986 * torch.exp(-0.94229 * x)
           + 0.28022 * torch.exp(-0.40290 * x) + 0.02817 * torch.exp(-0.20162 * x))
    t = ((rs - r_on) / (r_off - r_on)).clamp(0.0, 1.0)
    switch = 1.0 - t * t * t * (10.0 + t * (6.0 * t - 15.0))
    e = (14.399645 * zi * zj) * phi * switch / rs
    return torch.where(inside, e, torch.zeros_like(e))


def repulsion_settings(repulsion: Union[bool, Dict[str, float], None], cutoff: float) -> Optional[Dict[str, float]]:
    """The model config value ``repulsion`` (True/None: defaults, False: off, or a dict with ``r_on`` /
    ``r_off`` in Å) as ``{"r_on", "r_off"}``, or None when off."""
    if repulsion is False:
        return None
    if repulsion is None or repulsion is True:
        repulsion = {}
    if not isinstance(repulsion, dict) or set(repulsion) - {"r_on", "r_off"}:
        raise ValueError(f"model config 'repulsion' must be true, false or {{r_on: Å, r_off: Å}}, got {repulsion!r}")
    r_on = float(repulsion.get("r_on", REPULSION_R_ON))
    r_off = float(repulsion.get("r_off", REPULSION_R_OFF))
    if not 0.0 <= r_on < r_off <= cutoff:
        raise ValueError(f"repulsion needs 0 <= r_on < r_off <= cutoff ({cutoff:g} Å), got r_on={r_on:g}, "
                         f"r_off={r_off:g}; keep r_off below the shortest distance of the training data")
    return {"r_on": r_on, "r_off": r_off}


def graph_sum(values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Per-structure sums (B, ...) of per-atom values (N, ...): energies, pooled features, counts."""
    out = torch.zeros([num_graphs] + list(values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, batch, values)


def forces_from_energy(energy: Tensor, positions: Tensor, create_graph: bool) -> Tensor:
    """Forces (N, 3) = -dE/dr of the summed ``energy`` by autograd, in the dtype of ``positions`` (zeros where
    the energy does not depend on them). ``create_graph``: keep them differentiable (training on forces)."""
    grads = torch.autograd.grad([energy.sum()], [positions], create_graph=create_graph, allow_unused=True)
    g = grads[0]
    if g is None:
        return torch.zeros_like(positions)
    return -g


def checked_batch(numbers: Tensor, positions: Tensor, batch: Optional[Tensor],
                  known_elements: Tensor) -> Tuple[Tensor, int]:
    """The input checks every potential runs first: ``(batch, num_graphs)``, with ``batch`` defaulting to
    one molecule (all zeros)."""
    if batch is None:
        batch = torch.zeros(numbers.shape[0], dtype=torch.long, device=numbers.device)
    check_inputs(numbers, positions, batch, known_elements)
    return batch, (int(batch.max()) + 1 if batch.numel() > 0 else 0)


def checked_cell(cell: Optional[Tensor], pbc: Optional[Tensor],
                 num_graphs: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``cell`` as (B, 3, 3) Å and ``pbc`` as (B, 3), one per molecule of the batch; one molecule's (3, 3) cell
    and (3,) pbc (what ``atoms.cell[:]`` and ``atoms.pbc`` give) are taken as such. Other shapes are an error:
    a (1, 3) pbc against a batch's atoms would broadcast into a wrong energy without one."""
    if cell is not None:
        if cell.dim() == 2 and num_graphs == 1:
            cell = cell.unsqueeze(0)
        if cell.dim() != 3 or cell.shape[0] != num_graphs or cell.shape[1] != 3 or cell.shape[2] != 3:
            raise ValueError("cell must have shape (B, 3, 3) in Å (rows: the lattice vectors; B: the molecules of "
                             "the batch), or (3, 3) for one structure")
    if pbc is not None:
        if pbc.dim() == 1 and num_graphs == 1:
            pbc = pbc.unsqueeze(0)
        if pbc.dim() != 2 or pbc.shape[0] != num_graphs or pbc.shape[1] != 3:
            raise ValueError("pbc must have shape (B, 3) (bool: periodic along each lattice vector; B: the "
                             "molecules of the batch), or (3,) for one structure")
    return cell, pbc


class Potential(nn.Module):
    __jit_unused_properties__ = ["metadata", "elements", "config"]

    def __init__(self, backbone: Dict[str, Any], elements: List[int], atomref: Optional[Dict[int, float]] = None,
                 scale: float = 1.0, shift: float = 0.0, metadata: Optional[Dict[str, Any]] = None,
                 repulsion: Union[bool, Dict[str, float], None] = True):
        super().__init__()
        backbone = dict(backbone)
        backbone.setdefault("max_z", MAX_Z)
        self.backbone = create_backbone(backbone)
        self.head = EquivariantScalarHead(self.backbone.hidden)
        self.cutoff: float = float(self.backbone.cutoff)
        rep = repulsion_settings(repulsion, self.cutoff)
        self._config = {"backbone": backbone, "elements": sorted(int(z) for z in elements),
                        "repulsion": rep if rep is not None else False}
        # plain attributes, not buffers: state dicts (and so every model file) are unchanged
        self.repulsion: bool = rep is not None
        self.repulsion_r_on: float = rep["r_on"] if rep is not None else 0.0
        self.repulsion_r_off: float = rep["r_off"] if rep is not None else 0.0
        max_z = int(backbone["max_z"])
        for z in elements:
            if not 0 < int(z) < max_z:
                raise ValueError(f"atomic number {z} outside 1..{max_z - 1}")
        known = torch.zeros(max_z, dtype=torch.bool)
        known[torch.tensor(sorted(int(z) for z in elements), dtype=torch.long)] = True
        ref = torch.zeros(max_z, dtype=torch.float64)
        for z, e in (atomref or {}).items():
            ref[int(z)] = float(e)
        self.register_buffer("known_elements", known)
        self.register_buffer("atomref", ref)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(float(shift), dtype=torch.float64))
        self.metadata_json: str = json.dumps(metadata or {})

    # ------------------------------------------------------------------ python-side info
    @property
    def metadata(self) -> Dict[str, Any]:
        return json.loads(self.metadata_json)

    @property
    def elements(self) -> List[int]:
        return list(self._config["elements"])

    @property
    def config(self) -> Dict[str, Any]:
        """Everything needed to rebuild this module (apart from its state dict)."""
        return {**self._config, "metadata": self.metadata}

    def set_metadata(self, **kw: Any) -> None:
        meta = self.metadata
        meta.update(kw)
        self.metadata_json = json.dumps(meta)

    # ------------------------------------------------------------------ forward
    def atomic_energies(self, numbers: Tensor, positions: Tensor, batch: Tensor, cell: Optional[Tensor] = None,
                        pbc: Optional[Tensor] = None, learned_only: bool = False) -> Tensor:
        """Per-atom energies (N,) eV (learned + repulsion), without the reference energies. Atoms closer than
        :data:`MIN_PAIR_DISTANCE` raise (:func:`check_pair_distances`) before the model runs. ``learned_only``:
        see :meth:`atomic_energies_and_features`."""
        e_atom, _, _ = self.atomic_energies_and_features(numbers, positions, batch, cell, pbc, learned_only)
        return e_atom

    def atomic_energies_and_features(self, numbers: Tensor, positions: Tensor, batch: Tensor,
                                     cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None,
                                     learned_only: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        """``(e_atom (N,) eV, x (N, F), vec (N, 3, F))``: per-atom energies and the backbone's scalar and vector
        features. Every path that needs the model's energies goes through here or :meth:`energy_readout`.

        ``learned_only``: the learned part alone, without the ZBL repulsion and without the close-atoms check:
        for pretraining objectives, whose noisy coordinates may put atoms on top of each other (the repulsion
        would dominate their targets), and for property heads (no energy)."""
        edge_index, edge_vec = radius_graph(positions, batch, self.cutoff, cell, pbc)
        repulsive = False
        if not learned_only:
            shortest = check_pair_distances(edge_index, edge_vec, batch)
            # no edge inside r_off (every training frame): the repulsion is exactly zero, skip its ops
            repulsive = shortest < self.repulsion_r_off
        x, vec = self.backbone(numbers, edge_index, edge_vec)
        return self.energy_readout(numbers, x, vec, edge_index, edge_vec, repulsive), x, vec

    def energy_readout(self, numbers: Tensor, x: Tensor, vec: Tensor, edge_index: Tensor, edge_vec: Tensor,
                       with_repulsion: bool = True) -> Tensor:
        """Per-atom energies (N,) eV from the backbone's features: head, scale and shift, plus the repulsion of
        the edges (skipped with ``with_repulsion=False``, which callers pass only when no edge is shorter than
        ``repulsion_r_off``, where it is exactly zero). Eager, TorchScript and the traced graphs that are compiled
        (``forcefield.traced.EnergyForces``) all end here."""
        y = self.head(x, vec)
        e = y * self.scale.to(y.dtype) + self.shift.to(y.dtype)
        if with_repulsion and self.repulsion:
            e = e + self.repulsion_energies(numbers, edge_index, edge_vec)
        return e

    def repulsion_energies(self, numbers: Tensor, edge_index: Tensor, edge_vec: Tensor) -> Tensor:
        """ZBL repulsion per atom (N,) eV: half of each pair's :func:`zbl_pair_energy` to each of its atoms.
        ``edge_index`` must hold both directions of each pair (as ``radius_graph`` gives)."""
        z = numbers.to(edge_vec.dtype)
        i, j = edge_index[0], edge_index[1]
        r = torch.sqrt(edge_vec.pow(2).sum(-1))
        e_pair = zbl_pair_energy(z.index_select(0, i), z.index_select(0, j), r, self.repulsion_r_on,
                                 self.repulsion_r_off)
        return torch.zeros(numbers.shape[0], dtype=edge_vec.dtype, device=edge_vec.device).index_add_(
            0, i, 0.5 * e_pair)

    def forward(self, numbers: Tensor, positions: Tensor, batch: Optional[Tensor] = None,
                cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None, with_reference: bool = True,
                compute_forces: bool = True) -> Dict[str, Tensor]:
        batch, num_graphs = checked_batch(numbers, positions, batch, self.known_elements)
        cell, pbc = checked_cell(cell, pbc, num_graphs)
        create_graph = self.training
        if compute_forces:
            if not torch.is_grad_enabled():
                raise RuntimeError("forces are -dE/dr by autograd: do not call the potential under "
                                   "torch.no_grad() or torch.inference_mode()")
            if not positions.requires_grad:
                positions = positions.detach().requires_grad_(True)
        # inputs in any floating dtype (torch.tensor(atoms.positions) is float64): compute in the module's
        # dtype (that of its buffers), differentiate w.r.t. the caller's tensor, so forces keep its dtype
        dtype = self.scale.dtype
        if cell is not None:
            cell = cell.to(dtype)
        e_atom = self.atomic_energies(numbers, positions.to(dtype), batch, cell, pbc)
        energy = graph_sum(e_atom, batch, num_graphs)
        out: Dict[str, Tensor] = {}
        if compute_forces:
            out["forces"] = forces_from_energy(energy, positions, create_graph)
        if with_reference:
            ref = graph_sum(self.atomref[numbers].to(torch.float64), batch, num_graphs)
            energy = energy.to(torch.float64) + ref  # float64: total energies are large
        out["energy"] = energy if create_graph else energy.detach()
        return out

    # ------------------------------------------------------------------ serialisation helpers
    @classmethod
    def from_config(cls, config: Dict[str, Any], state_dict: Optional[Dict[str, Tensor]] = None) -> "Potential":
        # model files written before the repulsion existed have no "repulsion" key: on, with the defaults
        model = cls(backbone=config["backbone"], elements=config["elements"], metadata=config.get("metadata"),
                    repulsion=config.get("repulsion", True))
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model

    def describe(self) -> str:
        from ase.data import chemical_symbols as ELEMENT_SYMBOLS

        b = self._config["backbone"]
        els = ",".join(ELEMENT_SYMBOLS[z] for z in self.elements)
        n = sum(p.numel() for p in self.parameters())
        rep = (f"ZBL repulsion below {self.repulsion_r_off:g} Å" if self.repulsion else "no repulsion")
        return (f"{b.get('name', 'et').upper()} {b.get('num_layers')}x{b.get('hidden')} "
                f"cutoff {self.cutoff:g} Å, elements {els}, {rep}, {n:,} parameters")
