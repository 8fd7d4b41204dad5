"""Two CPU processes (gloo) under DistributedDataParallel: after a few steps both hold identical weights, and only
rank 0 writes files."""
import sys
from pathlib import Path

import torch

from forcefield.pretrain.distributed import launch_local
from forcefield.pretrain.trainer import Pretrainer
from tests.test_pretrain_loop import tiny_config, tiny_corpus


def _worker(info, root: str, corpus):
    out = Path(root) / f"rank{info.rank}"
    cfg = tiny_config("et-oreo", max_steps=3, batch_size=2, log_every=1, checkpoint_every=2)
    tr = Pretrainer(cfg, out, corpus=corpus, dist_info=info, progress=False, log=lambda s: None)
    assert tr.steps_per_epoch == 2             # 10 frames, batches of 2, dealt out to 2 ranks (one dropped)
    tr.fit()
    torch.save({k: v.detach().clone() for k, v in tr.task.state_dict().items()}, Path(root) / f"w{info.rank}.pt")


def test_two_gloo_processes_hold_identical_weights(tmp_path):
    corpus = tiny_corpus()
    launch_local(_worker, 2, str(tmp_path), corpus, start_method="fork" if sys.platform == "linux" else "spawn")
    w0 = torch.load(tmp_path / "w0.pt")
    w1 = torch.load(tmp_path / "w1.pt")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    init = Pretrainer(tiny_config("et-oreo"), tmp_path / "init", corpus=corpus, progress=False,
                      log=lambda s: None).task.state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0)                 # training did happen
    for name in ("last.pt", "pretrained.pt", "metrics.csv", "config.yaml"):
        assert (tmp_path / "rank0" / name).is_file()
    assert not (tmp_path / "rank1").exists()                               # rank 1 wrote nothing
    rows = (tmp_path / "rank0" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[-1].split(",")[0] == "3"
    ck = torch.load(tmp_path / "rank0" / "last.pt", weights_only=False)
    assert ck["world_size"] == 2 and ck["step"] == 3
