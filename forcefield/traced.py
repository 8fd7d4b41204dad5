"""The energy + forces graph that gets compiled: one module shared by the AOTInductor export
(:mod:`forcefield.compiled`, inference) and ``optim.compile`` (:mod:`forcefield.train.compiled_step`, training).

:class:`EnergyForces` is :class:`~forcefield.potential.Potential` written for tracing: the neighbour search stays
outside (it is data-dependent; :func:`pairs_and_shifts` runs it eagerly), the edges come in the symmetric layout
known without a check, and the energy and its position gradient are one function of the inputs, so ``make_fx``
turns the backward pass into ordinary forward code. The per-atom energies come from ``Potential.energy_readout``
(the code eager and TorchScript run: head, scale, shift, ZBL repulsion), the forces from
:func:`~forcefield.potential.forces_from_energy`. ET backbone only (it exposes ``represent``).
"""
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .graph import edges_from_pairs, half_pairs, shift_vectors
from .potential import forces_from_energy

__all__ = ["EnergyForces", "pairs_and_shifts", "traceable", "default_inductor_configs", "NO_BUFFER_REUSE",
           "EXPORT_TOLERANCE", "check_against_eager", "error_summary"]


# Inductor's generated element-wise kernels run on one thread; GEMMs and the rest of torch keep every
# torch thread. Measured on the 2-core benchmark machine (aspirin, ET 6x128, torch 2.13): kernels on 2
# OpenMP threads made the compiled model 2.4x slower for one molecule and 2x slower for 16 and 64
# replicas (each kernel is small: OpenMP start-up costs more than it saves). Override per call with
# ``inductor_configs={"cpp.threads": -1}`` (all torch threads) or the environment variable OREO_KERNEL_THREADS.
def default_inductor_configs(**extra: Any) -> Dict[str, Any]:
    """Inductor options oreo compiles with (AOTInductor export and ``optim.compile`` training)."""
    return {"cpp.threads": int(os.environ.get("OREO_KERNEL_THREADS", "1")), **extra}


#: Inductor options of the second build when the first fails its check against eager: torch 2.13's Inductor let a
#: fused kernel of the ethanol training backward write in place over a buffer a later kernel still read
#: (``UnboundLocalError: ... 'buf199'``); with buffer reuse off the same graph builds right (a little more memory)
NO_BUFFER_REUSE = {"allow_buffer_reuse": False, "inplace_buffers": False}

# |compiled - eager| seen on aspirin (float32, 6x128, random weights, forces ~1 eV/Å): ~1e-6; what we promise:
EXPORT_TOLERANCE = {"float32": {"energy_rel": 1e-5, "forces_abs": 1e-4},
                    "float64": {"energy_rel": 1e-10, "forces_abs": 1e-9}}


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """``Type: last line of the message`` of an exception (what a compiler failure report quotes; Dynamo's
    closing advice on verbose logging is not that line)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines()
             if ln.strip(" ^~") and not ln.startswith(("Set TORCHDYNAMO_VERBOSE", "For even more developer context"))]
    return f"{type(exc).__name__}: {(lines or [''])[-1]}"[:limit]


def check_against_eager(runner, eager: nn.Module, example, tol: Dict[str, float]) -> Optional[str]:
    """None when ``runner`` (a compiled build of the traced graph) gives the eager module's atomic energies and
    forces (when it computes them) on ``example`` within ``tol`` (``EXPORT_TOLERANCE``); else what differs (or what
    it raised)."""
    try:
        e_c, f_c = runner(*example)
    except Exception as exc:  # noqa: BLE001 - a broken build may raise anything
        return error_summary(exc)
    e_e, f_e = eager(*example)
    de = float((e_c.detach().sum().double() - e_e.detach().sum().double()).abs()
               / e_e.detach().sum().double().abs().clamp_min(1.0))
    df = 0.0 if f_e is None else float((f_c.detach().double() - f_e.detach().double()).abs().max())   # no forces
    if not (de <= tol["energy_rel"] and df <= tol["forces_abs"]):
        return f"energy off by {de:.2e} (relative), forces by {df:.2e} eV/Å (allowed {tol['energy_rel']:g}, " \
               f"{tol['forces_abs']:g})"
    return None


def traceable(potential: nn.Module) -> bool:
    """Whether ``potential`` is an eager oreo Potential whose backbone can be traced (ET)."""
    return hasattr(potential, "backbone") and hasattr(potential.backbone, "represent")


class EnergyForces(nn.Module):
    """(numbers (N,), positions (N, 3), pairs (2, P), cart (P, 3)) -> (atomic energies (N,) eV, forces (N, 3) eV/Å).

    ``pairs`` holds one direction of each pair (``graph.half_pairs``), ``cart`` its Cartesian image shift
    (zeros for molecules). Atomic energies include ``scale``/``shift`` and the ZBL repulsion
    (``Potential.energy_readout``, the same code as eager; ``with_repulsion=False``: the learned part alone, as
    ``Potential.atomic_energies_and_features(learned_only=True)``) but not the reference energies.
    ``with_forces=False``: the atomic energies alone, forces ``None`` (a property head's per-atom output, trained
    on one number per molecule: no position gradient to pay for).
    """

    def __init__(self, potential: nn.Module, differentiable: bool = False, with_repulsion: bool = True,
                 with_forces: bool = True):
        super().__init__()
        self.potential = potential
        self.differentiable = differentiable  # True: outputs stay differentiable in the parameters (training)
        self.with_repulsion = with_repulsion  # False: the learned part only (pretraining on noisy coordinates)
        self.with_forces = with_forces

    def forward(self, numbers: Tensor, positions: Tensor, pairs: Tensor,
                cart: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        pot = self.potential
        with torch.enable_grad():
            pos = positions.detach().requires_grad_(self.with_forces)
            edge_index, edge_vec = edges_from_pairs(pos, pairs, cart)
            x, v = pot.backbone.represent(numbers, edge_index, edge_vec, 2)
            # the repulsion is in the traced graph unless left out on purpose (branch-free; exactly zero beyond
            # r_off)
            e_atom = pot.energy_readout(numbers, x, v, edge_index, edge_vec, self.with_repulsion)
            forces = forces_from_energy(e_atom, pos, self.differentiable) if self.with_forces else None
        return (e_atom, forces) if self.differentiable else (e_atom.detach(), forces)


def pairs_and_shifts(positions: Tensor, batch: Tensor, cutoff: float, cell: Optional[Tensor] = None,
                     pbc: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The inputs the traced graph takes besides numbers and positions: one direction of each pair (2, P)
    and its Cartesian image shift (P, 3) in ``positions``' dtype (zeros without periodic directions; constant
    in the cell: no stress)."""
    pairs, shifts = half_pairs(positions, batch, cutoff, cell, pbc)
    if shifts is not None and cell is not None:
        return pairs, shift_vectors(pairs, shifts, cell.detach(), batch, positions.dtype)
    return pairs, torch.zeros(pairs.shape[1], 3, dtype=positions.dtype, device=positions.device)
