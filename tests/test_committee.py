"""Committees (forcefield/committee.py): mean and spread of several potentials, one model file, the calculator's
uncertainty results, the CLI, and what exports do with a committee. Tiny random ET models: seconds in all."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from forcefield import OreoCalculator
from forcefield.cli import main
from forcefield.committee import COMMITTEE_FORMAT, Committee, is_committee, save_committee
from forcefield.io import ModelFileError, load_potential, load_trainable_potential, open_model_file, save_model
from tests.helpers import ETHANOL_R, ETHANOL_Z, tiny_potential

Z = torch.as_tensor(ETHANOL_Z)
R = torch.as_tensor(ETHANOL_R, dtype=torch.float64)


def members(n=3, dtype=torch.float64, **kw):
    return [tiny_potential(dtype=dtype, seed=seed, **kw) for seed in range(n)]


def two_structures():
    """Ethanol and a distorted copy in one batch."""
    g = torch.Generator().manual_seed(1)
    r2 = R + 0.05 * torch.randn(R.shape, generator=g, dtype=torch.float64)
    return torch.cat([Z, Z]), torch.cat([R, r2]), torch.repeat_interleave(torch.arange(2), len(Z))


@pytest.fixture()
def member_files(tmp_path):
    paths = []
    for k, m in enumerate(members(3, dtype=torch.float32)):
        m.set_metadata(name=f"seed{k}")
        paths.append(save_model(m, tmp_path / f"seed{k}.pt"))
    return paths


def test_mean_and_std_are_those_of_the_members_computed_separately():
    pots = members(3)
    committee = Committee(pots)
    numbers, positions, batch = two_structures()
    sep = [p(numbers, positions, batch) for p in pots]
    e = torch.stack([o["energy"] for o in sep])            # (M, B)
    f = torch.stack([o["forces"] for o in sep])            # (M, N, 3)
    out = committee.energy_forces_spread(numbers, positions, batch)
    torch.testing.assert_close(out["energy"], e.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(out["forces"], f.mean(0), rtol=0, atol=1e-12)
    # the documented convention: population std (divide by M), torch.std(..., unbiased=False)
    torch.testing.assert_close(out["energy_std"], torch.std(e, 0, unbiased=False), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["forces_std"], torch.std(f, 0, unbiased=False), rtol=1e-10, atol=1e-12)
    assert out["energy_std"].shape == (2,) and out["forces_std"].shape == (len(numbers), 3)
    # forces_std_max: per structure, the largest per-atom norm of the force std = max_i sqrt(mean_k |F_i^k - F_i|^2)
    dev = (f - f.mean(0)).pow(2).sum(-1).mean(0).sqrt()    # (N,)
    expected = torch.stack([dev[batch == b].max() for b in range(2)])
    torch.testing.assert_close(out["forces_std_max"], expected, rtol=1e-10, atol=1e-12)
    assert bool((out["energy_std"] > 0).all()) and bool((out["forces_std_max"] > 0).all())
    torch.testing.assert_close(out["member_energy"], e, rtol=0, atol=0)
    # the plain call (every existing consumer) gives the same mean
    plain = committee(numbers, positions, batch)
    assert set(plain) == {"energy", "forces"}
    torch.testing.assert_close(plain["energy"], out["energy"], rtol=0, atol=0)
    torch.testing.assert_close(plain["forces"], out["forces"], rtol=0, atol=0)
    # float32 positions: forces come back in their dtype, like a single potential
    assert committee(Z, R.float())["forces"].dtype == torch.float32


def test_identical_members_have_zero_spread():
    committee = Committee([tiny_potential(seed=4) for _ in range(3)])
    out = committee.energy_forces_spread(Z, R)
    single = committee.members[0](Z, R)
    assert float(out["energy_std"].abs().max()) == 0.0
    assert float(out["forces_std"].abs().max()) == 0.0 and float(out["forces_std_max"].max()) == 0.0
    torch.testing.assert_close(out["energy"], single["energy"], rtol=0, atol=1e-9)
    torch.testing.assert_close(out["forces"], single["forces"], rtol=0, atol=1e-12)


def test_committee_forces_are_minus_the_gradient_of_the_mean_energy():
    committee = Committee(members(2))
    forces = committee(Z, R)["forces"]
    h, fd = 1e-5, torch.zeros_like(R)
    for i in range(R.shape[0]):
        for c in range(3):
            rp, rm = R.clone(), R.clone()
            rp[i, c] += h
            rm[i, c] -= h
            ep = committee(Z, rp, compute_forces=False)["energy"]
            em = committee(Z, rm, compute_forces=False)["energy"]
            fd[i, c] = -(ep - em).sum() / (2 * h)
    torch.testing.assert_close(forces, fd, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip_is_bit_identical(tmp_path, monkeypatch):
    pots = members(3, dtype=torch.float32)
    committee = Committee(pots, sources=["a.pt", "b.pt", "c.pt"], metadata={"note": "seeds 0-2"})
    path = save_committee(pots, tmp_path / "committee.pt", metadata={"note": "seeds 0-2"},
                          sources=["a.pt", "b.pt", "c.pt"])
    assert [p.name for p in tmp_path.iterdir()] == ["committee.pt"]          # atomic: no temporary file left
    mf = open_model_file(path)
    assert mf.kind == COMMITTEE_FORMAT and mf.is_potential and not mf.is_export
    loaded = load_potential(path)
    assert isinstance(loaded, Committee) and is_committee(loaded) and not loaded.training
    assert loaded.members[0].atomref.dtype == torch.float64            # reference energies stay float64
    ref_state, got_state = committee.state_dict(), loaded.state_dict()
    assert list(ref_state) == list(got_state)
    assert all(torch.equal(ref_state[k], got_state[k]) and ref_state[k].dtype == got_state[k].dtype
               for k in ref_state)
    r = R.float()
    a, b = committee.energy_forces_spread(Z, r), loaded.energy_forces_spread(Z, r)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = loaded.metadata
    assert meta["committee_size"] == 3 and meta["committee_members"] == ["a.pt", "b.pt", "c.pt"]
    assert meta["molecule"] == "ethanol" and meta["note"] == "seeds 0-2"
    # a shipped-name style path ("committee" / "committee.pt") resolves like any other model file
    import forcefield.io as io
    monkeypatch.setattr(io, "PRETRAINED_DIR", tmp_path)
    assert isinstance(load_potential("committee"), Committee)
    assert isinstance(load_potential("committee.pt", dtype=torch.float64), Committee)
    with pytest.raises(ModelFileError, match="cannot be trained or fine-tuned as one model"):
        load_trainable_potential(path)


def test_calculator_fills_the_spread_for_a_committee_only(tmp_path, member_files):
    path = save_committee(member_files, tmp_path / "committee.pt")
    calc = OreoCalculator(path, dtype="float64")
    assert {"energy_std", "forces_std", "forces_std_max"} <= set(calc.implemented_properties)
    atoms = Atoms(numbers=ETHANOL_Z, positions=ETHANOL_R)
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    ref = load_potential(path, dtype=torch.float64).energy_forces_spread(Z, R)
    assert energy == pytest.approx(float(ref["energy"][0]), abs=1e-9)
    np.testing.assert_allclose(forces, ref["forces"].numpy(), atol=1e-10)
    res = calc.results
    assert isinstance(res["energy_std"], float) and res["energy_std"] > 0
    assert res["forces_std"].shape == (len(atoms), 3) and res["forces_std"].dtype == np.float64
    assert res["forces_std_max"] == pytest.approx(float(np.linalg.norm(res["forces_std"], axis=1).max()))
    assert calc.get_property("forces_std_max", atoms) == res["forces_std_max"]
    # a committee module handed over directly works the same
    assert "forces_std" in OreoCalculator(load_potential(path)).implemented_properties
    # a single model: absent, not zero
    single = OreoCalculator(member_files[0])
    atoms.calc = single
    atoms.get_potential_energy()
    assert not {"energy_std", "forces_std", "forces_std_max"} & set(single.results)
    assert "forces_std" not in single.implemented_properties
    with pytest.raises(PropertyNotImplementedError):
        single.get_property("forces_std", atoms)


def test_existing_consumers_get_the_mean(tmp_path, member_files):
    """evaluate and md's ForceField call a committee like any potential."""
    from forcefield.data.conformations import ConformationSet
    from forcefield.evaluate import predict
    from md.potential import ForceField
    committee = load_potential(save_committee(member_files, tmp_path / "committee.pt"), dtype=torch.float64)
    numbers, positions, batch = two_structures()
    mean = committee(numbers, positions, batch)
    cset = ConformationSet(numbers=numbers.numpy(), positions=positions.numpy(), ptr=np.array([0, 9, 18]))
    pred = predict(committee, cset)
    np.testing.assert_allclose(pred["energy"], mean["energy"].numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(pred["forces"], mean["forces"].detach().numpy(), rtol=0, atol=1e-10)
    e, f = ForceField(committee)(positions, numbers, batch, 2)
    torch.testing.assert_close(e, mean["energy"], rtol=0, atol=1e-9)
    torch.testing.assert_close(f, mean["forces"].detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("field, odd, fix", [
    ("cutoff", dict(cutoff=3.5), "same model config"),
    ("elements", dict(elements=(1, 6, 7, 8)), "same elements"),
    ("molecule", dict(molecule="aspirin"), "one molecule"),
])
def test_members_that_disagree_are_refused_naming_the_field_and_the_fix(field, odd, fix):
    with pytest.raises(ValueError, match=f"disagree on {field}: .*{fix}"):
        Committee([tiny_potential(seed=0), tiny_potential(seed=1, **odd)])


def test_other_refusals_name_the_fix(tmp_path, member_files):
    a, b = tiny_potential(seed=0), tiny_potential(seed=1)
    b.set_metadata(units={"energy": "kcal/mol", "length": "Å", "forces": "kcal/mol/Å"})
    a.set_metadata(units={"energy": "eV", "length": "Å", "forces": "eV/Å"})
    with pytest.raises(ValueError, match="disagree on units"):
        Committee([a, b])
    # poly24 models of other polymers
    c, d = tiny_potential(seed=0, molecule=None), tiny_potential(seed=1, molecule=None)
    c.set_metadata(polymers=["PE"])
    d.set_metadata(polymers=["PP"])
    with pytest.raises(ValueError, match="disagree on polymers: .*same polymers"):
        Committee([c, d])
    # models trained on files record no molecule name, but the formula of their frames (oreo fit members)
    c, d = tiny_potential(seed=0, molecule=None), tiny_potential(seed=1, molecule=None)
    c.set_metadata(formula="C2H6O")
    d.set_metadata(formula="C9H8O4")
    with pytest.raises(ValueError, match="disagree on formula: formula='C2H6O' .*frames of the same molecule"):
        Committee([c, d])
    d.set_metadata(formula="C2H6O")
    assert Committee([c, d]).size == 2
    with pytest.raises(ValueError, match="disagree on dtype: .*same dtype"):
        Committee([tiny_potential(seed=0), tiny_potential(seed=1, dtype=torch.float32)])
    with pytest.raises(ValueError, match="at least 2 models, got 1; pass two or more"):
        Committee([tiny_potential()])
    with pytest.raises(ValueError, match="itself a committee; pass its members"):
        Committee([Committee(members(2)), tiny_potential()])
    from forcefield.export import export_torchscript
    ts = export_torchscript(member_files[0], tmp_path / "ts.pt")
    with pytest.raises(ValueError, match="is an export .*model file it was exported from"):
        save_committee([ts, member_files[1]], tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


def test_exporting_a_committee_is_an_error_that_names_the_limitation(tmp_path, member_files):
    from forcefield.compiled import export_compiled
    from forcefield.export import export_torchscript
    path = save_committee(member_files, tmp_path / "committee.pt")
    for model in (path, load_potential(path)):
        with pytest.raises(ValueError, match="cannot export a committee \\(3 members\\) as TorchScript: an export "
                                             "holds one model.*seed0.pt"):
            export_torchscript(model, tmp_path / "ts.pt")
        with pytest.raises(ValueError, match="cannot export a committee .* AOTInductor"):   # before any compiling
            export_compiled(model, tmp_path / "c.pt2")
    assert not (tmp_path / "ts.pt").exists() and not (tmp_path / "c.pt2").exists()


def test_cli_builds_a_committee_file_that_loads(tmp_path, member_files, capsys):
    out = tmp_path / "committee.pt"
    assert main(["committee", "--out", str(out)] + [str(p) for p in member_files]) == 0
    assert "committee of 3 models" in capsys.readouterr().out
    loaded = load_potential(out)
    assert isinstance(loaded, Committee) and loaded.metadata["committee_members"] == [str(p) for p in member_files]
    assert main(["info", str(out)]) == 0 and '"committee_size": 3' in capsys.readouterr().out
    assert main(["committee", "--out", str(tmp_path / "one.pt"), str(member_files[0])]) == 2
    assert "at least 2 models" in capsys.readouterr().err and not (tmp_path / "one.pt").exists()
    assert main(["committee", "--out", str(tmp_path / "x.pt"), str(member_files[0]), str(tmp_path / "nope.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["export", str(out), "-o", str(tmp_path / "ts.pt")]) == 2
    assert "cannot export a committee" in capsys.readouterr().err
