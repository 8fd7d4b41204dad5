"""Small pieces of the benchmark scripts that decide what gets reported."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pretrain_finetune  # noqa: E402
import speed_contenders  # noqa: E402
import speed_harness  # noqa: E402


def test_merge_fills_only_missing_cells(tmp_path):
    old = {"forcefield": [{"molecule": "aspirin", "size": 50, "method": "scratch", "forces_mae_meV_per_A": 1.0},
                          {"molecule": "ethanol", "size": 50, "method": "scratch", "forces_mae_meV_per_A": 2.0}],
           "qm9": [{"property": "gap", "method": "scratch", "test_mae": 3.0}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    new = [{"molecule": "ethanol", "size": 50, "method": "scratch", "forces_mae_meV_per_A": 9.0}]
    rows, qm9 = pretrain_finetune.merged_results(path, new, [])
    got = {(r["molecule"], r["size"], r["method"]): r["forces_mae_meV_per_A"] for r in rows}
    assert got == {("aspirin", 50, "scratch"): 1.0, ("ethanol", 50, "scratch"): 9.0}  # this run's row wins
    assert qm9 == old["qm9"]
    with pytest.raises(FileNotFoundError, match="--merge"):
        pretrain_finetune.merged_results(tmp_path / "missing.json", new, [])


def test_speed_benchmark_refuses_exploded_md():
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    speed_harness.check_not_exploded("ok", x0 + 0.01, x0)
    with pytest.raises(RuntimeError, match="not physical"):
        speed_harness.check_not_exploded("broken", x0 + torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), x0)
    with pytest.raises(RuntimeError, match="not physical"):
        speed_harness.check_not_exploded("nan", x0 * float("nan"), x0)


def test_speed_benchmark_batched_md_is_physical():
    """The batched workload integrates with md's Langevin in Å/fs (a carbon atom at 300 K moves ~0.005 Å/fs; the
    old Å/ps constant gave 1000x that): a few steps of a harmonic model move no atom far."""
    from forcefield.units import KB, MVV2E
    v = (KB * 300.0 / (12.011 * MVV2E)) ** 0.5
    assert 3e-3 < v < 8e-3
    z, r, e, f = speed_harness.aspirin(n_frames=4)
    r0 = torch.as_tensor(np.concatenate([r[k % len(r)] for k in range(2)]))
    spring = speed_contenders.Contender("spring", None, lambda pos, batch: -10.0 * (pos - r0), None, None)
    times = speed_harness.bench_batched([spring], (z, r, e, f, 2), rounds=1, replicas=2, per_block=3)
    assert len(times["spring"]) == 1 and times["spring"][0] > 0
