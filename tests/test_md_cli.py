"""``oreo-md`` command line and the MD17 benchmark script: clear errors, end-to-end runs on real rMD17 frames."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read

from md.cli import main

ROOT = Path(__file__).resolve().parents[1]


def rmd17_available():
    d = os.environ.get("OREO_DATA_DIR")
    return bool(d) and any(Path(d, "rmd17").glob("rmd17_ethanol_test_01*"))


needs_data = pytest.mark.skipif(not rmd17_available(), reason="rMD17 ethanol files not found under $OREO_DATA_DIR")


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:          # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------- errors
def test_unknown_molecule_is_a_clear_parse_error(capsys):
    code, _, err = run_cli(capsys, "simulate", "--molecule", "unobtainium")
    assert code == 2
    assert "unobtainium" in err and "aspirin" in err and "ethanol" in err   # names the problem and the choices


def test_bad_thermostat_is_a_clear_parse_error(capsys):
    code, _, err = run_cli(capsys, "simulate", "--molecule", "aspirin", "--thermostat", "berendsen")
    assert code == 2
    assert "berendsen" in err and "nose-hoover" in err and "langevin" in err and "nve" in err


@pytest.mark.parametrize("args, words", [
    (["--molecule", "aspirin", "--ps", "-3"], ["--ps", "must be > 0"]),
    (["--molecule", "aspirin", "--replicas", "two"], ["--replicas", "'two'"]),
    (["--molecule", "aspirin", "--structure", "x.xyz"], ["not allowed with"]),
])
def test_bad_numbers_and_combinations(capsys, args, words):
    code, _, err = run_cli(capsys, "simulate", *args)
    assert code == 2 and all(w in err for w in words), err


def test_missing_system_and_bad_settings(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", "--ps", "1")
    assert code == 2 and "--molecule" in err and "--structure" in err
    code, _, err = run_cli(capsys, "simulate", "--molecule", "ethanol", "--thermostat", "nose-hoover",
                           "--temperature", "0", "--out", str(tmp_path / "x"))
    assert code == 2 and "--temperature must be > 0" in err
    code, _, err = run_cli(capsys, "simulate", "--molecule", "ethanol", "--log-every", "100",
                           "--checkpoint-every", "150", "--out", str(tmp_path / "x"))
    assert code == 2 and "multiple of --log-every" in err
    code, _, err = run_cli(capsys, "simulate", "--structure", str(tmp_path / "missing.xyz"), "--model", "m.pt",
                           "--out", str(tmp_path / "y"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "simulate", "--molecule", "ethanol", "--device", "tpu9",
                           "--out", str(tmp_path / "z"))
    assert code == 2 and "--device must be auto, cpu, cuda or cuda:N, got 'tpu9'" in err
    if not torch.cuda.is_available():   # a GPU that is not there: said before any model is loaded
        code, _, err = run_cli(capsys, "simulate", "--molecule", "ethanol", "--device", "cuda",
                               "--out", str(tmp_path / "z"))
        assert code == 2 and "--device is 'cuda' but torch sees no GPU" in err


def test_analyze_and_dft_check_need_a_run_directory(capsys, tmp_path):
    for cmd in ("analyze", "dft-check"):
        code, _, err = run_cli(capsys, cmd, str(tmp_path))
        assert code == 2 and "not an oreo-md run directory" in err


def test_dft_check_without_pyscf_says_how_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyscf", None)               # makes `import pyscf` fail
    (tmp_path / "run.json").write_text("{}")
    code, _, err = run_cli(capsys, "dft-check", str(tmp_path), "--frames", "2")
    assert code == 2
    assert "pip install 'oreo[dft]'" in err and "pip install pyscf" in err


def test_coincident_atoms_in_a_structure_file_are_a_clear_error(capsys, tmp_path):
    from ase import Atoms
    from ase.io import write
    from forcefield.io import save_model
    from tests.helpers import ETHANOL_R, ETHANOL_Z, tiny_potential
    positions = ETHANOL_R.copy()
    positions[6] = positions[1]
    write(tmp_path / "broken.xyz", Atoms(numbers=ETHANOL_Z, positions=positions))
    model = save_model(tiny_potential(), tmp_path / "tiny.pt")
    code, _, err = run_cli(capsys, "simulate", "--structure", str(tmp_path / "broken.xyz"), "--model", str(model),
                           "--out", str(tmp_path / "run"), "--ps", "0.01", "--no-progress")
    assert code == 2 and "initial frame 0" in err and "atoms 1 and 6 are 0.000 Å apart" in err, err
    assert not (tmp_path / "run" / "traj_000.extxyz").exists()


@needs_data
def test_model_of_another_molecule_is_refused_unless_allowed(capsys, tmp_path):
    from forcefield.io import save_model
    from tests.helpers import tiny_potential
    code, _, err = run_cli(capsys, "simulate", "--molecule", "ethanol", "--model", "aspirin", "--out",
                           str(tmp_path / "a"), "--ps", "0.01", "--no-progress")
    assert code == 2 and "trained on aspirin, not ethanol" in err and "--allow-other-molecule" in err, err
    model = save_model(tiny_potential(dtype=torch.float32, molecule="aspirin"), tmp_path / "tiny_aspirin.pt")
    code, out, err = run_cli(capsys, "simulate", "--molecule", "ethanol", "--model", str(model), "--out",
                             str(tmp_path / "b"), "--ps", "0.005", "--replicas", "1", "--log-every", "5",
                             "--force-frames", "0", "--no-progress", "--allow-other-molecule")
    assert code == 0 and "stability" in out, err


def nan_potential():
    """``--model py:tests.test_md_cli:nan_potential``: a model that fails on everything (NaN out)."""
    class NaNPotential(torch.nn.Module):
        def forward(self, numbers, positions, batch, cell=None, pbc=None):
            return {"energy": torch.full((int(batch.max()) + 1,), float("nan"), dtype=positions.dtype),
                    "forces": torch.full_like(positions, float("nan"))}
    return NaNPotential()


@needs_data
def test_run_whose_replicas_all_went_non_finite_exits_non_zero(capsys, tmp_path):
    code, out, err = run_cli(capsys, "simulate", "--molecule", "ethanol", "--model",
                             "py:tests.test_md_cli:nan_potential", "--replicas", "2", "--ps", "0.01", "--force-frames", "5", "--no-progress",
                             "--out", str(tmp_path / "run"))
    assert code == 1 and "every replica (2) went non-finite" in err and "step 0" in err, err
    # no number that is not one: no perfect-looking 0.000 h(r), no nan
    assert "h(r) MAE n/a" in out and "speed n/a" in out and "force MAE n/a" in out, out
    metrics = [line for line in out.splitlines() if "h(r) MAE" in line]
    assert len(metrics) == 3 and not any("0.000" in line or "nan" in line for line in metrics), out


@needs_data
def test_missing_model_file_is_clear(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", "--molecule", "ethanol", "--model", str(tmp_path / "nope.pt"),
                           "--out", str(tmp_path / "run"), "--ps", "0.01")
    assert code == 2 and "nope.pt" in err and "not found" in err


# ------------------------------------------------------------------------------------------- end to end
SIM = ["--molecule", "ethanol", "--model", "py:md.analytic:bond_network", "--replicas", "2", "--log-every", "10",
       "--force-frames", "10", "--no-progress", "--temperature", "300"]


@pytest.mark.slow
@needs_data
def test_cli_simulate_extend_equals_straight_and_analyze(capsys, tmp_path):
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    code, out, err = run_cli(capsys, "simulate", *SIM, "--ps", "0.04", "--out", str(straight))
    assert code == 0, err
    assert "stability" in out and "force MAE" in out
    code, _, err = run_cli(capsys, "simulate", *SIM, "--ps", "0.02", "--out", str(extended))
    assert code == 0, err
    code, out, err = run_cli(capsys, "simulate", "--out", str(extended), "--ps", "0.04", "--no-progress")
    assert code == 0 and "resuming" in out, err
    for name in ("thermo.csv", "traj_000.extxyz", "traj_001.extxyz"):
        assert (straight / name).read_bytes() == (extended / name).read_bytes(), name
    # a changed setting on resume is refused with the fix named
    code, _, err = run_cli(capsys, "simulate", "--out", str(extended), "--seed", "7")
    assert code == 2 and "seed" in err and "--overwrite" in err
    code, out, err = run_cli(capsys, "analyze", str(straight), "--force-frames", "5", "--no-plots")
    assert code == 0, err
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["force"]["n_frames"] == 5 and summary["system"] == "ethanol"
    assert summary["stability_ps"]["n"] == 2
    # initial frames are held-out (test split) frames
    from forcefield.data import load_rmd17
    test = load_rmd17("ethanol", split="test")
    run = json.loads((straight / "run.json").read_text())
    first = read(straight / "traj_000.extxyz", index=0)
    np.testing.assert_allclose(first.positions, test.frame_positions(run["replicas"][0]["initial_frame"]), atol=1e-9)
    assert run["replicas"][0]["initial_frame_id"] in set(test.frame_id.tolist())


def load_benchmark():
    spec = importlib.util.spec_from_file_location("md17_simulation", ROOT / "benchmarks" / "md17_simulation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_data
def test_benchmark_script_end_to_end_with_random_weight_model(tmp_path, capsys):
    """A tiny random-weight oreo Potential, saved as a model file, through the whole benchmark (and reused)."""
    potential = pytest.importorskip("forcefield.potential")
    from forcefield.io import save_model
    torch.manual_seed(0)
    pot = potential.Potential(backbone={"name": "et", "hidden": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                                        "cutoff": 4.0}, elements=[1, 6, 8], metadata={"molecule": "ethanol"})
    model = save_model(pot, tmp_path / "tiny.pt")
    bench = load_benchmark()
    argv = ["--models", f"ethanol={model}", "--ps", "0.01", "--replicas", "2", "--log-every", "10",
            "--force-frames", "8", "--out", str(tmp_path / "bench"), "--no-progress"]
    assert bench.main(argv) == 0
    table = (tmp_path / "bench" / "md17_simulation.md").read_text()
    row = [line for line in table.splitlines() if line.startswith("| ethanol")]
    assert len(row) == 1 and "tiny.pt" in row[0]
    data = json.loads((tmp_path / "bench" / "md17_simulation.json").read_text())
    assert data[0]["force_mae_meV_per_A"] > 0 and data[0]["stability_ps"]["n"] == 2
    summary = tmp_path / "bench" / "ethanol__tiny" / "summary.json"
    before = summary.stat().st_mtime_ns
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert "reusing finished run" in capsys.readouterr().out and summary.stat().st_mtime_ns == before
    # a finished longer run reused for a shorter --ps: the table says what the row ran, and the settings used
    assert bench.main([a if a != "0.01" else "0.005" for a in argv]) == 0
    table = (tmp_path / "bench" / "md17_simulation.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| ethanol"))
    assert row.split(" | ")[2] == "0.01" and "asked: 0.005 ps" in table and "Nosé–Hoover 500 K, 0.5 fs" in table
    # the model file retrained in place: its finished run is another model's, so it is run again
    torch.manual_seed(1)
    save_model(potential.Potential(backbone={"name": "et", "hidden": 8, "num_layers": 1, "num_heads": 2,
                                             "num_rbf": 8, "cutoff": 4.0}, elements=[1, 6, 8],
                                   metadata={"molecule": "ethanol"}), model)
    capsys.readouterr()
    assert bench.main(argv) == 2                       # not reused as if it were this model's, not continued either
    assert "has changed since the run" in capsys.readouterr().err
    assert bench.main(["--models", "ethanol-path", "--out", str(tmp_path / "b2")]) == 2   # no MOLECULE=MODEL
    assert "MOLECULE=MODEL" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs on the device machine)")
@needs_data
def test_md_of_an_oreo_model_runs_on_the_gpu_as_the_fine_tune_grid_runs_it(tmp_path):
    """The MD a GPU piece of the fine-tune grid runs (benchmarks/md17_simulation.run_one, eager, device cuda): it
    finishes, and its first logged frame's forces equal the CPU's for the same positions."""
    from forcefield.io import load_potential, save_model
    from forcefield.potential import Potential
    torch.manual_seed(0)
    pot = Potential(backbone={"name": "et", "hidden": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff": 4.0},
                    elements=[1, 6, 8], metadata={"molecule": "ethanol"})
    model = save_model(pot, tmp_path / "tiny.pt")
    bench = load_benchmark()
    argv = ["--models", f"ethanol={model}", "--ps", "0.01", "--replicas", "2", "--log-every", "10",
            "--force-frames", "0", "--out", str(tmp_path / "gpu"), "--no-progress", "--device", "cuda"]
    assert bench.main(argv) == 0
    summary = json.loads((tmp_path / "gpu" / "ethanol__tiny" / "summary.json").read_text())
    assert summary["stability_ps"]["n"] == 2
    frame = read(tmp_path / "gpu" / "ethanol__tiny" / "traj_000.extxyz", index=-1)
    z = torch.tensor(frame.numbers)
    r = torch.tensor(frame.positions, dtype=torch.float64)
    cpu = load_potential(model, dtype=torch.float64)(z, r)["forces"]
    gpu = load_potential(model, device="cuda", dtype=torch.float64)(z.cuda(), r.cuda())["forces"].cpu()
    assert float((cpu - gpu).abs().max()) < 1e-9


@needs_data
def test_dft_check_with_pyscf(tmp_path, capsys):
    pytest.importorskip("pyscf")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "simulate", *SIM, "--ps", "0.01", "--out", str(out))
    assert code == 0, err
    code, text, err = run_cli(capsys, "dft-check", str(out), "--frames", "1", "--basis", "sto-3g", "--grid-level", "1",
                              "--conv-tol", "1e-8")
    assert code == 0, err
    report = json.loads((out / "dft_check.json").read_text())
    arrays = np.load(out / "dft_forces.npz")
    mae = 1000 * np.abs(arrays["model_0"] - arrays["dft_0"]).mean()
    assert report["n_frames"] == 1 and report["force_mae_meV_per_A"] == pytest.approx(mae)
    assert (out / "dft_parity.png").is_file()


def test_resume_policy_is_one_library_function(tmp_path):
    """md.rundir.plan_run: a new run from the given settings, or the stored run with the given ones on top."""
    from md.config import SimulationConfig
    from md.errors import MDInputError
    from md.rundir import CHECKPOINT_FORMAT, plan_run, resume_conflicts

    cfg, out, continuing = plan_run({"molecule": "ethanol", "ps": 1.0}, tmp_path / "run")
    assert not continuing and cfg.molecule == "ethanol" and out == tmp_path / "run"
    with pytest.raises(MDInputError, match="no checkpoint"):
        plan_run({}, tmp_path / "run", resume=True)
    with pytest.raises(MDInputError, match="give --molecule"):
        plan_run({}, tmp_path / "other")
    stored = SimulationConfig(molecule="ethanol", ps=1.0, seed=7).validate()
    (tmp_path / "run").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "config": stored.to_dict()}, tmp_path / "run" / "checkpoint.pt")
    cfg, _, continuing = plan_run({"ps": 3.0}, tmp_path / "run")
    assert continuing and cfg.ps == 3.0 and cfg.seed == 7
    assert resume_conflicts(stored, cfg) == {}
    assert set(resume_conflicts(stored, SimulationConfig(molecule="ethanol", ps=3.0, seed=8))) == {"seed"}
