"""Training: the loss goes down, a killed run resumes exactly, configs and the CLI fail clearly."""
import csv
import json

import numpy as np
import pytest
import torch

from forcefield.cli import main as oreo
from forcefield.io import load_potential
from forcefield.train import Trainer, config_from_dict
from forcefield.train.loop import cosine_lr_factor
from tests.helpers import TINY_TRAIN_CFG, tiny_train_config

_cfg = tiny_train_config


def test_training_lowers_the_error(tmp_path):
    trainer = Trainer(_cfg(), tmp_path / "run", progress=False, log=lambda s: None)
    before = trainer.validate()["forces_mae_meV_per_A"]
    metrics = trainer.fit()
    after = trainer.validate()["forces_mae_meV_per_A"]
    assert after < 0.9 * before
    assert metrics["forces_mae_meV_per_A"] > 0
    for name in ("best.pt", "last.pt", "metrics.csv", "learning_curve.png", "parity.png", "test_metrics.json"):
        assert (tmp_path / "run" / name).is_file(), name
    meta = load_potential(tmp_path / "run" / "best.pt").metadata
    assert len(meta["train_frame_ids"]) == 24 and meta["molecule"] == "ethanol"


def test_training_with_the_cosine_schedule_ends_at_its_floor(tmp_path):
    """optim.lr_schedule cosine: 6 epochs of 6 steps, the rate of each epoch's last step read from metrics.csv
    follows lr * cosine_lr_factor down to lr_min (no plateau cut, no stop on the floor), and the error falls."""
    trainer = Trainer(_cfg(lr_schedule="cosine", lr_min=5e-5, lr_patience=0), tmp_path / "run", progress=False,
                      log=lambda s: None)
    before = trainer.validate()["forces_mae_meV_per_A"]
    metrics = trainer.fit()
    assert trainer.step == 36 and metrics["stop_reason"] == "all 6 epochs done"
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rates = [float(row["lr"]) for row in csv.DictReader(fh)]
    assert rates == pytest.approx([5e-3 * cosine_lr_factor(6 * e - 1, 2, 36, 1e-2) for e in range(1, 7)])
    assert rates[-1] < 1e-4                                     # close to lr_min = 5e-5 at the last step
    assert trainer.validate()["forces_mae_meV_per_A"] < before


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    straight = Trainer(_cfg(epochs=3), tmp_path / "a", progress=False, log=lambda s: None)
    straight.fit()
    # "killed" after one epoch: a run whose budget ended, then resumed with the full budget
    first = Trainer(_cfg(epochs=1), tmp_path / "b", progress=False, log=lambda s: None)
    first.fit()
    resumed = Trainer(_cfg(epochs=3), tmp_path / "b", progress=False, log=lambda s: None)
    resumed.fit(resume=True)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().items()):
        assert torch.equal(a, b), k
    rows = (tmp_path / "b" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + one row per epoch, no duplicates


def test_resume_refuses_a_different_split(tmp_path):
    Trainer(_cfg(epochs=1), tmp_path / "r", progress=False, log=lambda s: None).fit()
    other = _cfg(epochs=2, seed=4)
    with pytest.raises(ValueError, match="split differs"):
        Trainer(other, tmp_path / "r", progress=False, log=lambda s: None).fit(resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_cfg(epochs=1), tmp_path / "r", progress=False, log=lambda s: None).fit()


def test_a_run_ended_before_its_first_checkpoint_starts_again_with_resume(tmp_path):
    """A run killed after its first log row but before its first checkpoint has nothing to continue. Without
    --resume the folder is refused with an error that says --resume starts it again; with it, the log is moved aside
    (nothing computed is lost) and the run starts from the beginning. An empty folder is still no run to resume."""
    out = tmp_path / "cell"
    Trainer(_cfg(epochs=1), out, progress=False, log=lambda *a: None).fit()
    (out / "last.pt").unlink()                                     # as if killed before it was written
    with pytest.raises(FileExistsError, match="no checkpoint.*--resume to start it again"):
        Trainer(_cfg(epochs=1), out, progress=False, log=lambda *a: None).fit()
    said = []
    Trainer(_cfg(epochs=1), out, progress=False, log=said.append).fit(resume=True)
    assert (out / "metrics.no-checkpoint-1.csv").is_file() and any("starts again" in s for s in said)
    assert (out / "last.pt").is_file() and len((out / "metrics.csv").read_text().strip().splitlines()) == 2
    with pytest.raises(FileNotFoundError, match="start without --resume"):
        Trainer(_cfg(epochs=1), tmp_path / "empty", progress=False, log=lambda *a: None).fit(resume=True)


def test_config_numbers_from_yaml_strings():
    cfg = config_from_dict({"optim": {"lr": "3e-4", "epochs": "7"}})  # YAML 1.1 reads 3e-4 as a string
    assert cfg.optim.lr == 3e-4 and cfg.optim.epochs == 7


def test_resume_with_a_new_learning_rate(tmp_path):
    Trainer(_cfg(epochs=1), tmp_path / "lr", progress=False, log=lambda s: None).fit()
    t = Trainer(_cfg(epochs=2, lr=1e-4), tmp_path / "lr", progress=False, log=lambda s: None)
    t.load_checkpoint(tmp_path / "lr" / "last.pt")
    assert t.optimizer.param_groups[0]["lr"] == 1e-4


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="optim.learning_rate"):
        config_from_dict({"optim": {"learning_rate": 1e-3}})
    with pytest.raises(ValueError, match="unknown backbone 'painn'"):
        Trainer(config_from_dict({**TINY_TRAIN_CFG, "model": {"name": "painn"}}), "/tmp/never", progress=False)


def test_cli_train_evaluate_export(tmp_path, capsys):
    import yaml
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY_TRAIN_CFG))
    out = tmp_path / "cli"
    assert oreo(["train", "--config", str(cfg), "--out", str(out), "--no-progress",
                 "--set", "optim.epochs=1"]) == 0
    assert oreo(["evaluate", str(out / "best.pt"), "--max-frames", "10", "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_frames"] == 10 and metrics["forces_mae_meV_per_A"] > 0
    assert metrics["frames_in_its_training_data"] == 0                       # the test file: held out
    capsys.readouterr()
    assert oreo(["evaluate", str(out / "best.pt"), "--split", "train", "--out", str(tmp_path / "ev-train")]) == 0
    seen = json.loads((tmp_path / "ev-train" / "metrics.json").read_text())["frames_in_its_training_data"]
    tiny = TINY_TRAIN_CFG["data"]
    assert seen == tiny["train_size"] + tiny["val_size"] and "not held-out errors" in capsys.readouterr().err
    assert (tmp_path / "ev" / "parity.png").stat().st_size > 1000
    assert oreo(["export", str(out / "best.pt"), "-o", str(tmp_path / "m.pt")]) == 0
    assert torch.jit.load(str(tmp_path / "m.pt")) is not None
    # bad inputs: a clear message and exit code 2, no traceback
    assert oreo(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert oreo(["evaluate", str(out / "best.pt"), "--molecule", "caffeine"]) == 2
    assert "caffeine" in capsys.readouterr().err
    assert oreo(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2    # forgot --resume
    assert "pass --resume" in capsys.readouterr().err
    assert oreo(["train", "--config", str(cfg), "--out", str(tmp_path / "x"), "--set", "optim.lr=[1"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_one_config_loader_converts_every_config():
    """forcefield.settings builds every config: unknown keys name the valid ones, values get the fields' types,
    and --set reaches nested keys."""
    from forcefield.pretrain.corpus import corpus_config_from_obj
    from forcefield.pretrain.property import PropertyConfig
    from forcefield.pretrain.trainer import pretrain_config_from_dict
    from forcefield.settings import apply_overrides, read_yaml
    from md.config import SimulationConfig
    from md.errors import MDInputError

    d = apply_overrides({"optim": None}, ["optim.lr=3e-4", "data.polymers=PE", "objectives.weights.zero_force=0.5"])
    assert d == {"optim": {"lr": "3e-4"}, "data": {"polymers": "PE"}, "objectives": {"weights": {"zero_force": 0.5}}}
    cfg = config_from_dict({"optim": d["optim"], "data": {"polymers": "PE", "temperatures": [300]}})
    assert cfg.optim.lr == 3e-4 and cfg.data.polymers == ["PE"] and cfg.data.temperatures == [300.0]
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["lr=1"])
    pre = pretrain_config_from_dict({"optim": {"max_steps": "10", "lr": "1e-3"}, "elements": ["8"],
                                     "objectives": {"method": ["force_matching"], "weights": {"force_matching": "2"}}})
    assert pre.optim.max_steps == 10 and pre.optim.lr == 1e-3 and pre.elements == [8]
    assert pre.objectives.method == ["force_matching"] and pre.objectives.weights == {"force_matching": 2.0}
    corpus = corpus_config_from_obj([{"reader": "rmd17", "kind": "off-equilibrium", "split_indices": 2,
                                      "max_frames": "100"}])
    assert corpus.sources[0].split_indices == [2] and corpus.sources[0].max_frames == 100
    assert PropertyConfig.from_dict({"epochs": "3", "layer_decay": "0.8"}).layer_decay == 0.8
    with pytest.raises(ValueError, match="whole number"):
        PropertyConfig.from_dict({"epochs": 2.5})
    assert SimulationConfig.from_dict({"molecule": "ethanol", "replicas": 3.0}).replicas == 3
    with pytest.raises(MDInputError, match="simulation.bogus"):
        SimulationConfig.from_dict({"bogus": 1})
    with pytest.raises(FileNotFoundError, match="examples/configs"):
        read_yaml("/nonexistent/config.yaml")


def test_a_cpu_time_budget_stops_the_loop():
    """optim.max_cpu_minutes: equal-compute comparisons on a shared machine count CPU time, not wall time."""
    from forcefield.train.loop import early_stop_reason
    common = dict(epochs_since_best=0, patience=10, lr=1e-3, lr_min=1e-6, step=100, warmup_steps=10, elapsed_s=3600.0,
                  max_minutes=None)
    assert early_stop_reason(**common, cpu_s=59.0, max_cpu_minutes=1.0) == ""
    assert early_stop_reason(**common, cpu_s=61.0, max_cpu_minutes=1.0).startswith("CPU budget of 1 min reached")
    assert config_from_dict({"optim": {"max_cpu_minutes": 10}}).optim.max_cpu_minutes == 10


def test_a_budget_that_runs_out_with_the_last_epoch_cut_nothing(tmp_path):
    """A run whose time is up when its last epoch ends has finished (a grid counts it as a result), and one whose
    time is up before it has not (a grid runs it again)."""
    done = Trainer(_cfg(epochs=1, max_minutes=1e-9), tmp_path / "a", progress=False, log=lambda s: None).fit()
    assert done["stop_reason"] == "all 1 epochs done"
    cut = Trainer(_cfg(epochs=2, max_minutes=1e-9), tmp_path / "b", progress=False, log=lambda s: None).fit()
    assert cut["stop_reason"].startswith("time budget")


def test_val_every_validates_every_nth_epoch_and_the_last(tmp_path):
    """optim.val_every: a 50-frame set has epochs of 7 steps; validating each would cost as much as training."""
    tr = Trainer(_cfg(epochs=5, val_every=2), tmp_path / "run", progress=False, log=lambda s: None)
    calls = []
    real = tr.validate
    tr.validate = lambda: calls.append(tr.epoch) or real()
    tr.fit()
    assert calls == [2, 4, 5]              # after epochs 2 and 4, and after the last
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [2, 4, 5] and tr.epoch == 5
    # a budget that ends the run between validations: the epochs trained are validated before it stops
    cut = Trainer(_cfg(epochs=5, val_every=3, max_minutes=1e-9), tmp_path / "cut", progress=False, log=lambda s: None)
    m = cut.fit()
    assert m["stop_reason"].startswith("time budget") and cut.epoch == 1 and (tmp_path / "cut" / "best.pt").is_file()



def test_a_run_paused_at_its_deadline_is_not_tested_and_resumes_as_if_it_never_paused(tmp_path):
    """fit(pause_minutes=...): a campaign piece's end is a deadline, not the run's budget. The run pauses after the
    epoch that passes it: its checkpoint written, no validation between validations, no test and no
    test_metrics.json (a grid would take the folder for a finished run); resumed, it validates, follows its schedule
    and ends exactly as the run that never paused."""
    def make(out):
        return Trainer(_cfg(epochs=4, val_every=2), out, progress=False, log=lambda s: None)
    straight = make(tmp_path / "a")
    done = straight.fit()
    paused = make(tmp_path / "b")
    calls, real = [], paused.validate
    paused.validate = lambda: calls.append(paused.epoch) or real()
    m = paused.fit(pause_minutes=1e-9)
    assert m["paused"] and m["epochs"] == 1 and m["steps"] == paused.step > 0 and calls == []
    assert m["stop_reason"].startswith("paused at this invocation's deadline")
    assert (tmp_path / "b" / "last.pt").is_file() and not (tmp_path / "b" / "test_metrics.json").exists()
    resumed = make(tmp_path / "b")
    again = resumed.fit(resume=True)
    assert again["stop_reason"] == done["stop_reason"] == "all 4 epochs done"
    assert again["forces_mae_meV_per_A"] == done["forces_mae_meV_per_A"]
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k

    def curve(run):
        with open(tmp_path / run / "metrics.csv") as fh:
            return [{k: v for k, v in r.items() if not k.endswith(("minutes", "hours", "seconds", "_s"))}
                    for r in csv.DictReader(fh)]
    assert curve("b") == curve("a") and [int(r["epoch"]) for r in curve("a")] == [2, 4]

def test_force_errors_by_element_add_up_to_the_total():
    from forcefield.data.conformations import ConformationSet
    from forcefield.evaluate import error_metrics
    rng = np.random.default_rng(0)
    numbers = np.array([8, 1, 1, 6, 1, 1, 1, 1])                  # two frames: water, methane
    forces = rng.normal(size=(8, 3))
    cset = ConformationSet(numbers=numbers, positions=rng.normal(size=(8, 3)), ptr=np.array([0, 3, 8]),
                           energy=np.zeros(2), forces=forces)
    err = np.zeros((8, 3))
    err[numbers == 1] = 0.002                                        # 2 meV/Å on every H component
    err[numbers == 8] = -0.010                                       # 10 on O, 0 on C
    m = error_metrics({"energy": np.zeros(2), "forces": forces + err}, cset)
    by = m["forces_mae_meV_per_A_by_element"]
    assert set(by) == {"H", "C", "O"}
    assert by["H"] == pytest.approx(2.0) and by["O"] == pytest.approx(10.0) and by["C"] == pytest.approx(0.0)
    counts = {"H": 6, "C": 1, "O": 1}                                # atom-weighted mean = the overall MAE
    assert sum(by[s] * n for s, n in counts.items()) / 8 == pytest.approx(m["forces_mae_meV_per_A"])
    assert "forces_mae_meV_per_A_by_energy_quintile" not in m       # two molecules: their energies do not compare


def test_force_errors_by_energy_quintile_sort_the_frames_by_reference_energy():
    from forcefield.data.conformations import ConformationSet
    from forcefield.evaluate import error_metrics
    rng = np.random.default_rng(1)
    n_frames, numbers = 10, np.array([8, 1, 1])                     # ten water frames
    energy = rng.permutation(n_frames).astype(float)                # frame k has energy rank energy[k]
    forces = rng.normal(size=(3 * n_frames, 3))
    cset = ConformationSet(numbers=np.tile(numbers, n_frames), positions=rng.normal(size=(3 * n_frames, 3)),
                           ptr=np.arange(0, 3 * n_frames + 1, 3), energy=energy, forces=forces)
    err = np.repeat(0.001 * energy, 3)[:, None] * np.ones((1, 3))   # error (meV/Å) = the frame's energy rank
    m = error_metrics({"energy": energy, "forces": forces - err}, cset)
    assert m["forces_mae_meV_per_A_by_energy_quintile"] == pytest.approx([0.5, 2.5, 4.5, 6.5, 8.5])
    assert np.mean(m["forces_mae_meV_per_A_by_energy_quintile"]) == pytest.approx(m["forces_mae_meV_per_A"])
    short = ConformationSet(numbers=np.tile(numbers, 4), positions=np.zeros((12, 3)), ptr=np.arange(0, 13, 3),
                            energy=np.zeros(4), forces=np.zeros((12, 3)))
    assert "forces_mae_meV_per_A_by_energy_quintile" not in error_metrics(
        {"energy": np.zeros(4), "forces": np.zeros((12, 3))}, short)  # fewer than 5 frames


def test_device_names_are_checked():
    from forcefield.devices import resolve_device
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="optim.device is 'cuda' but torch sees no GPU.*set it to cpu"):
            resolve_device("cuda")
        from forcefield import OreoCalculator
        with pytest.raises(ValueError, match="device is 'cuda:0' but torch sees no GPU"):
            OreoCalculator("ethanol", device="cuda:0")
        with pytest.raises(ValueError, match="no GPU"):
            Trainer(_cfg(device="cuda"), "unused", progress=False, log=lambda s: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs on the device machine)")
def test_a_cpu_run_continues_on_the_gpu_as_on_the_cpu(tmp_path):
    """The campaign's GPU pieces resume CPU states: the optimiser moments follow the weights to the GPU, and the
    steps taken there equal the CPU's (float64, up to the order of the sums)."""
    import shutil
    quiet = dict(progress=False, log=lambda s: None)
    Trainer(_cfg(epochs=1, dtype="float64", device="cpu"), tmp_path / "cpu", **quiet).fit()
    shutil.copytree(tmp_path / "cpu", tmp_path / "gpu")
    on_cpu = Trainer(_cfg(epochs=3, dtype="float64", device="cpu"), tmp_path / "cpu", **quiet)
    on_cpu.fit(resume=True)
    on_gpu = Trainer(_cfg(epochs=3, dtype="float64", device="cuda"), tmp_path / "gpu", state_file=tmp_path / "s.pt",
                     **quiet)
    on_gpu.fit(resume=True)
    for p in on_gpu.model.parameters():
        assert p.is_cuda and on_gpu.optimizer.state[p]["exp_avg"].is_cuda
    for (k, a), (_, b) in zip(on_cpu.ema.state_dict().items(), on_gpu.ema.state_dict().items()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-9, msg=k)
    # its compact state (what the campaign commits) is on the CPU and continues there
    Trainer(_cfg(epochs=4, dtype="float64", device="cpu"), tmp_path / "back", state_file=tmp_path / "s.pt",
            **quiet).fit(resume=True)
