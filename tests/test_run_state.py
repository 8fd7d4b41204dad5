"""Compact run state (committable), --init-from, thread defaults, and the campaign runner's job file."""
import json
import math
import os
import subprocess
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from forcefield.cli import main as oreo
from forcefield.io import ModelFileError, load_potential, load_trainable_potential, save_model
from forcefield.threads import configure_threads, default_threads
from forcefield.train import Trainer
from forcefield.train.runstate import (dequantize, pack_checkpoint, quantize_positive, quantize_signed,
                                       unpack_runstate)
from tests.helpers import TINY_TRAIN_CFG, import_campaign, tiny_train_config

REPO = Path(__file__).resolve().parents[1]


def _cfg(**optim):
    return tiny_train_config(**{"epochs": 2, **optim})


def _quiet(*a):
    pass


def test_quantisation_errors_are_small_and_keep_zero_and_sign():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g) * torch.logspace(-6, 0, 7)
    back = dequantize(quantize_signed(x))
    assert back.shape == x.shape and back.dtype == x.dtype
    blocks_max = x.abs().max()
    assert (back - x).abs().max() <= blocks_max / 127 * 0.51 + 1e-12
    v = torch.rand(999, generator=g) * torch.logspace(-20, -2, 999)
    v[::100] = 0.0                         # never-updated moments stay exactly zero
    bv = dequantize(quantize_positive(v))
    nz = v > 0
    assert torch.all(bv[~nz] == 0)
    rel = ((bv[nz] - v[nz]) / v[nz]).abs()
    assert rel.max() < 0.2 and torch.all(bv[nz] > 0)
    # zeros have their own code: they cost the block's other values no precision (they once stretched its range)
    w = torch.rand(256, generator=g) * torch.logspace(-10, -6, 256)
    with_zeros = w.clone()
    zeroed = torch.arange(5, 256, 10)
    zeroed = zeroed[(zeroed != w.argmin()) & (zeroed != w.argmax())]      # the block's range stays the same
    with_zeros[zeroed] = 0.0
    keep = with_zeros > 0
    assert torch.equal(dequantize(quantize_positive(with_zeros))[keep], dequantize(quantize_positive(w))[keep])
    span = math.log(float(w.max() / w.min()))
    assert ((dequantize(quantize_positive(w)) - w) / w).abs().max() <= math.exp(span / 508) - 1 + 1e-5
    assert torch.all(dequantize(quantize_positive(torch.zeros(300))) == 0)
    # a version-1 state (zeros at the floor of the block's log range) still reads
    lo, hi = torch.tensor([math.log(1e-30)]), torch.tensor([math.log(1e-6)])
    q = torch.tensor([[0, 255] + [0] * 254], dtype=torch.uint8)
    old = dequantize({"kind": "log-uint8", "q": q, "lo": lo, "hi": hi, "shape": (2,), "dtype": "torch.float32"})
    assert old[0] == 0 and old[1] == pytest.approx(1e-6, rel=1e-4)


def test_the_fused_optimizer_takes_the_reference_adamw_step_and_stays_fused_after_a_resume():
    """One optimiser for every trainer (forcefield.train.loop.adamw): the fused kernel on CPU, the same update as
    torch's reference per-tensor AdamW; a state written by the unfused optimiser (older checkpoints) loads
    without switching the implementation back."""
    from forcefield.train.loop import adamw, load_optimizer_state
    torch.manual_seed(0)
    ref_params = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    params = [p.detach().clone().requires_grad_(True) for p in ref_params]
    start = [p.detach().clone() for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.01, foreach=False)
    opt = adamw(params, lr=1e-2, weight_decay=0.01)
    assert opt.param_groups[0]["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(ref_params, params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    for p, q, q0 in zip(ref_params, params, start):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
        assert (q - q0).abs().max() > 1e-3          # the steps moved the parameters
    fresh = adamw([p.detach().clone().requires_grad_(True) for p in ref_params], lr=1e-2, weight_decay=0.01)
    load_optimizer_state(fresh, ref.state_dict())
    assert fresh.param_groups[0]["fused"] and fresh.param_groups[0]["lr"] == 1e-2
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"], ref.state[ref_params[0]]["exp_avg"])


@pytest.mark.slow
def test_run_state_is_compact_and_a_fresh_clone_resumes_from_it(tmp_path):
    state = tmp_path / "committed" / "run.pt"
    first = Trainer(_cfg(epochs=2), tmp_path / "a", progress=False, log=_quiet, state_file=state)
    first.fit()
    assert state.is_file()
    # fresh clone: the run folder is gone, only the committed state is left; it brings the weights back
    probe = Trainer(_cfg(epochs=4), tmp_path / "probe", progress=False, log=_quiet)
    probe.load_checkpoint(state)
    for k, v in first.ema.state_dict().items():
        assert torch.equal(v, probe.ema.state_dict()[k]), k                      # the EMA exactly
    resumed = Trainer(_cfg(epochs=4), tmp_path / "fresh", progress=False, log=_quiet, state_file=state)
    resumed.fit(resume=True)
    assert resumed.epoch == 4
    rows = (tmp_path / "fresh" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4     # the learning curve travelled with the state
    assert resumed.cpu_seconds > first.cpu_seconds > 0
    # the unpacked checkpoint matches the full one: EMA exactly, weights and moments to quantisation error
    ck = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    back = unpack_runstate(pack_checkpoint(ck))
    for k, v in ck["model"]["state_dict"].items():
        assert torch.equal(v, back["model"]["state_dict"][k])
    for k, v in ck["train_model"].items():
        if v.is_floating_point():
            drift = (v - ck["model"]["state_dict"][k]).abs().max()
            assert (v - back["train_model"][k]).abs().max() <= drift / 100 + 1e-12, k
    for idx, st in ck["optimizer"]["state"].items():
        m = st["exp_avg"]
        assert (m - back["optimizer"]["state"][idx]["exp_avg"]).abs().max() <= m.abs().max() / 100 + 1e-12
    assert back["epoch"] == ck["epoch"] and back["frame_ids"] == ck["frame_ids"]


def test_a_resume_from_the_run_state_makes_the_current_model_the_best_with_its_card(tmp_path):
    """The compact state holds the current weights, not the best of earlier pieces: a resume from it (a fresh clone)
    writes them as best.pt with their own score and card (CPU-hours, epochs), never a model that best_val does not
    describe, and never a card without CPU-hours."""
    state = tmp_path / "committed" / "run.pt"
    Trainer(_cfg(epochs=2), tmp_path / "a", progress=False, log=_quiet, state_file=state).fit()
    rs = torch.load(state, weights_only=False)
    rs["best_val"] = 1e-12                        # an earlier piece's best that the state no longer holds
    torch.save(rs, state)
    resumed = Trainer(_cfg(epochs=2), tmp_path / "fresh", progress=False, log=_quiet, state_file=state)
    resumed.fit(resume=True)                      # all epochs done: only the resume's own bookkeeping runs
    best = load_potential(tmp_path / "fresh" / "best.pt")
    assert best.metadata["epochs"] == 2 and best.metadata["cpu_hours"] > 0
    assert resumed.best_val == pytest.approx(resumed.validate()["score"])
    for k, v in resumed.ema.state_dict().items():
        assert torch.equal(v, best.state_dict()[k]), k


def test_a_run_state_further_along_than_the_folders_checkpoint_is_the_one_resumed(tmp_path):
    """A GPU piece's state copied over the job's state file, while this machine's run folder still holds an older
    last.pt: the resume takes the state that is further along (and says so), not the older checkpoint."""
    state = tmp_path / "committed" / "run.pt"
    Trainer(_cfg(epochs=1), tmp_path / "here", progress=False, log=_quiet, state_file=state).fit()
    elsewhere = tmp_path / "elsewhere.pt"
    Trainer(_cfg(epochs=3), tmp_path / "gpu", progress=False, log=_quiet, state_file=elsewhere).fit()
    shutil.copyfile(elsewhere, state)             # adopted; runs/here/last.pt is at epoch 1
    said = []
    resumed = Trainer(_cfg(epochs=4), tmp_path / "here", progress=False, log=said.append, state_file=state)
    resumed.fit(resume=True)
    assert resumed.epoch == 4 and any("further along" in line for line in said)
    rows = (tmp_path / "here" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4


def test_run_state_of_the_shipped_size_is_under_half_a_checkpoint():
    import io
    from forcefield.io import model_record
    pot = load_trainable_potential("aspirin")
    opt = torch.optim.AdamW(pot.parameters(), lr=1e-3)
    for p in pot.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    record = model_record(pot)
    record["state_dict"] = {k: v.clone() for k, v in record["state_dict"].items()}   # the EMA: its own copy
    ck = {"format": "oreo-checkpoint", "model": record, "train_model": pot.state_dict(),
          "optimizer": opt.state_dict(), "epoch": 1, "step": 1, "frame_ids": {}}

    def size(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell()
    n_params = sum(p.numel() for p in pot.parameters())
    packed = size(pack_checkpoint(ck))
    assert packed < 0.5 * size(ck) and packed < 7.5 * n_params


def test_init_from_continues_a_model_and_refuses_exports(tmp_path):
    Trainer(_cfg(epochs=1), tmp_path / "base", progress=False, log=_quiet).fit()
    base = load_potential(tmp_path / "base" / "best.pt")
    init = load_trainable_potential(tmp_path / "base" / "best.pt")
    assert init.training and all(p.requires_grad for p in init.parameters())
    t = Trainer(_cfg(epochs=1, lr=1e-12, lr_warmup_steps=0), tmp_path / "cont", progress=False, log=_quiet,
                init_model=init, init_cpu_hours=0.5)
    # starts from the given weights, not from a new model
    for (k, a), (_, b) in zip(base.state_dict().items(), t.model.state_dict().items()):
        assert torch.allclose(a.float(), b.float()), k
    t.fit()
    assert t.cpu_seconds >= 0.5 * 3600
    assert load_potential(tmp_path / "cont" / "best.pt").metadata["cpu_hours"] >= 0.5
    ts = tmp_path / "model_ts.pt"
    assert oreo(["export", str(tmp_path / "base" / "best.pt"), "-o", str(ts)]) == 0
    with pytest.raises(ModelFileError, match="cannot be trained further"):
        load_trainable_potential(ts)


def test_cli_init_from_and_state(tmp_path):
    cfg = tmp_path / "c.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump(TINY_TRAIN_CFG))
    save_model(load_trainable_potential(_trained(tmp_path)), tmp_path / "m.pt")
    args = ["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", "--threads", "1",
            "--init-from", str(tmp_path / "m.pt"), "--state", str(tmp_path / "s.pt"), "--set", "optim.epochs=1"]
    assert oreo(args) == 0
    assert (tmp_path / "s.pt").is_file()


def _trained(tmp_path) -> Path:
    Trainer(_cfg(epochs=1), tmp_path / "t", progress=False, log=_quiet).fit()
    return tmp_path / "t" / "best.pt"


def test_thread_defaults(monkeypatch):
    monkeypatch.delenv("OREO_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("OREO_THREADS", "2")
    assert default_threads() == 2
    monkeypatch.setenv("OREO_THREADS", "two")
    with pytest.raises(ValueError, match="OREO_THREADS"):
        default_threads()
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="at least 1"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_compiled_inference_keeps_freed_memory_unless_told():
    """The .pt2 loader's malloc policy (forcefield.allocator): applied once on glibc, off with OREO_MALLOC=default.
    Each check in a fresh process: the policy is process-wide."""
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the policy is glibc's")
    code = ("from forcefield.allocator import keep_freed_memory as k; a = k(); print(a, k() == a)")
    env = {k: v for k, v in os.environ.items() if k != "OREO_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OREO_MALLOC": "default"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.slow
def test_commands_run_on_one_thread_unless_told():
    env = {k: v for k, v in os.environ.items() if k not in ("OREO_THREADS", "OMP_NUM_THREADS")}
    code = ("import sys, torch; from forcefield.threads import configure_threads; "
            "configure_threads(); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OREO_THREADS": "2"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "2"
    # the oreo command sets the BLAS/OpenMP variables before its parsers import numpy and torch, and child
    # processes inherit them
    code = ("import os, sys; from forcefield.cli import main; main(['info', 'ethanol', '--threads', '1'] "
            "if '--threads' in sys.argv else ['info', 'ethanol']); "
            "print(os.environ['OMP_NUM_THREADS'], os.environ['OPENBLAS_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["1", "1"]


def test_campaign_job_file_is_checked(tmp_path, monkeypatch):
    campaign = import_campaign()
    jobs = campaign.read_jobs(campaign.CAMPAIGN_YAML)     # the committed job list is valid
    assert jobs and len({j["name"] for j in jobs}) == len(jobs)
    committed = next(j for j in jobs if j["name"] == "aspirin")          # its committed state reads back
    st = campaign.read_state(committed)
    assert st["epoch"] > 0 and st["cpu_hours"] > 1 and st["history"] and st["lr"] > 0
    bad = tmp_path / "c.yaml"
    bad.write_text("jobs:\n  - {name: a, config: examples/configs/rmd17_aspirin.yaml, budget: 1}\n")
    with pytest.raises(SystemExit, match="unknown key"):
        campaign.read_jobs(bad)
    job = {"name": "x", "config": "examples/configs/rmd17_aspirin.yaml", "set": ["optim.lr=0.001"], "threads": 1,
           "init_from": "aspirin", "init_cpu_hours": 1.5}
    fresh = campaign.job_command(job, 10, fresh=True)
    assert fresh[:3] == ["nice", "-n", "10"] and "--init-from" in fresh and "--resume" not in fresh
    again = campaign.job_command(job, 10, fresh=False)
    assert "--resume" in again and "--init-from" not in again and "optim.max_minutes=10.00" in again
    assert "optim.epochs=1000000" in again            # pieces end on their time, not on the config's epoch cap
    assert "optim.epochs=1000000" not in campaign.job_command({**job, "set": ["optim.epochs=5"]}, 10, fresh=False)
    pre = {"name": "pre", "kind": "pretrain", "config": "examples/configs/pretrain_et_oreo.yaml", "set": [],
           "threads": 1}
    assert "optim.epochs=1000000" not in campaign.job_command(pre, 10, fresh=False)   # epochs size its schedule
    # a fine-tune of a pretraining job's backbone: `oreo finetune --from` it on every piece, after that job is done
    bad.write_text("jobs:\n  - {name: pre, kind: pretrain, config: examples/configs/pretrain_et_oreo.yaml}\n"
                   "  - {name: ft, config: examples/configs/rmd17_ethanol.yaml, finetune_from: pre}\n")
    ft = campaign.read_jobs(bad)[1]
    assert ft["after"] == ["pre"]
    for fresh in (True, False):
        cmd = campaign.job_command(ft, 10, fresh=fresh)
        assert cmd[cmd.index("-m") + 2] == "finetune" and cmd[cmd.index("--from") + 1].endswith("models/pre.pt")
        assert ("--resume" in cmd) is not fresh
    bad.write_text("jobs:\n  - {name: a, config: examples/configs/rmd17_ethanol.yaml}\n"
                   "  - {name: ft, config: examples/configs/rmd17_ethanol.yaml, finetune_from: a}\n")
    with pytest.raises(SystemExit, match="not a pretraining job"):
        campaign.read_jobs(bad)
    # --ship compares against, and writes, the file named after the job's data: a `ship:` of another name is refused
    bad.write_text("jobs:\n  - {name: e, config: examples/configs/rmd17_ethanol.yaml, ship: aspirin}\n")
    with pytest.raises(SystemExit, match="ships as ethanol.pt; set `ship: ethanol`"):
        campaign.read_jobs(bad)
    bad.write_text("jobs:\n  - {name: e, config: examples/configs/rmd17_ethanol.yaml, ship: aspirin,\n"
                   "       set: {data.molecule: aspirin}}\n")
    assert campaign.read_jobs(bad)[0]["ship"] == "aspirin"
    assert campaign.finished({"budget_cpu_hours": 0.25, "init_cpu_hours": 1.5},
                             {"cpu_hours": 1.76}) and not campaign.finished({"budget_cpu_hours": 0.25},
                                                                            {"cpu_hours": 0.1})


def test_campaign_grid_job_waits_for_its_backbones_then_continues_its_state(tmp_path, monkeypatch):
    campaign = import_campaign()
    monkeypatch.setattr(campaign, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path / "state")
    grid = next(j for j in campaign.read_jobs(campaign.CAMPAIGN_YAML) if j["kind"] == "grid")
    assert campaign.finished(grid, None).startswith("waits for the backbone(s) of et-oro")
    (tmp_path / "models").mkdir()
    for name in grid["backbones"].values():
        (tmp_path / "models" / f"{name}.pt").write_bytes(b"backbone")
    assert campaign.finished(grid, None) == ""
    cmd = campaign.job_command(grid, 45, fresh=True)
    assert cmd[cmd.index("--state") + 1] == str(tmp_path / "state" / f"{grid['name']}.json")
    assert f"et-oro={tmp_path / 'models' / 'pretrain-et-oro.pt'}" in cmd and "45.00" in cmd
    (tmp_path / "state").mkdir()
    # complete is read from the job's runs, not the state's flag: three rows of a bigger grid are not all of it
    (tmp_path / "state" / f"{grid['name']}.json").write_text(json.dumps(
        {"forcefield": [{"molecule": "ethanol"}] * 3, "qm9": [], "complete": True, "cpu_hours": 0.7}))
    st = campaign.read_state(grid)
    assert st == {"cpu_hours": 0.7, "complete": False, "cells": 3} and campaign.finished(grid, st) == ""
    small = {**grid, "args": ["--methods", "scratch", "--molecules", "ethanol", "--sizes", "50", "--properties",
                              "gap"]}
    rows = {"forcefield": [{"molecule": "ethanol", "size": 50, "method": "scratch", "seed": 1}],
            "qm9": [{"property": "gap", "method": "scratch"}], "complete": False, "cpu_hours": 0.7}
    (tmp_path / "state" / f"{grid['name']}.json").write_text(json.dumps(rows))
    st = campaign.read_state(small)
    assert st == {"cpu_hours": 0.7, "complete": True, "cells": 2} and campaign.finished(small, st) == "all 2 runs done"
    # another seed of gap in the job's arguments: the same state is no longer all of it
    assert campaign.finished(small, campaign.read_state({**small, "args": small["args"] + ["--qm9-seeds",
                                                                                            "gap:2"]})) == ""
    bad = tmp_path / "c.yaml"
    bad.write_text("jobs:\n  - {name: g, kind: grid, args: [--sizes, 50], molecule: ethanol}\n")
    with pytest.raises(SystemExit, match="grid job 1 needs"):
        campaign.read_jobs(bad)


def test_campaign_md_job_pins_its_model_and_continues_from_its_state(tmp_path, monkeypatch):
    campaign = import_campaign()
    monkeypatch.setattr(campaign, "MODELS_DIR", REPO / "runs" / "test-campaign-models")
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path / "state")
    job = {"name": "md-test", "kind": "md", "molecule": "ethanol", "threads": 1}
    cmd = campaign.job_command(job, 10, fresh=True)
    assert cmd[:3] == ["nice", "-n", "10"] and cmd[4:7] == ["-m", "md.cli", "simulate"]
    assert cmd[cmd.index("--state") + 1] == str(tmp_path / "state" / "md-test.pt")
    assert cmd[cmd.index("--max-minutes") + 1] == "10.00" and cmd[cmd.index("--ps") + 1] == "300"
    assert cmd[cmd.index("--device") + 1] == "cpu"        # after a GPU piece, whose state says cuda
    pinned = REPO / cmd[cmd.index("--model") + 1]
    from forcefield.io import resolve_model_path
    assert pinned.read_bytes() == resolve_model_path("ethanol").read_bytes()    # a copy: git stores it once
    shutil.rmtree(campaign.MODELS_DIR)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "md-test.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match="its model .* does not"):
        campaign.pinned_model(job)                                            # never silently another model
    # simulated and DFT-checked: finished; simulated, DFT check to do: not; no frame to check: finished
    assert campaign.finished(job, {"step": 10, "n_steps": 10, "ps": 300.0, "running": 5, "sampled": 24,
                                   "dft_done": 10}) == "300 ps simulated, DFT-checked on 10 frames"
    assert campaign.finished(job, {"step": 10, "n_steps": 10, "ps": 300.0, "running": 5, "sampled": 24,
                                   "dft_done": 3}) == ""
    assert campaign.finished(job, {"step": 5, "n_steps": 10, "ps": 300.0, "running": 0, "sampled": 0,
                                   "dft_done": 0}) == "every replica stopped, no frame for the DFT check"
    assert campaign.finished(job, {"step": 5, "n_steps": 10, "ps": 300.0, "running": 2}) == ""
    cmd = campaign.dft_command(job, 20)
    assert cmd[1:5] == ["-m", "md.cli", "dft-check", str(tmp_path / "state" / "md-test.pt")]
    assert cmd[cmd.index("--max-minutes") + 1] == "20.00"



def test_campaign_gives_free_slots_to_the_least_served_job(monkeypatch):
    campaign = import_campaign()
    spent = {"a": {"cpu_hours": 3.0}, "b": {"cpu_hours": 2.5}, "c": None, "d": {"cpu_hours": 0.2}}
    monkeypatch.setattr(campaign, "read_state", lambda job: spent[job["name"]])
    jobs = [{"name": "a", "init_cpu_hours": 2.0}, {"name": "b"}, {"name": "c"}, {"name": "d", "priority": 1}]
    assert [j["name"] for j in campaign.schedule(jobs, None)] == ["c", "a", "b", "d"]   # a: 1 CPU-h of its own
    assert [j["name"] for j in campaign.schedule(jobs, ["d", "b"])] == ["d", "b"]       # --jobs: as given
    with pytest.raises(SystemExit, match="no job named"):
        campaign.schedule(jobs, ["zz"])


def test_campaign_estimates_the_compute_a_job_still_needs():
    campaign = import_campaign()
    # pretraining: a quarter of the steps took 1 CPU-h, so 3 are left; nothing known before the first step
    assert campaign.pretrain_hours_to_go({"total_steps": 400, "step": 100, "cpu_hours": 1.0}) == pytest.approx(3.0)
    assert math.isnan(campaign.pretrain_hours_to_go({"total_steps": 400, "step": 0, "cpu_hours": 0.0}))
    # MD: 100 of 300 ps at 0.5 fs leaves 400,000 steps; at 40 steps/s that is 10,000 s
    md = {"requested_ps": 300.0, "simulated_ps": 100.0, "timestep_fs": 0.5, "speed": {"steps_per_s": 40.0},
          "replicas": [{"stop_reason": None}, {"stop_reason": "unstable"}]}
    assert campaign.md_hours_to_go(md) == pytest.approx(10_000 / 3600)
    stopped = dict(md, replicas=[{"stop_reason": "unstable"}])                  # every replica stopped: no more MD
    assert math.isnan(campaign.md_hours_to_go(stopped))
    assert math.isnan(campaign.md_hours_to_go(dict(md, speed={})))             # no rate measured yet


def test_campaign_ends_a_running_job_that_the_job_file_marks_stopped(tmp_path):
    campaign = import_campaign()
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        slots = [campaign.Slot({"name": name}, proc, tmp_path / "log", 0.0) for name, proc in zip("ab", procs)]
        ended = campaign.stop_marked_jobs(slots, [{"name": "a", "stopped": "target met"}, {"name": "b"}])
        assert ended == [slots[0]] and slots[0].stopping == "target met"
        assert procs[0].wait(timeout=20) != 0 and procs[1].poll() is None     # only the marked job ends
        assert campaign.stop_marked_jobs(slots, [{"name": "a", "stopped": "target met"}]) == []   # once
        # a job launched while already marked (an MD job's last piece: its DFT check) is left to finish it
        slots[1].job["stopped"] = "300 ps done"
        assert campaign.stop_marked_jobs(slots, [{"name": "b", "stopped": "300 ps done"}]) == []
        assert procs[1].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


def runner_on_jobs(tmp_path, monkeypatch, jobs: str):
    """The campaign module, its job file replaced by ``jobs:`` + ``jobs`` (YAML lines), no job state, a fast tick."""
    campaign = import_campaign()
    job_file = tmp_path / "campaign.yaml"
    job_file.write_text("jobs:\n" + jobs)
    monkeypatch.setattr(campaign, "CAMPAIGN_YAML", job_file)
    monkeypatch.setattr(campaign, "read_state", lambda job: None)
    monkeypatch.setattr(campaign, "POLL_SECONDS", 0.2)
    return campaign, job_file


def test_campaign_runner_gives_the_slot_of_a_job_marked_stopped_to_the_next_one(tmp_path, monkeypatch):
    import threading
    md = "{name: %s, kind: md, molecule: ethanol%s}"
    campaign, job_file = runner_on_jobs(tmp_path, monkeypatch,
                                        "  - " + md % ("first", "") + "\n  - " + md % ("second", "") + "\n")
    started = []

    def launch(job, minutes, nice, worker=1):
        started.append(job["name"])          # "first" sleeps until it is ended; "second" ends by itself
        seconds = 60 if job["name"] == "first" else 0
        proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
        return campaign.Slot(job, proc, tmp_path / f"{job['name']}.log", time.time())

    monkeypatch.setattr(campaign, "launch", launch)

    def mark_first_stopped():
        time.sleep(1.5)
        job_file.write_text("jobs:\n  - " + md % ("first", ", stopped: target met") + "\n  - "
                            + md % ("second", "") + "\n")
    edit = threading.Thread(target=mark_first_stopped)
    edit.start()
    t0 = time.time()
    campaign.run(campaign.read_jobs(job_file), minutes=10, slots=1, every=60, names=["first", "second"])
    edit.join()
    assert started == ["first", "second"] and time.time() - t0 < 30      # ended early, not after its 60 s


def test_a_grid_job_with_workers_takes_the_slots_no_other_job_can_use(tmp_path, monkeypatch):
    """workers: 2 on a grid job: its second process starts only when a slot is left after every job's first
    process (here when the other job ends), once per invocation; the first worker's files keep their names."""
    campaign, job_file = runner_on_jobs(tmp_path, monkeypatch, "  - {name: grid, kind: grid, args: [], workers: 2}\n"
                                                               "  - {name: short, kind: md, molecule: ethanol}\n")
    monkeypatch.setattr(campaign, "FILL_EVERY_S", 0.2)
    started, procs = [], []
    real_launch = campaign.launch

    def launch(job, minutes, nice, worker=1):
        started.append((job["name"], worker))
        seconds = 1 if job["name"] == "short" else 3
        procs.append(subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"]))
        return campaign.Slot(job, procs[-1], tmp_path / f"{job['name']}.{worker}.log", time.time(), worker)
    monkeypatch.setattr(campaign, "launch", launch)
    t0 = time.time()
    campaign.run(campaign.read_jobs(job_file), minutes=10, slots=2, every=60, names=["grid", "short"])
    assert started == [("grid", 1), ("short", 1), ("grid", 2)] and time.time() - t0 < 30
    assert all(p.poll() is not None for p in procs)
    # a real second worker: its own log and pid file, seen as the job running here while it runs
    monkeypatch.setattr(campaign, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path / "state")
    job = {"name": "g", "kind": "grid", "threads": 1, "backbones": {},
           "args": ["--methods", "scratch", "--molecules", "--properties", "--sizes", "50"]}
    slot = real_launch(job, 5.0, 0, worker=2)
    assert slot.label == "g (worker 2)" and slot.log_path == tmp_path / "runs" / "g" / "campaign.w2.log"
    assert (tmp_path / "runs" / "g" / "running.w2.pid").read_text() == str(slot.proc.pid)
    assert slot.proc.wait(timeout=120) == 0 and campaign.running_here(job) is None      # nothing to run: ended
    assert "--state" in slot.log_path.read_text() and not (tmp_path / "runs" / "g" / "campaign.log").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:                                                  # any worker's live process counts as the job running here
        campaign.worker_file(job, 3, "running.pid").write_text(str(sleeper.pid))
        assert campaign.running_here(job) == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert campaign.running_here(job) is None
    for bad in ("0", "two"):
        job_file.write_text(f"jobs:\n  - {{name: grid, kind: grid, args: [], workers: {bad}}}\n")
        with pytest.raises(SystemExit, match="workers must be a whole number"):
            campaign.read_jobs(job_file)
    job_file.write_text("jobs:\n  - {name: m, kind: md, molecule: ethanol, workers: 2}\n")
    with pytest.raises(SystemExit, match="unknown|belongs to a grid job|not \\['workers'\\]"):
        campaign.read_jobs(job_file)


def test_campaign_runner_survives_a_job_that_cannot_start_and_commits_when_killed(tmp_path, monkeypatch):
    """One job that cannot start (e.g. its pinned model is missing) costs that job, not the others; a SIGTERM to
    the runner ends its jobs and commits what they saved, instead of leaving them orphaned and the state
    uncommitted; no job starts with less than a few minutes left."""
    import signal
    import threading
    campaign, job_file = runner_on_jobs(tmp_path, monkeypatch, "  - {name: broken, kind: md, molecule: ethanol}\n"
                                                               "  - {name: sleeper, kind: md, molecule: ethanol}\n")
    procs, commits = [], []

    def launch(job, minutes, nice, worker=1):
        if job["name"] == "broken":
            raise SystemExit("MD job broken: its state exists but its model does not")
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return campaign.Slot(job, procs[-1], tmp_path / "log", time.time())
    monkeypatch.setattr(campaign, "launch", launch)
    monkeypatch.setattr(campaign, "commit_state", lambda message: commits.append(message) or "committed")
    killer = threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    killer.start()
    t0 = time.time()
    campaign.run(campaign.read_jobs(job_file), minutes=30, slots=2, every=60, names=None, commit_every=60)
    killer.join()
    assert len(procs) == 1 and procs[0].poll() is not None and time.time() - t0 < 30
    assert commits and "stop" in commits[-1]
    procs.clear()
    campaign.run(campaign.read_jobs(job_file), minutes=campaign.MIN_START_MINUTES / 2, slots=2, every=60,
                 names=None)
    assert procs == []


def test_campaign_job_waits_for_the_jobs_it_comes_after(tmp_path, monkeypatch):
    campaign = import_campaign()
    cfg = "examples/configs/rmd17_ethanol.yaml"
    job_file = tmp_path / "campaign.yaml"
    job_file.write_text(f"jobs:\n  - {{name: ethanol, config: {cfg}}}\n"
                        "  - {name: md-ethanol, kind: md, molecule: ethanol, after: ethanol}\n")
    jobs = campaign.read_jobs(job_file)
    monkeypatch.setattr(campaign, "read_state", lambda job: None)
    assert campaign.waits_for(jobs[1], jobs) == "waits for ethanol to finish"
    assert campaign.waits_for(jobs[0], jobs) == ""
    jobs[0]["stopped"] = "target met"
    assert campaign.waits_for(jobs[1], jobs) == ""
    job_file.write_text("jobs:\n  - {name: md-ethanol, kind: md, molecule: ethanol, after: [ethanol]}\n")
    with pytest.raises(SystemExit, match="'after' names no job of the file"):
        campaign.read_jobs(job_file)
    job_file.write_text("jobs:\n  - {name: a, kind: md, molecule: ethanol, after: b}\n"
                        "  - {name: b, kind: md, molecule: ethanol, after: [a]}\n")
    with pytest.raises(SystemExit, match="waits for itself"):
        campaign.read_jobs(job_file)
    # a grid that cannot start yet (no backbones) is not finished: what comes after it waits
    grid = {"name": "g", "kind": "grid", "backbones": {"et-oreo": "no-such-pretraining"}}
    assert campaign.finished(grid, None).startswith("waits for") and not campaign.done(grid, None)
    assert campaign.waits_for({"name": "x", "after": ["g"]}, [grid]) == "waits for g to finish"


def test_campaign_commits_its_state_files_and_nothing_else(tmp_path, monkeypatch):
    campaign = import_campaign()
    repo = tmp_path / "clone"
    state, models = repo / "benchmarks" / "campaign" / "state", repo / "benchmarks" / "campaign" / "models"
    state.mkdir(parents=True)
    monkeypatch.setattr(campaign, "REPO", repo)
    monkeypatch.setattr(campaign, "STATE_DIR", state)
    monkeypatch.setattr(campaign, "MODELS_DIR", models)
    said = campaign.commit_state("autosave")
    assert said.startswith("not committed (git add") and "commit them by hand" in said     # not a git checkout

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (repo / "README.md").write_text("a\n")
    git("add", "README.md")
    git("commit", "-q", "-m", "first")
    (repo / "README.md").write_text("edited, staged, not the runner's to commit\n")
    git("add", "README.md")
    (repo / "code.py").write_text("work in progress\n")
    (state / "job.pt").write_bytes(b"x" * 1000)
    said = campaign.commit_state("campaign state at 12:00")
    assert said.startswith("committed 1 state file(s)"), said
    assert git("log", "-1", "--format=%s").strip() == "campaign state at 12:00"
    assert git("show", "--name-only", "--format=", "HEAD").split() == ["benchmarks/campaign/state/job.pt"]
    status = git("status", "--porcelain").splitlines()
    assert "M  README.md" in status and "?? code.py" in status                 # left as they were
    assert campaign.commit_state("again") == "state unchanged since the last commit"
    models.mkdir()
    (models / "md-job.pt").write_bytes(b"m")
    (state / "job.pt").unlink()                                                 # a job's state removed by hand
    assert campaign.commit_state("third").startswith("committed 2 state file(s)")
    assert set(git("show", "--name-only", "--format=", "HEAD").split()) == {
        "benchmarks/campaign/models/md-job.pt", "benchmarks/campaign/state/job.pt"}
    with pytest.raises(SystemExit, match="--commit-every takes minutes"):
        campaign.main(["--report", "--commit-every", "30"])


def test_a_gpu_piece_resumes_the_job_with_its_recipe_then_the_variant(tmp_path):
    """benchmarks/campaign_gpu.py: each variant is the job's own resumed run (config, its ``set``), on the GPU,
    eager, with the variant's overrides last (they win), in its own state file; no GPU here is a clear refusal."""
    gpu = import_campaign("campaign_gpu")
    job = {"name": "ethanol", "config": "examples/configs/rmd17_ethanol.yaml",
           "set": ["optim.batch_size=2", "optim.compile=True"]}
    cmd = gpu.variant_command(job, "b32", ["optim.batch_size=32"], 7.5, tmp_path, threads=2)
    sets = [cmd[k + 1] for k, c in enumerate(cmd) if c == "--set"]
    assert sets == ["optim.max_minutes=7.50", "optim.batch_size=2", "optim.compile=True", "optim.device=cuda",
                    "optim.compile=false", "optim.batch_size=32"]
    assert "--resume" in cmd and cmd[cmd.index("--state") + 1] == str(tmp_path / "b32.pt")
    assert cmd[cmd.index("--threads") + 1] == "2"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no GPU"):
            gpu.main(["ethanol", "--minutes", "1", "--out", str(tmp_path), "--variant", "a", "optim.lr=1e-4"])
    with pytest.raises(SystemExit, match="not a job of .*pick one of"):
        gpu.main(["md-nothing", "--minutes", "1", "--out", str(tmp_path), "--variant", "a"])
    # a pretraining job runs on the packed corpus (the device has no data folder), started when it has no state
    pre = {"name": "pretrain-et-oro", "kind": "pretrain", "config": "examples/configs/pretrain_et_oro.yaml",
           "set": ["optim.epochs=5"]}
    cmd = gpu.variant_command(pre, "main", [], 8, tmp_path, threads=4, resume=False, corpus=tmp_path / "c.npz")
    assert cmd[3] == "pretrain" and cmd[cmd.index("--corpus") + 1] == str(tmp_path / "c.npz")
    assert "--resume" not in cmd and "optim.device=cuda" in cmd
    with pytest.raises(SystemExit, match="--pack-corpus"):
        gpu.main(["pretrain-et-oro", "--minutes", "1", "--out", str(tmp_path), "--variant", "main"])


@pytest.mark.slow
def test_a_gpu_piece_of_a_grid_runs_shards_and_its_cells_are_adopted_into_the_committed_state(tmp_path, monkeypatch):
    """benchmarks/campaign_gpu.py on a grid job (here on the CPU, --device cpu, a smoke grid): K shards of
    pretrain_finetune.py side by side (eager: the job's --compile is for CPU pieces), each cell run once, merged into
    OUT/state.json; adopting it here adds its cells
    and host CPU-hours to the job's state, which a CPU piece may have advanced meanwhile. A grid budgeted in CPU
    minutes is refused (its cells would not compare across devices)."""
    campaign = import_campaign()
    gpu = import_campaign("campaign_gpu")
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path / "state")
    job = {"name": "grid-x", "kind": "grid", "threads": 1, "backbones": {},
           "args": ["--smoke", "--methods", "scratch", "--finetune-steps", "4", "--properties", "--compile"]}
    monkeypatch.setattr(gpu, "read_jobs", lambda path: [job])
    out = tmp_path / "piece"
    assert gpu.main(["grid-x", "--minutes", "20", "--out", str(out), "--shards", "2", "--device", "cpu"]) == 0
    logs = "".join(f.read_text() for f in (out / "runs").glob("shard-*.log"))
    assert "[finetune" in logs and "optim.compile" not in logs          # a GPU piece fine-tunes eager
    merged = json.loads((out / "state.json").read_text())
    assert sorted(r["size"] for r in merged["forcefield"]) == [8, 16] and not merged["complete"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["new_cells"] == 2 and summary["start"] == {"cpu_hours": 0.0, "cells": 0}
    back = tmp_path / "back"                                      # as gpu_piece.sh names the files it brings back
    back.mkdir()
    (back / "grid-x.state.json").write_text((out / "state.json").read_text())
    (back / "grid-x.summary.json").write_text((out / "summary.json").read_text())
    here = {**merged, "forcefield": merged["forcefield"][:1], "cpu_hours": 0.25}   # a CPU piece ran one cell meanwhile
    campaign.state_path(job).parent.mkdir(parents=True)
    campaign.state_path(job).write_text(json.dumps(here))
    assert gpu.main(["grid-x", "--adopt", str(back)]) == 0
    adopted = json.loads(campaign.state_path(job).read_text())
    assert len(adopted["forcefield"]) == 2 and adopted["cpu_hours"] == pytest.approx(0.25 + merged["cpu_hours"])
    with pytest.raises(SystemExit, match="adopted already"):                     # its CPU-hours count once
        gpu.main(["grid-x", "--adopt", str(back)])
    # not while a CPU piece of the job runs here: its next save would undo the adoption
    monkeypatch.setattr(campaign, "RUNS_DIR", tmp_path / "runs")
    (tmp_path / "runs" / "grid-x").mkdir(parents=True)
    (tmp_path / "runs" / "grid-x" / "running.pid").write_text(str(os.getpid()))
    with pytest.raises(SystemExit, match="is running here"):
        gpu.main(["grid-x", "--adopt", str(back)])
    job["args"] = ["--smoke", "--finetune-cpu-minutes", "1"]
    with pytest.raises(SystemExit, match="step budget"):
        gpu.main(["grid-x", "--minutes", "1", "--out", str(tmp_path / "p2"), "--device", "cpu"])


@pytest.mark.slow
def test_a_finished_jobs_state_is_archived_to_its_record(tmp_path, monkeypatch):
    """campaign.py --archive: a finished training job's state keeps what the tables and plots read (counters, CPU
    time, curve, lr) in a few kB; resuming it is a clear error; a job with compute left is not archived."""
    campaign = import_campaign()
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path / "state")
    job = {"name": "run", "kind": "train", "set": [], "ship": "ethanol"}
    Trainer(_cfg(epochs=2), tmp_path / "a", progress=False, log=_quiet, state_file=campaign.state_path(job)).fit()
    before = campaign.read_state(job)
    with pytest.raises(SystemExit, match="compute left"):
        campaign.archive_state(job)
    job["stopped"] = "target met"
    assert "kB" in campaign.archive_state(job) and campaign.state_path(job).stat().st_size < 20_000
    after = campaign.read_state(job)
    assert {k: after[k] for k in ("epoch", "step", "cpu_hours", "best_val", "lr")} == \
        {k: before[k] for k in ("epoch", "step", "cpu_hours", "best_val", "lr")} and after["history"] == before["history"]
    assert campaign.archive_state(job).endswith("already archived")
    with pytest.raises(ValueError, match="archived record"):
        Trainer(_cfg(epochs=4), tmp_path / "b", progress=False, log=_quiet,
                state_file=campaign.state_path(job)).fit(resume=True)


@pytest.mark.slow
@pytest.mark.skipif(not (Path(os.environ.get("OREO_DATA_DIR", "")) / "rmd17" / "rmd17_ethanol_test_05.npz").is_file(),
                    reason="rMD17 reference data not found")
def test_a_gpu_piece_of_an_md_job_continues_its_state_and_is_adopted_only_where_it_started(tmp_path, monkeypatch):
    """benchmarks/campaign_gpu.py on an MD job (here --device cpu): the job's simulation continued from a copy of
    its state, eager; adopting it replaces the job's state only if that is still where the piece began. The first
    piece runs here, on the CPU: it pins the job's model, which a piece on the device could not bring back."""
    campaign = import_campaign()
    gpu = import_campaign("campaign_gpu")
    models = REPO / "runs" / "test-gpu-md-models"
    monkeypatch.setattr(campaign, "MODELS_DIR", models)
    monkeypatch.setattr(gpu, "MODELS_DIR", models)
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path / "state")
    job = {"name": "md-x", "kind": "md", "molecule": "ethanol", "threads": 1, "ps": 0.005, "replicas": 2,
           "compile": False, "after": []}
    monkeypatch.setattr(gpu, "read_jobs", lambda path: [job])
    out = tmp_path / "piece"
    try:
        with pytest.raises(SystemExit, match="has not started here"):
            gpu.main(["md-x", "--minutes", "5", "--out", str(out), "--device", "cpu"])
        subprocess.run(campaign.md_command(job, 5, out=tmp_path / "cpu"), cwd=REPO, check=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})       # the first CPU piece
        job.update(ps=0.01, compile=True)
        assert gpu.main(["md-x", "--minutes", "5", "--out", str(out), "--device", "cpu"]) == 0
    finally:
        shutil.rmtree(models, ignore_errors=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start"]["step"] == 10 and summary["end"]["step"] == 20
    assert json.loads((out / "run" / "run.json").read_text())["config"]["compile"] is False   # eager, though the job compiles
    back = tmp_path / "back"
    back.mkdir()
    shutil.copyfile(out / "md.pt", back / "md-x.md.pt")
    shutil.copyfile(out / "summary.json", back / "md-x.summary.json")
    assert gpu.main(["md-x", "--adopt", str(back)]) == 0
    assert campaign.read_state(job)["step"] == 20
    with pytest.raises(SystemExit, match="moved it meanwhile"):                  # the job's state is no longer step 10
        gpu.main(["md-x", "--adopt", str(back)])


def test_a_run_ships_from_its_best_model_and_log_without_a_full_checkpoint(tmp_path):
    """release/ship_models.ship reads the run's counters from its log: a folder resumed from the compact state and
    stopped before its first checkpoint (no last.pt) still ships, with the card's epochs."""
    sys.path.insert(0, str(REPO))
    from release.ship_models import ship
    run = tmp_path / "run"
    Trainer(_cfg(epochs=2), run, progress=False, log=_quiet).fit()
    (run / "last.pt").unlink()
    summary = ship(run, tmp_path / "shipped")
    assert summary["epochs"] == 2 and (tmp_path / "shipped" / "ethanol.pt").is_file()
    card = (tmp_path / "shipped" / "ethanol.md").read_text()
    assert "2 epochs" in card and "ET 2x16 cutoff 4" in card and "CPU, " in card     # from the files, not fixed text


def test_a_model_ships_only_when_better_beyond_the_noise_of_the_validation_frames():
    """--ship's rule: lower validation MAE in at least 95 % of paired resamples of the frames. A clearly better
    model passes; one that is better on a few frames and worse on others, by a hair on average, does not."""
    import numpy as np
    from forcefield.data.conformations import ConformationSet
    campaign = import_campaign()
    rng = np.random.default_rng(0)
    frames = ConformationSet.from_arrays([6, 1, 1], rng.normal(size=(50, 3, 3)), forces=np.zeros((50, 3, 3)))
    old = rng.normal(scale=0.01, size=(150, 3))
    assert campaign.better_on_resamples(old * 0.8, old, frames) > 0.99
    noisy = old + rng.normal(scale=0.01, size=(150, 3)) * (rng.random((150, 1)) < 0.5)
    noisy *= np.abs(old).sum() / np.abs(noisy).sum() * 0.995                   # 0.5 % lower MAE on average
    assert 0.05 < campaign.better_on_resamples(noisy, old, frames) < campaign.SHIP_CONFIDENCE


def test_an_md_job_whose_trajectory_ends_gets_its_dft_check_in_the_same_invocation(tmp_path, monkeypatch):
    """A job starts once an invocation (no crash loops), except an MD job whose simulation just ended: its next
    piece, the DFT check along the trajectory, starts at once instead of waiting for the next session."""
    campaign = import_campaign()
    job_file = tmp_path / "campaign.yaml"
    job_file.write_text("jobs:\n  - {name: md-x, kind: md, molecule: ethanol}\n")
    monkeypatch.setattr(campaign, "CAMPAIGN_YAML", job_file)
    monkeypatch.setattr(campaign, "POLL_SECONDS", 0.1)
    monkeypatch.setattr(campaign, "FILL_EVERY_S", 0.1)
    launches = []
    running_md = {"step": 5, "n_steps": 10, "ps": 300.0, "ps_done": 150.0, "running": 5, "replicas": 5,
                  "sampled": 24, "dft_done": 0, "cpu_hours": 0.1}
    simulated = {**running_md, "step": 10, "ps_done": 300.0}
    monkeypatch.setattr(campaign, "read_state", lambda job: simulated if launches else running_md)

    def launch(job, minutes, nice, worker=1):
        launches.append(job["name"])
        return campaign.Slot(job, subprocess.Popen([sys.executable, "-c", "pass"]), tmp_path / "log", time.time())
    monkeypatch.setattr(campaign, "launch", launch)
    campaign.run(campaign.read_jobs(job_file), minutes=20, slots=1, every=60, names=None)
    assert launches == ["md-x", "md-x"]               # the simulation piece, then its DFT check; not a third time



def test_a_job_after_one_that_ran_in_this_invocation_waits_for_the_next(tmp_path, monkeypatch, capsys):
    """after: [a]: a job whose prerequisite finished in this invocation does not start in it (its model ships
    between invocations, with --ship), even with a slot free; one whose prerequisite finished earlier starts."""
    jobs = "  - {name: a, kind: md, molecule: ethanol}\n  - {name: b, kind: md, molecule: ethanol, after: [a]}\n"
    campaign, job_file = runner_on_jobs(tmp_path, monkeypatch, jobs)
    monkeypatch.setattr(campaign, "FILL_EVERY_S", 0.1)
    checked = {"step": 10, "n_steps": 10, "ps": 1.0, "ps_done": 1.0, "running": 5, "replicas": 5, "sampled": 0,
               "dft_done": 0, "cpu_hours": 0.1}
    launches = []
    monkeypatch.setattr(campaign, "read_state", lambda job: {**checked, "step": 5} if job["name"] == "a" and not
                        launches else checked if job["name"] == "a" else None)

    def launch(job, minutes, nice, worker=1):
        launches.append(job["name"])
        return campaign.Slot(job, subprocess.Popen([sys.executable, "-c", "pass"]), tmp_path / "log", time.time())
    monkeypatch.setattr(campaign, "launch", launch)
    campaign.run(campaign.read_jobs(job_file), minutes=20, slots=2, every=60, names=None)
    assert launches == ["a"] and "b waits for a, which ran in this invocation" in capsys.readouterr().out
    campaign.run(campaign.read_jobs(job_file), minutes=20, slots=2, every=60, names=None)     # the next invocation
    assert launches == ["a", "b"]

def test_a_resume_with_another_model_or_data_config_is_refused(tmp_path):
    """Weights trained at one cutoff (or on other labels) are not continued under another config; optim
    settings may change on a resume (lr, budgets)."""
    Trainer(_cfg(epochs=1), tmp_path / "run", progress=False, log=_quiet).fit()
    import dataclasses
    cfg = _cfg(epochs=2)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cutoff=3.0))
    with pytest.raises(ValueError, match=r"model.cutoff: 4.0 -> 3.0"):
        Trainer(other, tmp_path / "run", progress=False, log=_quiet).fit(resume=True)
    lr = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-4))
    assert Trainer(lr, tmp_path / "run", progress=False, log=_quiet).fit(resume=True) is not None


def test_a_grid_cell_ships_only_if_it_never_trained_on_the_shipped_models_validation_frames(tmp_path, monkeypatch,
                                                                                          capsys):
    """--ship also weighs the fine-tune grid's models (issue 13 item 3), on the shipped model's own validation
    frames: a cell that trained on some of them is left out even when it scores best there; a comparable cell
    that beats the shipped model beyond the frames' noise replaces it, and its card says where it came from."""
    import json
    import shutil
    sys.path.insert(0, str(REPO))
    from release.ship_models import ship
    from forcefield.io import load_potential, save_model
    campaign = import_campaign()
    monkeypatch.setattr(campaign, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path / "state")
    dest = tmp_path / "shipped"
    Trainer(_cfg(epochs=1), tmp_path / "first", progress=False, log=_quiet).fit()
    ship(tmp_path / "first", dest)                                               # the shipped model: 1 epoch
    val_ids = load_potential(dest / "ethanol.pt").metadata["val_frame_ids"]
    job = {"name": "grid-x", "kind": "grid", "backbones": {}}
    cells = tmp_path / "runs" / "grid-x" / "finetune" / "ethanol" / "24"
    shutil.copytree(tmp_path / "first", cells / "scratch")
    Trainer(_cfg(epochs=12), cells / "scratch", progress=False, log=_quiet).fit(resume=True)    # better, comparable
    shutil.copytree(cells / "scratch", cells / "scratch-s2")
    Trainer(_cfg(epochs=24), cells / "scratch-s2", progress=False, log=_quiet).fit(resume=True)  # best, but...
    leaky = load_potential(cells / "scratch-s2" / "best.pt", dtype=None)
    leaky.set_metadata(train_frame_ids=leaky.metadata["train_frame_ids"] + [val_ids[0]])  # ...saw a val frame
    save_model(leaky, cells / "scratch-s2" / "best.pt")
    rows = [{"molecule": "ethanol", "size": 24, "method": "scratch", "seed": s} for s in (1, 2)]
    rows.append({"molecule": "ethanol", "size": 24, "method": "scratch", "seed": 3, "failed": "diverged"})
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "grid-x.json").write_text(json.dumps({"settings": {}, "forcefield": rows, "qm9": []}))
    assert [c["seed"] for c in campaign.grid_cells_here(job)["ethanol"]] == [1, 2]   # the failed cell has no model
    campaign.ship_improved([job], dest=dest)
    out = capsys.readouterr().out
    assert "shipped ethanol.pt from grid-x ethanol n=24 scratch seed 1 (best of 1 comparable" in out
    shipped = load_potential(dest / "ethanol.pt").metadata
    comparable = load_potential(cells / "scratch" / "best.pt").metadata   # its best epoch depends on the threads
    assert shipped["epochs"] == comparable["epochs"] and val_ids[0] not in shipped["train_frame_ids"]
    assert "fine-tuned in the campaign's grid `grid-x` on 24 rMD17 frames (seed 1)" in (dest / "ethanol.md").read_text()
    campaign.ship_improved([job], dest=dest)                    # the shipped model is now that cell: nothing better
    assert "not below the shipped ethanol.pt" in capsys.readouterr().out


def test_a_grid_jobs_progress_line_says_its_runs_and_the_one_it_is_on(tmp_path, monkeypatch):
    import json
    campaign = import_campaign()
    monkeypatch.setattr(campaign, "STATE_DIR", tmp_path)
    job = {"name": "grid-x", "kind": "grid"}
    log = tmp_path / "campaign.log"
    assert campaign.grid_progress(job, log) == "grid-x: 0 runs recorded, 0.00 CPU-h"
    (tmp_path / "grid-x.json").write_text(json.dumps({"forcefield": [{}, {}], "qm9": [], "cpu_hours": 0.5}))
    log.write_text("[finetune aspirin n=50 scratch seed 1] starting\nepoch 7 ...\n[md aspirin n=50 scratch] 1 x 10 ps\n"
                   "step 100\n")
    assert campaign.grid_progress(job, log) == "grid-x: 2 runs recorded, 0.50 CPU-h; now [md aspirin n=50 scratch]"
    # a new piece appends to the log: until it names a run, it is on none of the earlier piece's
    with open(log, "a") as fh:
        fh.write("\n# 2026-12-05 06:40:52 python benchmarks/pretrain_finetune.py ...\n")
    assert campaign.grid_progress(job, log) == "grid-x: 2 runs recorded, 0.50 CPU-h"
    # a run that carries on from its committed run state is listed in campaign.md's grid table
    assert campaign.runs_in_progress(job) == []
    (tmp_path / "grid-x.runs").mkdir()
    import torch
    torch.save({"step": 12000}, tmp_path / "grid-x.runs" / "qm9-homo-scratch.pt")
    assert campaign.runs_in_progress(job) == ["qm9-homo-scratch (step 12,000)"]
    # a QM9 grid's tables: its own methods' columns, and no empty force table before a run is recorded
    assert campaign.grid_methods({"args": ["--methods", "scratch", "et-oro", "--hidden", 96]}) == ["scratch", "et-oro"]
    assert campaign.grid_methods({"args": ["--hidden", 96]}) == []
    import pretrain_finetune
    pretrain_finetune.write_report(tmp_path, [], [], ["scratch", "et-oro"])
    assert "No run recorded yet" in (tmp_path / "results.md").read_text()
    pretrain_finetune.write_report(tmp_path, [], [{"property": "homo", "method": "et-oro", "test_mae": 70.0}],
                                   ["scratch", "et-oro"])
    text = (tmp_path / "results.md").read_text()
    assert "Force MAE" not in text and "| homo | – | 70.0 |" in text


def test_campaign_runner_says_when_a_slot_stays_idle(tmp_path, monkeypatch, capsys):
    """A job of --jobs that ends early (e.g. its learning rate reached its floor) leaves its slot idle when no
    other listed job can run: the runner says so once, with what to do."""
    md = "{name: %s, kind: md, molecule: ethanol}"
    campaign, job_file = runner_on_jobs(tmp_path, monkeypatch, "  - " + md % "long" + "\n  - " + md % "short" + "\n")
    monkeypatch.setattr(campaign, "FILL_EVERY_S", 0.2)

    def launch(job, minutes, nice, worker=1):
        proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({3 if job['name'] == 'long' else 0})"])
        return campaign.Slot(job, proc, tmp_path / f"{job['name']}.log", time.time())

    monkeypatch.setattr(campaign, "launch", launch)
    campaign.run(campaign.read_jobs(job_file), minutes=10, slots=2, every=60, names=["long", "short"])
    out = capsys.readouterr().out
    assert out.count("1 of 2 slot(s) idle: no other job of --jobs can run now") == 1


def test_the_report_puts_a_grids_tables_into_the_readme_between_its_markers(tmp_path):
    """--report keeps the README's grid tables the state's: a grid's results.md (no title; its sections demoted to
    the README's level) replaces what lies between <!-- report:NAME --> and <!-- /report:NAME -->, and nothing else;
    a README without the pair is left as it is."""
    campaign = import_campaign()
    readme = tmp_path / "README.md"
    readme.write_text("# oreo\n\ntext before\n<!-- report:grid-x -->\nold table\n<!-- /report:grid-x -->\ntext after\n")
    report_md = "# Pretraining benchmark\n\n## Force MAE (meV/Å)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert campaign.embed_in_readme(readme, "grid-x", report_md)
    text = readme.read_text()
    assert text == ("# oreo\n\ntext before\n<!-- report:grid-x -->\n\n##### Force MAE (meV/Å)\n\n| a | b |\n|---|---|\n"
                    "| 1 | 2 |\n\n<!-- /report:grid-x -->\ntext after\n")
    assert campaign.embed_in_readme(readme, "grid-x", report_md) and readme.read_text() == text     # idempotent
    assert not campaign.embed_in_readme(readme, "grid-y", report_md) and readme.read_text() == text
