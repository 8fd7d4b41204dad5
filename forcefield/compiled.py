"""Ahead-of-time compiled potentials (torch.export + AOTInductor ``.pt2``) for fast MD inference.

The energy *and* its gradient are traced together into one graph of ATen operations
(``make_fx``: the backward pass becomes ordinary forward code), exported with a dynamic number of
atoms and pairs, and compiled by AOTInductor into a shared library packaged in a ``.pt2`` file.
Inductor fuses the element-wise chains of forward and backward; there is no autograd and no Python
in the loop at run time. The neighbour search stays in eager PyTorch (it is data-dependent) and
feeds the compiled graph one direction of each pair.

Numbers: the same function as the eager :class:`~forcefield.potential.Potential` up to float
rounding: ``EXPORT_TOLERANCE`` (float64 exports: 1e-10 relative energy, 1e-9 eV/Å forces, tested in
tests/test_speed_equivalence.py; float32: ~1e-6 seen on aspirin, 1e-5 relative / 1e-4 eV/Å promised).
Inference only (no training through a compiled file; ``optim.compile`` in
``forcefield/train/compiled_step.py`` compiles the same traced graph for training). Inductor's
element-wise kernels run on one thread (``default_inductor_configs``), GEMMs on every torch thread.

    export_compiled("runs/aspirin/best.pt", "aspirin.pt2")      # ~1-3 min: C++ compilation
    pot = load_compiled("aspirin.pt2")                          # needs the same torch version
    out = pot(numbers, positions)                               # {"energy": (B,) float64, "forces": (N, 3)}

Requirements: a C++ compiler at export time (g++/clang); at load time only torch (same version and
platform as the exporting one).
"""
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .graph import NeighborCache, half_pairs, shift_vectors
from .potential import check_pair_distances, checked_batch

COMPILED_FORMAT = "oreo-aoti"
COMPILED_FORMAT_VERSION = 1
METADATA_ENTRY = "oreo_metadata.json"
# Inductor's generated element-wise kernels run on one thread; GEMMs and the rest of torch keep every
# torch thread. Measured on the 2-core benchmark machine (aspirin, ET 6x128, torch 2.13): kernels on 2
# OpenMP threads made the compiled model 2.4x slower for one molecule and 2x slower for 16 and 64
# replicas (each kernel is small: OpenMP start-up costs more than it saves). Override per call with
# ``inductor_configs={"cpp.threads": -1}`` (all torch threads) or the environment variable OREO_KERNEL_THREADS.
def default_inductor_configs(**extra: Any) -> Dict[str, Any]:
    """Inductor options oreo compiles with (AOTInductor export and ``optim.compile`` training)."""
    return {"cpp.threads": int(os.environ.get("OREO_KERNEL_THREADS", "1")), **extra}


# |compiled - eager| seen on aspirin (float32, 6x128, random weights, forces ~1 eV/Å): ~1e-6; what we promise:
EXPORT_TOLERANCE = {"float32": {"energy_rel": 1e-5, "forces_abs": 1e-4}, "float64": {"energy_rel": 1e-10, "forces_abs": 1e-9}}


class EnergyForces(nn.Module):
    """(numbers (N,), positions (N, 3), pairs (2, P), cart (P, 3)) -> (atomic energies (N,) eV, forces (N, 3) eV/Å).

    ``pairs`` holds one direction of each pair (``graph.half_pairs``), ``cart`` its Cartesian image shift
    (zeros for molecules). Atomic energies include ``scale``/``shift`` and the ZBL repulsion
    (``Potential.energy_readout``, the same code as eager) but not the reference energies.
    """

    def __init__(self, potential: nn.Module, differentiable: bool = False):
        super().__init__()
        self.potential = potential
        self.differentiable = differentiable  # True: outputs stay differentiable in the parameters (training)

    def forward(self, numbers: Tensor, positions: Tensor, pairs: Tensor, cart: Tensor) -> Tuple[Tensor, Tensor]:
        pot = self.potential
        with torch.enable_grad():
            pos = positions.detach().requires_grad_(True)
            vec = pos.index_select(0, pairs[1]) - pos.index_select(0, pairs[0]) + cart
            edge_index = torch.cat([pairs, pairs.flip(0)], dim=1)
            edge_vec = torch.cat([vec, -vec])
            x, v = pot.backbone.represent(numbers, edge_index, edge_vec, 2)
            # the repulsion is always in the traced graph (branch-free; exactly zero beyond r_off)
            e_atom = pot.energy_readout(numbers, x, v, edge_index, edge_vec, True)
            (g,) = torch.autograd.grad([e_atom.sum()], [pos], create_graph=self.differentiable)
        return (e_atom, -g) if self.differentiable else (e_atom.detach(), -g)


def pairs_and_shifts(positions: Tensor, batch: Tensor, cutoff: float, cell: Optional[Tensor] = None,
                     pbc: Optional[Tensor] = None, neighbors: Optional[NeighborCache] = None) -> Tuple[Tensor, Tensor]:
    """The inputs the traced graph takes besides numbers and positions: one direction of each pair (2, P)
    and its Cartesian image shift (P, 3) in ``positions``' dtype (zeros without periodic directions; constant
    in the cell: no stress). ``neighbors``: a Verlet cache to search with instead of a fresh search."""
    if neighbors is not None:
        pairs, shifts = neighbors(positions, batch, cell, pbc)
    else:
        pairs, shifts = half_pairs(positions, batch, cutoff, cell, pbc)
    if shifts is not None and cell is not None:
        return pairs, shift_vectors(pairs, shifts, cell.detach(), batch, positions.dtype)
    return pairs, torch.zeros(pairs.shape[1], 3, dtype=positions.dtype, device=positions.device)


def _example_inputs(dtype: torch.dtype, cutoff: float):
    """A small molecule-like example (the traced graph is shape-generic)."""
    g = torch.Generator().manual_seed(0)
    n = 12
    numbers = torch.full((n,), 6, dtype=torch.long)
    positions = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 4.0).to(dtype)
    pairs, _ = half_pairs(positions, torch.zeros(n, dtype=torch.long), cutoff)
    return numbers, positions, pairs, torch.zeros(pairs.shape[1], 3, dtype=dtype)


def trace_energy_forces(potential: nn.Module, dtype: torch.dtype = torch.float32) -> torch.fx.GraphModule:
    """``make_fx`` graph (forward + backward as plain ATen ops) with symbolic atom and pair counts."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from .io import cast_potential

    if not hasattr(potential, "backbone") or not hasattr(potential.backbone, "represent"):
        raise TypeError("compiling needs an eager oreo Potential (a model file or checkpoint), not a TorchScript export")
    pot = cast_potential(potential, "cpu", dtype).eval()
    for p in pot.parameters():
        p.requires_grad_(False)
    module = EnergyForces(pot).eval()
    example = _example_inputs(dtype, float(pot.cutoff))
    return make_fx(module, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example), example


def export_compiled(model: Union[str, Path, nn.Module], out: Union[str, Path], dtype: torch.dtype = torch.float32,
                    max_atoms: int = 100_000, max_pairs: int = 50_000_000,
                    inductor_configs: Optional[Dict[str, Any]] = None) -> Path:
    """Trace, export and AOT-compile a potential into ``out`` (``.pt2``); metadata rides along in the archive."""
    from torch.export import Dim

    from . import __version__
    from .io import load_potential

    pot = load_potential(model, dtype=torch.float64) if isinstance(model, (str, Path)) else model
    meta = json.loads(getattr(pot, "metadata_json", "{}") or "{}")
    elements = [int(z) for z in torch.nonzero(pot.known_elements).reshape(-1).tolist()]
    info = {"format": COMPILED_FORMAT, "format_version": COMPILED_FORMAT_VERSION, "oreo_version": __version__,
            "torch_version": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "cutoff": float(pot.cutoff),
            "elements": elements, "atomref": pot.atomref.detach().double().tolist(), "metadata": meta,
            "repulsion": getattr(pot, "_config", {}).get("repulsion"),
            "tolerance_vs_eager": EXPORT_TOLERANCE[str(dtype).replace("torch.", "")],
            "call": "pot(numbers[N], positions[N,3] Å, batch[N]=None, cell[B,3,3]=None, pbc[B,3]=None) "
                    "-> {'energy': [B] eV float64, 'forces': [N,3] eV/Å}"}
    gm, example = trace_energy_forces(pot, dtype)
    n = Dim("n_atoms", min=2, max=max_atoms)
    p = Dim("n_pairs", min=2, max=max_pairs)
    ep = torch.export.export(gm, example, dynamic_shapes=({0: n}, {0: n}, {1: p}, {0: p}), strict=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent)
    tmp = os.path.join(tmpdir, out.name)  # the archive's root folder is named after the file
    try:
        options = default_inductor_configs()
        options.update(inductor_configs or {})
        torch._inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs=options)
        with zipfile.ZipFile(tmp, "a") as zf:
            root = zf.namelist()[0].split("/")[0]
            zf.writestr(f"{root}/extra/{METADATA_ENTRY}", json.dumps(info))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def is_compiled_file(path: Union[str, Path]) -> bool:
    return read_compiled_metadata(path) is not None


def read_compiled_metadata(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith(f"/extra/{METADATA_ENTRY}"):
                    info = json.loads(zf.read(name))
                    return info if info.get("format") == COMPILED_FORMAT else None
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    return None


class CompiledPotential(nn.Module):
    """A loaded ``.pt2``, called like :class:`~forcefield.potential.Potential` (inference only).

    ``skin`` > 0 keeps the pair list between calls until an atom moved more than ``skin / 2`` Å
    (:class:`~forcefield.graph.NeighborCache`; exact). It pays off for large or periodic systems only.
    """

    def __init__(self, path: Union[str, Path], skin: float = 0.0):
        super().__init__()
        info = read_compiled_metadata(path)
        if info is None:
            raise ValueError(f"{path} is not an oreo compiled (.pt2) file")
        if info["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
            raise RuntimeError(f"{path} was compiled with torch {info['torch_version']}, this is torch "
                               f"{torch.__version__}; re-export it with `export_compiled` here")
        self.info = info
        self.path = str(path)
        self.dtype = getattr(torch, info["dtype"])
        self.cutoff = float(info["cutoff"])
        self.metadata_json = json.dumps(info.get("metadata", {}))
        self.register_buffer("atomref", torch.tensor(info["atomref"], dtype=torch.float64))
        known = torch.zeros(self.atomref.shape[0], dtype=torch.bool)
        known[torch.tensor(info["elements"], dtype=torch.long)] = True
        self.register_buffer("known_elements", known)
        self._runner = torch._inductor.aoti_load_package(str(path))
        self.neighbors = NeighborCache(self.cutoff, skin) if skin > 0 else None

    @property
    def metadata(self) -> Dict[str, Any]:
        return json.loads(self.metadata_json)

    def forward(self, numbers: Tensor, positions: Tensor, batch: Optional[Tensor] = None,
                cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None, with_reference: bool = True,
                compute_forces: bool = True) -> Dict[str, Tensor]:
        batch, num_graphs = checked_batch(numbers, positions, batch, self.known_elements)
        n = positions.shape[0]
        pos = positions.detach().to(self.dtype)
        cell = cell.to(self.dtype) if cell is not None else None
        pairs, cart = pairs_and_shifts(pos, batch, self.cutoff, cell, pbc, self.neighbors)
        check_pair_distances(pairs, pos.index_select(0, pairs[1]) - pos.index_select(0, pairs[0]) + cart, batch)
        nums = numbers
        if n < 2 or pairs.shape[1] < 2:  # the graph is compiled for >= 2 atoms and pairs: pad with inert ones
            pad_atoms = max(0, 2 - n)
            if pad_atoms:
                far = (pos.abs().max() if n else pos.new_zeros(())) + 10.0 * self.cutoff
                pos = torch.cat([pos, far + pos.new_tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 3.0 * self.cutoff]])[:pad_atoms]])
                nums = torch.cat([numbers, numbers.new_full((pad_atoms,), int(self.info["elements"][0]))])
            k = 2 - pairs.shape[1] if pairs.shape[1] < 2 else 0
            if k:  # self-pairs of atom 0 shifted beyond the cutoff: cutoff factor exactly 0
                pairs = torch.cat([pairs, pairs.new_zeros(2, k)], dim=1)
                cart = torch.cat([cart, cart.new_tensor([[2.0 * self.cutoff, 0.0, 0.0]]).expand(k, 3)])
        e_atom, forces = self._runner(nums, pos, pairs, cart)
        e_atom, forces = e_atom[:n], forces[:n]
        energy = torch.zeros(num_graphs, dtype=e_atom.dtype).index_add_(0, batch, e_atom)
        out: Dict[str, Tensor] = {}
        if compute_forces:
            out["forces"] = forces.to(positions.dtype)
        if with_reference:
            ref = torch.zeros(num_graphs, dtype=torch.float64).index_add_(0, batch, self.atomref[numbers])
            energy = energy.to(torch.float64) + ref
        out["energy"] = energy
        return out


def load_compiled(path: Union[str, Path], skin: float = 0.0) -> CompiledPotential:
    return CompiledPotential(path, skin=skin).eval()
