"""Committees: several potentials of one molecule (or material) whose spread is the model's uncertainty.

A :class:`Committee` holds N ordinary :class:`~forcefield.potential.Potential` members (e.g. the same config
trained with different seeds, ``oreo train --set optim.seed=N``) and is called exactly like one of them, so every
consumer (:class:`~forcefield.calculator.OreoCalculator`, ``md``'s ``ForceField``, :func:`~forcefield.evaluate.
evaluate`) runs it unchanged and gets the committee **mean**::

    out = committee(numbers, positions, batch, cell, pbc)     # {"energy": (B,) eV, "forces": (N, 3) eV/Å}: means
    out = committee.energy_forces_spread(numbers, positions, batch, cell, pbc)
    out["energy_std"]       # (B,)   eV
    out["forces_std"]       # (N, 3) eV/Å, per atom and component
    out["forces_std_max"]   # (B,)   eV/Å, the active-learning criterion (below)
    out["member_energy"]    # (M, B) eV, out["member_forces"] (M, N, 3) eV/Å: each member's own prediction

Every member computes its energy and its forces = -dE/dr on its own path (``Potential.forward``); the committee
only averages, so the mean forces are exactly -d(mean energy)/dr.

Conventions (``M`` members, member ``k`` predicts ``E^k`` and ``F_i^k`` for atom ``i``):

- mean: ``E = (1/M) sum_k E^k``, ``F_i = (1/M) sum_k F_i^k``;
- std: the population standard deviation over the members, dividing by ``M`` (``torch.std(..., correction=0)``,
  i.e. ``unbiased=False``): ``energy_std = sqrt((1/M) sum_k (E^k - E)^2)``, and per component
  ``forces_std[i, c] = sqrt((1/M) sum_k (F_ic^k - F_ic)^2)``. A committee of identical members has zero spread;
  two members give half their difference;
- ``forces_std_max`` of a structure: the largest over its atoms of the norm of the per-atom force std vector,
  ``max_i sqrt(sum_c forces_std[i, c]^2) = max_i sqrt((1/M) sum_k |F_i^k - F_i|^2)`` (eV/Å), the same quantity
  as DP-GEN's "max force deviation"; a structure is worth labelling when it is large.

File format: one model file (``torch.save`` of a plain dict), read by :func:`forcefield.io.open_model_file`
through the format this module registers (``"oreo-committee"``, listed in ``io.FORMAT_PLUGINS``)::

    {"format": "oreo-committee", "format_version": 1, "oreo_version": str,
     "members": [model record of each member, as forcefield.io.save_model writes it],
     "sources": [where each member came from: path or name], "metadata": {extra committee metadata}}

Write one with :func:`save_committee` or ``oreo committee --out committee.pt MODEL1 MODEL2 ...``; load it with
``load_potential`` / ``OreoCalculator`` like any model file. Members must agree on cutoff, elements, units,
molecule, level of theory and dtype (:func:`check_members` names the field and the fix). Exports (TorchScript,
``.pt2``) hold one model: exporting a committee is an error (:func:`refuse_export`); export its members instead.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .files import atomic_torch_save
from .io import RecordFormat, model_record, open_model_file, register_record_format
from .potential import Potential
from .version import __version__

COMMITTEE_FORMAT = "oreo-committee"
COMMITTEE_FORMAT_VERSION = 1
#: the results a committee adds to a calculator's (eV, eV/Å)
SPREAD_PROPERTIES = ("energy_std", "forces_std", "forces_std_max")

MemberLike = Union[Potential, str, Path]


class Committee(nn.Module):
    """N potentials of the same molecule/elements, called like one :class:`~forcefield.potential.Potential` (the
    mean); :meth:`energy_forces_spread` also gives the spread (module docstring: conventions).

    Args:
        members: two or more eager :class:`Potential` (as ``load_potential`` returns them from model files).
        sources: where each member came from (paths or names), for the metadata; default: each member's
            metadata ``name``, else ``member K``.
        metadata: extra metadata of the committee (overrides the first member's).
    """

    def __init__(self, members: Sequence[Potential], sources: Optional[Sequence[str]] = None,
                 metadata: Optional[Dict[str, Any]] = None):
        super().__init__()
        members = list(members)
        if sources is None:
            sources = [_default_source(m, k) for k, m in enumerate(members)]
        self.sources: List[str] = [str(s) for s in sources]
        check_members(members, self.sources)
        self.members = nn.ModuleList(members)
        self.cutoff: float = float(members[0].cutoff)
        self._extra: Dict[str, Any] = dict(metadata or {})

    # ------------------------------------------------------------------ python-side info
    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def metadata(self) -> Dict[str, Any]:
        """The first member's metadata, the committee's own, ``committee_size`` and ``committee_members`` (the
        sources)."""
        return {**self.members[0].metadata, **self._extra, "committee_size": self.size,
                "committee_members": list(self.sources)}

    @property
    def metadata_json(self) -> str:
        return json.dumps(self.metadata)

    def set_metadata(self, **kw: Any) -> None:
        self._extra.update(kw)

    @property
    def elements(self) -> List[int]:
        return self.members[0].elements

    @property
    def precise_buffers(self) -> tuple:
        """Buffers that stay float64 when the committee is cast (``forcefield.io.cast_potential``): each member's."""
        return tuple(f"members.{k}.{name}" for k, m in enumerate(self.members)
                     for name in getattr(m, "precise_buffers", ("atomref",)))

    def describe(self) -> str:
        return f"committee of {self.size}: {self.members[0].describe()} (each)"

    # ------------------------------------------------------------------ forward
    def member_outputs(self, numbers: Tensor, positions: Tensor, batch: Optional[Tensor] = None,
                       cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None, with_reference: bool = True,
                       compute_forces: bool = True) -> Dict[str, Tensor]:
        """Each member's own prediction, stacked: ``{"energy": (M, B) eV, "forces": (M, N, 3) eV/Å}``."""
        outs = [m(numbers, positions, batch, cell, pbc, with_reference=with_reference, compute_forces=compute_forces)
                for m in self.members]
        return {key: torch.stack([o[key] for o in outs]) for key in outs[0]}

    def forward(self, numbers: Tensor, positions: Tensor, batch: Optional[Tensor] = None,
                cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None, with_reference: bool = True,
                compute_forces: bool = True) -> Dict[str, Tensor]:
        """The committee mean, with :meth:`Potential.forward`'s signature and outputs."""
        stacked = self.member_outputs(numbers, positions, batch, cell, pbc, with_reference, compute_forces)
        return {key: value.mean(0) for key, value in stacked.items()}

    def energy_forces_spread(self, numbers: Tensor, positions: Tensor, batch: Optional[Tensor] = None,
                             cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None,
                             with_reference: bool = True) -> Dict[str, Tensor]:
        """Mean and spread (module docstring): ``energy`` (B,) eV, ``forces`` (N, 3) eV/Å, ``energy_std`` (B,) eV,
        ``forces_std`` (N, 3) eV/Å, ``forces_std_max`` (B,) eV/Å, ``member_energy`` (M, B), ``member_forces``
        (M, N, 3). Energies in float64, forces in the dtype of ``positions``. Call with gradients enabled."""
        stacked = self.member_outputs(numbers, positions, batch, cell, pbc, with_reference, True)
        e_all, f_all = stacked["energy"], stacked["forces"]
        e_mean, f_mean = e_all.mean(0), f_all.mean(0)             # as forward: the same numbers, bit for bit
        e_std, f_std = torch.std(e_all, dim=0, correction=0), torch.std(f_all, dim=0, correction=0)
        if batch is None:
            batch = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
        per_atom = f_std.pow(2).sum(-1).sqrt()
        f_max = torch.zeros(e_mean.shape[0], dtype=per_atom.dtype, device=per_atom.device).scatter_reduce(
            0, batch, per_atom, reduce="amax", include_self=True)       # norms are >= 0: the zeros change nothing
        return {"energy": e_mean, "forces": f_mean, "energy_std": e_std, "forces_std": f_std,
                "forces_std_max": f_max, "member_energy": e_all, "member_forces": f_all}

    # ------------------------------------------------------------------ serialisation
    def record(self) -> Dict[str, Any]:
        return {"format": COMMITTEE_FORMAT, "format_version": COMMITTEE_FORMAT_VERSION, "oreo_version": __version__,
                "members": [model_record(m) for m in self.members], "sources": list(self.sources),
                "metadata": dict(self._extra)}

    @classmethod
    def from_record(cls, rec: Dict[str, Any]) -> "Committee":
        members = [Potential.from_config(r["config"], r["state_dict"]) for r in rec["members"]]
        return cls(members, sources=rec.get("sources"), metadata=rec.get("metadata"))


def _default_source(member: Any, k: int) -> str:
    """A member's path as given, else its metadata ``name``, else ``member K``."""
    if isinstance(member, (str, Path)):
        return str(member)
    name = member.metadata.get("name") if isinstance(member, Potential) else None
    return str(name or f"member {k}")


def is_committee(module: Any) -> bool:
    """Whether ``module`` gives a spread (:meth:`Committee.energy_forces_spread`): what the calculator and MD ask."""
    return callable(getattr(module, "energy_forces_spread", None))


# ---------------------------------------------------------------------------- members must agree
def _molecule(meta: Dict[str, Any]) -> Optional[str]:
    from .data.registry import molecule_key
    name = meta.get("molecule")
    return molecule_key(name) if name else None


#: field -> (how to read it from a member, what to do about a mismatch)
_AGREE = {
    "cutoff": (lambda m: float(m.cutoff),
               "train every member with the same model config (model.cutoff), or leave this one out"),
    "elements": (lambda m: m.elements,
                 "members must be trained on data with the same elements; leave this one out"),
    "units": (lambda m: m.metadata.get("units"),
              "members must predict in the same units (oreo models are eV, Å, eV/Å); leave this one out"),
    "molecule": (lambda m: _molecule(m.metadata),
                 "a committee is several models of one molecule; use models trained on the same molecule"),
    "formula": (lambda m: m.metadata.get("formula"),      # models trained on a file record no molecule name
                "a committee is several models of one molecule; use models trained on frames of the same molecule"),
    "level_of_theory": (lambda m: m.metadata.get("level_of_theory"),
                        "members must be trained on labels of the same level of theory; leave this one out"),
    "polymers": (lambda m: tuple(m.metadata["polymers"]) if m.metadata.get("polymers") else None,
                 "poly24 members must be trained on the same polymers; leave this one out"),
    "dtype": (lambda m: m.scale.dtype,
              "load every member with the same dtype (load_potential(path, dtype=...))"),
}


def check_members(members: Sequence[Any], sources: Sequence[str]) -> None:
    """Raise a ValueError naming the field and the fix unless ``members`` are two or more eager potentials that
    agree on cutoff, elements, units, molecule, level of theory and dtype (a field a member's metadata does not
    record is not compared)."""
    if len(members) < 2:
        raise ValueError(f"a committee needs at least 2 models, got {len(members)}; pass two or more model files "
                         f"of the same molecule (e.g. one config trained with different seeds: "
                         f"oreo train --set optim.seed=N)")
    if len(sources) != len(members):
        raise ValueError(f"{len(sources)} sources for {len(members)} committee members; give one per member")
    for k, m in enumerate(members):
        if isinstance(m, Committee):
            raise ValueError(f"committee member {sources[k]} is itself a committee; pass its members instead")
        if not isinstance(m, Potential):
            raise ValueError(f"committee member {sources[k]} is a {type(m).__name__}, not an oreo Potential "
                             f"(exports such as TorchScript or .pt2 files cannot be members); pass the oreo model "
                             f"file it was exported from")
    for field, (read, fix) in _AGREE.items():
        first = read(members[0])
        for k in range(1, len(members)):
            value = read(members[k])
            if first is not None and value is not None and value != first:
                raise ValueError(f"committee members disagree on {field}: {field}={first!r} in {sources[0]}, "
                                 f"{field}={value!r} in {sources[k]}; {fix}")


# ---------------------------------------------------------------------------- files
def member_from_file(model: Union[str, Path]) -> Potential:
    """A committee member from a model file (or checkpoint, run state, shipped name): its Potential as
    ``ModelFile.build`` rebuilds it (CPU, eval mode). Exports and committees are refused with the fix."""
    mf = open_model_file(model)
    if mf.is_export:
        raise ValueError(f"{mf.path} is an export ({mf.kind}); a committee is built from oreo model files: pass the "
                         f"model file it was exported from")
    if mf.kind == COMMITTEE_FORMAT:
        raise ValueError(f"{mf.path} is already a committee; pass its member model files instead")
    if not mf.is_potential:
        raise ValueError(f"{mf.path} is a {mf.kind}, not a potential; pass oreo model files")
    return mf.build().eval()


def save_committee(members: Sequence[MemberLike], path: Union[str, Path],
                   metadata: Optional[Dict[str, Any]] = None, sources: Optional[Sequence[str]] = None) -> Path:
    """Write a committee of ``members`` (Potentials, or model files / shipped names, read as stored) to ONE model
    file at ``path``, atomically. ``sources`` default to the paths given (``member K`` for modules without a
    ``name``). Returns the path; ``load_potential(path)`` gives the :class:`Committee` back."""
    members = list(members)
    if sources is None:
        sources = [_default_source(m, k) for k, m in enumerate(members)]
    mods = [member_from_file(m) if isinstance(m, (str, Path)) else m for m in members]
    return atomic_torch_save(Committee(mods, sources, metadata).record(), path)


def refuse_export(module: Any, what: str) -> None:
    """Raise a ValueError when ``module`` is a committee: a ``what`` export holds one model."""
    if isinstance(module, Committee):
        raise ValueError(f"cannot export a committee ({module.size} members) as {what}: an export holds one model "
                         f"and would lose the spread. Use the committee file itself (OreoCalculator and "
                         f"load_potential read it), or export each member model file on its own "
                         f"({', '.join(module.sources)})")


register_record_format(RecordFormat(COMMITTEE_FORMAT, COMMITTEE_FORMAT_VERSION, Committee.from_record,
                                    potential=True,
                                    not_trainable="a committee cannot be trained or fine-tuned as one model; start "
                                                  "from one of the model files it was built from"))
