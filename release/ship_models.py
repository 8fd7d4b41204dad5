"""Copy trained runs into the package as shipped models, each with a model card and its frame ids.

    python release/ship_models.py runs/aspirin runs/ethanol ...

For every run folder (written by ``oreo train``) this writes ``forcefield/pretrained/<molecule>.pt``
(EMA weights of the best validation epoch, an oreo model file), ``<molecule>.md`` (the card) and
``<molecule>.splits.json`` (rMD17 frame ids of the training, validation and test frames).
The test errors quoted in the card are re-computed here on every frame of the test file.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forcefield.data.poly24 import load_poly24, read_manifest  # noqa: E402
from forcefield.evaluate import evaluate  # noqa: E402
from forcefield.io import PRETRAINED_DIR, load_potential, save_model  # noqa: E402
from forcefield.train.config import config_from_dict  # noqa: E402
from forcefield.train.datasets import build_splits  # noqa: E402

CARD = """# oreo model card: {molecule} (revised MD17)

| | |
|---|---|
| file | `forcefield/pretrained/{molecule}.pt` (load: `OreoCalculator("{molecule}.pt")`) |
| architecture | {arch} |
| data | revised MD17 {molecule}, PBE/def2-SVP (Christensen & von Lilienfeld 2020), split file {split:02d} |
| training frames | {n_train} (seeded draw from `rmd17_{molecule}_train_{split:02d}`; ids in `{molecule}.splits.json`) |
| validation frames | {n_val} (same file, disjoint) |
| test frames | {n_test} (of `rmd17_{molecule}_test_{split:02d}`, disjoint from training) |
| elements | {elements} |
| **test force MAE** | **{f_mae:.2f} meV/Å** (RMSE {f_rmse:.1f}) |
| test force MAE by element | {f_by_element} |
| test force MAE by energy | {f_by_energy} (test frames in fifths by reference energy, lowest first) |
| test energy MAE | {e_mae:.1f} meV (RMSE {e_rmse:.1f}) |
| training | {training} |

Hyperparameters (the run's `config.yaml`, as of its last invocation):

```yaml
{config}```

{reproduce}

Check the quoted test errors:

```bash
oreo evaluate {molecule}.pt --molecule {molecule} --split test
```

Limits: trained on one molecule at one level of theory; it knows only the elements above and only the
conformations that 500 K MD of {molecule} visits. Outside them (bond breaking, other molecules) its
forces are not to be trusted.
"""


POLY24_CARD = """# oreo model card: poly24 (polymer oligomers, GFN2-xTB labels)

| | |
|---|---|
| file | `forcefield/pretrained/poly24.pt` (load: `OreoCalculator("poly24.pt")`) |
| architecture | {arch} |
| data | oreo-poly24 ({level}): H-capped oligomers of {n_polymers} polymers, Langevin MD at {temps} K; this project's own set, not the unpublished 24-polymer DFT set of the ET-OREO/PolyGET authors |
| training frames | {n_train} (every frame of the training trajectories) |
| validation frames | {n_val} (seeded draw from the validation trajectories) |
| test frames | {n_test} (every frame of the test trajectories: replica 0 of each polymer and temperature, never trained on) |
| elements | {elements} |
| **test force MAE** | **{f_mae:.2f} meV/Å** (RMSE {f_rmse:.1f}) |
| test force MAE by element | {f_by_element} |
| test energy MAE | {e_mae:.1f} meV (RMSE {e_rmse:.1f}) |
| training | {epochs} epochs, {steps} steps, {minutes:.0f} min of wall time, {where} ({stop}) |

Test force MAE per polymer (meV/Å):

| polymer | atoms | test frames | force MAE |
|---|---:|---:|---:|
{per_polymer}

Hyperparameters (the run's `config.yaml`):

```yaml
{config}```

Reproduce (generation settings in the set's `MANIFEST.md`):

```bash
export OREO_DATA_DIR=/path/to/data
oreo data poly24 --out $OREO_DATA_DIR/poly24 --temperatures 300 600 --replicas 4 --equilibration-steps 100 --steps 400 --stride 10
oreo train --config examples/configs/poly24.yaml --out runs/poly24
{resume_lines}python release/ship_models.py runs/poly24
oreo evaluate poly24.pt        # test split of every polymer
```

Limits: GFN2-xTB is a semi-empirical tight-binding level, not DFT; the model knows these oligomers in vacuum at
300-600 K, not bulk polymers, other chain lengths far from these, or chemistry (bond breaking) outside them.
"""


def _per_polymer(pot, cfg, names) -> str:
    rows = []
    for name in names:
        cset = load_poly24("test", polymers=[name], temperatures=cfg.data.temperatures, data_dir=cfg.data.data_dir,
                           root=cfg.data.path)
        m, _ = evaluate(pot, cset)
        rows.append(f"| {name} | {cset.n_atoms[0]} | {len(cset)} | {m['forces_mae_meV_per_A']:.1f} |")
    return "\n".join(rows)


RMD17_TRAINING = "{epochs} epochs, {steps} steps, {minutes:.0f} min of wall time, {where} ({stop})"
RMD17_REPRODUCE = """Reproduce: the commands that trained this model (`optim.max_minutes` caps each invocation by wall time, so
on another machine the number of epochs, and the result, differ; `--resume` continues the same run):

```bash
export OREO_DATA_DIR=/path/to/data          # holds rmd17/ (oreo data download rmd17)
oreo train --config examples/configs/rmd17_{molecule}.yaml --out runs/{molecule}
{resume_lines}python release/ship_models.py runs/{molecule}
```"""


def ship(run: Path, dest: Path, resume_args=(), training: str = None, reproduce: str = None) -> dict:
    """Ship ``run``'s best model into ``dest`` with card and frame ids; ``training`` and ``reproduce`` replace the
    card's training line and reproduce section (the campaign runner describes its runs itself)."""
    cfg_dict = yaml.safe_load((run / "config.yaml").read_text())
    cfg = config_from_dict(cfg_dict)
    poly = (cfg.data.dataset or "").lower() == "poly24"
    molecule = "poly24" if poly else cfg.data.molecule
    splits = build_splits(cfg.data, cfg.optim.seed)
    pot = load_potential(run / "best.pt", dtype=torch.float32)
    metrics, _ = evaluate(pot, splits.test)
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1] if rows else {}          # the run's counters where it ended (no last.pt needed)
    ck = {"epoch": int(last.get("epoch") or 0), "step": int(last.get("step") or 0),
          "elapsed": float(last.get("elapsed_s") or 0.0)}
    stop = json.loads((run / "test_metrics.json").read_text()).get("stop_reason", "") \
        if (run / "test_metrics.json").exists() else ""
    dest.mkdir(parents=True, exist_ok=True)
    full = load_potential(run / "best.pt", dtype=None)  # keep the stored dtype
    save_model(full, dest / f"{molecule}.pt")
    (dest / f"{molecule}.splits.json").write_text(json.dumps(splits.frame_ids()))
    from ase.data import chemical_symbols
    template = POLY24_CARD if poly else CARD
    extra = {}
    if poly:
        extra = dict(level=splits.train.meta.get("level_of_theory"), n_polymers=len(splits.train.meta["polymers"]),
                     temps=", ".join(f"{float(t):g}" for t in (cfg.data.temperatures or read_manifest(
                         cfg.data.data_dir, cfg.data.path)["generation"]["temperatures"])),
                     per_polymer=_per_polymer(pot, cfg, splits.test.meta["polymers"]))
    config_name = "poly24" if poly else f"rmd17_{molecule}"
    resume_lines = "".join(f"oreo train --config examples/configs/{config_name}.yaml --out runs/{molecule} "
                           f"--resume {a}\n" for a in resume_args)
    o = cfg.optim
    where = (f"device {o.device}" if str(o.device or "cpu") not in ("cpu", "auto") else "CPU") + \
        f", {o.threads or 1} thread(s)"
    training_line = RMD17_TRAINING.format(epochs=ck["epoch"], steps=ck["step"], minutes=ck["elapsed"] / 60,
                                          stop=stop or "see metrics.csv", where=where)
    arch = full.describe()
    pretrained = (full.metadata or {}).get("pretrained") or {}
    if pretrained.get("method"):
        arch += f"; fine-tuned from a {pretrained['method']} pretrained backbone ({pretrained.get('steps', '?')} steps)"
    reproduce_text = RMD17_REPRODUCE.format(molecule=molecule, resume_lines=resume_lines)
    card = template.format(
        molecule=molecule, split=cfg.data.split_index, **extra,
        arch=arch, where=where,
        n_train=len(splits.train), n_val=len(splits.val), n_test=len(splits.test),
        elements=", ".join(chemical_symbols[z] for z in pot.elements),
        f_mae=metrics["forces_mae_meV_per_A"], f_rmse=metrics["forces_rmse_meV_per_A"],
        f_by_element=", ".join(f"{el} {v:.1f}" for el, v in metrics["forces_mae_meV_per_A_by_element"].items())
        + " meV/Å",
        f_by_energy=" / ".join(f"{v:.1f}" for v in metrics.get("forces_mae_meV_per_A_by_energy_quintile") or [])
        + " meV/Å",
        e_mae=metrics["energy_mae_meV"], e_rmse=metrics["energy_rmse_meV"],
        epochs=ck["epoch"], steps=ck["step"], minutes=ck["elapsed"] / 60, stop=stop or "see metrics.csv",
        config=yaml.safe_dump(cfg_dict, sort_keys=False), training=training or training_line,
        reproduce=reproduce or reproduce_text, resume_lines=resume_lines)
    (dest / f"{molecule}.md").write_text(card)
    return {"molecule": molecule, **metrics, "epochs": ck["epoch"], "minutes": ck["elapsed"] / 60,
            "val_rows": len(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--dest", type=Path, default=PRETRAINED_DIR)
    ap.add_argument("--resume-args", action="append", default=[],
                    help="the extra arguments of each `oreo train --resume` call the runs went through, in order "
                         "(quoted), for the card's reproduce section")
    args = ap.parse_args(argv)
    summary = [ship(r, args.dest, args.resume_args) for r in args.runs]
    print("| molecule | test force MAE (meV/Å) | test energy MAE (meV) | epochs | minutes |")
    print("|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['molecule']} | {s['forces_mae_meV_per_A']:.1f} | {s['energy_mae_meV']:.1f} | {s['epochs']} | "
              f"{s['minutes']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
