"""torch-sim adapter: an oreo potential as a torch-sim model (batched MD, relaxations, swaps on one device)::

    import torch_sim as ts
    from forcefield.torchsim import OreoModel

    model = OreoModel("aspirin")                      # a shipped name, a model file / export, or a loaded potential
    final = ts.integrate(system=[atoms1, atoms2], model=model, integrator=ts.nvt_langevin,
                         n_steps=1000, temperature=300, timestep=0.0005)   # K, ps (0.5 fs)

Units: torch-sim's metal units are oreo's: positions Å, energies eV, forces eV/Å, masses amu (torch-sim's own
time unit; ``ts.integrate`` takes the timestep in ps). The energies and forces are those of the potential's one
energy + force path (``potential(numbers, positions, batch, cell, pbc)``: energy per system, forces = -dE/dr),
as in the ASE calculator; nothing is recomputed here. No stress: oreo potentials give energies and forces only,
so cell-changing integrators and optimizers (NPT, ``unit_cell_fire``, ``frechet_cell_fire``) stop with an error
that says so (:class:`NoStressError`) when they ask for it.

Optional: needs ``torch-sim-atomistic`` (``pip install "oreo[torchsim]"``). This is the only module that
imports ``torch_sim``; nothing in oreo imports this module, so ``import forcefield`` works without it.
"""
import copy
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .devices import resolve_device
from .io import cast_potential, load_potential

try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as exc:  # tests/test_torchsim.py hides torch_sim to check this message
    raise ImportError('forcefield.torchsim needs torch-sim: pip install "oreo[torchsim]" '
                      f"(the package torch-sim-atomistic>=0.3); {exc}") from exc

NO_STRESS = ("oreo potentials compute energies and forces, not stress: use a fixed-cell integrator or optimizer "
             "(ts.nve, ts.nvt_langevin, torch_sim.integrators.nvt.nvt_nose_hoover, ts.optimizers.fire or "
             "gradient_descent), not NPT or a cell-relaxing optimizer, and keep compute_stress=False")


class NoStressError(KeyError):
    """Raised for ``output["stress"]`` (NPT integrators and cell optimizers ask for it): names the fix."""

    def __str__(self) -> str:
        return NO_STRESS


class _Output(dict):
    """The model's output dict: a missing ``"stress"`` raises :class:`NoStressError` instead of a bare KeyError."""

    def __missing__(self, key):
        if key == "stress":
            raise NoStressError("stress")
        raise KeyError(key)


def _module_dtype(pot: torch.nn.Module) -> torch.dtype:
    """The dtype a loaded potential computes in: a compiled export's ``dtype``, else that of ``scale`` (eager
    and TorchScript :class:`~forcefield.potential.Potential`), else of its first floating parameter."""
    dt = getattr(pot, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    scale = getattr(pot, "scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.dtype
    for p in pot.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _module_device(pot: torch.nn.Module) -> torch.device:
    for t in list(pot.buffers()) + list(pot.parameters()):
        return t.device
    return torch.device("cpu")


class OreoModel(ModelInterface):
    """An oreo potential as a torch-sim :class:`~torch_sim.models.interface.ModelInterface`.

    ``model(state)`` takes a ``ts.SimState`` (or a state dict) with ``positions`` (N, 3) Å, ``atomic_numbers``
    (N,), ``system_idx`` (N,), ``cell`` (B, 3, 3) Å (torch-sim's column-vector cell) and ``pbc``, and returns
    ``{"energy": (B,) eV, "forces": (N, 3) eV/Å}`` in the dtype of the state's positions. Energies include the
    per-element reference energies (oreo adds them in float64; a float32 state rounds totals of ~10^4 eV to about
    1 meV, so use ``dtype=torch.float64`` where total energies must be compared more finely, e.g. NVE drift).
    Molecules (``pbc=False``, any cell) are the main case; periodic states pass their cell and pbc to the
    potential, which handles any cell.

    Args:
        model: path to a model file, training checkpoint or export, the name of a shipped model ("aspirin" /
            "aspirin.pt"), or an already loaded potential module (not modified: cast on a copy if ``device`` or
            ``dtype`` differ from its own). Files are read by :func:`forcefield.io.load_potential`.
        device: where the potential runs (default: "cpu" for files, the module's own device for a module).
        dtype: the dtype it computes in and torch-sim builds states in (``ts.integrate`` uses ``model.dtype``):
            torch.float32 (default for files, as the ASE calculator) or torch.float64; a module keeps its own by
            default. TorchScript and ``.pt2`` exports compute in the dtype they were exported in.
        compute_forces: return forces (True, needed by every integrator and optimizer).
        compute_stress: must stay False (no stress; see :data:`NO_STRESS`).
    """

    def __init__(self, model: Union[str, Path, torch.nn.Module] = "aspirin",
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None, *,
                 compute_forces: bool = True, compute_stress: bool = False):
        super().__init__()
        if compute_stress:
            raise NotImplementedError(NO_STRESS)
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        if isinstance(model, torch.nn.Module):
            dev = resolve_device(device, "device") if device is not None else _module_device(model)
            dt = dtype if dtype is not None else _module_dtype(model)
            if dev != _module_device(model) or dt != _module_dtype(model):
                model = cast_potential(copy.deepcopy(model), dev, dt)
            pot = model
        else:
            dev = resolve_device(device, "device") if device is not None else torch.device("cpu")
            pot = load_potential(model, device=dev, dtype=dtype if dtype is not None else torch.float32)
            dt = _module_dtype(pot)      # an export computes in its own dtype, and torch-sim's states must match it
        self.potential = pot.eval()
        self.cutoff = float(pot.cutoff)
        self._device = dev
        self._dtype = dt
        self._compute_forces = bool(compute_forces)
        self._compute_stress = False
        self._memory_scales_with = "n_atoms_x_density"  # radial cutoff

    @ModelInterface.compute_stress.setter
    def compute_stress(self, compute_stress: bool) -> None:
        # NotImplementedError: what torch-sim's validate_model_outputs expects from a model without stress
        if compute_stress:
            raise NotImplementedError(NO_STRESS)

    def forward(self, state, **kwargs) -> Dict[str, torch.Tensor]:
        """``{"energy": (n_systems,) eV, "forces": (n_atoms, 3) eV/Å}`` of every system of ``state``."""
        if isinstance(state, dict):
            state = ts.SimState(**{"masses": torch.ones(state["positions"].shape[0], dtype=state["positions"].dtype,
                                                        device=state["positions"].device), **state})
        positions = state.positions
        dev = self._device
        numbers = state.atomic_numbers.to(dev, torch.long)
        batch = state.system_idx.to(dev, torch.long)
        cell = pbc = None
        periodic = torch.as_tensor(state.pbc, dtype=torch.bool, device=dev)
        if bool(periodic.any()):
            cell = state.row_vector_cell.to(dev)            # torch-sim stores cell vectors as columns, oreo as rows
            # torch-sim 0.3: one bool for every system and direction; also accept (3,) and (B, 3)
            pbc = periodic if periodic.dim() == 2 else periodic.expand(3).expand(cell.shape[0], 3)
        pos = positions.detach().to(dev)                  # the potential casts to its dtype; forces keep this one
        if self._compute_forces:
            with torch.enable_grad():
                out = self.potential(numbers, pos, batch, cell, pbc)
        else:
            out = self.potential(numbers, pos, batch, cell, pbc, with_reference=True, compute_forces=False)
        result = _Output(energy=out["energy"].detach().to(positions.device, positions.dtype))
        if self._compute_forces:
            result["forces"] = out["forces"].detach().to(positions.device, positions.dtype)
        return result
