"""`oreo fit` runs against revised MD17: what the labels chosen by the committee's spread buy over random ones.

Each ``oreo fit`` run keeps the committee of every round (``DIR/rounds/rNN/committee.pt``). This evaluates every
one of them on revised MD17's test frames of the molecule (the same level of theory, PBE/def2-SVP, frames no run
saw), beside the shipped model trained on 950 rMD17 frames, and reads each run's wall time per stage from its
``fit.json``. Writes ``OUT/result.json``, ``OUT/result.md`` and ``OUT/rmd17_mae.png`` (test force MAE against
the DFT labels spent)::

    python benchmarks/fit_compare.py --molecule ethanol --shipped ethanol \\
        --runs uncertainty=runs/fit/ethanol-al random=runs/fit/ethanol-random --out benchmarks/results/fit_ethanol

Energies: the fit's labels come from PySCF, rMD17's from ORCA, at the same functional and basis; total energies of
two codes differ by a near-constant offset, so the energy MAE is also given with the mean offset removed.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

try:
    import forcefield  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("label", "train", "explore", "evaluate", "select")


def evaluate_on(model, cset) -> Dict[str, float]:
    from forcefield.evaluate import evaluate
    from forcefield.io import load_potential
    metrics, pred = evaluate(load_potential(model), cset, batch_size=100)
    diff = pred["energy"] - cset.energy
    return {"forces_mae_meV_per_A": metrics["forces_mae_meV_per_A"], "energy_mae_meV": metrics["energy_mae_meV"],
            "energy_mae_offset_removed_meV": float(1e3 * np.mean(np.abs(diff - diff.mean())))}


def run_rows(name: str, folder: Path, cset) -> Dict:
    fit = json.loads((folder / "fit.json").read_text())
    labels = len(fit.get("test_ids", []))           # held-out frames are labels spent too
    rows = []
    for r in fit["rounds"]:
        labels += len(r.get("selected", []))
        committee = folder / "rounds" / f"r{r['round']:02d}" / "committee.pt"
        if not (r.get("trained") and committee.is_file()):
            continue
        row = {"round": r["round"], "dft_labels": labels, "trained_on": r["n_train"] + r["n_val"],
               "held_out_forces_mae_meV_per_A": r["test"]["forces_mae_meV_per_A"], **evaluate_on(committee, cset)}
        rows.append(row)
        print(f"{name} round {r['round']}: {labels} labels, rMD17 test force MAE "
              f"{row['forces_mae_meV_per_A']:.1f} meV/Å", flush=True)
    seconds = {k: 0.0 for k in STAGES}
    for r in fit["rounds"]:
        for k, v in r.get("seconds", {}).items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
    for k, v in fit.get("stages", {}).items():
        if isinstance(v, dict) and "seconds" in v:
            seconds[k] = seconds.get(k, 0.0) + float(v["seconds"])
    check = fit.get("stages", {}).get("check", {})
    # every label records its own DFT time: this counts the labels of an interrupted invocation too
    label_s = [float(np.load(f)["seconds"]) for f in sorted(folder.glob("labels/*.npz"))]
    return {"dft_frames": len(label_s), "dft_seconds": round(sum(label_s), 1),
            "dft_median_s_per_frame": round(float(np.median(label_s)), 1) if label_s else None,
            "name": name, "folder": str(folder), "select": fit["settings"]["select"],
            "level_of_theory": fit.get("level_of_theory"), "rounds": rows,
            "seconds": {k: round(v, 1) for k, v in seconds.items() if v > 0},
            "check": {k: check.get(k) for k in ("n_frames", "forces_mae_meV_per_A", "spread_mean_eV_per_A")}
            if check.get("done") else None}


def plot(runs: List[Dict], shipped: Dict, path: Path, molecule: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    for run in runs:
        ax.plot([r["dft_labels"] for r in run["rounds"]], [r["forces_mae_meV_per_A"] for r in run["rounds"]], "o-",
                label=f"oreo fit, {run['select']}")
    if shipped:
        ax.axhline(shipped["forces_mae_meV_per_A"], color="k", ls="--", lw=0.9,
                   label=f"shipped {shipped['model']} (950 rMD17 frames)")
    ax.set_yscale("log")
    ax.set_xlabel("DFT labels spent (PBE/def2-SVP, held-out frames included)")
    ax.set_ylabel("rMD17 test force MAE (meV/Å)")
    ax.set_title(f"{molecule}: committees of every round on revised MD17's test frames", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: Dict) -> str:
    lines = [f"# `oreo fit` on {res['molecule']} against revised MD17 ({res['n_frames']} test frames, split "
             f"{res['split_index']})", "", "`" + res["command"] + "`", "",
             "| run | round | DFT labels spent | trained on | held-out force MAE (own frames) | rMD17 test force MAE "
             "| rMD17 energy MAE (offset removed) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for run in res["runs"]:
        for r in run["rounds"]:
            lines.append(f"| {run['name']} | {r['round']} | {r['dft_labels']} | {r['trained_on']} | "
                         f"{r['held_out_forces_mae_meV_per_A']:.1f} | {r['forces_mae_meV_per_A']:.1f} | "
                         f"{r['energy_mae_offset_removed_meV']:.1f} |")
    if res.get("shipped"):
        s = res["shipped"]
        lines.append(f"| shipped `{s['model']}` | | (950 rMD17 frames) | 1000 | | {s['forces_mae_meV_per_A']:.1f} | "
                     f"{s['energy_mae_offset_removed_meV']:.1f} |")
    lines += ["", "Force MAE in meV/Å, energy MAE in meV. Wall time per stage as the run recorded it (seconds, 1 "
              "thread each; an interrupted invocation's stages are not in it, its labels are in the DFT column):", "",
              "| run | " + " | ".join(STAGES) + " | check | DFT labels: frames, CPU-h, median s/frame "
              "| DFT check along the final committee's MD |", "|---|" + "---:|" * (len(STAGES) + 3)]
    for run in res["runs"]:
        sec = run["seconds"]
        chk = run["check"]
        lines.append(f"| {run['name']} | " + " | ".join(f"{sec.get(k, 0):.0f}" for k in STAGES)
                     + f" | {sec.get('check', 0):.0f} | {run['dft_frames']}, {run['dft_seconds'] / 3600:.2f}, "
                     f"{run['dft_median_s_per_frame']} | "
                     + (f"{chk['forces_mae_meV_per_A']:.1f} meV/Å on {chk['n_frames']} frames" if chk else "not run")
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecule", required=True, help="rMD17 molecule")
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=DIR of oreo fit runs")
    ap.add_argument("--shipped", help="a shipped model name or file to put beside them")
    ap.add_argument("--split-index", type=int, default=1)
    ap.add_argument("--max-frames", type=int, help="first N test frames only (default: all)")
    ap.add_argument("--data-dir")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from forcefield.data import load_rmd17
    import torch
    torch.set_num_threads(1)
    cset = load_rmd17(args.molecule, split="test", split_index=args.split_index, data_dir=args.data_dir)
    if args.max_frames:
        cset = cset.subset(list(range(min(args.max_frames, len(cset)))))
    runs = []
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--runs takes NAME=DIR, got '{spec}'")
        runs.append(run_rows(name, Path(folder), cset))
    shipped = {"model": args.shipped, **evaluate_on(args.shipped, cset)} if args.shipped else None
    res = {"molecule": args.molecule, "split_index": args.split_index, "n_frames": len(cset),
           "command": "python benchmarks/fit_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "runs": runs, "shipped": shipped}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    (out / "result.md").write_text(markdown(res))
    plot(runs, shipped, out / "rmd17_mae.png", args.molecule)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
