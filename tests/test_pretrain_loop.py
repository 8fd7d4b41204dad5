"""The pretraining loop (loss goes down, exact resume, files), fine-tuning from its checkpoint, the CLI."""
import csv
import json
import warnings
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from forcefield.data.conformations import ConformationSet
from forcefield.pretrain.corpus import Corpus
from forcefield.pretrain.finetune import (
    FinetuneOptions, finetune_forcefield, layerwise_param_groups, load_pretrained, make_finetune_potential,
)
from forcefield.pretrain.property import PropertyConfig, PropertyTrainer
from forcefield.pretrain.trainer import Pretrainer, pretrain_config_from_dict
from forcefield.train.config import config_from_dict
from forcefield.train.loop import cosine_lr_factor
from tests.helpers import ETHANOL_R, ETHANOL_Z

DATA = Path(os.environ["OREO_DATA_DIR"])
QM9_DB = DATA / "schnetpack_testdata" / "test_qm9.db"
have_rmd17 = pytest.mark.skipif(not (DATA / "rmd17" / "rmd17_ethanol_train_01.npz").is_file(),
                                reason="rMD17 reference data not found")
TINY_ET = {"name": "et", "hidden": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "cutoff": 4.0}
TINY_EGNN = {"name": "egnn", "hidden": 16, "num_layers": 2, "cutoff": None, "num_rbf": 8}


def tiny_corpus(seed=0, names=("eth", "water")):
    """Off-equilibrium 'ethanol' with forces of a harmonic well, and equilibrium water."""
    rng = np.random.default_rng(seed)
    disp = 0.05 * rng.normal(size=(6, 9, 3))
    eth = ConformationSet.from_arrays(ETHANOL_Z, ETHANOL_R[None] + disp, forces=-2.0 * disp, source="eth")
    water = np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])
    wat = ConformationSet.from_arrays([8, 1, 1], water[None] + 0.01 * rng.normal(size=(4, 3, 3)),
                                      equilibrium=np.ones(4, bool), source="water")
    return Corpus([eth, wat], names=list(names))


def tiny_config(method="et-oreo", model=TINY_ET, objectives=None, **optim):
    o = {"batch_size": 4, "max_steps": 6, "warmup_steps": 1, "lr": 2e-3, "log_every": 2, "checkpoint_every": 3,
         "seed": 5}
    o.update(optim)
    return pretrain_config_from_dict({"model": dict(model), "objectives": {"method": method, **(objectives or {})},
                                      "optim": o})


def _eval_loss(trainer, seeds=(11, 12, 13, 14, 15, 16)):
    """Loss on all frames, averaged over fixed noise draws (the same before and after training)."""
    b = trainer.corpus.collate(np.arange(len(trainer.corpus)), dtype=trainer.dtype)
    trainer.task.eval()
    total = 0.0
    with torch.enable_grad():
        for s in seeds:
            loss, _ = trainer.task(b, torch.Generator().manual_seed(s))
            total += float(loss.detach())
    return total / len(seeds)


@pytest.mark.parametrize("method,model", [("et-oreo", TINY_ET), ("et-oro", TINY_ET), ("3d-emgp", TINY_EGNN),
                                          ("3d-emgp", TINY_ET), ("denoise", TINY_ET)])
def test_a_few_pretraining_steps_lower_the_loss(tmp_path, method, model):
    # denoising a 0.04 Å noise takes a tiny model far more than 25 steps; 0.2 Å shows the trend quickly
    extra = {"denoise_sigma": 0.2} if method == "denoise" else None
    tr = Pretrainer(tiny_config(method, model, extra, max_steps=25, lr=3e-3, min_lr=3e-3, batch_size=6),
                    tmp_path, corpus=tiny_corpus(), progress=False, log=lambda s: None)
    before = _eval_loss(tr)
    tr.fit()
    after = _eval_loss(tr)
    assert after < before, (method, before, after)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.task.state_dict().items()}


def test_resume_continues_exactly_and_files_are_written(tmp_path, monkeypatch):
    cfg = tiny_config(dtype="float64")
    straight = Pretrainer(cfg, tmp_path / "a", corpus=tiny_corpus(), progress=False, log=lambda s: None)
    straight.fit()

    first = Pretrainer(cfg, tmp_path / "b", corpus=tiny_corpus(), progress=False, log=lambda s: None)
    monkeypatch.setattr(Pretrainer, "_should_stop", lambda self, started: self.step == 3)  # "killed" at step 3
    first.fit()
    assert first.step == 3
    monkeypatch.undo()
    second = Pretrainer(cfg, tmp_path / "b", corpus=tiny_corpus(), progress=False, log=lambda s: None)
    with pytest.raises(FileExistsError):
        second.fit()
    second.fit(resume=True)
    assert second.step == 6
    a, b = _weights(straight), _weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.yaml", "corpus_report.json", "last.pt", "pretrained.pt", "metrics.csv"):
        assert (tmp_path / "b" / name).is_file()
    with open(tmp_path / "b" / "metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == [2, 3, 4, 6]      # the interrupted run logged step 3; nothing is logged twice
    # resuming ET-OREO's run as ET-ORO (the same weights fit both) or with another batch would mix two recipes
    for other, why in ((tiny_config("et-oro", dtype="float64", max_steps=9), "objective weights"),
                       (tiny_config(dtype="float64", max_steps=9, batch_size=2), "optim.batch_size")):
        with pytest.raises(ValueError, match=f"other settings: .*{why}"):
            Pretrainer(other, tmp_path / "b", corpus=tiny_corpus(), progress=False, log=lambda s: None).fit(resume=True)


def test_finetune_starts_from_the_pretrained_backbone(tmp_path):
    tr = Pretrainer(tiny_config(max_steps=3), tmp_path / "pre", corpus=tiny_corpus(), progress=False,
                    log=lambda s: None)
    tr.fit()
    ref = {k: v for k, v in tr.task.potential.state_dict().items()}
    for name in ("pretrained.pt", "last.pt"):
        pot, info = load_pretrained(tmp_path / "pre" / name)
        assert info["method"] == "et-oreo" and info["steps"] == 3
        assert all(torch.equal(pot.state_dict()[k], ref[k].float()) for k in ref if k.startswith("backbone."))
    pot, _ = load_pretrained(tmp_path / "pre" / "pretrained.pt")
    train = tiny_corpus().frames.subset(np.arange(6))
    train.energy = np.linspace(-10.0, -9.0, 6)
    new = make_finetune_potential(pot, train)
    same_head = make_finetune_potential(pot, train, options=FinetuneOptions(reuse_head=True))
    sd, sd2, old = new.state_dict(), same_head.state_dict(), pot.state_dict()
    assert all(torch.equal(sd[k], old[k]) for k in old if k.startswith("backbone."))
    assert not all(torch.equal(sd[k], old[k]) for k in old if k.startswith("head."))
    assert all(torch.equal(sd2[k], old[k]) for k in old if k.startswith("head."))
    assert new.elements == [1, 6, 8] and new.metadata["pretrained"]["method"] == "et-oreo"
    groups = layerwise_param_groups(new, 1e-3, layer_decay=0.5)
    lrs = [g["lr"] for g in groups]
    assert lrs[0] == 1e-3 and lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(1e-3 * 0.5 ** 3)
    assert sum(len(g["params"]) for g in groups) == len(list(new.parameters()))


@have_rmd17
def test_finetune_forcefield_runs_with_the_training_trainer(tmp_path):
    tr = Pretrainer(tiny_config(max_steps=2), tmp_path / "pre", corpus=tiny_corpus(), progress=False,
                    log=lambda s: None)
    tr.fit()
    cfg = config_from_dict({"data": {"molecule": "ethanol", "train_size": 4, "val_size": 2, "test_size": 3},
                            "optim": {"epochs": 1, "batch_size": 2, "lr_warmup_steps": 1}})
    m = finetune_forcefield(tmp_path / "pre" / "pretrained.pt", cfg, tmp_path / "ft",
                            FinetuneOptions(layer_decay=0.8), progress=False, log=lambda s: None)
    assert m["n_frames"] == 3 and np.isfinite(m["forces_mae_meV_per_A"])
    from forcefield.io import load_potential
    best = load_potential(tmp_path / "ft" / "best.pt")
    assert best.metadata["pretrained"]["method"] == "et-oreo" and best.metadata["molecule"] == "ethanol"
    # the run records the architecture it trained (the pretrained one), not the config's defaults (6x128)
    import yaml
    recorded = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["model"]
    assert {k: recorded[k] for k in TINY_ET} == TINY_ET


@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_property_finetune_loads_backbone_and_reports_meV(tmp_path):
    tr = Pretrainer(tiny_config(max_steps=2), tmp_path / "pre", corpus=tiny_corpus(names=("eth", "qm9-water")),
                    progress=False, log=lambda s: None)
    tr.fit()
    cfg = PropertyConfig(property="homo", source=str(QM9_DB), split="random", train_size=8, val_size=4,
                         test_size=4, epochs=1, batch_size=4, lr_warmup_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pt = PropertyTrainer(cfg, tmp_path / "homo", pretrained=tmp_path / "pre" / "pretrained.pt", progress=False,
                             log=lambda s: None)
    # the backbone saw QM9 molecules: a random split's test MAE is on molecules it has seen, and it says so
    assert any("split 'random'" in str(w.message) and "qm9-water" in str(w.message) for w in caught)
    # ET-ORO never draws the equilibrium QM9 source: nothing to warn about
    Pretrainer(tiny_config("et-oro", max_steps=1), tmp_path / "oro", corpus=tiny_corpus(names=("eth", "qm9-water")),
               progress=False, log=lambda s: None).fit()
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        PropertyTrainer(cfg, tmp_path / "homo-oro", pretrained=tmp_path / "oro" / "pretrained.pt", progress=False,
                        log=lambda s: None)
    assert not any("split 'random'" in str(w.message) for w in quiet)
    ref = tr.task.potential.state_dict()
    backbone = {k[len("potential."):]: v for k, v in pt.model.state_dict().items() if k.startswith("potential.backbone.")}
    assert backbone and all(torch.equal(v, ref[k].float()) for k, v in backbone.items())
    m = pt.fit()
    assert m["unit"] == "meV" and np.isfinite(m["test_mae"]) and m["n_test"] == 4
    assert json.loads((tmp_path / "homo" / "test_metrics.json").read_text())["property"] == "homo"


@have_rmd17
@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_cli_pretrain_and_finetune(tmp_path, capsys):
    from forcefield.cli import main
    corpus = {"leakage": {"protocol": "strict", "targets": ["ethanol"], "split_indices": [1]},
              "sources": [{"reader": "qm9", "kind": "equilibrium", "path": str(QM9_DB), "split": "train"},
                          {"reader": "rmd17", "kind": "off-equilibrium", "molecules": ["malonaldehyde"],
                           "max_frames": 6}]}
    (tmp_path / "corpus.yaml").write_text(yaml.safe_dump(corpus))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": TINY_ET, "optim": {
        "batch_size": 4, "max_steps": 2, "warmup_steps": 1, "log_every": 1}}))
    assert main(["pretrain", "--config", str(tmp_path / "cfg.yaml"), "--corpus", str(tmp_path / "corpus.yaml"),
                 "--out", str(tmp_path / "pre"), "--no-progress", "--method", "et-oreo"]) == 0
    report = json.loads((tmp_path / "pre" / "corpus_report.json").read_text())
    assert report["sources"][0]["dropped"]["ethanol"] == 1      # QM9's ethanol left out of pretraining
    assert main(["finetune", "--from", str(tmp_path / "pre" / "pretrained.pt"), "--molecule", "ethanol",
                 "--train-size", "4", "--val-size", "2", "--epochs", "1", "--set", "data.test_size=2",
                 "--set", "optim.batch_size=2", "--set", "finetune.layer_decay=0.8", "--out", str(tmp_path / "ft"),
                 "--no-progress"]) == 0
    assert (tmp_path / "ft" / "test_metrics.json").is_file()
    assert yaml.safe_load((tmp_path / "ft" / "finetune.yaml").read_text())["finetune"] == {"layer_decay": 0.8}
    from forcefield.io import load_potential
    assert load_potential(tmp_path / "ft" / "best.pt").metadata["pretrained"]["method"] == "et-oreo"   # --from used
    # its card states what the run did: the steps of the shipped file, the protocol's own sentence, the model size
    import sys as _sys
    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "release"))
    import ship_pretrained
    ship_pretrained.ship(tmp_path / "pre", "tiny-oreo", tmp_path / "shipped")
    card = (tmp_path / "shipped" / "tiny-oreo.md").read_text()
    assert "2 steps × batch 4 = 8 conformations" in card and "every conformation of ethanol removed" in card
    assert "as ET 2 × 16" in card


def test_sources_no_objective_uses_are_not_sampled(tmp_path):
    tr = Pretrainer(tiny_config("et-oro", batch_size=2), tmp_path, corpus=tiny_corpus(), progress=False,
                    log=lambda s: None)
    assert tr.source_weights.tolist() == [1.0, 0.0]         # ET-ORO never draws the equilibrium water frames
    assert all((f < 6).all() for f in tr.sampler.epoch_batches(0))
    oreo = Pretrainer(tiny_config("et-oreo", batch_size=2), tmp_path / "b", corpus=tiny_corpus(), progress=False,
                      log=lambda s: None)
    assert oreo.source_weights.tolist() == [1.0, 1.0]


def test_shipped_pretrained_backbones_load_by_name():
    """`oreo finetune --from pretrained-<method>` resolves the shipped backbone; each ships with its card."""
    from forcefield.io import shipped_models
    from forcefield.pretrain.finetune import load_pretrained
    names = [n for n in shipped_models() if n.startswith("pretrained-")]
    if not names:
        pytest.skip("no pretrained backbone shipped")
    for name in names:
        pot, info = load_pretrained(name)
        assert info["method"] in name and info["steps"] > 0
        assert shipped_models()[name].with_suffix(".md").is_file()
        z = torch.tensor([6, 1, 1, 1, 1])
        r = torch.tensor([[0.0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
                          [0.63, -0.63, -0.63]])
        out = pot(z, r)
        assert torch.isfinite(out["forces"]).all()


def _resumes_from_its_compact_state(make, tmp_path, key, first_end, second_end):
    """``make(out, state_file)`` builds a trainer; the compact state of a finished run restores its weights
    exactly in a fresh folder and the run continues there, learning curve and CPU time included."""
    state = tmp_path / "committed" / "state.pt"
    first = make(tmp_path / "a", state, first_end)
    first.fit()
    assert state.is_file()
    resumed = make(tmp_path / "fresh", state, second_end)
    resumed.load_checkpoint(state)
    model = resumed.task if hasattr(resumed, "task") else resumed.model
    ref = (first.task if hasattr(first, "task") else first.model).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    resumed = make(tmp_path / "fresh2", state, second_end)
    resumed.fit(resume=True)
    with open(tmp_path / "fresh2" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert int(rows[-1][key]) == second_end and len(rows) == len({r[key] for r in rows}) > 1
    assert resumed.cpu_seconds > first.cpu_seconds > 0 and float(rows[-1]["cpu_hours"]) > 0
    assert (tmp_path / "fresh2" / "learning_curve.png").is_file()


def test_pretraining_keeps_a_compact_run_state(tmp_path):
    _resumes_from_its_compact_state(
        lambda out, state, steps: Pretrainer(tiny_config(dtype="float64", max_steps=steps), out, corpus=tiny_corpus(),
                                             progress=False, log=lambda s: None, state_file=state),
        tmp_path, "step", 4, 6)


@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_property_training_keeps_a_compact_run_state(tmp_path):
    def make(out, state, epochs):
        cfg = PropertyConfig(property="gap", source=str(QM9_DB), split="random", train_size=8, val_size=4,
                             test_size=4, epochs=epochs, batch_size=4, lr_warmup_steps=1,
                             model={"name": "et", "hidden": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                                    "cutoff": 4.0})
        return PropertyTrainer(cfg, out, progress=False, log=lambda s: None, state_file=state)
    _resumes_from_its_compact_state(make, tmp_path, "epoch", 1, 2)


def test_epochs_of_a_fixed_number_of_steps_walk_a_stream_of_seeded_passes():
    """``epoch_steps``: epoch e takes batches e*S .. e*S+S-1 of the stream of passes (pass p in the order of
    default_rng([seed, p])), so every molecule is seen once a pass whatever S, and a resumed epoch draws the same
    batches; without it an epoch is one pass, as before."""
    import types
    from forcefield.train.loop import EpochTrainer
    n, bs = 10, 4                                        # passes of 3 batches (4, 4, 2)

    def batches(epoch, epoch_steps):
        run = types.SimpleNamespace(opts=types.SimpleNamespace(seed=7, batch_size=bs, epoch_steps=epoch_steps),
                                    epoch=epoch, n_train=lambda: n)
        run.steps_per_pass = lambda: EpochTrainer.steps_per_pass(run)
        return EpochTrainer.epoch_batches(run)
    whole = [b for e in range(2) for b in batches(e, None)]
    assert [len(b) for b in whole] == [4, 4, 2, 4, 4, 2]
    assert all(sorted(np.concatenate(whole[3 * p:3 * p + 3])) == list(range(n)) for p in range(2))
    stream = [b for e in range(3) for b in batches(e, 2)]          # epochs of 2 steps cross the passes' ends
    assert len(stream) == 6 and all(np.array_equal(a, b) for a, b in zip(stream, whole))
    assert all(np.array_equal(a, b) for a, b in zip(batches(2, 2), whole[4:6]))


@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_property_training_in_epochs_of_steps_resumes_exactly_and_refuses_other_epoch_steps(tmp_path):
    def make(out, epochs, epoch_steps=3):
        cfg = PropertyConfig(property="gap", source=str(QM9_DB), split="random", train_size=8, val_size=4,
                             test_size=4, epochs=epochs, epoch_steps=epoch_steps, batch_size=4, lr_warmup_steps=1,
                             dtype="float64", model={"name": "et", "hidden": 16, "num_layers": 1, "num_heads": 2,
                                                     "num_rbf": 8, "cutoff": 4.0})
        return PropertyTrainer(cfg, out, progress=False, log=lambda s: None)
    straight = make(tmp_path / "a", 2)
    straight.fit()
    assert straight.step == 6                             # 2 epochs of 3 steps: passes of 2 steps, crossed
    make(tmp_path / "b", 1).fit()
    resumed = make(tmp_path / "b", 2)
    resumed.fit(resume=True)
    assert resumed.step == 6
    assert all(torch.equal(v, straight.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    with pytest.raises(ValueError, match="epoch_steps"):
        make(tmp_path / "b", 3, epoch_steps=2).fit(resume=True)


def test_the_cosine_factor_rises_over_the_warmup_then_falls_to_its_floor_at_the_last_step():
    f = [cosine_lr_factor(s, 4, 20, floor=0.01) for s in range(25)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])                  # linear warm-up
    assert f[4] == pytest.approx(1.0) and f[12] == pytest.approx(0.505)   # half-way down: (1 + floor) / 2
    assert all(a > b for a, b in zip(f[4:20], f[5:21]))                   # falls every step after it
    assert f[20:] == pytest.approx([0.01] * 5)                             # the floor, and after the last step


@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_property_training_with_the_cosine_schedule_follows_it_and_resumes_exactly(tmp_path):
    """lr_schedule cosine: each step's rate is lr * cosine_lr_factor(step) over the run's epochs x epoch_steps (no
    plateau cuts), the lr floor does not end the run early, and a run paused at an invocation's deadline (as a
    campaign piece's end pauses it: untested) and resumed takes the same steps as one that was not (the rate depends
    on the step alone)."""
    def make(out, schedule="cosine"):
        cfg = PropertyConfig(property="gap", source=str(QM9_DB), split="random", train_size=8, val_size=4,
                             test_size=4, epochs=3, epoch_steps=3, batch_size=4, lr=1e-3, lr_min=1e-5,
                             lr_warmup_steps=1, lr_schedule=schedule, lr_patience=0, lr_factor=0.1,
                             dtype="float64",
                             model={"name": "et", "hidden": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8,
                                    "cutoff": 4.0})
        return PropertyTrainer(cfg, out, progress=False, log=lambda s: None)
    straight = make(tmp_path / "a")
    metrics = straight.fit()
    assert straight.step == 9 and metrics["stop_reason"] == "all 3 epochs done"
    with open(tmp_path / "a" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    # each epoch's row has the rate of its last step (patience 0 would have cut a plateau schedule every epoch)
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3 * cosine_lr_factor(s, 1, 9, 1e-2)
                                                            for s in (2, 5, 8)])
    paused = make(tmp_path / "b").fit(pause_minutes=1e-9)          # pauses after its first epoch
    assert paused["paused"] and paused["steps"] == 3 and not (tmp_path / "b" / "test_metrics.json").exists()
    resumed = make(tmp_path / "b")
    resumed.fit(resume=True)
    assert resumed.step == 9
    assert all(torch.equal(v, straight.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    with pytest.raises(ValueError, match=r"unknown learning-rate schedule lr_schedule: 'linear'; use plateau"):
        make(tmp_path / "c", schedule="linear")


@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_a_compiled_property_step_equals_the_eager_one(tmp_path, monkeypatch):
    """compile: a QM9 property model's training step through the traced + compiled per-atom graph (no forces) gives
    the eager loss and parameter gradients (aot_eager: the same traced graph, built in seconds), and trains. The
    trainer asks for the malloc policy that keeps freed memory (forcefield.allocator: its batches page-faulted)."""
    monkeypatch.setenv("OREO_COMPILE_BACKEND", "aot_eager")
    import forcefield.pretrain.property as property_module
    asked = []
    monkeypatch.setattr(property_module, "keep_freed_memory", lambda: asked.append(1) or True)

    def make(out, compile_):
        cfg = PropertyConfig(property="gap", source=str(QM9_DB), split="random", train_size=8, val_size=4,
                             test_size=4, epochs=2, batch_size=4, lr_warmup_steps=1, dtype="float64",
                             compile=compile_, model={"name": "et", "hidden": 16, "num_layers": 2, "num_heads": 2,
                                                      "num_rbf": 8, "cutoff": 4.0})
        return PropertyTrainer(cfg, out, progress=False, log=lambda s: None)
    eager, compiled = make(tmp_path / "e", False), make(tmp_path / "c", True)
    assert eager._compiled is None and compiled._compiled is not None and len(asked) == 2
    compiled.model.load_state_dict(eager.model.state_dict())
    results = []
    for tr in (eager, compiled):
        tr.model.train()
        params = [p for p in tr.model.parameters() if p.requires_grad]
        loss = tr.batch_loss(np.arange(8))
        results.append((loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (le, ge), (lc, gc) = results
    assert compiled._compiled.compiles == 1 and compiled._compiled.failure is None
    torch.testing.assert_close(lc, le, rtol=1e-10, atol=1e-12)
    assert sum(e is not None for e in ge) > 10
    for a, e in zip(gc, ge):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)
    compiled.fit()                                                         # the loop runs on it
    assert compiled.step == 4 and compiled._compiled.failure is None


@pytest.mark.skipif(not QM9_DB.is_file(), reason="SchNetPack QM9 test database not found")
def test_compiled_property_training_needs_the_et_backbone(tmp_path):
    cfg = PropertyConfig(property="gap", source=str(QM9_DB), split="random", train_size=8, val_size=4, test_size=4,
                         compile=True, model={"name": "egnn", "hidden": 16, "num_layers": 1, "cutoff": 4.0})
    with pytest.raises(ValueError, match=r"^compile needs the ET backbone.*set compile: false"):
        PropertyTrainer(cfg, tmp_path, progress=False, log=lambda s: None)


def test_campaign_reads_a_pretraining_state_and_builds_its_command(tmp_path, monkeypatch):
    from tests.helpers import import_campaign
    campaign = import_campaign()
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path)
    job = {"name": "pre", "kind": "pretrain", "config": "examples/configs/pretrain_et_oro.yaml",
           "corpus": "examples/configs/pretrain_corpus.yaml", "method": "et-oro", "set": ["model.hidden=96"],
           "threads": 1}
    cmd = campaign.job_command(job, 30, fresh=True)
    assert cmd[4:7] == ["-m", "forcefield.cli", "pretrain"] and "--resume" not in cmd
    assert cmd[cmd.index("--state") + 1] == str(tmp_path / "pre.pt") and "optim.max_minutes=30.00" in cmd
    assert cmd[cmd.index("--method") + 1] == "et-oro" and "model.hidden=96" in cmd
    assert "--resume" in campaign.job_command(job, 30, fresh=False)
    monkeypatch.setattr(campaign, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(campaign, "MODELS_DIR", tmp_path / "models")
    run = tmp_path / "runs" / "pre"
    Pretrainer(tiny_config(dtype="float64", max_steps=4), run, corpus=tiny_corpus(), progress=False,
               log=lambda s: None, state_file=tmp_path / "pre.pt").fit()
    st = campaign.read_state(job)
    assert st["step"] == 4 and st["cpu_hours"] > 0 and st["history"] and "loss" in st["history"][-1]
    # every step done: the job still wants one run, which (on a fresh clone) only writes the backbone from the state
    assert st["total_steps"] == 4 and campaign.finished(job, st) == ""
    import shutil
    shutil.rmtree(run)
    Pretrainer(tiny_config(dtype="float64", max_steps=4), run, corpus=tiny_corpus(), progress=False,
               log=lambda s: None, state_file=tmp_path / "pre.pt").fit(resume=True)
    assert campaign.read_state(job)["step"] == 4
    kept = campaign.keep_backbone(job)
    assert kept == tmp_path / "models" / "pre.pt" and load_pretrained(kept) is not None
    assert campaign.finished(job, campaign.read_state(job)).startswith("all 4 steps done")
    # done, its backbone kept: the state is cut to its record (the runner still sees it done, with its curve)
    before = campaign.read_state(job)
    assert "kB" in campaign.archive_state(job)
    after = campaign.read_state(job)
    assert after["history"] == before["history"] and after["total_steps"] == 4
    assert campaign.finished(job, after).startswith("all 4 steps done")
    with pytest.raises(ValueError, match="archived record"):
        Pretrainer(tiny_config(dtype="float64", max_steps=6), tmp_path / "again", corpus=tiny_corpus(),
                   progress=False, log=lambda s: None, state_file=tmp_path / "pre.pt").fit(resume=True)


@pytest.mark.parametrize("method", ["et-oreo", pytest.param("et-oro", marks=pytest.mark.slow)])
def test_a_compiled_pretraining_step_equals_the_eager_one(tmp_path, monkeypatch, method):
    """optim.compile: the objectives' forward passes through the traced + compiled energy/force graph (learned
    part only) give the eager loss and parameter gradients (aot_eager: the same traced graph, built in seconds)."""
    monkeypatch.setenv("OREO_COMPILE_BACKEND", "aot_eager")
    cfg = tiny_config(method, dtype="float64", compile=True)
    tr = Pretrainer(cfg, tmp_path, corpus=tiny_corpus(), progress=False, log=lambda s: None)
    assert tr._runner is not None
    b = tr.corpus.collate(np.arange(len(tr.corpus)), dtype=tr.dtype)
    params = [p for p in tr.task.parameters() if p.requires_grad]
    tr.task.train()
    results = []
    for runner in (None, tr._runner):
        loss, parts = tr.task(b, torch.Generator().manual_seed(3), runner=runner)
        results.append((loss, parts, torch.autograd.grad(loss, params, allow_unused=True)))
    (le, pe, ge), (lc, pc, gc) = results
    torch.testing.assert_close(lc, le, rtol=1e-10, atol=1e-12)
    assert set(pc) == set(pe) and len(pe) == len(cfg.objectives.resolved_weights())
    for a, e in zip(gc, ge):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)
    tr.fit()                                                              # the loop runs on it
    assert tr.step == 6


def test_compiled_pretraining_refuses_objectives_that_read_features(tmp_path):
    with pytest.raises(ValueError, match="coord_denoising read the backbone's features.*optim.compile: false"):
        Pretrainer(tiny_config("denoise", compile=True), tmp_path, corpus=tiny_corpus(), progress=False,
                   log=lambda s: None)


def _corpus_with_an_unused_source_first(seed=0):
    """Equilibrium HF first (an element the rest lacks), then off-equilibrium 'ethanol' with forces."""
    rng = np.random.default_rng(seed)
    hf = ConformationSet.from_arrays([9, 1], np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.917]])[None]
                                     + 0.01 * rng.normal(size=(5, 2, 3)), equilibrium=np.ones(5, bool), source="hf")
    disp = 0.05 * rng.normal(size=(7, 9, 3))
    eth = ConformationSet.from_arrays(ETHANOL_Z, ETHANOL_R[None] + disp, forces=-2.0 * disp, source="eth")
    return Corpus([hf, eth], names=["hf", "eth"])


def test_a_packed_corpus_holds_the_float32_batches_and_resumes_the_same_run(tmp_path):
    """--pack-corpus: what a run collates in float32 is exactly what the built corpus gives; packed for ET-ORO
    (the equilibrium source left out) it still reports the whole corpus, so a run started on the built corpus
    continues on the packed one step for step."""
    from forcefield.pretrain.corpus_pack import is_packed_corpus, load_packed_corpus, save_packed_corpus
    built = _corpus_with_an_unused_source_first()
    quiet = lambda s: None
    full = load_packed_corpus(save_packed_corpus(built, tmp_path / "full.npz"), log=quiet)
    every = np.arange(len(built))
    a, b = built.collate(every, dtype=torch.float32), full.collate(every, dtype=torch.float32)
    for name in ("numbers", "positions", "forces", "batch", "has_forces", "source"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert full.summary() == built.summary() and full.elements == built.elements == [1, 6, 8, 9]

    oro = load_packed_corpus(save_packed_corpus(built, tmp_path / "oro.npz", sources=[False, True]), log=quiet)
    assert len(oro) == 7 and oro.summary() == built.summary() and oro.elements == built.elements
    assert oro.force_rms() == built.force_rms()
    assert is_packed_corpus(tmp_path / "oro.npz") and not is_packed_corpus(tmp_path / "missing.npz")

    def run(out, corpus, stop_at, resume=False):
        tr = Pretrainer(tiny_config("et-oro", max_steps=6, batch_size=3), out, corpus=corpus, progress=False,
                        log=quiet)
        tr._should_stop = lambda started: tr.step >= stop_at      # a piece that ends on its time budget
        tr.fit(resume=resume)
        return tr
    straight = run(tmp_path / "straight", built, 6)
    run(tmp_path / "pieces", built, 3)
    continued = run(tmp_path / "pieces", oro, 6, resume=True)
    started_packed = run(tmp_path / "packed", oro, 6)       # the same model (elements, force scale) and steps
    for k, v in straight.task.state_dict().items():
        assert torch.equal(v, continued.task.state_dict()[k]), k
        assert torch.equal(v, started_packed.task.state_dict()[k]), k
    with pytest.raises(ValueError, match="not a packed oreo corpus"):
        load_packed_corpus(tmp_path / "straight" / "metrics.csv")
    # packed for ET-ORO, it cannot run ET-OREO, whose equilibrium terms would find no frame (it would be ET-ORO)
    with pytest.raises(ValueError, match="holds no frames of 'hf' \\(equilibrium, 5 frames\\).*packed for another"):
        Pretrainer(tiny_config("et-oreo", max_steps=6, batch_size=3), tmp_path / "oreo", corpus=oro, progress=False,
                   log=quiet)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs on the device machine)")
def test_pretraining_on_the_gpu_takes_the_cpu_steps_and_state(tmp_path):
    """A GPU piece of a pretraining job (benchmarks/campaign_gpu.py): the steps equal the CPU's (float64, up to
    the order of the sums), and its compact state continues on the CPU."""
    quiet = lambda s: None
    cpu = Pretrainer(tiny_config("et-oreo", dtype="float64", device="cpu"), tmp_path / "cpu", corpus=tiny_corpus(),
                     progress=False, log=quiet)
    cpu.fit()
    gpu = Pretrainer(tiny_config("et-oreo", dtype="float64", device="cuda"), tmp_path / "gpu", corpus=tiny_corpus(),
                     progress=False, log=quiet, state_file=tmp_path / "s.pt")
    gpu.fit()
    for k, v in cpu.task.state_dict().items():
        torch.testing.assert_close(gpu.task.state_dict()[k].cpu(), v, rtol=1e-6, atol=1e-9, msg=k)
    back = Pretrainer(tiny_config("et-oreo", dtype="float64", device="cpu", max_steps=8), tmp_path / "back",
                      corpus=tiny_corpus(), progress=False, log=quiet, state_file=tmp_path / "s.pt")
    back.fit(resume=True)
    assert back.step == 8
