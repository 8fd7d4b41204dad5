#!/usr/bin/env python
"""Side-by-side speed benchmark: oreo ET against the original oreo code and the installed peers.

Measures, in one run and interleaved (round-robin blocks, the order rotated every round, so load
drift hits every contender alike), medians over the blocks:

  (a) single    one energy + forces call on aspirin (21 atoms), ms
  (b) ase-md    ASE Langevin MD, ms per step (ASE calculator, 0.5 fs, 300 K; fp32 model, fp64 integration)
  (c) batched   R replicas of aspirin in one batched model call per step, BAOAB Langevin in float64
                torch code shared by all contenders: atom-steps per second
  (d) train     energy + force training steps (batch of B rMD17 aspirin frames, AdamW, grad clipping): samples/s

Contenders: oreo ET at the paper size (6 layers x 128, 8 heads, 32 rbf, 5 Å) — eager, TorchScript, and
AOTInductor (``--aoti``) — plus "oreo original" (the code before the speed work, a frozen copy kept in
tests/test_speed_equivalence.py, same weights). Peers run in their own virtual environments (they
conflict with each other): each peer worker process times the peer *and* oreo eager interleaved, so
every peer ratio comes from one process; see benchmarks/README_speed.md for installing them.

    python benchmarks/speed.py --threads 2 --aoti build \
        --peer tmdnet=/tmp/peers-tmdnet/bin/python --peer mace=/tmp/peers-mace/bin/python \
        --peer nequip=/tmp/peers-nequip/bin/python

Writes ``<out>/speed.md`` (markdown table), ``<out>/speed.json`` and ``<out>/speed.png``.
Random weights everywhere (speed does not depend on them).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

KCAL = 0.0433641153087705  # eV per kcal/mol
ET_CONFIG = {"name": "et", "hidden": 128, "num_layers": 6, "num_heads": 8, "num_rbf": 32, "cutoff": 5.0}
WORKLOADS = ("single", "ase-md", "batched", "train")
COMPILED = "oreo ET compiled"
UNITS = {"single": "ms/call", "ase-md": "ms/step", "batched": "atom-steps/s", "train": "samples/s"}


# --------------------------------------------------------------------------------------------- data
def data_dir() -> Path:
    env = os.environ.get("OREO_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def aspirin(n_frames: int = 64):
    """Numbers (N,), positions (F, N, 3) Å, energies (F,) eV, forces (F, N, 3) eV/Å from rMD17 (or a fallback)."""
    path = data_dir() / "rmd17" / "rmd17_aspirin_train_01.npz"
    if path.is_file():
        d = np.load(path)
        z = d["nuclear_charges"].astype(np.int64)
        r = d["coords"][:n_frames].astype(np.float64)
        e = d["energies"][:n_frames].astype(np.float64) * KCAL
        f = d["forces"][:n_frames].astype(np.float64) * KCAL
        return z, r, e - e.mean(), f
    from ase.build import molecule  # fallback: no labels of value, same size class
    a = molecule("CH3CH2OH")
    rng = np.random.default_rng(0)
    r = a.positions[None] + 0.05 * rng.standard_normal((n_frames, len(a), 3))
    return a.numbers.astype(np.int64), r, np.zeros(n_frames), np.zeros_like(r)


# --------------------------------------------------------------------------------------------- contenders
class Contender:
    """What a benchmark needs from a model: callables that take float64 torch tensors.

    single(pos (N,3)) -> None; forces_batched(pos (R*N,3), batch (R*N,)) -> forces float64;
    ase_calculator() -> ASE calculator; train_step(k) -> None (one optimizer step on batch k).
    """

    def __init__(self, name: str, single: Callable, forces_batched: Optional[Callable],
                 ase_calculator: Optional[Callable], train_step: Optional[Callable], note: str = ""):
        self.name, self.single, self.forces_batched = name, single, forces_batched
        self.ase_calculator, self.train_step, self.note = ase_calculator, train_step, note


def _train_batches(z, r, e, f, batch_size: int, dtype):
    out = []
    for s in range(0, len(r) - batch_size + 1, batch_size):
        n = len(z)
        out.append(dict(
            numbers=torch.as_tensor(np.tile(z, batch_size)),
            positions=torch.as_tensor(r[s:s + batch_size].reshape(-1, 3), dtype=dtype),
            batch=torch.arange(batch_size).repeat_interleave(n),
            energy=torch.as_tensor(e[s:s + batch_size], dtype=dtype),
            forces=torch.as_tensor(f[s:s + batch_size].reshape(-1, 3), dtype=dtype)))
    return out


def _oreo_model(seed: int = 0):
    from forcefield.io import cast_potential
    from forcefield.potential import Potential

    torch.manual_seed(seed)
    pot = Potential(backbone=dict(ET_CONFIG), elements=[1, 6, 7, 8],
                    atomref={1: -13.6, 6: -1029.0, 7: -1485.0, 8: -2041.0})
    with torch.no_grad():
        for p in pot.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cast_potential(pot, "cpu", torch.float32).eval()


def _potential_contender(name: str, module, z, data, train_module=None, note: str = "",
                         compiled_train: bool = False) -> Contender:
    """Any module with oreo's call signature (Potential, scripted Potential, CompiledPotential, reference).
    ``compiled_train``: train through ``optim.compile``'s compiled energy + force graph (compiled here, once)."""
    from forcefield.calculator import OreoCalculator

    zt = torch.as_tensor(z)
    n = len(z)

    def single(pos):
        with torch.enable_grad():
            module(zt, pos.to(torch.float32))

    def forces_batched(pos, batch):
        with torch.enable_grad():
            out = module(zt.repeat(pos.shape[0] // n), pos.to(torch.float32), batch)
        return out["forces"].detach().to(torch.float64)

    train_step = None
    if train_module is not None:
        opt = torch.optim.AdamW(train_module.parameters(), lr=1e-4)
        batches = _train_batches(*data, dtype=torch.float32)
        forward = lambda b: train_module(b["numbers"], b["positions"], b["batch"], with_reference=False)  # noqa: E731
        if compiled_train:
            from forcefield.train.compiled_step import CompiledEnergyForces
            compiled = CompiledEnergyForces(train_module)
            forward = lambda b: compiled(b["numbers"], b["positions"], b["batch"])  # noqa: E731

        def train_step(k):
            b = batches[k % len(batches)]
            train_module.train()
            out = forward(b)
            loss = 0.05 * (out["energy"] - b["energy"]).pow(2).mean() + 0.95 * (out["forces"] - b["forces"]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train_module.parameters(), 10.0)
            opt.step()

    if compiled_train:
        t = time.time()
        train_step(0)
        print(f"[compile] {name}: training graph compiled in {time.time() - t:.0f} s")
    return Contender(name, single, forces_batched, lambda: OreoCalculator(module, dtype="float32"), train_step, note)


def oreo_contenders(args, data) -> List[Contender]:
    z = data[0]
    batch_size = args.train_batch
    out = []
    pot = _oreo_model()
    train_pot = _oreo_model()
    out.append(_potential_contender("oreo ET eager", pot, z, data, train_pot))
    if "original" in args.oreo:
        try:
            from tests.test_speed_equivalence import reference_of
            ref = reference_of(pot).eval()
            ref_train = reference_of(train_pot)
            out.append(_potential_contender("oreo original (before speed work)", ref, z, data,
                                            ref_train))
        except ImportError as exc:
            print(f"[skip] oreo original: {exc}")
    if "script" in args.oreo:
        scripted = torch.jit.script(pot)
        out.append(_potential_contender("oreo ET TorchScript", scripted, z, data,
                                        torch.jit.script(_oreo_model())))
    if args.aoti:
        from forcefield.compiled import export_compiled
        path = aoti_path(args)
        if args.aoti == "build" or not path.is_file():
            t = time.time()
            export_compiled(pot, path)
            print(f"[aoti] compiled {path} in {time.time() - t:.0f} s")
        out.append(compiled_contender(path, data))
    return out


def aoti_path(args) -> Path:
    """Where the oreo ``.pt2`` is (``--aoti PATH``) or is built (``--aoti build``: the cache folder)."""
    return Path(args.out) / "cache" / "oreo_et_6x128.pt2" if args.aoti == "build" else Path(args.aoti)


def compiled_contender(path: Path, data) -> Contender:
    """oreo at full speed: the AOTInductor ``.pt2`` for inference, ``optim.compile`` for training."""
    from forcefield.compiled import load_compiled
    return _potential_contender("oreo ET compiled", load_compiled(path), data[0], data, _oreo_model(),
                                note="AOTInductor .pt2 for inference; optim.compile (torch.compile of the "
                                     "traced force graph) for training", compiled_train=True)


def _with_batch(data, batch_size):
    return data + (batch_size,)


# ------------------------------------------------------------------------------------------------ peers
def peer_tmdnet(args, data) -> Contender:
    """TorchMD-Net equivariant transformer at oreo's hyperparameters (pip install torchmd-net)."""
    from torchmdnet.models.model import create_model

    def build():
        torch.manual_seed(0)
        return create_model(dict(
            model="equivariant-transformer", embedding_dimension=128, num_layers=6, num_rbf=32, rbf_type="expnorm",
            trainable_rbf=False, activation="silu", attn_activation="silu", num_heads=8, distance_influence="both",
            neighbor_embedding=True, cutoff_lower=0.0, cutoff_upper=5.0, max_z=100, max_num_neighbors=64,
            precision=32, derivative=True, atom_filter=-1, prior_model=None, output_model="Scalar",
            reduce_op="add", vector_cutoff=False))

    model = build().eval()
    train_model = build()
    z, _, _, _, batch_size = data
    zt = torch.as_tensor(z)
    n = len(z)

    def single(pos):
        model(zt, pos.to(torch.float32))

    def forces_batched(pos, batch):
        _, f = model(zt.repeat(pos.shape[0] // n), pos.to(torch.float32), batch)
        return f.detach().to(torch.float64)

    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
    batches = _train_batches(*data[:4], batch_size, torch.float32)

    def train_step(k):
        b = batches[k % len(batches)]
        train_model.train()
        e, f = train_model(b["numbers"], b["positions"], b["batch"])
        loss = 0.05 * (e.squeeze(-1) - b["energy"]).pow(2).mean() + 0.95 * (f - b["forces"]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_model.parameters(), 10.0)
        opt.step()

    return Contender("TorchMD-Net ET", single, forces_batched, lambda: TorchCalculator(single_ef(model, zt)),
                     train_step, note="torchmd-net " + _version("torchmd-net"))


def single_ef(model, zt):
    def ef(pos):
        e, f = model(zt, pos.to(torch.float32))
        return float(e.detach().double().sum()), f.detach().double().numpy()
    return ef


class TorchCalculator:
    """Minimal ASE calculator around ``ef(positions float64 tensor) -> (energy, forces ndarray)``."""

    def __new__(cls, ef):
        from ase.calculators.calculator import Calculator, all_changes

        class _Calc(Calculator):
            implemented_properties = ["energy", "free_energy", "forces"]

            def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
                super().calculate(atoms, properties, system_changes)
                e, f = ef(torch.as_tensor(self.atoms.positions, dtype=torch.float64))
                self.results = {"energy": e, "free_energy": e, "forces": f}

        return _Calc()


def peer_mace(args, data) -> Contender:
    """MACE (64x0e + 64x1o, max_ell 3, correlation 3, 2 interactions, 5 Å), fp32 (pip install mace-torch)."""
    from e3nn import o3
    from mace import data as mdata
    from mace import modules, tools

    torch.set_default_dtype(torch.float32)
    z, r, e, f, batch_size = data
    table = tools.AtomicNumberTable([1, 6, 7, 8])

    def build():
        torch.manual_seed(0)
        return modules.ScaleShiftMACE(
            r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=2, num_elements=4, hidden_irreps=o3.Irreps("64x0e+64x1o"), MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.zeros(4), avg_num_neighbors=14.0, atomic_numbers=table.zs, correlation=3,
            gate=torch.nn.functional.silu, atomic_inter_scale=1.0, atomic_inter_shift=0.0).float()

    model = build().eval()
    train_model = build()
    from ase import Atoms

    def graph(pos_np, n_rep):
        configs = []
        for k in range(n_rep):
            at = Atoms(numbers=z, positions=pos_np[k * len(z):(k + 1) * len(z)])
            configs.append(mdata.config_from_atoms(at))
        ds = [mdata.AtomicData.from_config(c, z_table=table, cutoff=5.0) for c in configs]
        from mace.tools import torch_geometric
        return next(iter(torch_geometric.dataloader.DataLoader(ds, batch_size=len(ds), shuffle=False)))

    def run(m, pos, n_rep, training=False):
        b = graph(pos.numpy(), n_rep).to_dict()
        b["positions"] = b["positions"].float()
        out = m(b, training=training, compute_force=True)
        return out

    def single(pos):
        run(model, pos, 1)

    def ef(pos):
        out = run(model, pos, 1)
        return float(out["energy"].detach().double().sum()), out["forces"].detach().double().numpy()

    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
    batches = _train_batches(z, r, e, f, batch_size, torch.float32)

    def train_step(k):
        bt = batches[k % len(batches)]
        train_model.train()
        out = run(train_model, bt["positions"].double(), batch_size, training=True)
        loss = 0.05 * (out["energy"] - bt["energy"]).pow(2).mean() + 0.95 * (out["forces"] - bt["forces"]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_model.parameters(), 10.0)
        opt.step()

    # batched replicas: not run. MACE's own pipeline (matscipy neighbour list on a vacuum "cell") took > 5 min
    # per 3-step block of 16 replicas here and 4.5 GB; it would dominate the run without telling anything new
    return Contender("MACE 64x0e+64x1o", single, None, lambda: TorchCalculator(ef), train_step,
                     note="mace-torch " + _version("mace-torch") + " (graph built by MACE's own data pipeline per call; "
                          "batched replicas not run: > 5 min per block of 16 replicas on this machine)")


NEQUIP_CONFIG = dict(num_layers=4, l_max=1, num_features=32, r_max=5.0, avg_num_neighbors=14.0)


def peer_nequip(args, data) -> List[Contender]:
    """NequIP (4 layers, l_max 1, 32 features, 5 Å), fp32, eager and AOTInductor (pip install nequip)."""
    from ase import Atoms
    from nequip.data import AtomicDataDict, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()
    types = ["H", "C", "N", "O"]
    z, r, e, f, batch_size = data

    def build():
        return NequIPGNNModel(seed=0, model_dtype="float32", type_names=types, **NEQUIP_CONFIG)

    model = build().eval()
    train_model = build()
    tf = [ChemicalSpeciesToAtomTypeMapper(model_type_names=types,
                                          chemical_species_to_atom_type_map={t: t for t in types}),
          NeighborListTransform(r_max=NEQUIP_CONFIG["r_max"])]

    def to_data(pos_np):
        d = from_ase(Atoms(numbers=z, positions=pos_np))
        for t in tf:
            d = t(d)
        return d

    def batched(pos, n_rep):
        p = pos.numpy()
        return AtomicDataDict.batched_from_list([to_data(p[k * len(z):(k + 1) * len(z)]) for k in range(n_rep)])

    def single(pos):
        model(to_data(pos.numpy()))

    def forces_batched(pos, batch):
        return model(batched(pos, pos.shape[0] // len(z)))["forces"].detach().double()

    def ef(pos):
        out = model(to_data(pos.numpy()))
        return float(out["total_energy"].detach().double().sum()), out["forces"].detach().double().numpy()

    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
    batches = _train_batches(z, r, e, f, batch_size, torch.float32)

    def train_step(k):
        bt = batches[k % len(batches)]
        train_model.train()
        out = train_model(batched(bt["positions"].double(), batch_size))
        loss = (0.05 * (out["total_energy"].reshape(-1) - bt["energy"]).pow(2).mean()
                + 0.95 * (out["forces"] - bt["forces"]).pow(2).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_model.parameters(), 10.0)
        opt.step()

    cfg = ", ".join(f"{k}={v}" for k, v in NEQUIP_CONFIG.items())
    out = [Contender("NequIP eager", single, forces_batched, lambda: TorchCalculator(ef), train_step,
                     note=f"nequip {_version('nequip')} ({cfg})")]
    cache = Path(args.json).parent  # the worker JSON lives in the cache folder
    # as nequip-compile builds it (Inductor kernels on all torch threads), and with oreo's one-thread kernels
    for kernel_threads, file in ((None, "nequip_ase.nequip.pt2"), (1, "nequip_ase_kernels1.nequip.pt2")):
        try:
            out.append(_nequip_aoti(model, tf, cache / file, z, kernel_threads))
        except Exception as exc:
            print(f"[nequip] AOTInductor compile failed ({file}): {type(exc).__name__}: {exc}")
    return out


def _nequip_aoti(model, transforms, path: Path, numbers, kernel_threads: Optional[int] = None) -> Contender:
    """``nequip-compile --mode aotinductor --target ase`` done in-process on the in-memory model;
    ``kernel_threads`` sets Inductor's ``cpp.threads`` (None: nequip's default)."""
    from ase import Atoms
    import nequip.scripts.compile as nc
    from nequip.integrations.ase import NequIPCalculator
    from nequip.scripts._compile_utils import COMPILE_TARGET_DICT
    from nequip.utils.aot import aot_export_model
    from nequip.utils.aoti_metadata import NEQUIP_AOTI_INPUTS_KEY, NEQUIP_AOTI_OUTPUTS_KEY, serialize_aoti_keys
    from nequip.data import from_ase
    from nequip.utils.global_state import get_latest_global_state

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        meta = dict(model.metadata)
        meta.update(get_latest_global_state(only_metadata_related=True))
        meta = {k: str(int(v)) if isinstance(v, bool) else v for k, v in meta.items()}
        target = COMPILE_TARGET_DICT["ase"]
        # a (non-periodic) box: nequip's compile check compares the stress too, which is NaN without a cell
        example = from_ase(Atoms(numbers=numbers, positions=np.arange(len(numbers))[:, None] * np.array([[1.1, 0.3, 0.0]]),
                                 cell=[40.0, 40.0, 40.0], pbc=False))
        for transform in transforms:
            example = transform(example)
        batch_map = target["batch_map_settings"]({"graph": torch.export.Dim.STATIC,
                                                   "node": nc._parse_bounds_to_Dim("num_nodes", "2,inf"),
                                                   "edge": nc._parse_bounds_to_Dim("num_edges", "2,inf")})
        meta[NEQUIP_AOTI_INPUTS_KEY] = serialize_aoti_keys(target["input"])
        meta[NEQUIP_AOTI_OUTPUTS_KEY] = serialize_aoti_keys(target["output"])
        aot_export_model(model=model, device="cpu", input_fields=target["input"], output_fields=target["output"],
                         data=target["data_settings"](example),
                         batch_map=batch_map, output_path=str(path),
                         inductor_configs={nc._AOT_METADATA_KEY: {k: str(v) for k, v in meta.items()},
                                           **({} if kernel_threads is None else {"cpp.threads": kernel_threads})},
                         seed=nc._COMPILE_SEED)
        print(f"[nequip] AOTInductor compiled in {time.time() - t:.0f} s")
    calc = NequIPCalculator.from_compiled_model(str(path), device="cpu")
    atoms = Atoms(numbers=numbers, positions=np.zeros((len(numbers), 3)))
    atoms.calc = calc

    def single(pos):
        atoms.positions = pos.numpy()
        atoms.get_forces()

    name = "NequIP AOTInductor" + ("" if kernel_threads is None else f" (cpp.threads={kernel_threads})")
    return Contender(name, single, None,
                     lambda: NequIPCalculator.from_compiled_model(str(path), device="cpu"), None,
                     note="nequip-compile --mode aotinductor --target ase (in-process)"
                          + ("" if kernel_threads is None else f", Inductor cpp.threads={kernel_threads}"))


PEERS = {"tmdnet": peer_tmdnet, "mace": peer_mace, "nequip": peer_nequip}


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------------- timing
def interleaved(contenders: List[Contender], fn: Callable[[Contender, int], float], rounds: int,
                warmup: int = 2) -> Dict[str, List[float]]:
    """Round-robin: each round runs ``fn(c, k)`` (returns seconds per unit) for every contender, rotating
    the order; the first ``warmup`` rounds are dropped."""
    times: Dict[str, List[float]] = {c.name: [] for c in contenders}
    for k in range(rounds + warmup):
        order = contenders[k % len(contenders):] + contenders[:k % len(contenders)]
        for c in order:
            dt = fn(c, k)
            if k >= warmup and dt is not None:
                times[c.name].append(dt)
    return times


def bench_single(contenders, data, rounds, per_block=5):
    z, r = data[0], data[1]
    pos = [torch.as_tensor(x) for x in r]

    def fn(c, k):
        t = time.perf_counter()
        for m in range(per_block):
            c.single(pos[(k * per_block + m) % len(pos)])
        return (time.perf_counter() - t) / per_block
    return interleaved(contenders, fn, rounds)


def check_not_exploded(name: str, x, x0, max_shift: float = 0.5) -> None:
    """A few MD steps move no atom by more than ``max_shift`` Å; otherwise the timing measured a broken
    geometry (atoms flown apart have no neighbours and cost nothing) and is refused."""
    shift = float((x - x0).norm(dim=-1).max())
    if not shift < max_shift:
        raise RuntimeError(f"{name}: an atom moved {shift:.3g} Å in one timing block; the MD is not physical "
                           f"(units or forces broken), so its timing would be meaningless")


def bench_ase_md(contenders, data, rounds, per_block=5):
    from ase import Atoms, units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    z, r = data[0], data[1]
    dyn, start = {}, {}
    for c in contenders:
        if c.ase_calculator is None:
            continue
        atoms = Atoms(numbers=z, positions=r[0])
        atoms.calc = c.ase_calculator()
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0), force_temp=True)
        start[c.name] = (atoms.positions.copy(), atoms.get_momenta().copy())
        dyn[c.name] = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, fixcm=False,
                               rng=np.random.default_rng(1))

    def fn(c, k):
        if c.name not in dyn:
            return None
        d = dyn[c.name]
        # every block starts from the same state: random-weight models must not drift to exploded geometries
        d.atoms.positions = start[c.name][0].copy()
        d.atoms.set_momenta(start[c.name][1].copy())
        t = time.perf_counter()
        d.run(per_block)
        dt_block = time.perf_counter() - t
        check_not_exploded(c.name, torch.as_tensor(d.atoms.positions), torch.as_tensor(start[c.name][0]))
        return dt_block / per_block
    return interleaved(contenders, fn, rounds)


MVV2E = 103.6427  # eV per amu Å²/fs² (velocities here are in Å/fs)


def bench_batched(contenders, data, rounds, replicas, per_block=3):
    """BAOAB Langevin (float64) of ``replicas`` aspirin copies; one batched model call per step."""
    from ase.data import atomic_masses

    z, r = data[0], data[1]
    n = len(z)
    g = torch.Generator().manual_seed(0)
    pos0 = torch.as_tensor(np.concatenate([r[k % len(r)] for k in range(replicas)]), dtype=torch.float64)
    batch = torch.arange(replicas).repeat_interleave(n)
    mass = torch.as_tensor(atomic_masses[np.tile(z, replicas)], dtype=torch.float64).unsqueeze(1)
    dt, gamma, kT = 0.5, 0.01, 8.617333e-5 * 300.0
    c1 = math.exp(-gamma * dt)
    c2 = torch.sqrt((1 - c1 ** 2) * kT / (mass * MVV2E))
    state = {}
    for c in contenders:
        if c.forces_batched is None:
            continue
        v = torch.randn(pos0.shape, generator=g, dtype=torch.float64) * torch.sqrt(kT / (mass * MVV2E))
        state[c.name] = [pos0.clone(), v, c.forces_batched(pos0, batch)]

    def step(c):
        x, v, f = state[c.name]
        v = v + 0.5 * dt * f / (mass * MVV2E)
        x = x + 0.5 * dt * v
        v = c1 * v + c2 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        x = x + 0.5 * dt * v
        f = c.forces_batched(x, batch)
        v = v + 0.5 * dt * f / (mass * MVV2E)
        state[c.name] = [x, v, f]

    initial = {name: list(st) for name, st in state.items()}

    def fn(c, k):
        if c.name not in state:
            return None
        state[c.name] = list(initial[c.name])  # same start every block (random weights: no exploded geometries)
        t = time.perf_counter()
        for _ in range(per_block):
            step(c)
        dt_block = time.perf_counter() - t
        check_not_exploded(c.name, state[c.name][0], initial[c.name][0])
        return dt_block / per_block / (replicas * n)  # seconds per atom-step
    return interleaved(contenders, fn, rounds)


def bench_train(contenders, data, rounds, per_block=2):
    batch_size = data[4]

    def fn(c, k):
        if c.train_step is None:
            return None
        t = time.perf_counter()
        for m in range(per_block):
            c.train_step(k * per_block + m)
        return (time.perf_counter() - t) / per_block / batch_size  # seconds per sample
    return interleaved(contenders, fn, rounds)


def run_all(contenders, data, args) -> Dict[str, Dict[str, Dict[str, float]]]:
    res: Dict[str, Dict[str, Dict[str, float]]] = {}
    runners = {"single": lambda: bench_single(contenders, data, args.rounds),
               "ase-md": lambda: bench_ase_md(contenders, data, args.rounds),
               "batched": lambda: bench_batched(contenders, data, max(4, args.rounds // 2), args.replicas),
               "train": lambda: bench_train(contenders, data, max(4, args.rounds // 2))}
    for w in args.workloads:
        t = time.time()
        times = runners[w]()
        for name, ts in times.items():
            if not ts:
                continue
            med = float(np.median(ts))
            q1, q3 = (float(x) for x in np.percentile(ts, [25, 75]))
            if w in ("single", "ase-md"):
                value, lo, hi = med * 1e3, q1 * 1e3, q3 * 1e3
            else:  # rates: invert per-unit times
                value, lo, hi = 1.0 / med, 1.0 / q3, 1.0 / q1
            res.setdefault(name, {})[w] = {"median": value, "q1": lo, "q3": hi, "n": len(ts)}
        print(f"[{w}] {time.time() - t:.0f} s: " + ", ".join(
            f"{k}={v[w]['median']:.4g}" for k, v in res.items() if w in v), flush=True)
    return res


# --------------------------------------------------------------------------------------------- report
def report(results: Dict, args, out: Path) -> None:
    base = "oreo ET eager"
    st = results.get("settings") or {"threads": args.threads, "rounds": args.rounds, "replicas": args.replicas,
                                     "train_batch": args.train_batch, "command": " ".join(sys.argv),
                                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [f"# oreo speed benchmark\n",
             f"aspirin (21 atoms), {st['threads']} thread(s), {st['rounds']} interleaved rounds, medians "
             f"(IQR in brackets); batched: {st['replicas']} replicas; train: batch {st['train_batch']}.  ",
             f"torch {st['torch']}, {st['date']}, command: `{st['command']}`\n"]
    groups = results["groups"]
    for gname, res in groups.items():
        lines.append(f"\n## {gname}\n")
        names = list(res)
        lines.append("| contender | " + " | ".join(f"{w} ({UNITS[w]})" for w in WORKLOADS) + " |")
        lines.append("|---|" + "---|" * len(WORKLOADS))
        for name in names:
            cells = []
            for w in WORKLOADS:
                v = res[name].get(w)
                cells.append("—" if v is None else f"{v['median']:.4g} [{v['q1']:.3g}–{v['q3']:.3g}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for ref in (base, COMPILED):
            if ref not in res:
                continue
            lines.append("")
            lines.append(f"Ratios in this group (same process): time ratio for single/ase-md "
                         f"(contender / {ref}; < 1 is faster than {ref}), throughput ratio for batched/train "
                         f"(contender / {ref}; > 1 is faster).\n")
            lines.append("| contender | " + " | ".join(WORKLOADS) + " |")
            lines.append("|---|" + "---|" * len(WORKLOADS))
            for name in names:
                cells = []
                for w in WORKLOADS:
                    a, b = res[name].get(w), res[ref].get(w)
                    cells.append("—" if a is None or b is None else f"{a['median'] / b['median']:.3f}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for note in results.get("notes", []):
        lines.append(f"\n- {note}")
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    (out / "speed.json").write_text(json.dumps(results, indent=1))
    try:
        plot(groups, out / "speed.png")
    except Exception as exc:  # matplotlib missing or headless trouble: the table is what matters
        print(f"[plot] skipped: {exc}")
    print("\n".join(lines))


def plot(groups: Dict, path: Path) -> None:
    """Bars relative to oreo ET eager measured in the same process (absolute times drift between processes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = "oreo ET eager"
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(4.4 * len(WORKLOADS), 4.2))
    for ax, w in zip(axes, WORKLOADS):
        labels, vals = [], []
        for gname, res in groups.items():
            if base not in res or w not in res[base]:
                continue
            for name, v in res.items():
                if w in v and (gname == "oreo" or not name.startswith("oreo")):
                    labels.append(name)
                    vals.append(v[w]["median"] / res[base][w]["median"])
        if not vals:
            ax.set_visible(False)
            continue
        y = np.arange(len(vals))
        colors = ["tab:orange" if lab.startswith("oreo") else "tab:blue" for lab in labels]
        ax.barh(y, vals, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        better = "lower is better" if w in ("single", "ase-md") else "higher is better"
        ax.set_title(f"{w}: {UNITS[w]} / oreo ET eager\n(same process; {better})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------- main
def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def worker(args) -> None:
    """Run inside a peer's environment: the peer, oreo eager and (with --aoti PATH) oreo compiled, interleaved;
    JSON to --json."""
    set_threads(args.threads)
    data = _with_batch(aspirin(), args.train_batch)
    contenders = []
    try:
        got = PEERS[args.worker](args, data)
        contenders.extend(got if isinstance(got, list) else [got])
    except Exception as exc:
        Path(args.json).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    pot, train_pot = _oreo_model(), _oreo_model()
    contenders.insert(0, _potential_contender("oreo ET eager", pot, data[0], data, train_pot))
    if args.aoti and Path(args.aoti).is_file():  # the main process's .pt2: compiled oreo in the same process too
        contenders.insert(1, compiled_contender(Path(args.aoti), data))
    res = run_all(contenders, data, args)
    peers = [c for c in contenders if not c.name.startswith("oreo")]
    Path(args.json).write_text(json.dumps({"results": res, "note": "; ".join(c.note for c in peers if c.note)}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds per workload (medians over them)")
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--oreo", default="original,script", help="extra oreo contenders: original,script")
    ap.add_argument("--aoti", default="", help="'build' (compile now, ~2 min) or a path to an exported .pt2")
    ap.add_argument("--peer", action="append", default=[],
                    help="NAME=PYTHON: run peer NAME (tmdnet, mace) with that interpreter (its venv)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--report", default="", help="rewrite speed.md/png from an existing speed.json (no timing)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.oreo = [x for x in args.oreo.split(",") if x]
    if args.worker:
        return worker(args)
    if args.report:
        return report(json.loads(Path(args.report).read_text()), args, Path(args.out))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(args.threads)
    data = _with_batch(aspirin(), args.train_batch)
    results = {"groups": {}, "notes": [], "threads": args.threads,
               "settings": {"threads": args.threads, "rounds": args.rounds, "replicas": args.replicas,
                            "train_batch": args.train_batch, "command": " ".join(sys.argv),
                            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}}
    print(f"== oreo contenders ({args.threads} threads)", flush=True)
    results["groups"]["oreo"] = run_all(oreo_contenders(args, data), data, args)
    for spec in args.peer:
        name, _, python = spec.partition("=")
        if name not in PEERS:
            results["notes"].append(f"peer '{name}' unknown (known: {', '.join(PEERS)}); skipped")
            continue
        if not python or not Path(python).exists():
            results["notes"].append(f"peer '{name}': interpreter '{python}' not found; skipped "
                                    f"(see benchmarks/README_speed.md to install it)")
            continue
        print(f"== peer {name} ({python})", flush=True)
        js = out / "cache" / f"peer_{name}.json"  # worker output, merged into speed.json
        js.parent.mkdir(parents=True, exist_ok=True)
        cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--json", str(js),
               "--threads", str(args.threads), "--rounds", str(args.rounds), "--replicas", str(args.replicas),
               "--train-batch", str(args.train_batch), "--workloads", ",".join(args.workloads)]
        if args.aoti:
            cmd += ["--aoti", str(aoti_path(args))]
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: e3nn 0.4.x (pinned by mace-torch) torch.load()s its own constants.pt,
        # which torch >= 2.6 refuses by default
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, env=env)
        info = json.loads(js.read_text()) if js.is_file() else {}
        if proc.returncode != 0 or "results" not in info:
            results["notes"].append(f"peer '{name}' failed: {info.get('error', f'exit code {proc.returncode}')}; skipped")
            continue
        results["groups"][f"peer: {name}"] = info["results"]
        results["notes"].append(f"peer '{name}': {info.get('note', '')}")
    report(results, args, out)


if __name__ == "__main__":
    main()
