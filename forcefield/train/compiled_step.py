"""Compiled energy + forces for training (``optim.compile: true``): the double backward, fused.

Training on forces differentiates twice: forces are -dE/dr (first backward), and the force loss is
differentiated in the parameters (second backward). Eager autograd runs that as hundreds of small
ATen calls. Here the energy *and* its position gradient are traced once into a plain graph of ATen
operations (``make_fx``, symbolic atom and pair counts; the first backward becomes ordinary forward
code, the parameters are graph inputs), and that graph is handed to ``torch.compile`` (Inductor). The
remaining derivative in the parameters is an ordinary first-order backward, which AOTAutograd traces
and Inductor fuses like the forward. Same function as the eager :class:`~forcefield.potential.Potential`
(tested: parameter gradients of an energy + force loss equal eager to float rounding).

Cost: the first call compiles (minutes on a small CPU, cached on disk by Inductor for later runs);
the neighbour search stays eager. The first call also runs one trial forward (checked against eager within
``EXPORT_TOLERANCE``) + parameter backward through the compiled graph. When that fails, it is built once more
with Inductor's buffer reuse off (torch 2.13's Inductor lets a kernel of the ethanol batches' backward write in
place over a buffer that a later kernel still reads: ``UnboundLocalError``); when that fails too, training
continues on the eager path with a warning that says so, instead of dying minutes into a long run. ET backbone
only (it exposes ``represent`` with the symmetric edge layout). The traced graph is
:mod:`forcefield.traced`'s, the one the AOTInductor export (inference) compiles.
"""
import os
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..potential import checked_batch, forces_from_energy, graph_sum
from ..traced import (EXPORT_TOLERANCE, NO_BUFFER_REUSE, EnergyForces, check_against_eager, default_inductor_configs,
                      error_summary, pairs_and_shifts, traceable)


class _Functional(nn.Module):
    """``EnergyForces`` with the potential's parameters and buffers passed in as tensors."""

    def __init__(self, potential: nn.Module, with_repulsion: bool = True, with_forces: bool = True):
        super().__init__()
        self.inner = EnergyForces(potential, differentiable=True, with_repulsion=with_repulsion,
                                  with_forces=with_forces)
        self.names = [n for n, _ in potential.named_parameters()] + [n for n, _ in potential.named_buffers()]
        # where each tensor lives (its module's parameter or buffer dict, and its key): read at every call, so a
        # reassigned tensor is seen, without walking the module tree every step
        self._slots = []
        for n in self.names:
            owner, _, key = n.rpartition(".")
            mod = potential.get_submodule(owner)
            self._slots.append((mod._parameters if key in mod._parameters else mod._buffers, key))

    def tensors(self) -> List[Tensor]:
        """The potential's current parameters and buffers, in the order ``forward`` takes them."""
        return [d[k] for d, k in self._slots]

    def forward(self, tensors: List[Tensor], numbers: Tensor, positions: Tensor, pairs: Tensor, cart: Tensor):
        state = {"potential." + n: t for n, t in zip(self.names, tensors)}
        return torch.func.functional_call(self.inner, state, (numbers, positions, pairs, cart))


def strip_detach(gm: torch.fx.GraphModule) -> int:
    """Remove the ``detach`` nodes of a traced force graph; returns how many.

    When ``make_fx`` traces ``autograd.grad``, the tensors the first backward reads from the forward
    (saved activations) enter the graph through ``aten.detach``. Executed as a graph that is itself
    differentiated (the parameter gradient of a force loss), those detaches would cut every path of the
    second derivative through saved activations: the gradient would silently be wrong by a few per cent.
    ``detach`` is the identity on values, so dropping it changes no output, only restores the gradient.
    """
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    gm.graph.lint()
    gm.recompile()
    return removed


class CompiledEnergyForces:
    """``fn(numbers, positions, batch, cell, pbc) -> {"energy": (B,), "forces": (N, 3)}`` for training,
    differentiable in ``potential``'s parameters, compiled on the first call.

    The parameters are read from ``potential`` at every call, so optimiser steps, ``load_state_dict``
    and resumed checkpoints are seen. ``backend``: ``"inductor"`` (fused C++ kernels; the default) or
    ``"aot_eager"`` (the same traced graph without code generation: seconds to build, for tests and
    debugging); the environment variable ``OREO_COMPILE_BACKEND`` sets the default. ``learned_only``: the
    learned energy alone, as ``Potential.atomic_energies_and_features(learned_only=True)`` (no ZBL repulsion,
    no close-atoms check: pretraining objectives on noisy coordinates); the output then also holds
    ``"atomic_energies"``. ``with_forces=False`` (with ``learned_only``): no forces, only ``"energy"`` and
    ``"atomic_energies"``: a property head's per-atom output (QM9 HOMO/LUMO), whose training needs no position
    gradient (measured: ET 4x96, QM9 batches of 32, 1 thread, 1.42x the eager training step:
    ``benchmarks/compiled_step_speed.py --molecules --qm9 homo``).
    """

    def __init__(self, potential: nn.Module, backend: Optional[str] = None, learned_only: bool = False,
                 with_forces: bool = True, setting: str = "optim.compile"):
        if not traceable(potential):     # ``setting``: the config key that asked for it, named in the error
            raise ValueError(f"{setting} needs the ET backbone (model.name: et); set {setting}: false "
                             "for other backbones")
        self.potential = potential
        self.backend = backend or os.environ.get("OREO_COMPILE_BACKEND", "inductor")
        self.learned_only = bool(learned_only)
        self.with_forces = bool(with_forces)
        if not self.with_forces and not self.learned_only:
            raise ValueError("with_forces=False needs learned_only=True (a per-atom output without the repulsion)")
        self._fn = _Functional(potential, with_repulsion=not self.learned_only, with_forces=self.with_forces)
        self._compiled = None
        self.compiles = 0
        self.rebuilds = 0                     #: traces made again for a batch the first graph did not take
        self.failure: Optional[str] = None   #: why the compiled graph was given up for the eager path
        self.options: Optional[Dict] = None   #: the Inductor options of the build in use

    def _build(self, example) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        tensors = [t.detach() for t in example[0]]
        gm = make_fx(self._fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(tensors, *example[1:])
        strip_detach(gm)
        # Inductor's in-place buffer reuse can hand a buffer's storage to a kernel's in/out argument while a later
        # kernel of the backward still reads it (torch 2.13, ethanol batches: "UnboundLocalError: cannot access
        # local variable 'buf199'"); the second build turns buffer reuse off (a little more memory), before giving
        # up for the eager path
        attempts = [default_inductor_configs(), default_inductor_configs(**NO_BUFFER_REUSE)] \
            if self.backend == "inductor" else [None]
        tol = EXPORT_TOLERANCE.get(str(example[2].dtype).replace("torch.", ""), EXPORT_TOLERANCE["float32"])
        failures = []
        for options in attempts:
            self._compiled = torch.compile(gm, backend=self.backend, dynamic=True, options=options)
            self.compiles += 1
            try:   # what training will do: forward (checked against eager), then a backward in the parameters
                problem = check_against_eager(self._compiled, self._fn, example, tol)
                if problem is not None:
                    raise RuntimeError(f"not the eager numbers: {problem}")
                params = [t for t in example[0] if t.requires_grad]
                e_atom, forces = self._compiled(*example)
                trial = e_atom.sum() + (forces.square().sum() if forces is not None else 0.0)
                torch.autograd.grad(trial, params, allow_unused=True)
                self.options = options
                if failures:
                    warnings.warn(f"optim.compile: the first build failed its trial step ({failures[0]}); the "
                                  f"build with Inductor option(s) {NO_BUFFER_REUSE} works and is used",
                                  RuntimeWarning, stacklevel=3)
                return
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager path computes the same
                failures.append(error_summary(exc))
                torch._dynamo.reset()
        self.failure = "; ".join(failures)
        self._compiled = None
        warnings.warn(f"optim.compile: the compiled force graph failed its trial step in {len(failures)} build(s) "
                      f"(torch {torch.__version__}, {self.backend}: {self.failure}); training continues on the "
                      f"eager path (the same numbers, about 1.2x slower). Set optim.compile: false to skip the "
                      f"compile", RuntimeWarning, stacklevel=3)

    def __call__(self, numbers: Tensor, positions: Tensor, batch: Optional[Tensor] = None,
                 cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None) -> Dict[str, Tensor]:
        pot = self.potential
        batch, num_graphs = checked_batch(numbers, positions, batch, pot.known_elements)
        if self.failure is None:
            pairs, cart = pairs_and_shifts(positions, batch, pot.cutoff, cell, pbc)  # no stress training
            args = (self._fn.tensors(), numbers, positions.detach(), pairs, cart)
            if self._compiled is None:
                self._build(args)
            if self.failure is None:
                try:
                    e_atom, forces = self._compiled(*args)
                except Exception as exc:  # noqa: BLE001 - see _rebuild
                    e_atom, forces = self._rebuild(args, exc)
                if self.failure is None:
                    out = {"energy": graph_sum(e_atom, batch, num_graphs)}
                    if self.with_forces:
                        out["forces"] = forces
                    return {**out, "atomic_energies": e_atom} if self.learned_only else out
        return self._eager(numbers, positions, batch, num_graphs, cell, pbc)

    def _rebuild(self, args, exc: Exception):
        """A batch of a new size that the compiled graph does not take: the symbolic trace can bake a size in when
        the first batch's atom count happens to equal a size of the weights (ethanol, 32 frames: 288 atoms = 3 x 96
        hidden, and a later ``view`` kept 3 x 288 as a constant), and the recompile for the short last batch of the
        epoch then fails. Traced once more from this batch (whose sizes differ); a second failure gives up for the
        eager path, with a warning (the same numbers: a long run goes on)."""
        if self.rebuilds >= 1:
            self.failure, self._compiled = error_summary(exc), None
            warnings.warn(f"optim.compile: the compiled force graph, traced twice, failed on a batch of "
                          f"{args[1].shape[0]} atoms ({self.failure}); training continues on the eager path (the "
                          f"same numbers, slower). Set optim.compile: false to skip the compile",
                          RuntimeWarning, stacklevel=3)
            return None, None
        self.rebuilds += 1
        warnings.warn(f"optim.compile: the compiled force graph failed on a batch of {args[1].shape[0]} atoms "
                      f"({error_summary(exc)}); tracing it again from this batch", RuntimeWarning, stacklevel=3)
        torch._dynamo.reset()
        self._compiled = None
        self._build(args)
        if self.failure is not None:
            return None, None
        return self._compiled(*args)

    def _eager(self, numbers, positions, batch, num_graphs, cell, pbc) -> Dict[str, Tensor]:
        """The same numbers by eager autograd (after a failed build)."""
        pot = self.potential
        if not self.learned_only:
            return pot(numbers, positions, batch, cell, pbc, with_reference=False)
        pos = positions.detach().requires_grad_(self.with_forces)
        e_atom, _, _ = pot.atomic_energies_and_features(numbers, pos, batch, cell, pbc, learned_only=True)
        energy = graph_sum(e_atom, batch, num_graphs)
        if not self.with_forces:
            return {"energy": energy, "atomic_energies": e_atom}
        return {"energy": energy, "forces": forces_from_energy(energy, pos, True), "atomic_energies": e_atom}
