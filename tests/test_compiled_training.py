"""optim.compile: the traced + compiled energy/force graph trains exactly like eager autograd."""
import json

import pytest
import torch

from forcefield.graph import half_pairs
from forcefield.train import Trainer, config_from_dict
from forcefield.train.compiled_step import CompiledEnergyForces, _Functional, strip_detach
from helpers import ETHANOL_R, ETHANOL_Z, tiny_potential


def _batch(seed, periodic=False):
    """Two ethanol-like molecules, jittered; optionally the second in a small periodic cell."""
    g = torch.Generator().manual_seed(seed)
    r = torch.as_tensor(ETHANOL_R, dtype=torch.float64)
    pos = torch.cat([r, r + torch.tensor([20.0, 0.0, 0.0])]) + 0.1 * torch.randn(18, 3, generator=g, dtype=torch.float64)
    numbers = torch.as_tensor(ETHANOL_Z).repeat(2)
    batch = torch.arange(2).repeat_interleave(9)
    cell = pbc = None
    if periodic:
        cell = torch.stack([torch.eye(3, dtype=torch.float64) * 30.0, torch.eye(3, dtype=torch.float64) * 4.5])
        pbc = torch.tensor([[False] * 3, [True] * 3])
    e = torch.randn(2, generator=g, dtype=torch.float64)
    f = torch.randn(18, 3, generator=g, dtype=torch.float64)
    return numbers, pos, batch, cell, pbc, e, f


def _grads(out, e, f, params):
    loss = (out["energy"] - e).pow(2).mean() + (out["forces"] - f).pow(2).mean()
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_parameter_gradients_equal_eager(backend):
    # the real path is inductor (C++ code generation, ~1 min here for a 1-layer model); aot_eager checks the
    # traced graph itself on more cases in seconds
    pot = tiny_potential(num_layers=1 if backend == "inductor" else 2).train()
    params = list(pot.parameters())
    fn = CompiledEnergyForces(pot, backend=backend)
    cases = [(0, False), (1, True)] if backend == "inductor" else [(0, False), (1, True), (2, False), (3, True)]
    for seed, periodic in cases:  # different pair counts: one trace, shapes stay symbolic
        numbers, pos, batch, cell, pbc, e, f = _batch(seed, periodic)
        out_c = fn(numbers, pos, batch, cell, pbc)
        out_e = pot(numbers, pos, batch, cell, pbc, with_reference=False)
        torch.testing.assert_close(out_c["energy"], out_e["energy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out_c["forces"], out_e["forces"], rtol=1e-9, atol=1e-9)
        lc, gc = _grads(out_c, e, f, params)
        le, ge = _grads(out_e, e, f, params)
        for p, a, b in zip(pot.state_dict(), gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f"gradient of {p}")
    assert fn.compiles == 1


@pytest.mark.slow
def test_traced_force_graph_needs_its_detaches_removed():
    """make_fx records saved activations of the first backward through aten.detach: left in, the parameter
    gradient of a force loss is wrong (checked here), so the compiled step strips them."""
    pot = tiny_potential().train()
    numbers, pos, batch, _, _, _, f = _batch(0)
    pairs, _ = half_pairs(pos, batch, pot.cutoff)
    cart = torch.zeros(pairs.shape[1], 3, dtype=pos.dtype)
    tensors = [p for _, p in pot.named_parameters()] + [b for _, b in pot.named_buffers()]
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(_Functional(pot), tracing_mode="symbolic", _allow_non_fake_inputs=True)(tensors, numbers, pos, pairs, cart)
    params = list(pot.parameters())
    g_eager = torch.autograd.grad((pot(numbers, pos, batch, with_reference=False)["forces"] * f).sum(), params)
    g_raw = torch.autograd.grad((gm(tensors, numbers, pos, pairs, cart)[1] * f).sum(), params)
    assert max(float((a - b).abs().max()) for a, b in zip(g_raw, g_eager)) > 1e-4
    assert strip_detach(gm) > 0
    g_fixed = torch.autograd.grad((gm(tensors, numbers, pos, pairs, cart)[1] * f).sum(), params)
    for a, b in zip(g_fixed, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_trainer_with_compile_follows_the_eager_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OREO_COMPILE_BACKEND", "aot_eager")
    base = {"data": {"molecule": "ethanol", "train_size": 16, "val_size": 8, "test_size": 8},
            "model": {"hidden": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff": 4.0},
            "optim": {"epochs": 2, "batch_size": 4, "lr": 5e-3, "lr_warmup_steps": 2, "seed": 3, "dtype": "float64"}}
    runs = {}
    for flag in (False, True):
        cfg = json.loads(json.dumps(base))
        cfg["optim"]["compile"] = flag
        t = Trainer(config_from_dict(cfg), tmp_path / str(flag), progress=False, log=lambda s: None)
        t.fit()
        runs[flag] = t
    assert runs[True]._compiled is not None and runs[True]._compiled.compiles == 1
    for (k, a), (_, b) in zip(runs[False].model.state_dict().items(), runs[True].model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_the_graph_without_forces_gives_the_eager_per_atom_output_and_gradients(backend):
    """with_forces=False (a property head's training, QM9): per-atom learned outputs and their parameter gradients
    equal eager's, over batches of other sizes from one trace; no forces are returned."""
    pot = tiny_potential(num_layers=1 if backend == "inductor" else 2).train()
    params = list(pot.parameters())
    fn = CompiledEnergyForces(pot, backend=backend, learned_only=True, with_forces=False)
    for seed in (0, 1, 2):
        numbers, pos, batch, _, _, e, _ = _batch(seed)
        keep = 18 - 3 * seed                      # batches of other atom counts
        numbers, pos, batch = numbers[:keep], pos[:keep], batch[:keep]
        out = fn(numbers, pos, batch)
        assert "forces" not in out
        ref, _, _ = pot.atomic_energies_and_features(numbers, pos, batch, learned_only=True)
        torch.testing.assert_close(out["atomic_energies"], ref, rtol=1e-10, atol=1e-10)
        w = torch.linspace(-1.0, 1.0, keep, dtype=ref.dtype)
        gc = torch.autograd.grad((out["atomic_energies"] * w).sum(), params, allow_unused=True)
        ge = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
        for name, a, b in zip(pot.state_dict(), gc, ge):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")
    assert fn.compiles == 1 and fn.failure is None


def test_a_graph_without_forces_needs_the_learned_part_alone():
    with pytest.raises(ValueError, match="with_forces=False needs learned_only=True"):
        CompiledEnergyForces(tiny_potential(), with_forces=False)


def test_compile_refuses_other_backbones():
    from forcefield.potential import Potential
    pot = Potential({"name": "egnn", "hidden": 8, "num_layers": 1, "cutoff": 4.0}, elements=[1, 6])
    with pytest.raises(ValueError, match="optim.compile needs the ET backbone"):
        CompiledEnergyForces(pot)


def test_compile_flag_must_be_a_boolean():
    with pytest.raises(ValueError, match="optim.compile must be true or false"):
        config_from_dict({"optim": {"compile": "fast"}})
    assert config_from_dict({"optim": {"compile": True}}).optim.compile is True


class _BrokenBackward(torch.autograd.Function):
    """The identity whose backward fails the way torch 2.13's Inductor build of the ethanol backward did."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise UnboundLocalError("cannot access local variable 'buf199' where it is not associated with a value")


def _fake_compile(monkeypatch, outputs, builds=None):
    """torch.compile replaced by the traced graph run eagerly, its (atomic energies, forces) passed through
    ``outputs(options, e, f)``: a stand-in for a compiler that builds right or wrong, in milliseconds."""
    import forcefield.train.compiled_step as cs

    def compile_(gm, backend=None, dynamic=None, options=None):
        if builds is not None:
            builds.append(dict(options or {}))

        def run(*args):
            e, f = gm(*args)
            return outputs(options or {}, e, f)
        return run
    monkeypatch.setattr(cs.torch, "compile", compile_)


def test_a_compiler_failure_falls_back_to_the_eager_path_with_a_warning(monkeypatch):
    """A compiled graph whose trial step fails (as torch 2.13's Inductor does for ethanol batches) must not end a
    long run: the same numbers come from the eager path, and the warning says why."""
    _fake_compile(monkeypatch, lambda options, e, f: (_BrokenBackward.apply(e), f))
    pot = tiny_potential().train()
    fn = CompiledEnergyForces(pot, backend="aot_eager")
    numbers, pos, batch, cell, pbc, e, f = _batch(0)
    with pytest.warns(RuntimeWarning, match="failed its trial step.*buf199.*eager path"):
        out = fn(numbers, pos, batch, cell, pbc)
    assert fn.failure.startswith("UnboundLocalError") and fn.compiles == 1
    eager = pot(numbers, pos, batch, cell, pbc, with_reference=False)
    torch.testing.assert_close(out["forces"], eager["forces"], rtol=0, atol=0)
    loss, grads = _grads(fn(numbers, pos, batch, cell, pbc), e, f, list(pot.parameters()))   # trains: eager
    assert all(torch.isfinite(g).all() for g in grads)


def test_a_buffer_reuse_failure_is_retried_without_reuse_before_the_eager_path(monkeypatch):
    """torch 2.13's Inductor writes in place over a buffer of the ethanol backward that a later kernel still reads; the build
    without buffer reuse works there, so the compiled step tries it before giving up."""
    builds = []          # like torch 2.13's Inductor: broken unless in-place buffer reuse is off
    _fake_compile(monkeypatch, lambda options, e, f: (_BrokenBackward.apply(e) if options.get("inplace_buffers", True)
                                                      else e, f), builds)
    pot = tiny_potential().train()
    fn = CompiledEnergyForces(pot, backend="inductor")
    numbers, pos, batch, cell, pbc, e, f = _batch(0)
    with pytest.warns(RuntimeWarning, match=r"first build failed.*buf199.*'inplace_buffers': False\} works"):
        out = fn(numbers, pos, batch, cell, pbc)
    assert fn.failure is None and fn.compiles == 2 and fn.options["inplace_buffers"] is False
    assert [b.get("inplace_buffers", True) for b in builds] == [True, False]
    eager = pot(numbers, pos, batch, cell, pbc, with_reference=False)
    torch.testing.assert_close(out["forces"], eager["forces"], rtol=0, atol=0)
    _, grads = _grads(fn(numbers, pos, batch, cell, pbc), e, f, list(pot.parameters()))   # through the build
    assert len(builds) == 2 and all(torch.isfinite(g).all() for g in grads)


def test_a_build_with_wrong_forces_is_not_trained_on(monkeypatch):
    """The trial step checks the build's forces against eager: a build that raises nothing but computes other
    numbers is rebuilt (and given up for eager if that is wrong too)."""
    _fake_compile(monkeypatch, lambda options, e, f: (e, f + 1e-3))
    pot = tiny_potential().train()
    fn = CompiledEnergyForces(pot, backend="inductor")
    numbers, pos, batch, cell, pbc, e, f = _batch(0)
    with pytest.warns(RuntimeWarning, match=r"in 2 build\(s\).*not the eager numbers: energy off by .*forces by 1\.00e-03"):
        out = fn(numbers, pos, batch, cell, pbc)
    assert fn.compiles == 2 and fn.failure is not None
    torch.testing.assert_close(out["forces"], pot(numbers, pos, batch, cell, pbc, with_reference=False)["forces"])


def test_a_batch_size_the_first_trace_baked_in_is_traced_again():
    """The campaign's ethanol job at batch 32 died at the short last batch of its first epoch: 32 frames of 9 atoms
    are 288 = 3 x 96 (hidden) atoms, the symbolic trace kept 3 x 288 as a constant in a ``view``, and the
    recompile for 22 frames failed. The same coincidence with hidden 24 (8 frames, 72 atoms): the graph is traced
    again from the new batch, and every batch size after that takes it, with the eager numbers."""
    pot = tiny_potential(hidden=24).train()
    fn = CompiledEnergyForces(pot, backend="aot_eager")
    r = torch.as_tensor(ETHANOL_R, dtype=torch.float64)

    def molecules(n, seed):
        g = torch.Generator().manual_seed(seed)
        pos = torch.cat([r + torch.tensor([15.0 * k, 0.0, 0.0]) for k in range(n)])
        pos = pos + 0.1 * torch.randn(pos.shape, generator=g, dtype=torch.float64)
        return torch.as_tensor(ETHANOL_Z).repeat(n), pos, torch.arange(n).repeat_interleave(9)

    with pytest.warns(RuntimeWarning, match="failed on a batch of 54 atoms.*tracing it again"):
        for n in (8, 6):                    # 72 atoms = 3 x hidden, then the short batch
            out = fn(*molecules(n, n))
    for n in (8, 6, 3):                     # the second trace takes every size
        numbers, pos, batch = molecules(n, 10 + n)
        out = fn(numbers, pos, batch)
        eager = pot(numbers, pos, batch, with_reference=False)
        torch.testing.assert_close(out["forces"], eager["forces"], rtol=1e-9, atol=1e-9)
    assert fn.failure is None and fn.rebuilds == 1 and fn.compiles == 2
