"""Physics of the potential: symmetries, forces = -dE/dr, smoothness at the cutoff, TorchScript = eager."""
import numpy as np
import pytest
import torch

from forcefield.graph import radius_graph
from tests.helpers import ETHANOL_R, ETHANOL_Z, random_rotation, tiny_potential


def _run(pot, z, r, batch=None, cell=None, pbc=None):
    z = torch.as_tensor(z, dtype=torch.long)
    r = torch.as_tensor(r, dtype=torch.float64)
    return pot(z, r, batch, cell, pbc)


@pytest.fixture(scope="module")
def pot():
    return tiny_potential()


def test_rotation_translation_invariance_and_force_equivariance(pot):
    out = _run(pot, ETHANOL_Z, ETHANOL_R)
    rot = random_rotation(3)
    r2 = torch.as_tensor(ETHANOL_R) @ rot.T + torch.tensor([1.3, -7.2, 0.4], dtype=torch.float64)
    out2 = _run(pot, ETHANOL_Z, r2)
    assert torch.allclose(out["energy"], out2["energy"], atol=1e-9, rtol=0)
    assert torch.allclose(out["forces"] @ rot.T, out2["forces"], atol=1e-9)
    # a reflection is a symmetry of the energy too (the model is E(3)-invariant)
    out3 = _run(pot, ETHANOL_Z, ETHANOL_R * np.array([-1.0, 1.0, 1.0]))
    assert torch.allclose(out["energy"], out3["energy"], atol=1e-9, rtol=0)


def test_permutation_equivariance(pot):
    perm = np.random.default_rng(0).permutation(len(ETHANOL_Z))
    out = _run(pot, ETHANOL_Z, ETHANOL_R)
    out_p = _run(pot, ETHANOL_Z[perm], ETHANOL_R[perm])
    assert torch.allclose(out["energy"], out_p["energy"], atol=1e-10, rtol=0)
    assert torch.allclose(out["forces"][perm], out_p["forces"], atol=1e-10)


def test_model_is_not_trivially_symmetric(pot):
    """Guards the tests above: moving one atom does change the energy and the forces are not zero."""
    out = _run(pot, ETHANOL_Z, ETHANOL_R)
    r = ETHANOL_R.copy()
    r[0, 0] += 0.05
    assert abs(float(_run(pot, ETHANOL_Z, r)["energy"] - out["energy"])) > 1e-6
    assert float(out["forces"].abs().max()) > 1e-4


def test_forces_match_finite_differences(pot):
    out = _run(pot, ETHANOL_Z, ETHANOL_R)
    h = 1e-5
    fd = np.zeros_like(ETHANOL_R)
    for a in range(len(ETHANOL_Z)):
        for k in range(3):
            rp, rm = ETHANOL_R.copy(), ETHANOL_R.copy()
            rp[a, k] += h
            rm[a, k] -= h
            fd[a, k] = -(float(_run(pot, ETHANOL_Z, rp)["energy"]) - float(_run(pot, ETHANOL_Z, rm)["energy"])) / (2 * h)
    np.testing.assert_allclose(out["forces"].detach().numpy(), fd, atol=1e-7, rtol=1e-5)


def _egnn_with_a_cutoff():
    from forcefield.potential import Potential
    torch.manual_seed(3)
    return Potential(backbone={"name": "egnn", "hidden": 16, "num_layers": 2, "cutoff": 3.0, "num_rbf": 8},
                     elements=[1, 6, 8], scale=0.7).double()


@pytest.mark.parametrize("backbone", ["et", "egnn"])
def test_energy_and_forces_continuous_across_cutoff(pot, backbone):
    """Two fragments pulled apart: energy and force are continuous at r = cutoff (ET, and EGNN with a finite
    cutoff: an atom entering the sphere once changed every neighbour's normalisation in a step)."""
    pot = pot if backbone == "et" else _egnn_with_a_cutoff()
    rc = pot.cutoff
    def config(d):
        return np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.1], [d, 0.0, 0.0]])
    z = np.array([6, 8, 1])
    # atom 2 interacts only with atom 0 near d = rc (atom 1 is farther)
    e_in = _run(pot, z, config(rc - 1e-6))
    e_out = _run(pot, z, config(rc + 1e-6))
    assert abs(float(e_in["energy"] - e_out["energy"])) < 1e-9
    assert float((e_in["forces"] - e_out["forces"]).abs().max()) < 1e-5
    # and the interaction is real just inside the cutoff region
    e_mid = _run(pot, z, config(rc - 0.5))
    assert abs(float(e_mid["energy"] - e_out["energy"])) > 1e-7


def test_batched_equals_single(pot):
    z = np.concatenate([ETHANOL_Z, ETHANOL_Z[:5]])
    r = np.concatenate([ETHANOL_R, ETHANOL_R[:5] + 0.1])
    batch = torch.tensor([0] * 9 + [1] * 5)
    out = _run(pot, z, r, batch)
    a = _run(pot, ETHANOL_Z, ETHANOL_R)
    b = _run(pot, ETHANOL_Z[:5], ETHANOL_R[:5] + 0.1)
    assert torch.allclose(out["energy"], torch.cat([a["energy"], b["energy"]]), atol=1e-10)
    assert torch.allclose(out["forces"], torch.cat([a["forces"], b["forces"]]), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchscript_equals_eager(dtype):
    pot = tiny_potential(dtype=dtype)
    scripted = torch.jit.script(pot)
    z = torch.as_tensor(ETHANOL_Z)
    r = torch.as_tensor(ETHANOL_R, dtype=dtype)
    a, b = pot(z, r), scripted(z, r)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(a["energy"], b["energy"], atol=tol, rtol=0)
    assert torch.allclose(a["forces"], b["forces"], atol=tol)


def test_periodic_box_larger_than_cutoff_equals_molecule(pot):
    cell = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 30.0
    pbc = torch.tensor([[True, True, True]])
    a = _run(pot, ETHANOL_Z, ETHANOL_R)
    b = _run(pot, ETHANOL_Z, ETHANOL_R + 10.0, None, cell, pbc)
    assert torch.allclose(a["energy"], b["energy"], atol=1e-9)
    assert torch.allclose(a["forces"], b["forces"], atol=1e-9)


def test_periodic_images_and_neighbour_list_against_ase(pot):
    from ase import Atoms
    from ase.neighborlist import neighbor_list
    rng = np.random.default_rng(1)
    cell = np.array([[4.2, 0.0, 0.0], [0.7, 3.9, 0.0], [0.3, -0.4, 4.5]])
    frac = rng.random((6, 3))
    pos = frac @ cell
    atoms = Atoms(numbers=[6, 1, 1, 8, 1, 6], positions=pos, cell=cell, pbc=True)
    i_ase, j_ase, d_ase = neighbor_list("ijd", atoms, pot.cutoff)
    ei, vec = radius_graph(torch.as_tensor(pos), torch.zeros(6, dtype=torch.long), pot.cutoff,
                           torch.as_tensor(cell).unsqueeze(0), torch.tensor([[True, True, True]]))
    ours = sorted(zip(ei[0].tolist(), ei[1].tolist(), vec.norm(dim=1).tolist()))
    ref = sorted(zip(i_ase.tolist(), j_ase.tolist(), d_ase.tolist()))
    assert len(ours) == len(ref) > 0
    assert [o[:2] for o in ours] == [r[:2] for r in ref]
    np.testing.assert_allclose([o[2] for o in ours], [r[2] for r in ref], atol=1e-10)
    # moving an atom by a lattice vector changes nothing
    z = atoms.numbers
    c = torch.as_tensor(cell).unsqueeze(0)
    pbc = torch.tensor([[True, True, True]])
    shifted = pos.copy()
    shifted[2] += cell[0] - cell[2]
    a, b = _run(pot, z, pos, None, c, pbc), _run(pot, z, shifted, None, c, pbc)
    assert torch.allclose(a["energy"], b["energy"], atol=1e-9)
    assert torch.allclose(a["forces"], b["forces"], atol=1e-9)


def test_unknown_element_and_nan_positions_raise_clear_errors(pot):
    with pytest.raises(ValueError, match="atomic number 9 was not in this model's training data"):
        _run(pot, np.array([6, 9]), np.array([[0.0, 0, 0], [1.2, 0, 0]]))
    bad = ETHANOL_R.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _run(pot, ETHANOL_Z, bad)
    scripted = torch.jit.script(pot)
    with pytest.raises(Exception, match="atomic number 9"):
        scripted(torch.tensor([6, 9]), torch.tensor([[0.0, 0, 0], [1.2, 0, 0]], dtype=torch.float64))


def test_mixed_batch_slab_and_missing_cell(pot):
    """Molecules batched with periodic frames, slabs with a zero third vector, pbc without a cell."""
    z = torch.as_tensor(np.concatenate([ETHANOL_Z, ETHANOL_Z]))
    r = torch.as_tensor(np.concatenate([ETHANOL_R, ETHANOL_R + 1.0]))
    batch = torch.tensor([0] * 9 + [1] * 9)
    cell = torch.zeros(2, 3, 3, dtype=torch.float64)
    cell[1] = torch.eye(3, dtype=torch.float64) * 12.0
    out = pot(z, r, batch, cell, torch.tensor([[False] * 3, [True] * 3]))
    single = _run(pot, ETHANOL_Z, ETHANOL_R)
    assert torch.allclose(out["energy"][0], single["energy"][0], atol=1e-10)
    alone = _run(pot, ETHANOL_Z, ETHANOL_R + 1.0, None, cell[1:], torch.tensor([[True] * 3]))
    assert torch.allclose(out["energy"][1], alone["energy"][0], atol=1e-10)      # the periodic frame of the batch
    # a 6 Å slab: images within the 4 Å cutoff in x and y (they change the energy), none along the zero vector
    slab = torch.tensor([[[6.0, 0, 0], [0, 6.0, 0], [0, 0, 0]]], dtype=torch.float64)
    out = _run(pot, ETHANOL_Z, ETHANOL_R, None, slab, torch.tensor([[True, True, False]]))
    far = torch.tensor([[[6.0, 0, 0], [0, 6.0, 0], [0, 0, 50.0]]], dtype=torch.float64)
    ref = _run(pot, ETHANOL_Z, ETHANOL_R, None, far, torch.tensor([[True, True, True]]))
    assert abs(float(out["energy"] - single["energy"])) > 1e-4
    assert torch.allclose(out["energy"], ref["energy"], atol=1e-10)
    with pytest.raises(ValueError, match="zero cell vector"):
        _run(pot, ETHANOL_Z, ETHANOL_R, None, torch.zeros(1, 3, 3, dtype=torch.float64),
             torch.tensor([[True, True, True]]))


# ------------------------------------------------------------------------------ close atoms and repulsion
def _pair(z, r):
    """Two atoms ``z`` (2,) at distance ``r`` Å along x."""
    return np.asarray(z), np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]])


def _without_repulsion(pot):
    from forcefield.potential import Potential
    off = Potential.from_config({**pot.config, "repulsion": False}, pot.state_dict())
    return off.to(pot.scale.dtype).eval()


def test_coincident_atoms_raise_naming_the_atoms(pot):
    """Atoms on top of each other gave NaN with no error: now every path refuses them before the model runs."""
    r = ETHANOL_R.copy()
    r[5] = r[2] + [0.03, 0.0, 0.0]
    for model in (pot, torch.jit.script(pot)):
        with pytest.raises(Exception, match=r"atoms 2 and 5 are 0\.030 Å apart \(closer than 0\.100 Å\).*duplicate"):
            _run(model, ETHANOL_Z, r)
    # in a batch: indices within the structure, and which structure
    z = np.concatenate([ETHANOL_Z, ETHANOL_Z])
    with pytest.raises(ValueError, match="atoms 2 and 5 are 0.030 Å apart .* of structure 1"):
        _run(pot, z, np.concatenate([ETHANOL_R, r + 20.0]), torch.tensor([0] * 9 + [1] * 9))
    # an atom on a periodic image of another
    cell = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 6.0
    with pytest.raises(ValueError, match="atoms 0 and 1 are 0.000 Å apart"):
        _run(pot, np.array([6, 8]), np.array([[0.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), None, cell,
             torch.tensor([[True, True, True]]))
    # 0.1 Å and more is evaluated (the repulsion takes over), with finite numbers
    out = _run(pot, *_pair([6, 6], 0.1))
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()


def test_repulsion_rises_pushes_apart_and_is_smooth(pot):
    """Below r_off the ZBL term dominates: energy up, force pushing the atoms apart; forces = -dE/dr by finite
    differences through the switch; beyond r_off exactly nothing changes."""
    off = _without_repulsion(pot)
    assert pot.repulsion and not off.repulsion
    r_on, r_off = pot.repulsion_r_on, pot.repulsion_r_off
    for z in ([6, 6], [1, 1], [1, 8]):
        rs = np.linspace(0.15, r_off + 0.1, 30)
        outs = [_run(pot, *_pair(z, r)) for r in rs]
        e = np.array([float(o["energy"]) for o in outs])
        e_rep = e - np.array([float(_run(off, *_pair(z, r))["energy"]) for r in rs])
        push = np.array([float(o["forces"][1, 0]) for o in outs])          # on atom 1 (at +x): > 0 is apart
        inside = rs < r_off
        assert np.all(e_rep[inside] > 0) and np.all(e_rep[~inside] == 0.0)
        assert np.all(np.diff(e_rep[inside]) < 0)                           # falls as the atoms separate
        assert np.all(np.diff(e[rs < r_on]) < 0) and np.all(push[rs < 0.5 * (r_on + r_off)] > 0)
        assert e_rep[0] > 20.0                                              # eV: fusing is out of reach
        # finite differences across the switch region (and past r_off)
        h = 1e-5
        for r in np.linspace(r_on - 0.05, r_off + 0.05, 13):
            e_plus, e_minus = (float(_run(pot, *_pair(z, r + s))["energy"]) for s in (h, -h))
            fd = -(e_plus - e_minus) / (2 * h)
            f = float(_run(pot, *_pair(z, r))["forces"][1, 0])
            assert f == pytest.approx(fd, rel=1e-6, abs=1e-6), (z, r)


@pytest.mark.slow
def test_repulsion_is_in_every_path(pot):
    """Eager, TorchScript and the traced energy+force graph that AOTInductor compiles: the same numbers with a
    pair inside r_off (the repulsion contributes) and without."""
    from forcefield.compiled import trace_energy_forces
    from forcefield.graph import half_pairs

    close = ETHANOL_R.copy()
    close[3] = close[0] + [0.0, 0.42, 0.0]
    gm, _ = trace_energy_forces(pot, torch.float64)
    scripted = torch.jit.script(pot)
    off = _without_repulsion(pot)
    for r, active in ((close, True), (ETHANOL_R, False)):
        z, rt = torch.as_tensor(ETHANOL_Z), torch.as_tensor(r)
        ref = pot(z, rt, with_reference=False)
        delta = float(ref["energy"] - off(z, rt, with_reference=False)["energy"])
        assert (delta > 1.0) if active else (delta == 0.0)
        s = scripted(z, rt, with_reference=False)
        pairs, _ = half_pairs(rt, torch.zeros(len(z), dtype=torch.long), pot.cutoff)
        e_atom, forces = gm(z, rt, pairs, torch.zeros(pairs.shape[1], 3, dtype=torch.float64))
        for e, f in ((s["energy"], s["forces"]), (e_atom.sum(), forces)):
            assert float(e.sum()) == pytest.approx(float(ref["energy"].sum()), abs=1e-9)
            assert float((f - ref["forces"]).abs().max()) < 1e-9


RMD17_MOLECULES_CHECKED = ("ethanol", "salicylic", "aspirin")   # ethanol and salicylic: shortest distances


def _rmd17_test(molecule):
    from forcefield.data import DataNotFoundError, load_rmd17
    try:
        return load_rmd17(molecule, split="test")
    except (DataNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"rMD17 {molecule} not found under $OREO_DATA_DIR: {exc}")


@pytest.mark.parametrize("molecule", RMD17_MOLECULES_CHECKED)
def test_repulsion_is_exactly_zero_at_every_rmd17_test_frame(molecule):
    """Energy and gradient of the repulsion are exactly 0 at every held-out frame: training is unaffected."""
    from forcefield.potential import REPULSION_R_OFF, REPULSION_R_ON, zbl_pair_energy

    frames = _rmd17_test(molecule)
    z = torch.as_tensor(frames.frame_numbers(0))
    pos = torch.as_tensor(np.stack([frames.frame_positions(f) for f in range(len(frames))]))  # (F, n, 3)
    i, j = torch.triu_indices(len(z), len(z), offset=1)
    pos.requires_grad_(True)
    r = (pos[:, j] - pos[:, i]).norm(dim=-1)                                  # every pair of every frame
    assert len(frames) == 1000 and float(r.detach().min()) > REPULSION_R_OFF + 0.2
    e = zbl_pair_energy(z[i].double(), z[j].double(), r, REPULSION_R_ON, REPULSION_R_OFF)
    (g,) = torch.autograd.grad(e.sum(), pos)
    assert bool((e == 0).all()) and bool((g == 0).all())


@pytest.mark.parametrize("name", ["aspirin", "ethanol"])
def test_shipped_models_unchanged_on_real_frames(name):
    """The shipped models load with the repulsion on and give the numbers of the model without it (as before the
    repulsion existed) on held-out rMD17 frames."""
    from forcefield import load_potential

    frames = _rmd17_test(name)
    pot = load_potential(name)                                               # float32, as users load it
    assert pot.repulsion
    off = _without_repulsion(pot)
    b = frames.collate(np.arange(0, 1000, 50), dtype=torch.float32)
    a, c = pot(b.numbers, b.positions, b.batch), off(b.numbers, b.positions, b.batch)
    torch.testing.assert_close(a["energy"], c["energy"], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(a["forces"], c["forces"], rtol=1e-6, atol=1e-6)
