"""The report of ``oreo fit``: ``DIR/report.md`` and ``DIR/report/*.png``, made from ``fit.json`` alone (so it is
rewritten at the end of every invocation and never disagrees with the manifest).

Per round: the labels trained on, the held-out force and energy MAE of the committee mean, the committee's spread
on the held-out frames and along its MD, MD stability (replicas that ran their full length / stopped on spread /
unstable) and the wall time of each stage; the DFT (or xTB) check along the final model's MD when it ran.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from ..files import atomic_write_text


def _fmt(v, spec: str = ".1f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _plots(folder: Path, rounds: List[Dict[str, Any]], data: Dict[str, Any]) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    names = []
    n_lab = [r["n_train"] + r["n_val"] for r in rounds]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    ax[0].plot(n_lab, [r["test"]["forces_mae_meV_per_A"] for r in rounds], "o-")
    ax[0].set_xlabel("labelled training + validation frames")
    ax[0].set_ylabel("held-out force MAE (meV/Å)")
    ax[1].plot(n_lab, [r["test"]["energy_mae_meV"] for r in rounds], "o-", color="C1")
    ax[1].set_xlabel("labelled training + validation frames")
    ax[1].set_ylabel("held-out energy MAE (meV)")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "mae.png", dpi=110)
    plt.close(fig)
    names.append("mae.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = [r["round"] for r in rounds]
    ax.plot(x, [r["md"]["spread_max"] if r["md"]["spread_max"] is not None else np.nan for r in rounds], "o-",
            label="max along committee MD")
    ax.plot(x, [r["md"]["spread_median"] if r["md"]["spread_median"] is not None else np.nan for r in rounds], "s-",
            label="median along committee MD")
    ax.plot(x, [r["test"]["spread_mean_eV_per_A"] for r in rounds], "^-", label="mean on held-out frames")
    ax.axhline(data["settings"]["stop_std"], color="k", ls="--", lw=0.8, label="--stop-std")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("committee force spread (eV/Å)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "spread.png", dpi=110)
    plt.close(fig)
    names.append("spread.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bottom = np.zeros(len(rounds))
    for stage in ("select", "label", "train", "evaluate", "explore"):
        vals = np.array([r["seconds"].get(stage, 0.0) for r in rounds]) / 60.0
        ax.bar(x, vals, bottom=bottom, label=stage)
        bottom += vals
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("wall time (min)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "timing.png", dpi=110)
    plt.close(fig)
    names.append("timing.png")
    return names


def label_seconds(out: Path) -> float:
    """The compute time of every saved label (seconds each calculation took, summed over frames)."""
    total = 0.0
    for p in (out / "labels").glob("*.npz"):
        with np.load(p) as z:
            total += float(z["seconds"])
    return total


def write_report(out, data: Dict[str, Any]) -> Path:
    out = Path(out)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    s = data["settings"]
    mol = data.get("molecule", {})
    rounds = [r for r in data.get("rounds", []) if r.get("md") and r.get("test")]
    stages = data.get("stages", {})
    plots = _plots(folder, rounds, data) if rounds else []
    lines = [f"# oreo fit: {s.get('name') or s.get('smiles') or s.get('structure')}", ""]
    lines += [f"- molecule: {mol.get('formula')} ({mol.get('n_atoms')} atoms), "
              + (f"SMILES `{s['smiles']}`" if s.get("smiles") else f"structure {s.get('structure')}")
              + f", {mol.get('conformers')} conformer(s)",
              f"- labels: {data.get('level_of_theory')}; budget --dft-frames {s['dft_frames']}, used "
              f"{data.get('labels_used')}",
              f"- committee: {s['committee']} members, backbone: {data.get('backbone')} (retrain: {s['retrain']})",
              f"- selection: {s['select']}; first batch {s['initial_frames']} frames "
              + ("at random" if s["select"] == "random" else f"by farthest-point sampling in {data.get('descriptor')}")
              + f", then {s['frames_per_round']} per round "
              + ("at random from the committee MD" if s["select"] == "random"
                 else "with the largest committee force spread (forces_std_max) along the committee MD"),
              f"- held-out frames: {len(data.get('test_ids', []))} frames drawn at random (seed {s['seed']}) from the "
              f"GFN2-xTB MD pool ({stages.get('pool', {}).get('frames')} frames at "
              f"{', '.join(f'{t:g}' for t in s['temperatures'])} K), labelled at the same level, never trained on; "
              "frame ids in fit.json (test_ids)",
              f"- stopped: {data.get('stop_reason', 'not yet (run the command again to continue)')}",
              "- model: `committee.pt` (OreoCalculator gives the committee mean and energy_std, forces_std, "
              "forces_std_max)", ""]
    lines += ["## Rounds", "",
              "| round | training+val labels | held-out force MAE (meV/Å) | held-out energy MAE (meV) | held-out "
              "spread (eV/Å) | MD: full length / replicas | stopped on spread | unstable | MD spread max / median "
              "(eV/Å) | frames chosen next |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    all_rounds = data.get("rounds", [])
    for r in rounds:
        nxt = all_rounds[r["round"] + 1] if r["round"] + 1 < len(all_rounds) else None
        md, t = r["md"], r["test"]
        chosen = "—" if nxt is None else f"{len(nxt.get('selected', []))}" + (
            f" (spread {min(nxt['selected_spread']):.3f}–{max(nxt['selected_spread']):.3f})"
            if nxt.get("selected_spread") else "")
        lines.append(f"| {r['round']} | {r['n_train'] + r['n_val']} | {t['forces_mae_meV_per_A']:.1f} | "
                     f"{t['energy_mae_meV']:.1f} | {t['spread_mean_eV_per_A']:.3f} | {md['full_length']} / "
                     f"{md['replicas']} ({md['ps']:g} ps each) | {md['stopped_uncertain']} | {md['unstable']} | "
                     f"{_fmt(md['spread_max'], '.3f')} / {_fmt(md['spread_median'], '.3f')} | {chosen} |")
    lines += ["", "Held-out errors are of the committee mean; \"spread\" is forces_std_max (max over atoms of the "
              "per-atom force standard deviation over the members, eV/Å). MD: Langevin with the committee from "
              "labelled frames at " + ", ".join(f"{t:g}" for t in s["md_temperatures"]) + " K; a replica stops on a "
              f"spread above --md-max-std {s['md_max_std']:g} eV/Å or when unstable (a bond "
              f"{s['bond_threshold']:g} Å "
              "off its reference length, non-finite forces, or 10x too hot).", ""]
    lines += ["## Wall time", "", "| stage | seconds |", "|---|---:|"]
    for name in ("conformers", "pool", "split"):
        if name in stages:
            lines.append(f"| {name} | {stages[name].get('seconds', 0):.1f} |")
    for r in all_rounds:
        sec = r.get("seconds", {})
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sec.items())
        lines.append(f"| round {r['round']} ({parts}) | {sum(sec.values()):.1f} |")
    if "check" in stages:
        lines.append(f"| check | {stages['check'].get('seconds', 0):.1f} |")
    lines += [f"| every invocation, total ({len(data.get('invocations', []))} invocation(s)) | "
              f"{sum(data.get('invocations', [])):.1f} |", "",
              f"Label compute time, summed over the saved labels: {label_seconds(out):.1f} s (wall time is less with "
              f"--workers > 1). Times of stages that were interrupted and continued count only the finishing "
              f"invocation.", ""]
    check = stages.get("check")
    if check and check.get("done"):
        lines += ["## Check along the final model's MD", ""]
        if check.get("n_frames"):
            lines += [f"{check['n_frames']} frames drawn at random from the final committee's own MD (round "
                      f"{check['round']}) labelled at {check['level_of_theory']}: force MAE "
                      f"**{check['forces_mae_meV_per_A']:.1f} meV/Å** (RMSE {check['forces_rmse_meV_per_A']:.1f}), "
                      f"mean spread {check['spread_mean_eV_per_A']:.3f} eV/Å. Parity plot: `check/parity.png`.", ""]
        else:
            lines += [check.get("note", "no frame checked"), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}](report/{p})" for p in plots] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
