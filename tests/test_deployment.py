"""Deployment: model files, the ASE calculator, the TorchScript export, clear errors for bad files."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from forcefield import OreoCalculator
from forcefield.export import export_torchscript, read_export_metadata
from forcefield.io import ModelFileError, load_potential, save_model
from tests.helpers import ETHANOL_R, ETHANOL_Z, tiny_potential


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(tiny_potential(dtype=torch.float64), path)
    return path


def test_model_file_round_trip(model_file):
    pot = tiny_potential(dtype=torch.float64)
    loaded = load_potential(model_file, dtype=torch.float64)
    z, r = torch.as_tensor(ETHANOL_Z), torch.as_tensor(ETHANOL_R)
    a, b = pot(z, r), loaded(z, r)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])
    assert loaded.metadata["molecule"] == "ethanol"


def test_calculator_matches_potential_and_energy_is_precise(model_file):
    atoms = Atoms(numbers=ETHANOL_Z, positions=ETHANOL_R)
    atoms.calc = OreoCalculator(model_file, dtype="float64")
    pot = load_potential(model_file, dtype=torch.float64)
    ref = pot(torch.as_tensor(ETHANOL_Z), torch.as_tensor(ETHANOL_R))
    assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"]), abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"].numpy(), atol=1e-10)
    # float32 model: the large reference energy is still added in float64
    atoms32 = atoms.copy()
    atoms32.calc = OreoCalculator(model_file, dtype="float32")
    assert atoms32.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=2e-4)
    assert atoms.get_potential_energy() < -4000  # reference energies (-4180.6 eV) included


def test_calculator_change_detection_matches_ase(model_file):
    """The exact-comparison check_state reports what ASE's compare_atoms reports, for every kind of change."""
    from ase.calculators.calculator import compare_atoms
    calc = OreoCalculator(model_file, dtype="float64")
    base = Atoms(numbers=ETHANOL_Z, positions=ETHANOL_R)
    base.calc = calc
    base.get_forces()
    edits = {
        "nothing": lambda a: None,
        "positions": lambda a: a.positions.__setitem__((0, 0), a.positions[0, 0] + 1e-3),
        "numbers": lambda a: a.numbers.__setitem__(8, 8),
        "cell": lambda a: a.set_cell([10.0, 10.0, 10.0]),
        "pbc": lambda a: a.set_pbc([True, False, False]),
        "charges": lambda a: a.set_initial_charges(np.ones(len(a))),
        "magmoms": lambda a: a.set_initial_magnetic_moments(np.ones(len(a))),
        "momenta only": lambda a: a.set_momenta(np.ones((len(a), 3))),
    }
    for name, edit in edits.items():
        a = base.copy()
        edit(a)
        assert sorted(calc.check_state(a)) == sorted(compare_atoms(calc.atoms, a)), name
    assert calc.check_state(base) == []


def test_calculator_short_nve_md_conserves_energy(model_file):
    atoms = Atoms(numbers=ETHANOL_Z, positions=ETHANOL_R)
    atoms.calc = OreoCalculator(model_file, dtype="float64")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    e0 = atoms.get_total_energy()
    energies = []
    for _ in range(40):
        dyn.run(1)
        energies.append(atoms.get_total_energy())
    assert np.all(np.isfinite(energies))
    assert max(abs(e - e0) for e in energies) < 5e-3  # eV, 40 steps of 0.25 fs
    assert np.abs(atoms.positions - ETHANOL_R).max() > 1e-3  # the atoms did move


@pytest.mark.slow
def test_torchscript_export_equals_eager_and_loads_with_torch_only(model_file, tmp_path):
    out = tmp_path / "tiny_ts.pt"
    export_torchscript(model_file, out, dtype=torch.float64)
    meta = read_export_metadata(out)
    assert meta["units"]["energy"] == "eV"
    assert meta["export_format"] == "oreo-torchscript"
    eager = load_potential(model_file, dtype=torch.float64)
    ref = eager(torch.as_tensor(ETHANOL_Z), torch.as_tensor(ETHANOL_R))
    # a Python that imports neither forcefield nor ase
    code = (
        "import sys, json, torch\n"
        "sys.modules['forcefield'] = None; sys.modules['ase'] = None\n"
        f"m = torch.jit.load({str(out)!r})\n"
        f"z = torch.tensor({ETHANOL_Z.tolist()}); r = torch.tensor({ETHANOL_R.tolist()}, dtype=torch.float64)\n"
        "o = m(z, r)\n"
        "print(json.dumps({'e': o['energy'].tolist(), 'f': o['forces'].tolist()}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout)
    assert got["e"][0] == pytest.approx(float(ref["energy"]), abs=1e-9)
    np.testing.assert_allclose(np.array(got["f"]), ref["forces"].numpy(), atol=1e-10)
    # the calculator loads exports too
    atoms = Atoms(numbers=ETHANOL_Z, positions=ETHANOL_R)
    atoms.calc = OreoCalculator(out, dtype="float64")
    assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"]), abs=1e-9)


def test_missing_and_corrupt_model_files_give_clear_errors(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        OreoCalculator(tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ModelFileError, match="corrupt"):
        OreoCalculator(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="not an oreo model"):
        load_potential(other)


def test_calculator_rejects_unknown_element(model_file):
    atoms = Atoms(numbers=[6, 9], positions=[[0, 0, 0], [1.3, 0, 0]])
    atoms.calc = OreoCalculator(model_file)
    with pytest.raises(ValueError, match="atomic number 9"):
        atoms.get_potential_energy()


def test_torchscript_export_takes_float64_positions_and_documents_its_call(model_file, tmp_path):
    """torch.tensor(atoms.positions) is float64: a float32 export casts inside and answers in the input dtype."""
    out = export_torchscript(model_file, tmp_path / "tiny32.pt")             # float32, the default
    meta = read_export_metadata(out)
    assert meta["export_dtype"] == "float32" and meta["units"] == {"energy": "eV", "length": "Å", "forces": "eV/Å"}
    assert "float64" in meta["inputs"]["positions"] and "dtype of positions" in meta["outputs"]["forces"]
    assert meta["repulsion"] == {"r_on": 0.3, "r_off": 0.6}
    module = torch.jit.load(str(out))
    eager = load_potential(model_file, dtype=torch.float64)
    z = torch.as_tensor(ETHANOL_Z)
    ref = eager(z, torch.as_tensor(ETHANOL_R))
    for dtype in (torch.float64, torch.float32):
        got = module(z, torch.tensor(ETHANOL_R, dtype=dtype))
        assert got["energy"].dtype == torch.float64 and got["forces"].dtype == dtype
        assert float(got["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-3)
        np.testing.assert_allclose(got["forces"].double().numpy(), ref["forces"].numpy(), atol=1e-4)
    # a periodic call with a float64 cell as well
    cell = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 30.0
    got = module(z, torch.as_tensor(ETHANOL_R) + 10.0, None, cell, torch.tensor([[True, True, True]]))
    np.testing.assert_allclose(got["forces"].numpy(), ref["forces"].numpy(), atol=1e-4)


def test_calculator_refuses_coincident_atoms_naming_them(model_file, tmp_path):
    positions = ETHANOL_R.copy()
    positions[7] = positions[1]                                               # a duplicated atom
    for model in (model_file, export_torchscript(model_file, tmp_path / "ts.pt")):
        atoms = Atoms(numbers=ETHANOL_Z, positions=positions)
        atoms.calc = OreoCalculator(model)
        with pytest.raises(Exception, match=r"atoms 1 and 7 are 0\.000 Å apart"):
            atoms.get_potential_energy()


def test_repulsion_setting_is_stored_in_model_files(tmp_path):
    """On by default; ``repulsion: false`` or custom radii are kept in the file; files written before the setting
    existed (no key) load with it on."""
    from forcefield.io import _read_record
    pot = tiny_potential()
    assert pot.config["repulsion"] == {"r_on": 0.3, "r_off": 0.6}
    old = tmp_path / "old.pt"
    save_model(pot, old)
    rec = _read_record(old)
    del rec["config"]["repulsion"]
    torch.save(rec, old)
    assert load_potential(old).repulsion
    off = tiny_potential(repulsion=False)
    save_model(off, tmp_path / "off.pt")
    loaded = load_potential(tmp_path / "off.pt", dtype=torch.float64)
    assert not loaded.repulsion and loaded.config["repulsion"] is False
    z, r = torch.tensor([6, 6]), torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]], dtype=torch.float64)
    assert float(loaded(z, r)["energy"]) < float(tiny_potential()(z, r)["energy"]) - 100.0
    wide = tiny_potential(repulsion={"r_off": 0.7})
    save_model(wide, tmp_path / "wide.pt")
    assert load_potential(tmp_path / "wide.pt").config["repulsion"] == {"r_on": 0.3, "r_off": 0.7}
    with pytest.raises(ValueError, match="r_on < r_off <= cutoff"):
        tiny_potential(repulsion={"r_off": 9.0})


def test_one_dispatch_reads_every_kind_of_model_file(model_file, tmp_path):
    """forcefield.io.open_model_file tells every kind apart: model files, training checkpoints and compact run
    states (their EMA model), exports (frozen), property models (not potentials)."""
    from forcefield.io import (ModelFileNotFound, load_model, load_trainable_potential, model_record,
                               open_model_file)
    from forcefield.pretrain.property import PropertyModel, save_property_model
    from forcefield.train.runstate import pack_checkpoint

    pot = tiny_potential(dtype=torch.float32).train()
    z, r = torch.as_tensor(ETHANOL_Z), torch.as_tensor(ETHANOL_R, dtype=torch.float32)
    opt = torch.optim.AdamW(pot.parameters())
    pot(z, r)["energy"].sum().backward()
    opt.step()
    pot.eval()
    ck = {"format": "oreo-checkpoint", "model": model_record(pot), "train_model": pot.state_dict(),
          "optimizer": opt.state_dict()}
    torch.save(ck, tmp_path / "last.pt")
    torch.save(pack_checkpoint(ck), tmp_path / "state.pt")
    ref = pot(z, r)["energy"]
    for name in ("last.pt", "state.pt"):
        mf = open_model_file(tmp_path / name)
        assert mf.kind == "oreo-potential" and mf.wrapper in ("oreo-checkpoint", "oreo-runstate")
        assert torch.allclose(load_potential(tmp_path / name)(z, r)["energy"], ref)
        assert load_trainable_potential(tmp_path / name).training
    ts = export_torchscript(model_file, tmp_path / "ts.pt")
    assert open_model_file(ts).is_export and open_model_file(ts).kind == "torchscript"
    prop = PropertyModel({"name": "et", "hidden": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff": 4.0},
                         mean=1.0, std=2.0)
    save_property_model(prop, tmp_path / "prop.pt")
    loaded = load_model(tmp_path / "prop.pt")
    assert isinstance(loaded, PropertyModel) and loaded.mean.dtype == torch.float64
    batch = torch.zeros(len(z), dtype=torch.long)
    assert torch.allclose(loaded(z, r, batch, 1), prop.eval()(z, r, batch, 1))
    with pytest.raises(ModelFileError, match="not a potential"):
        load_potential(tmp_path / "prop.pt")
    with pytest.raises(FileNotFoundError, match="not found"):      # ModelFileNotFound is both
        open_model_file(tmp_path / "missing.pt")
    assert issubclass(ModelFileNotFound, ModelFileError)


def test_exports_keep_their_dtype_and_a_users_module_is_left_as_it_is(model_file, tmp_path):
    """A float64 TorchScript export computes in float64 wherever it is loaded (as a .pt2 does); the calculator
    works on a copy of a module it is given, in the dtype asked for; an export is not exported again."""
    ts64 = export_torchscript(model_file, tmp_path / "ts64.pt", dtype=torch.float64)
    assert OreoCalculator(ts64).potential.scale.dtype == torch.float64
    assert load_potential(ts64).scale.dtype == torch.float64
    mine = tiny_potential(dtype=torch.float32).train()
    calc = OreoCalculator(mine, dtype="float64")
    assert calc.potential.scale.dtype == torch.float64 and not calc.potential.training
    assert mine.scale.dtype == torch.float32 and mine.training                 # the caller's module untouched
    with pytest.raises(ValueError, match="already an export.*from the oreo model file"):
        export_torchscript(ts64, tmp_path / "again.pt")


def test_one_structures_cell_and_pbc_as_ase_gives_them_and_bad_shapes_are_errors(model_file):
    """``atoms.cell[:]`` (3, 3) and ``atoms.pbc`` (3,) are one structure's cell and pbc; shapes that would broadcast
    into another energy, and integer positions, are errors that say what is expected."""
    pot = load_potential(model_file, dtype=torch.float64)
    z, r = torch.as_tensor(ETHANOL_Z), torch.as_tensor(ETHANOL_R)
    cell = torch.diag(torch.tensor([6.0, 6.5, 7.0], dtype=torch.float64))
    pbc = torch.tensor([True, True, False])
    ref = pot(z, r, None, cell[None], pbc[None])
    got = pot(z, r, None, cell, pbc)
    assert torch.equal(ref["energy"], got["energy"]) and torch.equal(ref["forces"], got["forces"])
    with pytest.raises(ValueError, match=r"pbc must have shape \(B, 3\)"):
        pot(z, r, None, cell[None], pbc[None, :2])
    with pytest.raises(ValueError, match=r"cell must have shape \(B, 3, 3\)"):
        pot(z, r, torch.tensor([0] * 4 + [1] * 5), cell, pbc)
    with pytest.raises(ValueError, match="float32 or float64"):
        pot(z, torch.round(r).long())
