"""``oreo-md simulate --dataset poly24``: polymer MD on a tiny generated oreo-poly24 set, its errors, and the
poly24 simulation benchmark script."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read

pytest.importorskip("rdkit")
pytest.importorskip("tblite")

from forcefield.data.poly24 import load_poly24  # noqa: E402
from md import poly24 as md_poly24  # noqa: E402
from md.cli import main  # noqa: E402
from md.rundir import default_run_dir  # noqa: E402
from md.config import SimulationConfig  # noqa: E402
from md.errors import MDInputError  # noqa: E402
from md.metrics import distance_histogram, hr_mae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = [1, 6, 7, 8, 9, 14, 17]        # H C N O F Si Cl: every poly24 element


@pytest.fixture(scope="session")
def poly24_set(tmp_path_factory):
    """PE and POM at 300 K, 3 trajectories each (test / val / train) of 4 labelled frames."""
    from forcefield.data.poly24.generate import GenerationConfig, generate
    out = tmp_path_factory.mktemp("poly24")
    generate(out, GenerationConfig(polymers=["PE", "POM"], temperatures=[300.0], replicas=3, equilibration_steps=5,
                                   steps=20, stride=5, relax_steps=5), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight ET model over the poly24 elements, saved as a model file."""
    from forcefield.io import save_model
    from forcefield.potential import Potential
    torch.manual_seed(0)
    pot = Potential(backbone={"name": "et", "hidden": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                              "cutoff": 4.0}, elements=ELEMENTS, metadata={"dataset": "poly24"})
    return save_model(pot, tmp_path_factory.mktemp("model") / "tiny.pt")


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:          # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def sim_args(poly24_set, tiny_model, out, *extra):
    return ["simulate", "--dataset", "poly24", "--polymer", "pe", "--poly24-dir", poly24_set, "--model", tiny_model,
            "--ps", "0.005", "--replicas", "2", "--log-every", "5", "--temperature", "300", "--no-progress",
            "--no-stop-unstable", "--out", out, *extra]


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_simulate_poly24_end_to_end_and_analyze(capsys, tmp_path, poly24_set, tiny_model):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, *sim_args(poly24_set, tiny_model, run_dir))
    assert code == 0, err
    assert "PE" in out and "force MAE" in out and "test split at 300 K" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["system"] == "PE" and summary["dataset"] == "poly24" and summary["completed"]
    assert "test split at 300 K (4 frames)" in summary["frames"]["reference"]
    assert summary["stability_ps"]["n"] == 2 and summary["hr_mae"]["n"] == 2
    test = load_poly24("test", polymers=["PE"], root=poly24_set)
    assert summary["force"]["n_frames"] == len(test) == 4
    assert (run_dir / "hr.png").is_file() and (run_dir / "thermo.png").is_file()

    # initial frames are test-split frames; the config records the set's folder for later analysis
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["polymer"] == "PE" and run["config"]["dataset"] == "poly24"
    assert Path(run["config"]["poly24_dir"]) == Path(poly24_set).resolve()
    first = read(run_dir / "traj_000.extxyz", index=0)
    np.testing.assert_allclose(first.positions, test.frame_positions(run["replicas"][0]["initial_frame"]), atol=1e-9)
    assert run["replicas"][0]["initial_frame_id"] in set(test.frame_id.tolist())

    # h(r) against the frames of the reference (test, 300 K) trajectory file
    ref = read(poly24_set / "trajectories" / "PE" / "T300_r0.extxyz", index=":")
    h_ref = distance_histogram(np.stack([a.positions for a in ref]))[1]
    traj = read(run_dir / "traj_001.extxyz", index=":")
    h = distance_histogram(np.stack([a.positions for a in traj]))[1]
    assert summary["replicas"][1]["hr_mae"] == pytest.approx(hr_mae(h, h_ref), rel=1e-9)

    # oreo-md analyze re-loads the frames from the run's config
    (run_dir / "summary.json").unlink()
    code, out, err = run_cli(capsys, "analyze", run_dir, "--force-frames", "2", "--no-plots")
    assert code == 0, err
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["force"]["n_frames"] == 2 and again["frames"] == summary["frames"]
    assert again["hr_mae"]["mean"] == pytest.approx(summary["hr_mae"]["mean"])

    # resume with more ps continues the run
    code, out, err = run_cli(capsys, "simulate", "--out", run_dir, "--ps", "0.01", "--no-progress")
    assert code == 0 and "resuming" in out, err
    assert len(read(run_dir / "traj_000.extxyz", index=":")) == 5


# ------------------------------------------------------------------------------------------- errors
def test_unknown_polymer_lists_the_valid_names(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", "--dataset", "poly24", "--polymer", "kevlar", "--model", "m.pt",
                           "--out", tmp_path / "x")
    assert code == 2 and "kevlar" in err and "PE" in err and "PDMS" in err and "Traceback" not in err
    with pytest.raises(MDInputError, match="PE, PP"):
        SimulationConfig(dataset="poly24", polymer="kevlar", model="m.pt").validate()


def test_inconsistent_system_options(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", "--dataset", "poly24", "--model", "m.pt", "--out", tmp_path / "x")
    assert code == 2 and "--polymer" in err
    code, _, err = run_cli(capsys, "simulate", "--polymer", "PE", "--molecule", "aspirin")
    assert code == 2 and "not allowed with" in err
    code, _, err = run_cli(capsys, "simulate", "--dataset", "poly24", "--molecule", "aspirin", "--out", tmp_path / "x")
    assert code == 2 and "--polymer" in err


def test_missing_set_is_a_clean_error_naming_the_generator(capsys, tmp_path, tiny_model):
    code, _, err = run_cli(capsys, "simulate", "--polymer", "PE", "--model", tiny_model,
                           "--poly24-dir", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in err
    assert "oreo data poly24" in err and str(tmp_path / "nowhere") in err
    assert not (tmp_path / "run").exists()                       # nothing created for a run that cannot start
    code, _, err = run_cli(capsys, "simulate", "--polymer", "PE", "--model", tiny_model, "--data-dir",
                           tmp_path / "data", "--out", tmp_path / "run")
    assert code == 2 and "oreo data poly24" in err and str(tmp_path / "data" / "poly24") in err


def test_polymer_missing_from_the_set(capsys, tmp_path, poly24_set, tiny_model):
    code, _, err = run_cli(capsys, "simulate", "--polymer", "PS", "--model", tiny_model, "--poly24-dir", poly24_set,
                           "--out", tmp_path / "run")
    assert code == 2 and "PS is not in the poly24 set" in err and "oreo data poly24 --polymers PS" in err


def test_default_model_and_run_directory(monkeypatch):
    monkeypatch.setattr(md_poly24, "shipped_model_available", lambda: False)
    with pytest.raises(MDInputError, match="--model PATH"):
        SimulationConfig(polymer="PE").validate()
    monkeypatch.setattr(md_poly24, "shipped_model_available", lambda: True)
    cfg = SimulationConfig(polymer="pe", temperature=600).validate()
    assert cfg.dataset == "poly24" and cfg.polymer == "PE" and cfg.model_spec == "poly24"
    assert default_run_dir(cfg).name == "PE_poly24_nose-hoover_600K_seed123"


# ------------------------------------------------------------------------------------------- benchmark
def load_benchmark():
    spec = importlib.util.spec_from_file_location("poly24_simulation", ROOT / "benchmarks" / "poly24_simulation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_script_on_the_tiny_set(tmp_path, capsys, poly24_set, tiny_model):
    bench = load_benchmark()
    out = tmp_path / "bench"
    argv = ["--model", str(tiny_model), "--poly24-dir", str(poly24_set), "--ps", "0.0025", "--replicas", "2",
            "--log-every", "5", "--force-frames", "2", "--out", str(out), "--no-progress"]
    assert bench.main(argv) == 0
    table = (out / "poly24_simulation.md").read_text()
    assert "python benchmarks/poly24_simulation.py --model" in table.splitlines()[3]
    rows = {line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("| P") and not line.startswith("| Polymer")}
    assert rows == {"PE", "POM"}                                 # default: every polymer of the manifest
    data = json.loads((out / "poly24_simulation.json").read_text())
    assert [r["polymer"] for r in data["rows"]] == ["PE", "POM"]
    r = data["rows"][0]
    assert r["force_frames"] == 2 and r["force_mae_meV_per_A"] > 0 and r["stability_ps_min"] is not None
    assert "all temperatures" in r["reference_frames"]          # the set has no 600 K (the default) test frames
    capsys.readouterr()
    # finished runs are reused; --polymers picks a subset
    assert bench.main(argv + ["--polymers", "pom"]) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    assert [r["polymer"] for r in json.loads((out / "poly24_simulation.json").read_text())["rows"]] == ["POM"]
    assert bench.main(argv + ["--polymers", "PS"]) == 2
    assert "PS" in capsys.readouterr().err
