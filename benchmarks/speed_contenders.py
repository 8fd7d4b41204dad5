"""The speed benchmark's contenders: oreo (eager, TorchScript, compiled) and the peers, behind one interface.

A :class:`Contender` is what the workloads of :mod:`speed_harness` call: ``single(pos)``,
``forces_batched(pos, batch)``, an ASE calculator and ``train_step(k)``, all on float64 torch tensors.
Peers (TorchMD-Net, MACE, NequIP) are built from their packages' public APIs and run in their own virtual
environments (see benchmarks/README_speed.md). Random weights everywhere: speed does not depend on them.
Any other module with oreo's call signature joins with ``--contender NAME=module:factory`` (see
:func:`extra_contender`).
"""
import importlib
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

ET_CONFIG = {"name": "et", "hidden": 128, "num_layers": 6, "num_heads": 8, "num_rbf": 32, "cutoff": 5.0}
COMPILED = "oreo ET compiled"
LR = 1e-4
ENERGY_WEIGHT, FORCES_WEIGHT = 0.05, 0.95   # the training loss of every contender (oreo's defaults)


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


def make_train_step(model: torch.nn.Module, data, forward: Callable) -> Callable[[int], None]:
    """``train_step(k)``: one AdamW step of the energy + force loss on training batch ``k`` (cycled), with
    gradient clipping; ``forward(batch dict) -> (energies (B,), forces (N, 3))`` is the contender's own call.
    The same loss and optimiser for every contender."""
    z, r, e, f, batch_size = data
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    batches = _train_batches(z, r, e, f, batch_size, torch.float32)

    def train_step(k: int) -> None:
        b = batches[k % len(batches)]
        model.train()
        energy, forces = forward(b)
        loss = (ENERGY_WEIGHT * (energy.reshape(-1) - b["energy"]).pow(2).mean()
                + FORCES_WEIGHT * (forces - b["forces"]).pow(2).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    return train_step


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


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------------- oreo
def oreo_model(seed: int = 0):
    """oreo ET at the paper size with random (non-trivial) weights, float32, eval mode."""
    from forcefield.io import cast_potential
    from forcefield.potential import Potential

    torch.manual_seed(seed)
    pot = Potential(backbone=dict(ET_CONFIG), elements=[1, 6, 7, 8],
                    atomref={1: -13.6, 6: -1029.0, 7: -1485.0, 8: -2041.0})
    with torch.no_grad():
        for p in pot.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cast_potential(pot, "cpu", torch.float32).eval()


def potential_contender(name: str, module, data, train_module=None, note: str = "",
                        compiled_train: bool = False) -> Contender:
    """Any module with oreo's call signature (Potential, scripted Potential, CompiledPotential, ...).
    ``compiled_train``: train through ``optim.compile``'s compiled energy + force graph (compiled here, once)."""
    from forcefield.calculator import OreoCalculator

    zt = torch.as_tensor(data[0])
    n = len(zt)

    def single(pos):
        with torch.enable_grad():
            module(zt, pos.to(torch.float32))

    def forces_batched(pos, batch):
        with torch.enable_grad():
            out = module(zt.repeat(pos.shape[0] // n), pos.to(torch.float32), batch)
        return out["forces"].detach().to(torch.float64)

    train_step = None
    if train_module is not None:
        call = lambda b: train_module(b["numbers"], b["positions"], b["batch"], with_reference=False)  # noqa: E731
        if compiled_train:
            from forcefield.train.compiled_step import CompiledEnergyForces
            compiled = CompiledEnergyForces(train_module)
            call = lambda b: compiled(b["numbers"], b["positions"], b["batch"])  # noqa: E731

        def forward(b):
            out = call(b)
            return out["energy"], out["forces"]
        train_step = make_train_step(train_module, data, forward)
        if compiled_train:
            t = time.time()
            train_step(0)
            if compiled.failure is not None:      # it went on eagerly: a "compiled" column would be an eager one
                raise RuntimeError(f"{name}: the compiled training step fell back to eager ({compiled.failure}); "
                                   f"no compiled training number is measured")
            print(f"[compile] {name}: training graph compiled in {time.time() - t:.0f} s")
    return Contender(name, single, forces_batched, lambda: OreoCalculator(module, dtype="float32"), train_step, note)


def aoti_path(args) -> Path:
    """Where the oreo ``.pt2`` is (``--aoti PATH``) or is built (``--aoti build``: the cache folder)."""
    return Path(args.out) / "cache" / "oreo_et_6x128.pt2" if args.aoti == "build" else Path(args.aoti)


def compiled_contender(path: Path, data) -> Contender:
    """oreo at full speed: the AOTInductor ``.pt2`` for inference, ``optim.compile`` for training."""
    from forcefield.compiled import load_compiled
    return potential_contender(COMPILED, load_compiled(path), data, oreo_model(),
                               note="AOTInductor .pt2 for inference; optim.compile (torch.compile of the "
                                    "traced force graph) for training", compiled_train=True)


def extra_contender(spec: str, data) -> Contender:
    """``NAME=module:factory``: ``factory(potential)`` returns a module with oreo's call signature computing the
    same function as ``potential`` (e.g. the frozen pre-speed-work copy kept with the tests,
    ``"oreo original=tests.test_speed_equivalence:reference_of"``); timed like oreo eager, same weights."""
    name, _, target = spec.partition("=")
    module_name, _, attr = target.partition(":")
    if not name or not module_name or not attr:
        raise SystemExit(f"--contender expects NAME=module:factory, got '{spec}'")
    factory = getattr(importlib.import_module(module_name), attr)
    return potential_contender(name, factory(oreo_model()).eval(), data, factory(oreo_model()))


def oreo_contenders(args, data) -> List[Contender]:
    pot = oreo_model()
    out = [potential_contender("oreo ET eager", pot, data, oreo_model())]
    for spec in args.contender:
        out.append(extra_contender(spec, data))
    if "script" in args.oreo:
        out.append(potential_contender("oreo ET TorchScript", torch.jit.script(pot), data,
                                       torch.jit.script(oreo_model())))
    if args.aoti:
        from forcefield.compiled import export_compiled
        path = aoti_path(args)
        if args.aoti == "build" or not path.is_file():
            t = time.time()
            export_compiled(pot, path)
            print(f"[aoti] compiled {path} in {time.time() - t:.0f} s")
        out.append(compiled_contender(path, data))
    return out


# --------------------------------------------------------------------------------------------- peers
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
    zt = torch.as_tensor(data[0])
    n = len(zt)

    def single(pos):
        model(zt, pos.to(torch.float32))

    def forces_batched(pos, batch):
        _, f = model(zt.repeat(pos.shape[0] // n), pos.to(torch.float32), batch)
        return f.detach().to(torch.float64)

    def ef(pos):
        e, f = model(zt, pos.to(torch.float32))
        return float(e.detach().double().sum()), f.detach().double().numpy()

    train_step = make_train_step(train_model, data, lambda b: train_model(b["numbers"], b["positions"], b["batch"]))
    return Contender("TorchMD-Net ET", single, forces_batched, lambda: TorchCalculator(ef), train_step,
                     note="torchmd-net " + _version("torchmd-net"))


def peer_mace(args, data) -> Contender:
    """MACE (64x0e + 64x1o, max_ell 3, correlation 3, 2 interactions, 5 Å), fp32 (pip install mace-torch)."""
    from ase import Atoms
    from e3nn import o3
    from mace import data as mdata
    from mace import modules, tools
    from mace.tools import torch_geometric

    torch.set_default_dtype(torch.float32)
    z, batch_size = data[0], data[4]
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

    def graphs(pos, n_rep):
        p = pos.numpy()
        configs = [mdata.config_from_atoms(Atoms(numbers=z, positions=p[k * len(z):(k + 1) * len(z)]))
                   for k in range(n_rep)]
        ds = [mdata.AtomicData.from_config(c, z_table=table, cutoff=5.0) for c in configs]
        b = next(iter(torch_geometric.dataloader.DataLoader(ds, batch_size=len(ds), shuffle=False))).to_dict()
        b["positions"] = b["positions"].float()
        return b

    built = {}      # training batches' graphs, built once as MACE's own training does (its data loader holds them)

    def run(m, pos, n_rep, training=False):
        if not training:                  # MD: new positions every call, so the graph is built every call
            return m(graphs(pos, n_rep), training=False, compute_force=True)
        key = pos.numpy().tobytes()
        if key not in built:
            built[key] = graphs(pos, n_rep)
        b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in built[key].items()}
        return m(b, training=True, compute_force=True)

    def single(pos):
        run(model, pos, 1)

    def ef(pos):
        out = run(model, pos, 1)
        return float(out["energy"].detach().double().sum()), out["forces"].detach().double().numpy()

    def forward(b):
        out = run(train_model, b["positions"].double(), batch_size, training=True)
        return out["energy"], out["forces"]

    # batched replicas: not run. MACE's own pipeline (matscipy neighbour list on a vacuum "cell") took > 5 min
    # per 3-step block of 16 replicas here and 4.5 GB; it would dominate the run without telling anything new
    return Contender("MACE 64x0e+64x1o", single, None, lambda: TorchCalculator(ef),
                     make_train_step(train_model, data, forward),
                     note="mace-torch " + _version("mace-torch") + " (graph built by MACE's own data pipeline per call; "
                          "batched replicas not run: > 5 min per block of 16 replicas on this machine)")


NEQUIP_CONFIG = dict(num_layers=4, l_max=1, num_features=32, r_max=5.0, avg_num_neighbors=14.0)


def peer_nequip(args, data) -> List[Contender]:
    """NequIP (4 layers, l_max 1, 32 features, 5 Å), fp32, eager (pip install nequip); with
    ``--nequip-compiled FILE`` also the AOTInductor model that ``nequip-compile --mode aotinductor --target ase``
    wrote (its public route; the benchmark does not reach into NequIP's private compile modules)."""
    from ase import Atoms
    from nequip.data import AtomicDataDict, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()
    types = ["H", "C", "N", "O"]
    z, batch_size = data[0], data[4]

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

    def forward(b):
        out = train_model(batched(b["positions"].double(), batch_size))
        return out["total_energy"], out["forces"]

    cfg = ", ".join(f"{k}={v}" for k, v in NEQUIP_CONFIG.items())
    out = [Contender("NequIP eager", single, forces_batched, lambda: TorchCalculator(ef),
                     make_train_step(train_model, data, forward), note=f"nequip {_version('nequip')} ({cfg})")]
    if getattr(args, "nequip_compiled", ""):
        out.append(_nequip_compiled(Path(args.nequip_compiled), z))
    return out


def _nequip_compiled(path: Path, numbers) -> Contender:
    """A ``.nequip.pt2`` written by ``nequip-compile ... --mode aotinductor --target ase``, through NequIP's ASE
    calculator (single calls and ASE MD)."""
    from ase import Atoms
    from nequip.integrations.ase import NequIPCalculator

    atoms = Atoms(numbers=numbers, positions=np.zeros((len(numbers), 3)))
    atoms.calc = NequIPCalculator.from_compiled_model(str(path), device="cpu")

    def single(pos):
        atoms.positions = pos.numpy()
        atoms.get_forces()

    return Contender("NequIP AOTInductor", single, None,
                     lambda: NequIPCalculator.from_compiled_model(str(path), device="cpu"), None,
                     note=f"nequip-compile --mode aotinductor --target ase ({path.name})")


PEERS: Dict[str, Callable] = {"tmdnet": peer_tmdnet, "mace": peer_mace, "nequip": peer_nequip}
