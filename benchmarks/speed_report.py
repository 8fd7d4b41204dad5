"""The speed benchmark's report: ``speed.md`` (tables, ratios measured in one process), ``speed.json`` and
``speed.png`` (bars relative to oreo eager), from the results of :mod:`speed_harness`."""
from pathlib import Path
from typing import Dict

import numpy as np

from forcefield.files import write_json
from speed_contenders import COMPILED
from speed_harness import UNITS, WORKLOADS


def report(results: Dict, out: Path) -> None:
    base = "oreo ET eager"
    st = results["settings"]
    lines = ["# oreo speed benchmark\n",
             f"aspirin (21 atoms), {st['threads']} thread(s), {st['rounds']} interleaved rounds "
             f"({max(4, int(st['rounds']) // 2)} for batched and train, whose rounds are longer), medians "
             f"(IQR in brackets); batched: {st['replicas']} replicas; train: batch {st['train_batch']}.  ",
             f"torch {st['torch']}, {st['date']}, command: `{st['command']}`\n"]
    groups = results["groups"]
    for gname, res in groups.items():
        lines.append(f"\n## {gname}\n")
        names = list(res)
        lines.append("| contender | " + " | ".join(f"{w} ({UNITS[w]})" for w in WORKLOADS) + " |")
        lines.append("|---|" + "---|" * len(WORKLOADS))
        for name in names:
            cells = []
            for w in WORKLOADS:
                v = res[name].get(w)
                cells.append("—" if v is None else f"{v['median']:.4g} [{v['q1']:.3g}–{v['q3']:.3g}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for ref in (base, COMPILED):
            if ref not in res:
                continue
            lines.append("")
            lines.append(f"Ratios in this group (same process): time ratio for single/ase-md "
                         f"(contender / {ref}; < 1 is faster than {ref}), throughput ratio for batched/train "
                         f"(contender / {ref}; > 1 is faster).\n")
            lines.append("| contender | " + " | ".join(WORKLOADS) + " |")
            lines.append("|---|" + "---|" * len(WORKLOADS))
            for name in names:
                cells = []
                for w in WORKLOADS:
                    a, b = res[name].get(w), res[ref].get(w)
                    cells.append("—" if a is None or b is None else f"{a['median'] / b['median']:.3f}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for note in results.get("notes", []):
        lines.append(f"\n- {note}")
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    write_json(out / "speed.json", results, indent=1)
    try:
        plot(groups, out / "speed.png")
    except Exception as exc:  # matplotlib missing or headless trouble: the table is what matters
        print(f"[plot] skipped: {exc}")
    print("\n".join(lines))


def plot(groups: Dict, path: Path) -> None:
    """Bars relative to oreo ET eager measured in the same process (absolute times drift between processes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = "oreo ET eager"
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(4.4 * len(WORKLOADS), 4.2))
    for ax, w in zip(axes, WORKLOADS):
        labels, vals = [], []
        for gname, res in groups.items():
            if base not in res or w not in res[base]:
                continue
            for name, v in res.items():
                if w in v and (gname == "oreo" or not name.startswith("oreo")):
                    labels.append(name)
                    vals.append(v[w]["median"] / res[base][w]["median"])
        if not vals:
            ax.set_visible(False)
            continue
        y = np.arange(len(vals))
        colors = ["tab:orange" if lab.startswith("oreo") else "tab:blue" for lab in labels]
        ax.barh(y, vals, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        better = "lower is better" if w in ("single", "ase-md") else "higher is better"
        ax.set_title(f"{w}: {UNITS[w]} / oreo ET eager\n(same process; {better})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------- main
