"""The optimised model computes the same function as the original one.

``_Ref*`` below is a frozen copy of the math of ``forcefield/models/{et,layers,heads}.py``,
``forcefield/graph.py`` and ``Potential.forward`` as they were before the speed work (commit
42d352f). Module and parameter names are identical, so a reference model loads the optimised
model's state dict as is. Energies and forces must agree to ~1e-10 (float64); the optimised
code may sum in another order, nothing else.
"""
import math
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from forcefield.io import cast_potential
from forcefield.potential import Potential
from tests.helpers import ETHANOL_R, ETHANOL_Z

# ---------------------------------------------------------------------------------------------------------------
# frozen reference (original code; do not optimise)
# ---------------------------------------------------------------------------------------------------------------


def _ref_pairs_within(pos: Tensor, batch: Tensor, cutoff: float) -> Tensor:
    with torch.no_grad():
        p = pos.detach()
        same = batch.unsqueeze(0) == batch.unsqueeze(1)
        d2 = (p.unsqueeze(0) - p.unsqueeze(1)).pow(2).sum(-1)
        mask = same & (d2 < cutoff * cutoff)
        mask.fill_diagonal_(False)
        return mask.nonzero().t()


def _ref_periodic_pairs(pos, batch, cutoff, cell, pbc):
    with torch.no_grad():
        c = cell.detach()
        frac = torch.einsum("nx,nxk->nk", pos.detach(), torch.linalg.inv(c)[batch])
        offset = torch.floor(frac) * pbc[batch].to(frac.dtype)
        p = pos.detach() - torch.einsum("nk,nkx->nx", offset, c[batch])
        vol = torch.linalg.det(c).abs()
        cross = torch.stack([torch.linalg.cross(c[:, 1], c[:, 2], dim=-1), torch.linalg.cross(c[:, 2], c[:, 0], dim=-1),
                             torch.linalg.cross(c[:, 0], c[:, 1], dim=-1)], dim=1)
        spacing = vol.unsqueeze(-1) / torch.linalg.norm(cross, dim=-1).clamp_min(1e-12)
        n_img = torch.ceil(cutoff / spacing).to(torch.long) * pbc.to(torch.long)
        nmax = n_img.max(dim=0).values
        rng = [torch.arange(-int(nmax[k]), int(nmax[k]) + 1, device=pos.device) for k in range(3)]
        shifts = torch.cartesian_prod(rng[0], rng[1], rng[2]).reshape(-1, 3)
        same = batch.unsqueeze(0) == batch.unsqueeze(1)
        pairs = same.nonzero()
        ii, jj = pairs[:, 0], pairs[:, 1]
        g = batch[ii]
        cart = torch.einsum("sk,pkx->psx", shifts.to(p.dtype), c[g])
        d = p[jj].unsqueeze(1) + cart - p[ii].unsqueeze(1)
        ok = d.pow(2).sum(-1) < cutoff * cutoff
        allowed = (shifts.abs().unsqueeze(0) <= n_img[g].unsqueeze(1)).all(-1)
        self_pair = (ii == jj).unsqueeze(1) & (shifts == 0).all(-1).unsqueeze(0)
        ok = ok & allowed & ~self_pair
        hit = ok.nonzero()
        pi, si = hit[:, 0], hit[:, 1]
        edge_index = torch.stack([ii[pi], jj[pi]])
        unwrapped = shifts[si] - offset[jj[pi]].to(torch.long) + offset[ii[pi]].to(torch.long)
        return edge_index, unwrapped


def _ref_radius_graph(positions, batch, cutoff, cell=None, pbc=None):
    if cell is not None and pbc is not None and bool(pbc.any()):
        edge_index, shifts = _ref_periodic_pairs(positions, batch, cutoff, cell, pbc)
        i, j = edge_index[0], edge_index[1]
        cart = torch.einsum("ek,ekx->ex", shifts.to(positions.dtype), cell[batch[i]].to(positions.dtype))
        return edge_index, positions[j] - positions[i] + cart
    edge_index = _ref_pairs_within(positions, batch, cutoff)
    return edge_index, positions[edge_index[1]] - positions[edge_index[0]]


class _RefCosineCutoff(nn.Module):
    def __init__(self, cutoff):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, r):
        return 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0) * (r < self.cutoff).to(r.dtype)


class _RefExpNormalSmearing(nn.Module):
    def __init__(self, cutoff, num_rbf):
        super().__init__()
        self.alpha = 5.0 / cutoff
        start = math.exp(-cutoff)
        self.register_buffer("means", torch.linspace(start, 1.0, num_rbf))
        self.register_buffer("betas", torch.full((num_rbf,), (2.0 / num_rbf * (1.0 - start)) ** -2))

    def forward(self, r):
        return torch.exp(-self.betas * (torch.exp(-self.alpha * r).unsqueeze(-1) - self.means) ** 2)


def _ref_safe_norm(v, dim, eps=1e-8):
    return torch.sqrt(v.pow(2).sum(dim) + eps)


class _RefGatedEquivariantBlock(nn.Module):
    def __init__(self, in_features, out_features, scalar_activation):
        super().__init__()
        self.out_features = out_features
        self.vec_proj = nn.Linear(in_features, 2 * out_features, bias=False)
        self.update = nn.Sequential(nn.Linear(in_features + out_features, in_features), nn.SiLU(),
                                    nn.Linear(in_features, 2 * out_features))
        self.scalar_activation = scalar_activation
        self.act = nn.SiLU()

    def forward(self, x, vec):
        v = self.vec_proj(vec)
        v1, v2 = torch.split(v, self.out_features, dim=-1)
        h = self.update(torch.cat([x, _ref_safe_norm(v1, 1)], dim=-1))
        x_out, gate = torch.split(h, self.out_features, dim=-1)
        vec_out = gate.unsqueeze(1) * v2
        if self.scalar_activation:
            x_out = self.act(x_out)
        return x_out, vec_out


class _RefHead(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.block1 = _RefGatedEquivariantBlock(hidden, hidden // 2, scalar_activation=True)
        self.block2 = _RefGatedEquivariantBlock(hidden // 2, 1, scalar_activation=False)

    def forward(self, x, vec):
        x, vec = self.block1(x, vec)
        x, vec = self.block2(x, vec)
        return x.squeeze(-1) + 0.0 * vec.sum(dim=(1, 2))


class _RefNeighborEmbedding(nn.Module):
    def __init__(self, hidden, num_rbf, max_z):
        super().__init__()
        self.embedding = nn.Embedding(max_z, hidden)
        self.distance_proj = nn.Linear(num_rbf, hidden)
        self.combine = nn.Linear(2 * hidden, hidden)

    def forward(self, x, z, edge_index, rbf, cut):
        i, j = edge_index[0], edge_index[1]
        w = self.distance_proj(rbf) * cut.unsqueeze(-1)
        msg = w * self.embedding(z)[j]
        agg = torch.zeros_like(x).index_add_(0, i, msg)
        return self.combine(torch.cat([x, agg], dim=-1))


class _RefEquivariantAttention(nn.Module):
    def __init__(self, hidden, num_heads, num_rbf):
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 5 * hidden)
        self.vec_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.dkv = nn.Linear(num_rbf, 4 * hidden)
        self.out = nn.Linear(hidden, 3 * hidden)
        self.act = nn.SiLU()

    def forward(self, x, vec, edge_index, rbf, cut, unit):
        n, h, nh, hd = x.shape[0], self.hidden, self.num_heads, self.head_dim
        i, j = edge_index[0], edge_index[1]
        e = i.shape[0]
        q, k, v = torch.split(self.qkv(self.norm(x)), [h, h, 3 * h], dim=-1)
        vec1, vec2, vec3 = torch.split(self.vec_proj(vec), h, dim=-1)
        vec_dot = (vec1 * vec2).sum(dim=1)
        dk, dv = torch.split(self.act(self.dkv(rbf)), [h, 3 * h], dim=-1)
        attn = (q[i] * k[j] * dk).view(e, nh, hd).sum(-1)
        attn = self.act(attn) * cut.unsqueeze(-1)
        vj = (v[j] * dv).view(e, nh, 3 * hd)
        xm, v1, v2 = torch.split(vj, hd, dim=-1)
        xm = (xm * attn.unsqueeze(-1)).reshape(e, h)
        cut_e = cut.view(e, 1, 1)
        v1 = v1.reshape(e, 1, h) * cut_e
        v2 = v2.reshape(e, 1, h) * cut_e
        vm = vec[j] * v1 + v2 * unit.unsqueeze(-1)
        x_agg = torch.zeros((n, h), dtype=x.dtype, device=x.device).index_add_(0, i, xm)
        vec_agg = torch.zeros((n, 3, h), dtype=x.dtype, device=x.device).index_add_(0, i, vm)
        o1, o2, o3 = torch.split(self.out(x_agg), h, dim=-1)
        dx = vec_dot * o2 + o3
        dvec = vec3 * o1.unsqueeze(1) + vec_agg
        return x + dx, vec + dvec


class _RefET(nn.Module):
    def __init__(self, hidden=128, num_layers=6, num_heads=8, num_rbf=32, cutoff=5.0, max_z=100, name="et"):
        super().__init__()
        self.hidden = hidden
        self.cutoff = cutoff
        self.embedding = nn.Embedding(max_z, hidden)
        self.rbf = _RefExpNormalSmearing(cutoff, num_rbf)
        self.cutoff_fn = _RefCosineCutoff(cutoff)
        self.neighbor_embedding = _RefNeighborEmbedding(hidden, num_rbf, max_z)
        self.layers = nn.ModuleList([_RefEquivariantAttention(hidden, num_heads, num_rbf) for _ in range(num_layers)])
        self.out_norm = nn.LayerNorm(hidden)

    def forward(self, z, edge_index, edge_vec):
        r = torch.sqrt(edge_vec.pow(2).sum(-1))
        unit = edge_vec / r.unsqueeze(-1)
        rbf = self.rbf(r)
        cut = self.cutoff_fn(r)
        x = self.embedding(z)
        x = self.neighbor_embedding(x, z, edge_index, rbf, cut)
        vec = torch.zeros((x.shape[0], 3, self.hidden), dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, vec = layer(x, vec, edge_index, rbf, cut, unit)
        return self.out_norm(x), vec


class _RefPotential(nn.Module):
    """Same names and buffers as ``Potential``; forward = the original ``Potential.forward``."""

    def __init__(self, backbone: Dict, max_z: int = 100):
        super().__init__()
        cfg = {k: v for k, v in backbone.items() if k != "name"}
        cfg.setdefault("max_z", max_z)
        self.backbone = _RefET(**cfg)
        self.head = _RefHead(self.backbone.hidden)
        self.cutoff = float(self.backbone.cutoff)
        mz = int(cfg["max_z"])
        self.register_buffer("known_elements", torch.zeros(mz, dtype=torch.bool))
        self.register_buffer("atomref", torch.zeros(mz, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(0.0, dtype=torch.float64))

    def forward(self, numbers, positions, batch=None, cell=None, pbc=None, with_reference=True,
                compute_forces=True):
        if batch is None:
            batch = torch.zeros(numbers.shape[0], dtype=torch.long, device=numbers.device)
        num_graphs = int(batch.max()) + 1
        create_graph = self.training
        positions = positions.detach().requires_grad_(True)
        edge_index, edge_vec = _ref_radius_graph(positions, batch, self.cutoff, cell, pbc)
        x, vec = self.backbone(numbers, edge_index, edge_vec)
        y = self.head(x, vec)
        e_atom = y * self.scale.to(y.dtype) + self.shift.to(y.dtype)
        energy = torch.zeros(num_graphs, dtype=e_atom.dtype).index_add_(0, batch, e_atom)
        out = {}
        if compute_forces:
            g = torch.autograd.grad([energy.sum()], [positions], create_graph=create_graph, allow_unused=True)[0]
            out["forces"] = -g if g is not None else torch.zeros_like(positions)
        if with_reference:
            ref = torch.zeros(num_graphs, dtype=torch.float64).index_add_(0, batch, self.atomref[numbers].to(torch.float64))
            energy = energy.to(torch.float64) + ref
        out["energy"] = energy
        return out


def reference_of(pot: Potential) -> _RefPotential:
    """A frozen-reference model with ``pot``'s weights (state dict loaded strictly: names and shapes match)."""
    ref = _RefPotential(pot.config["backbone"])
    ref.load_state_dict(pot.state_dict(), strict=True)
    dtype = next(pot.parameters()).dtype
    return cast_potential(ref, "cpu", dtype).train(pot.training)


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------

TOL = 1e-10  # float64: the optimised code only sums and multiplies in another order
SMALL = {"name": "et", "hidden": 32, "num_layers": 3, "num_heads": 4, "num_rbf": 16, "cutoff": 5.0}
RUNS = Path(__file__).resolve().parents[1] / "runs"


def _model(cfg=SMALL, seed=0, dtype=torch.float64, repulsion=False) -> Potential:
    """Random weights. The frozen reference predates the ZBL repulsion, so the models compared with it have none
    (the random molecules below have pairs inside its 0.6 Å); the traced-graph and AOTInductor tests turn it on
    and compare with the eager Potential."""
    torch.manual_seed(seed)
    pot = Potential(backbone=cfg, elements=[1, 6, 7, 8], atomref={1: -13.6, 6: -1029.0, 7: -1485.0, 8: -2041.0},
                    scale=0.7, shift=0.01, repulsion=repulsion)
    with torch.no_grad():  # random non-zero weights everywhere (biases start at zero)
        for p in pot.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return cast_potential(pot, "cpu", dtype).eval()


def _molecule(n=21, seed=0, box=6.0):
    rng = np.random.default_rng(seed)
    z = rng.choice([1, 6, 7, 8], size=n)
    r = rng.random((n, 3)) * box
    return torch.as_tensor(z, dtype=torch.long), torch.as_tensor(r, dtype=torch.float64)


def _assert_same(a: Dict[str, Tensor], b: Dict[str, Tensor], tol: float = TOL):
    assert a["energy"].shape == b["energy"].shape and a["forces"].shape == b["forces"].shape
    assert float((a["energy"] - b["energy"]).detach().abs().max()) < tol
    assert float((a["forces"] - b["forces"]).detach().abs().max()) < tol


def test_state_dict_names_and_shapes_unchanged():
    for cfg in (SMALL, {"name": "et", "hidden": 128, "num_layers": 6, "num_heads": 8, "num_rbf": 32, "cutoff": 5.0}):
        pot = _model(cfg)
        ref = _RefPotential(cfg)
        assert [(k, tuple(v.shape)) for k, v in ref.state_dict().items()] == \
               [(k, tuple(v.shape)) for k, v in pot.state_dict().items()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_energy_forces_equal_reference_single_molecule(seed):
    pot = _model(seed=seed)
    ref = reference_of(pot)
    z, r = _molecule(21, seed)
    _assert_same(pot(z, r), ref(z, r))
    z, r = torch.as_tensor(ETHANOL_Z), torch.as_tensor(ETHANOL_R)
    _assert_same(pot(z, r), ref(z, r))


def test_energy_forces_equal_reference_batch_and_isolated_atom():
    pot = _model(seed=3)
    ref = reference_of(pot)
    z1, r1 = _molecule(21, 4)
    z2, r2 = _molecule(9, 5)
    z3, r3 = torch.tensor([8]), torch.zeros(1, 3, dtype=torch.float64) + 40.0  # no neighbours at all
    z, r = torch.cat([z1, z2, z3]), torch.cat([r1, r2 + 30.0, r3])
    batch = torch.tensor([0] * 21 + [1] * 9 + [2])
    _assert_same(pot(z, r, batch), ref(z, r, batch))


def test_energy_forces_equal_reference_periodic():
    pot = _model(seed=6)
    ref = reference_of(pot)
    z, r = _molecule(8, 7, box=4.0)
    cell = torch.tensor([[[4.3, 0.0, 0.0], [0.6, 4.0, 0.0], [0.2, -0.5, 4.6]]], dtype=torch.float64)
    for pbc in ([True, True, True], [True, False, True]):
        p = torch.tensor([pbc])
        _assert_same(pot(z, r, None, cell, p), ref(z, r, None, cell, p))


def test_general_edge_order_equals_symmetric_layout():
    """The backbone accepts any edge list (e.g. from an external neighbour list): same result."""
    from forcefield.graph import radius_graph
    from forcefield.models.et import is_symmetric_layout

    pot = _model(seed=8)
    ref = reference_of(pot)
    z, r = _molecule(15, 9)
    ei, ev = radius_graph(r, torch.zeros(15, dtype=torch.long), pot.cutoff)
    assert is_symmetric_layout(ei, ev)
    perm = torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(0))
    assert not is_symmetric_layout(ei[:, perm], ev[perm])
    a = pot.backbone(z, ei[:, perm], ev[perm])
    b = pot.backbone(z, ei, ev)
    c = ref.backbone(z, ei, ev)
    for u, v, w in zip(a, b, c):
        assert float((u - w).abs().max()) < TOL and float((v - w).abs().max()) < TOL


def test_training_gradients_equal_reference():
    """Energy + force loss (double backward, as the trainer does): same gradient for every parameter."""
    pot = _model(seed=10).train()
    ref = reference_of(pot).train()
    z, r = _molecule(12, 11)
    batch = torch.tensor([0] * 6 + [1] * 6)
    grads = []
    for m in (pot, ref):
        m.zero_grad(set_to_none=True)
        out = m(z, r, batch, with_reference=False)
        loss = 0.3 * out["energy"].pow(2).mean() + 0.7 * out["forces"].pow(2).mean()
        loss.backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    a, b = grads
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            assert float((a[k] - b[k]).abs().max()) < TOL, k


def test_forces_only_loss_gradients_reach_the_same_parameters():
    pot = _model(seed=12).train()
    ref = reference_of(pot).train()
    z, r = _molecule(10, 13)
    for m in (pot, ref):
        m.zero_grad(set_to_none=True)
        m(z, r, with_reference=False)["forces"].pow(2).sum().backward()
    for (k, p), (_, q) in zip(pot.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            assert float((p.grad - q.grad).abs().max()) < TOL, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchscript_equals_eager_and_reference(dtype):
    pot = _model(seed=14, dtype=dtype)
    ref = reference_of(pot)
    scripted = torch.jit.script(pot)
    z, r = _molecule(21, 15)
    r = r.to(dtype)
    a, b, c = pot(z, r), scripted(z, r), ref(z, r)
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    _assert_same(a, b, tol)
    _assert_same(a, c, 1e-4 if dtype == torch.float32 else TOL)


def test_finished_model_file_equals_reference():
    """The shipped models (trained with the original code) give the same numbers with the optimised code."""
    from forcefield.io import load_potential, shipped_models

    files = sorted(shipped_models().values()) + (sorted(RUNS.glob("*/best.pt")) if RUNS.is_dir() else [])
    if not files:
        pytest.skip("no shipped model and no finished model file under runs/")
    for path in files[:2]:
        loaded = load_potential(path, dtype=torch.float64)
        pot = cast_potential(Potential.from_config({**loaded.config, "repulsion": False}, loaded.state_dict()),
                             "cpu", torch.float64).eval()   # the learned part (the reference has no repulsion)
        ref = reference_of(pot)
        ref.atomref.data = pot.atomref.clone()
        n = len(pot.elements)
        z = torch.as_tensor(np.resize(np.array(pot.elements), 9), dtype=torch.long)
        _, r = _molecule(9, 16, box=3.0)
        _assert_same(pot(z, r), ref(z, r))


def test_no_edges_single_atom_and_far_apart_atoms():
    pot = _model(seed=17)
    ref = reference_of(pot)
    scripted = torch.jit.script(pot)
    for z, r in ((torch.tensor([6]), torch.zeros(1, 3, dtype=torch.float64)),
                 (torch.tensor([6, 8]), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 7.5]], dtype=torch.float64))):
        a = pot(z, r)
        _assert_same(a, ref(z, r))
        _assert_same(a, scripted(z, r))


# ---------------------------------------------------------------------------------------------------------------
# compiled paths (forcefield/compiled.py): traced forward+backward graph, AOTInductor .pt2
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype, repulsion", [(torch.float64, False), (torch.float32, False), (torch.float64, True)])
def test_traced_energy_forces_graph_equals_eager(dtype, repulsion):
    """The make_fx graph that AOTInductor compiles (forward and backward as plain ops) = eager Potential
    (= the frozen reference without repulsion; with it, the eager Potential: this molecule has a 0.52 Å pair)."""
    from forcefield.compiled import trace_energy_forces
    from forcefield.graph import half_pairs

    pot = _model(seed=18, dtype=dtype, repulsion=repulsion)
    before = {k: (v.shape, v.dtype) for k, v in pot.state_dict().items()}
    gm, _ = trace_energy_forces(pot, torch.float32 if dtype == torch.float64 else dtype)   # the caller's model kept
    assert {k: (v.shape, v.dtype) for k, v in pot.state_dict().items()} == before
    gm, _ = trace_energy_forces(pot, dtype)
    # no 0-dim constant in the graph: AOTInductor crashed loading CUDA packages with them (pytorch#172739)
    consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert consts and all(c.dim() >= 1 for c in consts if isinstance(c, torch.Tensor))
    z, r = _molecule(21, 19)
    r = r.to(dtype)
    pairs, _ = half_pairs(r, torch.zeros(21, dtype=torch.long), pot.cutoff)
    e_atom, forces = gm(z, r, pairs, torch.zeros(pairs.shape[1], 3, dtype=dtype))
    ref = (pot if repulsion else reference_of(pot))(z, r, with_reference=False)
    tol = TOL if dtype == torch.float64 else 1e-4
    assert abs(float(e_atom.sum()) - float(ref["energy"].sum())) < tol * max(1.0, abs(float(ref["energy"].sum())))
    assert float((forces - ref["forces"]).abs().max()) < tol


def _have_compiler() -> bool:
    import shutil
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OREO_TEST_AOTI", "1") == "0" or not _have_compiler(),
                    reason="OREO_TEST_AOTI=0, or no C++ compiler for AOTInductor (this test takes ~1-2 min)")
def test_aoti_export_equals_eager(tmp_path):
    from forcefield.compiled import EXPORT_TOLERANCE, export_compiled, load_compiled

    # with the repulsion, compared with the eager Potential (itself = the frozen reference plus the repulsion)
    pot = _model({"name": "et", "hidden": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff": 5.0}, seed=20,
                 repulsion=True)
    path = export_compiled(pot, tmp_path / "tiny.pt2", dtype=torch.float64)
    cp = load_compiled(path)
    ref = pot
    z1, r1 = _molecule(21, 21)
    z2, r2 = _molecule(5, 22)
    cases = [(z1, r1, None, None, None), (*_molecule(21, 19), None, None, None),   # the second: a 0.52 Å pair
             (torch.cat([z1, z2]), torch.cat([r1, r2 + 20.0]), torch.tensor([0] * 21 + [1] * 5), None, None),
             (torch.tensor([8]), torch.zeros(1, 3, dtype=torch.float64), None, None, None),
             (z2, r2, None, torch.eye(3, dtype=torch.float64).unsqueeze(0) * 4.5, torch.tensor([[True, True, True]]))]
    tol = EXPORT_TOLERANCE["float64"]
    for z, r, b, c, p in cases:
        a, e = cp(z, r, b, c, p), ref(z, r, b, c, p)
        assert a["energy"].shape == e["energy"].shape and a["energy"].dtype == torch.float64
        assert float((a["energy"] - e["energy"]).abs().max()) < tol["energy_rel"] * max(1.0, float(e["energy"].abs().max()))
        assert float((a["forces"] - e["forces"].detach()).abs().max()) < tol["forces_abs"]
    with pytest.raises(ValueError, match="atomic number 9"):
        cp(torch.tensor([6, 9]), torch.tensor([[0.0, 0, 0], [1.2, 0, 0]], dtype=torch.float64))
    # its kernels are C++ for the CPU: asked for on a GPU, the error says how to build one for it
    from forcefield.io import load_potential
    assert cp.info["device"] == "cpu"
    with pytest.raises(ValueError, match="compiled for cpu, not cuda.*--device cuda"):
        load_potential(path, device="cuda")


def test_a_build_whose_check_crashes_is_an_error_that_names_the_fix(tmp_path, monkeypatch):
    """A package is checked in a child process: one that kills torch's loader (a CUDA package segfaulted so on an
    H200) is reported as that, and the export ends in an error pointing to the eager model, not in a crash."""
    import sys
    import forcefield.compiled as compiled
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    assert "SIGSEGV" in compiled.run_check_process(crash)
    assert compiled.run_check_process([sys.executable, "-c", "print('{\"problem\": null}')"]) is None
    assert "boom" in compiled.run_check_process([sys.executable, "-c", "raise SystemExit('boom')"])
    builds = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda ep, package_path, inductor_configs: builds.append(inductor_configs))
    monkeypatch.setattr(compiled, "check_package", lambda *a: compiled.run_check_process(crash))
    with pytest.raises(RuntimeError, match="killed the process that checked it \\(SIGSEGV\\).*eager model"):
        compiled.export_compiled(_model(seed=3), tmp_path / "crash.pt2", dtype=torch.float32)
    assert len(builds) == 2 and not (tmp_path / "crash.pt2").exists()     # the rebuild with buffer reuse off, too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs on the device machine)")
def test_aoti_export_for_the_gpu_equals_eager_there(tmp_path):
    """MD on a GPU machine (oreo-md simulate --device cuda --compile) runs the package built for it."""
    from forcefield.compiled import EXPORT_TOLERANCE, export_compiled, load_compiled
    from forcefield.io import cast_potential
    pot = _model({"name": "et", "hidden": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff": 5.0}, seed=20,
                 repulsion=True)
    cp = load_compiled(export_compiled(pot, tmp_path / "gpu.pt2", dtype=torch.float32, device="cuda"))
    ref = cast_potential(pot, "cuda", torch.float32)
    z1, r1 = _molecule(21, 21)
    z2, r2 = _molecule(5, 22)
    z = torch.cat([z1, z2]).cuda()
    r = torch.cat([r1, r2 + 20.0]).float().cuda()
    b = torch.tensor([0] * 21 + [1] * 5).cuda()
    a, e = cp(z, r, b), ref(z, r, b)
    tol = EXPORT_TOLERANCE["float32"]
    assert cp.info["device"] == "cuda" and a["forces"].is_cuda
    assert float((a["energy"] - e["energy"]).abs().max()) < tol["energy_rel"] * max(1.0, float(e["energy"].abs().max()))
    assert float((a["forces"] - e["forces"].detach()).abs().max()) < tol["forces_abs"]


def test_frozen_torchscript_equals_eager():
    """torch.jit.freeze of the scripted potential (faster for MD) keeps forces (autograd inside) exact."""
    pot = _model(seed=23)
    frozen = torch.jit.freeze(torch.jit.script(pot).eval(), preserved_attrs=["cutoff", "metadata_json"])
    z, r = _molecule(21, 24)
    _assert_same(pot(z, r), frozen(z, r), 1e-12)
    assert frozen.cutoff == pot.cutoff


def test_an_export_that_differs_from_eager_is_rebuilt_without_buffer_reuse_or_refused(tmp_path, monkeypatch):
    """Every AOTInductor build is checked against eager before it is kept (a compiler bug must not reach MD as
    wrong forces): a wrong first build is rebuilt with buffer reuse off; two wrong builds are an error."""
    import json
    import zipfile

    from forcefield.compiled import export_compiled, read_compiled_metadata

    builds, bad = [], {"after": 1}

    def fake_compile(ep, package_path, inductor_configs):      # a package like AOTInductor's, minus the C++
        builds.append(dict(inductor_configs))
        with zipfile.ZipFile(package_path, "w") as zf:
            zf.writestr(f"{Path(package_path).stem}/build.json", json.dumps(inductor_configs))

    def fake_load(path):
        module = ep_module["gm"]
        wrong = len(builds) <= bad["after"]

        def run(*args):
            e, f = module(*args)
            return e, (f + 1e-3 if wrong else f)           # a wrong build: forces off by 1e-3 eV/Å
        return run

    import forcefield.compiled as fc
    ep_module = {}
    real_trace = fc.trace_energy_forces

    def trace(pot, dtype, device):
        gm, example = real_trace(pot, dtype, device)
        ep_module["gm"] = gm
        return gm, example
    monkeypatch.setattr(fc, "trace_energy_forces", trace)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    # the check of a build (in a child process in earnest) here in-process, on the fake package
    monkeypatch.setattr(fc, "check_package", lambda package, eager, example, tol:
                        fc.check_against_eager(fake_load(package), eager, example, tol))
    pot = _model({"name": "et", "hidden": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff": 5.0}, seed=3)
    path = export_compiled(pot, tmp_path / "m.pt2")
    assert [b.get("inplace_buffers", True) for b in builds] == [True, False]
    assert read_compiled_metadata(path)["inductor_configs"]["allow_buffer_reuse"] is False
    builds.clear()
    bad["after"] = 2
    with pytest.raises(RuntimeError, match=r"forces by 1\.00e-03.*with buffer reuse off.*eager model"):
        export_compiled(pot, tmp_path / "n.pt2")
    assert len(builds) == 2 and not (tmp_path / "n.pt2").exists()
