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
``forcefield/train/compiled_step.py`` compiles the same traced graph, :mod:`forcefield.traced`, for training).
Inductor's element-wise kernels run on one thread (``default_inductor_configs``), GEMMs on every torch thread.
A ``.pt2`` registers with :mod:`forcefield.io`, so ``load_potential`` and the calculator load it like any model.

    export_compiled("runs/aspirin/best.pt", "aspirin.pt2")      # ~1-3 min: C++ compilation
    pot = load_compiled("aspirin.pt2")                          # needs the same torch version
    out = pot(numbers, positions)                               # {"energy": (B,) float64, "forces": (N, 3)}

Requirements: a C++ compiler at export time (g++/clang); at load time only torch (same version and
platform as the exporting one).
"""
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from .allocator import keep_freed_memory
from .graph import half_pairs
from .io import FileFormat, cast_potential, load_potential, register_file_format
from .potential import check_pair_distances, checked_batch, checked_cell, graph_sum
from .traced import (EXPORT_TOLERANCE, NO_BUFFER_REUSE, EnergyForces, check_against_eager,  # noqa: F401
                     default_inductor_configs, pairs_and_shifts, traceable)

COMPILED_FORMAT = "oreo-aoti"
COMPILED_FORMAT_VERSION = 1
METADATA_ENTRY = "oreo_metadata.json"


def _example_inputs(dtype: torch.dtype, cutoff: float, device: torch.device = torch.device("cpu")):
    """A small molecule-like example (the traced graph is shape-generic), on ``device``."""
    g = torch.Generator().manual_seed(0)
    n = 12
    numbers = torch.full((n,), 6, dtype=torch.long)
    positions = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 4.0).to(dtype)
    pairs, _ = half_pairs(positions, torch.zeros(n, dtype=torch.long), cutoff)
    return tuple(t.to(device) for t in (numbers, positions, pairs, torch.zeros(pairs.shape[1], 3, dtype=dtype)))


def trace_energy_forces(potential: nn.Module, dtype: torch.dtype = torch.float32,
                        device: torch.device = torch.device("cpu")) -> torch.fx.GraphModule:
    """``make_fx`` graph (forward + backward as plain ATen ops) with symbolic atom and pair counts, on ``device``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    if not traceable(potential):
        raise ValueError("compiling needs an eager oreo Potential (a model file or checkpoint), not a TorchScript export")
    pot = cast_potential(copy.deepcopy(potential), device, dtype).eval()    # the caller's model stays as it is
    for p in pot.parameters():
        p.requires_grad_(False)
    # a 0-dim buffer (scale, shift) becomes a 0-dim constant of the package; AOTInductor has crashed loading CUDA
    # packages holding such constants (pytorch/pytorch#172739; torch 2.13 segfaulted loading ours on an H200): hold
    # them as 1-element vectors, which broadcast the same (check_package verifies every build either way)
    for mod in pot.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.dim() == 0:
                mod._buffers[name] = buf.reshape(1)
    module = EnergyForces(pot).eval()
    example = _example_inputs(dtype, float(pot.cutoff), device)
    return make_fx(module, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example), example


def export_compiled(model: Union[str, Path, nn.Module], out: Union[str, Path], dtype: torch.dtype = torch.float32,
                    max_atoms: int = 100_000, max_pairs: int = 50_000_000,
                    inductor_configs: Optional[Dict[str, Any]] = None, device="cpu") -> Path:
    """Trace, export and AOT-compile a potential into ``out`` (``.pt2``) for ``device`` (C++ kernels for the CPU,
    Triton kernels for a GPU; a package runs on the kind of device it was built for); metadata rides along in the
    archive. A committee is refused (a ValueError: a package holds one model; compile each member instead)."""
    from torch.export import Dim

    from .committee import refuse_export
    from .devices import resolve_device
    from .version import __version__
    from .files import atomic_write

    device = resolve_device(device, "device")

    pot = load_potential(model, dtype=torch.float64) if isinstance(model, (str, Path)) else model
    refuse_export(pot, "an AOTInductor package")
    meta = json.loads(getattr(pot, "metadata_json", "{}") or "{}")
    elements = [int(z) for z in torch.nonzero(pot.known_elements).reshape(-1).tolist()]
    info = {"format": COMPILED_FORMAT, "format_version": COMPILED_FORMAT_VERSION, "oreo_version": __version__,
            "torch_version": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
            "cutoff": float(pot.cutoff),
            "elements": elements, "atomref": pot.atomref.detach().double().tolist(), "metadata": meta,
            "repulsion": getattr(pot, "_config", {}).get("repulsion"),
            "tolerance_vs_eager": EXPORT_TOLERANCE[str(dtype).replace("torch.", "")],
            "call": "pot(numbers[N], positions[N,3] Å, batch[N]=None, cell[B,3,3]=None, pbc[B,3]=None) "
                    "-> {'energy': [B] eV float64, 'forces': [N,3] eV/Å}"}
    gm, example = trace_energy_forces(pot, dtype, device)
    n = Dim("n_atoms", min=2, max=max_atoms)
    p = Dim("n_pairs", min=2, max=max_pairs)
    ep = torch.export.export(gm, example, dynamic_shapes=({0: n}, {0: n}, {1: p}, {0: p}), strict=False)
    options = default_inductor_configs()
    options.update(inductor_configs or {})
    eager = EnergyForces(cast_potential(copy.deepcopy(pot), device, dtype).eval()).eval()
    tol = EXPORT_TOLERANCE[str(dtype).replace("torch.", "")]

    def write(tmp: Path) -> None:     # the archive's root folder is named after the file: tmp has out's name
        # every build is checked against eager on the traced example before it is kept (in a separate process, see
        # check_package): a compiler bug must not reach an MD run as silently wrong forces or a crash; a failed
        # first build is rebuilt with buffer reuse off
        failures = []
        for opts in (options, {**options, **NO_BUFFER_REUSE}):
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=opts)
            problem = check_package(tmp, eager, example, tol)
            if problem is None:
                info["inductor_configs"] = {k: v for k, v in opts.items() if isinstance(v, (bool, int, float, str))}
                with zipfile.ZipFile(tmp, "a") as zf:
                    root = zf.namelist()[0].split("/")[0]
                    zf.writestr(f"{root}/extra/{METADATA_ENTRY}", json.dumps(info))
                return
            failures.append(problem)
            tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the AOTInductor build of this model does not compute what the eager model does "
                           f"(torch {torch.__version__}): {'; with buffer reuse off: '.join(failures)}. Use the eager "
                           f"model (no --compile / compiled=False)")
    return atomic_write(out, write, keep_name=True)


def check_package(package: Path, eager: nn.Module, example, tol: Dict[str, float]) -> Optional[str]:
    """None when the AOTInductor package at ``package`` gives ``eager``'s atomic energies and forces on ``example``
    within ``tol``; else the problem. The package is loaded and run in a child process: a build that crashes torch's
    loader (a CUDA package built by torch 2.13 segfaulted in ``aoti_load_package`` on an H200, 2026-12-04) is then a
    problem reported here instead of the end of the exporting process (an MD run, a test session)."""
    e, f = eager(*example)
    with tempfile.TemporaryDirectory(prefix="oreo-check-") as d:
        job = Path(d) / "check.pt"
        torch.save({"package": str(package), "device": str(example[0].device), "tol": dict(tol),
                    "example": [t.cpu() for t in example], "reference": [e.detach().cpu(), f.detach().cpu()]}, job)
        code = f"from forcefield.compiled import _check_in_this_process as c; c({str(job)!r})"
        return run_check_process([sys.executable, "-c", code])


def run_check_process(cmd, timeout: float = 900.0) -> Optional[str]:
    """Run a build check in a child process (the repository importable, the environment kept) and return the problem
    it printed as its last line (JSON ``{"problem": ...}``), or how it died."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"loading and running the package took over {timeout:.0f} s"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"loading and running the package killed the process that checked it ({name})"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return "the check of the package failed: " + ((proc.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])["problem"]


def _check_in_this_process(job_file: str) -> None:
    """The child side of :func:`check_package`."""
    job = torch.load(job_file, weights_only=False)
    device = torch.device(job["device"])
    example = [t.to(device) for t in job["example"]]
    reference = tuple(t.to(device) for t in job["reference"])
    problem = check_against_eager(torch._inductor.aoti_load_package(job["package"]), lambda *a: reference, example,
                                  job["tol"])
    print(json.dumps({"problem": problem}), flush=True)


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
    """A loaded ``.pt2``, called like :class:`~forcefield.potential.Potential` (inference only)."""

    def __init__(self, path: Union[str, Path]):
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
        device = torch.device(info.get("device", "cpu"))      # where its kernels run (packages before: the CPU)
        self.register_buffer("atomref", torch.tensor(info["atomref"], dtype=torch.float64, device=device))
        known = torch.zeros(self.atomref.shape[0], dtype=torch.bool, device=device)
        known[torch.tensor(info["elements"], dtype=torch.long, device=device)] = True
        self.register_buffer("known_elements", known)
        keep_freed_memory()   # each call's buffers reused, not handed back to the kernel: 1.47x in MD (allocator)
        self._runner = torch._inductor.aoti_load_package(str(path))

    @property
    def metadata(self) -> Dict[str, Any]:
        return json.loads(self.metadata_json)

    def forward(self, numbers: Tensor, positions: Tensor, batch: Optional[Tensor] = None,
                cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None, with_reference: bool = True,
                compute_forces: bool = True) -> Dict[str, Tensor]:
        batch, num_graphs = checked_batch(numbers, positions, batch, self.known_elements)
        cell, pbc = checked_cell(cell, pbc, num_graphs)
        n = positions.shape[0]
        pos = positions.detach().to(self.dtype)
        cell = cell.to(self.dtype) if cell is not None else None
        pairs, cart = pairs_and_shifts(pos, batch, self.cutoff, cell, pbc)
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
        energy = graph_sum(e_atom, batch, num_graphs)
        out: Dict[str, Tensor] = {}
        if compute_forces:
            out["forces"] = forces.to(positions.dtype)
        if with_reference:
            ref = graph_sum(self.atomref[numbers], batch, num_graphs)
            energy = energy.to(torch.float64) + ref
        out["energy"] = energy
        return out


def load_compiled(path: Union[str, Path]) -> CompiledPotential:
    return CompiledPotential(path).eval()


def _load_for(path, header: Dict[str, Any], device, dtype) -> CompiledPotential:
    """``load_potential`` of a ``.pt2``: its kernels were built for one kind of device, so another is an error that
    says how to get a package for it."""
    built = header.get("device", "cpu")
    wanted = torch.device(device).type
    if wanted != built:
        raise ValueError(f"{path} was compiled for {built}, not {wanted}: export the model again for it "
                         f"(oreo export MODEL -o FILE.pt2 --format aoti --device {wanted})")
    return load_compiled(path)


# a .pt2 is a model file like any other: forcefield.io.open_model_file recognises it through this entry
register_file_format(FileFormat(COMPILED_FORMAT, lambda path: read_compiled_metadata(path), _load_for))
