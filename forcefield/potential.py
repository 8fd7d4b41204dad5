"""The potential: backbone + energy head + per-element reference energies; forces = -dE/dr.

``Potential`` is TorchScript-able and is the one interface that training, the ASE calculator,
the TorchScript export and the MD integrators all use::

    out = potential(numbers, positions, batch, cell, pbc)
    out["energy"]  # (B,)   eV
    out["forces"]  # (N, 3) eV/Å

Inputs: ``numbers`` (N,) int64, ``positions`` (N, 3) Å in the module's dtype, ``batch`` (N,)
graph index (None: one structure), optional ``cell`` (B, 3, 3) Å and ``pbc`` (B, 3) bool.
"""
import json
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .graph import radius_graph
from .models import EquivariantScalarHead, create_backbone

MAX_Z = 100


def check_inputs(numbers: Tensor, positions: Tensor, batch: Tensor, known_elements: Tensor) -> None:
    """Clear errors for malformed input, NaN positions and elements the model never saw."""
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError("positions must have shape (N, 3) in Å")
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


def checked_batch(numbers: Tensor, positions: Tensor, batch: Optional[Tensor],
                  known_elements: Tensor) -> Tuple[Tensor, int]:
    """The input checks every potential runs first: ``(batch, num_graphs)``, with ``batch`` defaulting to
    one molecule (all zeros)."""
    if batch is None:
        batch = torch.zeros(numbers.shape[0], dtype=torch.long, device=numbers.device)
    check_inputs(numbers, positions, batch, known_elements)
    return batch, (int(batch.max()) + 1 if batch.numel() > 0 else 0)


class Potential(nn.Module):
    __jit_unused_properties__ = ["metadata", "elements", "config"]

    def __init__(self, backbone: Dict[str, Any], elements: List[int], atomref: Optional[Dict[int, float]] = None,
                 scale: float = 1.0, shift: float = 0.0, metadata: Optional[Dict[str, Any]] = None):
        super().__init__()
        backbone = dict(backbone)
        backbone.setdefault("max_z", MAX_Z)
        self._config = {"backbone": backbone, "elements": sorted(int(z) for z in elements)}
        self.backbone = create_backbone(backbone)
        self.head = EquivariantScalarHead(self.backbone.hidden)
        self.cutoff: float = float(self.backbone.cutoff)
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
                        pbc: Optional[Tensor] = None) -> Tensor:
        """Per-atom learned energies (N,) eV, without the reference energies."""
        edge_index, edge_vec = radius_graph(positions, batch, self.cutoff, cell, pbc)
        x, vec = self.backbone(numbers, edge_index, edge_vec)
        y = self.head(x, vec)
        return y * self.scale.to(y.dtype) + self.shift.to(y.dtype)

    def forward(self, numbers: Tensor, positions: Tensor, batch: Optional[Tensor] = None,
                cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None, with_reference: bool = True,
                compute_forces: bool = True) -> Dict[str, Tensor]:
        batch, num_graphs = checked_batch(numbers, positions, batch, self.known_elements)
        create_graph = self.training
        if compute_forces:
            if not torch.is_grad_enabled():
                raise RuntimeError("forces are -dE/dr by autograd: do not call the potential under "
                                   "torch.no_grad() or torch.inference_mode()")
            if not positions.requires_grad:
                positions = positions.detach().requires_grad_(True)
        e_atom = self.atomic_energies(numbers, positions, batch, cell, pbc)
        energy = torch.zeros(num_graphs, dtype=e_atom.dtype, device=e_atom.device).index_add_(0, batch, e_atom)
        out: Dict[str, Tensor] = {}
        if compute_forces:
            grads = torch.autograd.grad([energy.sum()], [positions], create_graph=create_graph,
                                        allow_unused=True)
            g = grads[0]
            out["forces"] = -g if g is not None else torch.zeros_like(positions)
        if with_reference:
            ref = torch.zeros(num_graphs, dtype=torch.float64, device=energy.device).index_add_(
                0, batch, self.atomref[numbers].to(torch.float64))
            energy = energy.to(torch.float64) + ref  # float64: total energies are large
        out["energy"] = energy if create_graph else energy.detach()
        return out

    # ------------------------------------------------------------------ serialisation helpers
    @classmethod
    def from_config(cls, config: Dict[str, Any], state_dict: Optional[Dict[str, Tensor]] = None) -> "Potential":
        model = cls(backbone=config["backbone"], elements=config["elements"], metadata=config.get("metadata"))
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model

    def describe(self) -> str:
        from ase.data import chemical_symbols as ELEMENT_SYMBOLS

        b = self._config["backbone"]
        els = ",".join(ELEMENT_SYMBOLS[z] for z in self.elements)
        n = sum(p.numel() for p in self.parameters())
        return (f"{b.get('name', 'et').upper()} {b.get('num_layers')}x{b.get('hidden')} "
                f"cutoff {self.cutoff:g} Å, elements {els}, {n:,} parameters")
