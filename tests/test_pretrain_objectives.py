"""Pretraining objectives and noise: exact targets give zero loss, others a positive one; the Riemann-Gaussian
score is the gradient of its log-density; the noise-level logits are rotation invariant."""
import numpy as np
import pytest
import torch
from torch import nn

from forcefield.data.conformations import ConformationSet
from forcefield.pretrain import noise
from forcefield.pretrain.corpus import Corpus
from forcefield.pretrain.objectives import (
    CoordinateDenoising, ForceDenoising, ForceMatching, NoiseLevelClassification, ObjectivesConfig, Outputs,
    PretrainTask, RiemannPerturbation, RiemannScoreMatching, StepContext, ZeroForce, build_objectives,
    potential_outputs,
)
from tests.helpers import ETHANOL_R, ETHANOL_Z, random_rotation, tiny_potential


WATER_Z = np.array([8, 1, 1])
WATER_R = np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])


def _corpus(forces_scale=1.0):
    """Two off-equilibrium ethanol frames with (made-up) forces and two equilibrium water frames."""
    rng = np.random.default_rng(0)
    eth = ConformationSet.from_arrays(ETHANOL_Z, np.stack([ETHANOL_R, ETHANOL_R + 0.05 * rng.normal(size=ETHANOL_R.shape)]),
                                      forces=forces_scale * rng.normal(size=(2, 9, 3)), source="eth")
    wat = ConformationSet.from_arrays(WATER_Z, np.stack([WATER_R, WATER_R @ random_rotation(1).numpy().T]),
                                      equilibrium=np.ones(2, bool), source="water")
    return Corpus([eth, wat], names=["eth", "water"])


def _batch(dtype=torch.float64):
    return _corpus().collate(np.arange(4), dtype=dtype)


def harmonic_runner(kappa, anchor, sigma=1.0):
    """Analytic stand-in for the model: E = kappa/2 |x - anchor(sub)|^2; x = |x - x_sub|, vec = (x - x_sub)/sigma."""
    def run(sub, pos, forces):
        p = pos.detach().requires_grad_(True) if forces else pos
        e_atom = 0.5 * kappa * (p - anchor(sub)).pow(2).sum(-1)
        energy = torch.zeros(sub.num_graphs, dtype=p.dtype).index_add(0, sub.batch, e_atom)
        disp = pos - sub.positions
        x = disp.norm(dim=-1, keepdim=True).expand(-1, 4)
        return Outputs(x, (disp / sigma).unsqueeze(-1), e_atom, energy, p, create_graph=False)
    return run


def _ctx(batch, runner, seed=0):
    return StepContext(None, batch, torch.Generator().manual_seed(seed), training=False, runner=runner)


# ---------------------------------------------------------------------------- noise
def test_sigma_schedule_is_geometric_10_to_0_01():
    s = noise.sigma_schedule(10.0, 0.01, 50)
    assert len(s) == 50 and float(s[0]) == pytest.approx(10.0) and float(s[-1]) == pytest.approx(0.01)
    ratio = s[1:] / s[:-1]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))


def test_riemann_score_matches_finite_differences_of_log_density():
    b = _batch()
    g = torch.Generator().manual_seed(3)
    pert = b.positions + 0.3 * torch.randn(b.positions.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.7, 1.3, 0.4, 2.0], dtype=torch.float64)
    score = noise.riemann_score(pert, b.positions, sigma, b.batch)
    h = 1e-6
    fd = torch.zeros_like(pert)
    for a in range(pert.shape[0]):
        for k in range(3):
            pp, pm = pert.clone(), pert.clone()
            pp[a, k] += h
            pm[a, k] -= h
            lp = noise.riemann_log_density(pp, b.positions, sigma, b.batch).sum()
            lm = noise.riemann_log_density(pm, b.positions, sigma, b.batch).sum()
            fd[a, k] = (lp - lm) / (2 * h)
    assert torch.allclose(score, fd, atol=1e-6, rtol=1e-6)
    # the paper's target is the same vector field, rescaled per graph by 2 sigma / (|X~^T X~| + |X^T X~|)
    target = noise.riemann_force_target(pert, b.positions, sigma, b.batch)
    _, _, ptp, otp, _ = noise.riemann_gram(pert, b.positions, b.batch)
    factor = 2 * sigma / (torch.linalg.matrix_norm(ptp) + torch.linalg.matrix_norm(otp))
    assert torch.allclose(target, score * factor[b.batch].unsqueeze(-1), atol=1e-10)


def test_riemann_distance_is_invariant_and_target_vanishes_at_rigid_motions():
    b = _batch()
    rot = random_rotation(5)
    moved = b.positions @ rot.T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    d2 = noise.riemann_distance_sq(moved, b.positions, b.batch)
    assert torch.allclose(d2, torch.zeros_like(d2), atol=1e-9)
    assert float(noise.riemann_force_target(moved, b.positions, 0.5, b.batch).abs().max()) < 1e-9
    noisy = b.positions + 0.1 * torch.randn(b.positions.shape, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(0))
    assert bool((noise.riemann_distance_sq(noisy, b.positions, b.batch) > 1e-6).all())
    # equivariance of the target: rotating both geometries rotates the target
    t = noise.riemann_force_target(noisy, b.positions, 0.5, b.batch)
    t_rot = noise.riemann_force_target(noisy @ rot.T, b.positions @ rot.T, 0.5, b.batch)
    assert torch.allclose(t @ rot.T, t_rot, atol=1e-10)


def test_one_langevin_step_from_the_clean_geometry_is_gaussian():
    b = _batch()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    p = noise.riemann_perturb(b.positions, 0.2, b.batch, steps=1, generator=g1)
    eps = torch.randn(b.positions.shape, generator=g2, dtype=torch.float64)
    assert torch.allclose(p, b.positions + 0.2 * eps, atol=1e-12)


# ---------------------------------------------------------------------------- objectives: exact targets
def test_force_matching_zero_for_exact_forces_positive_otherwise():
    b = _batch()
    kappa, anchor = 3.0, lambda sub: sub.positions * 0.9
    exact = -kappa * (b.positions - 0.9 * b.positions)
    b.forces = torch.where(b.has_forces[b.batch].unsqueeze(-1), exact, torch.zeros_like(exact))
    obj = ForceMatching()
    assert float(obj(_ctx(b, harmonic_runner(kappa, anchor)))["force_matching"]) < 1e-20
    assert float(obj(_ctx(b, harmonic_runner(kappa * 1.1, anchor)))["force_matching"]) > 1e-4
    # frames without forces (water) are left out: changing the model there changes nothing
    b.has_forces[:] = False
    assert obj(_ctx(b, harmonic_runner(kappa, anchor))) == {}


def test_zero_force_zero_at_minimum_positive_elsewhere():
    b = _batch()
    obj = ZeroForce()
    assert float(obj(_ctx(b, harmonic_runner(2.0, lambda sub: sub.positions)))["zero_force"]) == 0.0
    assert float(obj(_ctx(b, harmonic_runner(2.0, lambda sub: sub.positions + 0.1)))["zero_force"]) > 1e-4


def test_force_denoising_target_points_back_along_minus_eps():
    b = _batch()
    obj = ForceDenoising(sigma=0.04, temperature=300.0)
    k = obj.stiffness
    assert k == pytest.approx(8.617333e-5 * 300 / 0.04 ** 2, rel=1e-5)   # ~16 eV/Å^2
    exact = harmonic_runner(k, lambda sub: sub.positions)                # F(x + eps) = -k eps
    assert float(obj(_ctx(b, exact))["force_denoising"]) < 1e-20
    assert float(obj(_ctx(b, harmonic_runner(0.5 * k, lambda sub: sub.positions)))["force_denoising"]) > 1e-3
    # only equilibrium frames are used
    b.equilibrium[:] = False
    assert obj(_ctx(b, exact)) == {}


def test_riemann_score_matching_zero_for_exact_target():
    b = _batch()
    pert = RiemannPerturbation(0.5, 0.5, 1, steps=1)                     # one level: sigma = 0.5

    def exact(sub, pos, forces):
        target = noise.riemann_force_target(pos, sub.positions, 0.5, sub.batch)
        e = torch.zeros(sub.num_graphs, dtype=pos.dtype)
        return Outputs(pos[:, :1], pos.unsqueeze(-1), pos[:, 0], e, pos, False, forces=target)

    def wrong(sub, pos, forces):
        out = exact(sub, pos, forces)
        out._forces = out.forces * 1.2
        return out
    obj = RiemannScoreMatching(pert)
    assert float(obj(_ctx(b, exact))["riemann_score"]) < 1e-20
    assert float(obj(_ctx(b, wrong))["riemann_score"]) > 1e-4


def test_noise_level_classification_labels_and_loss():
    b = _batch()
    pert = RiemannPerturbation(1.0, 0.001, 2, steps=1)                   # levels 1.0 and 0.001 Å
    obj = NoiseLevelClassification(pert, hidden=4)
    obj.node_dec = nn.Identity()

    class Rule(nn.Module):                                               # large noise <=> level 0
        def __init__(self, sign):
            super().__init__()
            self.sign = sign

        def forward(self, h):
            noisy = h[:, 4]                                              # summed |displacement| (clean part is 0)
            z = self.sign * 1e3 * (noisy - 0.05)
            return torch.stack([z, -z], dim=-1)
    obj.classifier = Rule(1.0)
    runner = harmonic_runner(1.0, lambda sub: sub.positions)
    out = obj(_ctx(b, runner, seed=1))
    assert float(out["noise_level"]) < 1e-8 and float(out["noise_level/accuracy"]) == 1.0
    obj.classifier = Rule(-1.0)
    out = obj(_ctx(b, runner, seed=1))
    assert float(out["noise_level"]) > 1.0 and float(out["noise_level/accuracy"]) == 0.0


def test_coordinate_denoising_zero_for_exact_noise():
    b = _batch()
    class FirstChannel(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x, vec):
            return self.factor * vec[..., 0]
    obj = CoordinateDenoising(hidden=4, sigma=0.04)
    obj.head = FirstChannel(1.0)
    runner = harmonic_runner(1.0, lambda sub: sub.positions, sigma=0.04)  # vec = eps / sigma
    assert float(obj(_ctx(b, runner))["coord_denoising"]) < 1e-20
    obj.head = FirstChannel(0.5)
    assert float(obj(_ctx(b, runner))["coord_denoising"]) > 1e-3


# ---------------------------------------------------------------------------- with the real model
def test_potential_outputs_match_the_potential():
    pot = tiny_potential()
    b = _batch()
    out = potential_outputs(pot, b.numbers, b.positions, b.batch, b.num_graphs, create_graph=False)
    ref = pot(b.numbers, b.positions, b.batch, with_reference=False)
    assert torch.allclose(out.energy, ref["energy"], atol=1e-10)
    assert torch.allclose(out.forces, ref["forces"], atol=1e-10)
    assert out.x.shape == (len(b.numbers), 16) and out.vec.shape == (len(b.numbers), 3, 16)


def test_pretraining_passes_are_the_learned_part_without_close_atoms_check():
    """Noisy pretraining geometries may put atoms on top of each other: the objectives' forward pass is the
    potential's learned part only (no ZBL repulsion, no close-atoms error), where the potential itself refuses."""
    pot = tiny_potential()
    z = torch.as_tensor(ETHANOL_Z)
    r = torch.as_tensor(ETHANOL_R).clone()
    r[3] = r[0] + torch.tensor([0.0, 0.05, 0.0], dtype=r.dtype)        # 0.05 Å apart: deep in the ZBL range
    batch = torch.zeros(len(z), dtype=torch.long)
    with pytest.raises(ValueError, match="apart"):
        pot(z, r, batch)
    out = potential_outputs(pot, z, r, batch, 1, create_graph=False)
    learned = pot.atomic_energies(z, r, batch, learned_only=True)
    assert torch.equal(out.e_atom, learned) and torch.isfinite(out.forces).all()
    far = r.clone()
    far[3] = far[0] + torch.tensor([0.0, 0.45, 0.0], dtype=r.dtype)     # inside r_off: the repulsion is on
    assert float(pot.atomic_energies(z, far, batch).sum() - pot.atomic_energies(z, far, batch, learned_only=True).sum()) > 1.0


def test_noise_level_logits_are_rotation_invariant():
    pot = tiny_potential()
    b = _batch()
    obj = NoiseLevelClassification(RiemannPerturbation(), hidden=16).double()
    with torch.no_grad():
        for p in obj.parameters():
            p.add_(0.1 * torch.randn_like(p))
    noisy = b.positions + 0.2 * torch.randn(b.positions.shape, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(2))
    rot = random_rotation(11)

    def logits(clean, pert):
        xc = potential_outputs(pot, b.numbers, clean, b.batch, b.num_graphs, forces=False).x
        xn = potential_outputs(pot, b.numbers, pert, b.batch, b.num_graphs, forces=False).x
        return obj.logits(xc, xn, b.batch, b.num_graphs)
    l1 = logits(b.positions, noisy)
    l2 = logits(b.positions @ rot.T + 1.5, noisy @ rot.T + 1.5)
    assert l1.shape == (4, 50)
    assert torch.allclose(l1, l2, atol=1e-9)
    assert float((logits(b.positions, b.positions) - l1).detach().abs().max()) > 1e-6   # and they do see the noise


@pytest.mark.parametrize("method", ["et-oreo", "et-oro", "3d-emgp", "denoise"])
def test_every_method_gives_a_finite_loss_and_gradients_everywhere(method):
    pot = tiny_potential(dtype=torch.float32)
    pot.train()
    task = PretrainTask(pot, build_objectives(ObjectivesConfig(method=method), 16))
    b = _corpus().collate(np.arange(4))
    loss, parts = task(b, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert all(p.grad is not None for p in task.parameters())   # DDP needs every parameter in the graph
    expected = {"et-oreo": {"force_matching", "zero_force", "force_denoising"}, "et-oro": {"force_matching"},
                "3d-emgp": {"riemann_score", "noise_level", "noise_level/accuracy"},
                "denoise": {"coord_denoising"}}[method]
    assert set(parts) == expected


def test_clean_pass_covers_only_frames_an_objective_reads():
    b = _batch()
    seen = []
    base = harmonic_runner(3.0, lambda sub: 0.9 * sub.positions)

    def runner(sub, pos, forces):
        seen.append(sub.num_graphs)
        return base(sub, pos, forces)
    task = PretrainTask(nn.Linear(1, 1), {"force_matching": ForceMatching()})
    loss, parts = task(b, torch.Generator().manual_seed(0), runner=runner)
    assert seen == [2]                                      # the two ethanol frames with forces, not the water
    full = ForceMatching()(_ctx(b, base))["force_matching"]
    assert torch.allclose(parts["force_matching"], full.detach())
    assert task.frames_used(np.array([True, False]), np.array([False, True])).tolist() == [True, False]
