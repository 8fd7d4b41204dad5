"""Adapter between :mod:`md` and any batched potential.

A *potential* is any callable ``pot(numbers, positions, batch, cell=None, pbc=None)`` that
returns a dict with ``"energy"`` (B,) eV and ``"forces"`` (N, 3) eV/Å, computing forces with
autograd inside (so it is called with gradients enabled). :class:`ForceField` feeds it
positions in the potential's own dtype and device and hands back float64 results, calling it
only on the systems that are still active (one forward/backward for all of them).

:func:`load_model` turns a model spec into such a potential:

- a path to any oreo model file (model, checkpoint, export), or a shipped model's bare name (``"aspirin"``,
  ``"aspirin.pt"``) -> :func:`forcefield.io.load_potential` (the one reader of model files);
- ``"py:package.module:factory"`` -> ``factory(**kwargs)``, where ``factory`` may declare any
  of the keyword arguments ``molecule``, ``data_dir``, ``device``, ``dtype`` (for analytic or
  custom potentials; see :mod:`md.analytic`).
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from .errors import MDInputError


def potential_dtype(pot) -> torch.dtype:
    """The floating dtype ``pot`` expects: its ``dtype`` attribute, else that of its first
    floating parameter or buffer, else torch's default dtype."""
    dt = getattr(pot, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    if isinstance(pot, torch.nn.Module):
        for t in list(pot.parameters()) + list(pot.buffers()):
            if t.is_floating_point():
                return t.dtype
    return torch.get_default_dtype()


def potential_device(pot, fallback="cpu") -> torch.device:
    """The device of ``pot``'s first parameter or buffer (``fallback`` if it has none)."""
    if isinstance(pot, torch.nn.Module):
        for t in list(pot.parameters()) + list(pot.buffers()):
            return t.device
    dev = getattr(pot, "device", None)
    return torch.device(dev) if dev is not None else torch.device(fallback)


class ForceField:
    """Calls a batched potential on the active systems of a batch and returns float64 results.

    ``forcefield(positions, numbers, batch, n_systems, cell=None, pbc=None, active=None)``
    -> ``(energy (B,) float64 eV, forces (N, 3) float64 eV/Å)`` on the device of ``positions``.
    Inactive systems get zero energy and zero forces and are not passed to the potential.

    When the potential is a committee (``forcefield.committee``), the energy and forces are the committee mean and
    ``last_force_std_max`` holds, after every call, each system's committee force spread (``forces_std_max``, eV/Å,
    float64 (B,); NaN for systems not evaluated); for a single model it stays None.

    When the potential refuses the batch because atoms of some systems overlap (closer than 0.1 Å: oreo
    potentials raise, see ``forcefield.potential.check_pair_distances``), those systems get NaN energy and
    forces and the others are evaluated, so MD stops only the collapsed replicas (as non-finite).
    """

    def __init__(self, potential: Callable, device=None, dtype: Optional[torch.dtype] = None):
        if not callable(potential):
            raise MDInputError(f"the potential must be callable as pot(numbers, positions, batch, cell, pbc); "
                               f"got {type(potential).__name__}")
        self.potential = potential
        if hasattr(potential, "eval") and callable(potential.eval):
            potential.eval()
        self.dtype = dtype or potential_dtype(potential)
        self.device = torch.device(device) if device is not None else potential_device(potential)
        self.cutoff = getattr(potential, "cutoff", None)
        self.metadata = potential_metadata(potential)
        self.n_calls = 0
        from forcefield.committee import is_committee
        self.committee = is_committee(potential)
        self.last_force_std_max: Optional[torch.Tensor] = None

    def __call__(self, positions: torch.Tensor, numbers: torch.Tensor, batch: torch.Tensor, n_systems: int,
                 cell: Optional[torch.Tensor] = None, pbc: Optional[torch.Tensor] = None,
                 active: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        out_device = positions.device
        energy = torch.zeros(n_systems, dtype=torch.float64, device=out_device)
        forces = torch.zeros(positions.shape[0], 3, dtype=torch.float64, device=out_device)
        if active is None or bool(active.all()):
            sel_atoms, sub_batch, sel_sys = None, batch, None
            n_sub = n_systems
        else:
            if not bool(active.any()):
                return energy, forces
            sel_sys = torch.nonzero(active).squeeze(1)
            new_id = torch.cumsum(active.long(), 0) - 1
            sel_atoms = active[batch]
            sub_batch = new_id[batch[sel_atoms]]
            n_sub = int(sel_sys.numel())
        pos = positions if sel_atoms is None else positions[sel_atoms]
        num = numbers if sel_atoms is None else numbers[sel_atoms]
        c = cell if (cell is None or sel_sys is None) else cell[sel_sys]
        p = pbc if (pbc is None or sel_sys is None) else pbc[sel_sys]
        dev, dt = self.device, self.dtype
        args = dict(cell=None if c is None else c.to(dev, dt), pbc=None if p is None else p.to(dev))
        try:
            with torch.enable_grad():
                call = self.potential.energy_forces_spread if self.committee else self.potential
                out = call(num.to(dev), pos.detach().to(dev, dt), sub_batch.to(dev), **args)
        except Exception:
            # checked only after a failure: costs nothing on the normal path
            rest = self._without_overlapping(positions, batch, n_systems, cell, pbc, active)
            if rest is None:
                raise
            keep, collapsed = rest
            energy, forces = self(positions, numbers, batch, n_systems, cell, pbc, keep)
            energy[collapsed] = float("nan")
            forces[collapsed[batch]] = float("nan")
            return energy, forces
        self.n_calls += 1
        e, f = self._check(out, n_sub, pos.shape[0])
        if self.committee:
            spread = torch.full((n_systems,), float("nan"), dtype=torch.float64, device=out_device)
            std = out["forces_std_max"].detach().to(out_device, torch.float64)
            if sel_sys is None:
                spread = std
            else:
                spread[sel_sys] = std
            self.last_force_std_max = spread
        e = e.detach().to(out_device, torch.float64)
        f = f.detach().to(out_device, torch.float64)
        if sel_atoms is None:
            return e, f
        energy[sel_sys] = e
        forces[sel_atoms] = f
        return energy, forces

    @staticmethod
    def _without_overlapping(positions, batch, n_systems, cell, pbc, active):
        """``(active systems without overlapping atoms, overlapping active systems)`` as (B,) bool masks, or
        None when no active system has overlapping atoms."""
        from .state import overlapping_atoms
        active = torch.ones(n_systems, dtype=torch.bool, device=positions.device) if active is None else active
        collapsed = torch.zeros_like(active)
        for g in overlapping_atoms(positions, batch, cell, pbc):
            collapsed[g] = bool(active[g])
        if not bool(collapsed.any()):
            return None
        return active & ~collapsed, collapsed

    def _check(self, out, n_sys: int, n_atoms: int):
        if not isinstance(out, dict) or "energy" not in out or "forces" not in out:
            got = sorted(out.keys()) if isinstance(out, dict) else type(out).__name__
            raise MDInputError(f"the potential must return a dict with 'energy' (B,) and 'forces' (N, 3); got {got}")
        e, f = out["energy"], out["forces"]
        if e is None or f is None:
            raise MDInputError("the potential returned energy or forces = None; MD needs both "
                               "(load the potential with forces enabled)")
        e = e.reshape(-1)
        if e.shape[0] != n_sys or tuple(f.shape) != (n_atoms, 3):
            raise MDInputError(f"the potential returned energy {tuple(e.shape)} and forces {tuple(f.shape)} "
                               f"for {n_sys} systems with {n_atoms} atoms; expected ({n_sys},) and ({n_atoms}, 3)")
        return e, f


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "float64": torch.float64, "float": torch.float32, "double": torch.float64}
    if name not in table:
        raise MDInputError(f"unknown dtype '{name}'; use float32 or float64")
    return table[name]


def load_model(spec: str, molecule: Optional[str] = None, data_dir=None, device="cpu",
               dtype="float32", allow_other_molecule: bool = False) -> Callable:
    """Load a potential from a model spec (see the module docstring). Errors name the fix.

    A model whose metadata names another molecule than ``molecule`` is refused (its numbers on a molecule it
    never saw mean nothing) unless ``allow_other_molecule``."""
    if not spec:
        raise MDInputError("empty model spec; pass --model PATH (checkpoint/export) or a shipped model name")
    dt = _dtype(dtype)
    if spec.startswith("py:"):
        target = spec[3:]
        if ":" not in target:
            raise MDInputError(f"model spec '{spec}' must look like py:package.module:factory")
        mod_name, attr = target.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise MDInputError(f"cannot import '{attr}' from '{mod_name}' for model spec '{spec}': {exc}. "
                               f"Check the module is on PYTHONPATH and defines that callable") from exc
        ctx = dict(molecule=molecule, data_dir=data_dir, device=device, dtype=dt)
        params = inspect.signature(factory).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = ctx
        else:
            kwargs = {k: v for k, v in ctx.items() if k in params}
        pot = factory(**kwargs)
        if isinstance(pot, torch.nn.Module):
            pot = pot.to(device)
        return pot
    from forcefield.data.registry import molecule_key
    from forcefield.io import load_potential
    try:
        pot = load_potential(spec, device=device, dtype=dt)
    except FileNotFoundError as exc:
        raise MDInputError(f"model '{spec}' not found ({exc}); pass --model PATH to a checkpoint or export, "
                           f"or the name of a shipped model") from exc
    except (ValueError, KeyError, RuntimeError) as exc:
        raise MDInputError(f"could not load model '{spec}': {exc}") from exc
    trained_on = potential_metadata(pot).get("molecule")
    if molecule and trained_on and molecule_key(trained_on) != molecule_key(molecule):
        if not allow_other_molecule:
            raise MDInputError(f"model '{spec}' was trained on {trained_on}, not {molecule}: its energies and "
                               f"forces on {molecule} are an extrapolation. Pass --model with a {molecule} model "
                               f"(the shipped one: --model {molecule}), or --allow-other-molecule to run it anyway")
        warnings.warn(f"model '{spec}' was trained on '{trained_on}' but you simulate '{molecule}' "
                      f"(--allow-other-molecule)", stacklevel=2)
    return pot


def potential_metadata(pot) -> Dict[str, object]:
    """``pot.metadata`` (or the JSON in ``pot.metadata_json`` of exports), ``{}`` if none."""
    from forcefield.io import metadata_of
    return metadata_of(pot)


def model_metadata(pot) -> Dict[str, object]:
    """JSON-friendly view of the potential's metadata plus ``cutoff`` (for run.json / summary.json)."""
    meta = {}
    for k, v in potential_metadata(pot).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            meta[k] = v
    cutoff = getattr(pot, "cutoff", None)
    if cutoff is not None:
        try:
            meta["cutoff"] = float(cutoff)
        except (TypeError, ValueError):
            pass
    return meta


def compiled_model(spec: str, out_dir, dtype="float32", device="cpu") -> str:
    """The AOTInductor export (``.pt2``) of the model file ``spec``, built once in ``out_dir`` (named by the model
    file's SHA-256 and the dtype, so a changed model is rebuilt) and reused by later pieces of the run on the same
    machine; returns its path. The export computes the same function as the eager model (``forcefield.compiled``;
    float rounding aside), in one fused graph."""
    from pathlib import Path
    fingerprint = model_fingerprint(spec)
    if not fingerprint:
        raise MDInputError(f"--compile needs an oreo model file (got '{spec}'); drop --compile for py: factories")
    kind = torch.device(device).type
    out = Path(out_dir) / (f"model-{fingerprint['model_sha256'][:16]}-{dtype}"
                           + ("" if kind == "cpu" else f"-{kind}") + ".pt2")
    if not out.is_file():
        from forcefield.compiled import export_compiled
        from forcefield.io import resolve_model_path
        print(f"--compile: building {out.name} from {spec} (AOTInductor; a few minutes, once per run directory)",
              flush=True)
        try:
            export_compiled(resolve_model_path(spec), out, dtype=_dtype(dtype), device=device)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager model is the way on
            raise MDInputError(f"--compile: could not build the export of '{spec}' ({exc}); drop --compile to run "
                               f"the eager model") from exc
    return str(out)


def model_fingerprint(spec: str) -> Dict[str, object]:
    """Which model file a spec names, and its SHA-256: a run records it so that a run continued later (perhaps after
    the shipped model was re-trained and re-shipped) is refused instead of silently mixing two models. ``{}`` for
    ``py:`` factories (no file)."""
    if not spec or spec.startswith("py:"):
        return {}
    from forcefield.data.registry import sha256sum
    from forcefield.io import resolve_model_path
    try:
        path = resolve_model_path(spec)
    except FileNotFoundError:
        return {}
    return {"model_file": path.name, "model_sha256": sha256sum(path)}


def model_change(recorded: Optional[Dict[str, object]], fingerprint: Dict[str, object]) -> Optional[str]:
    """``"SHA-256 <then>... then, <now>... now"`` when the model a run recorded is not the file ``fingerprint``
    (:func:`model_fingerprint`) names now, e.g. a re-shipped model; None when it is, or when either is unknown."""
    had, now = (recorded or {}).get("model_sha256"), fingerprint.get("model_sha256")
    return f"SHA-256 {had[:12]}... then, {now[:12]}... now" if had and now and had != now else None
