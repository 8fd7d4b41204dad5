"""PNG plots of a run (matplotlib's Agg canvas; no global backend switch, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np


def _figure(nrows: int = 1, ncols: int = 1, size=(6.4, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_hr(path, r: np.ndarray, h_ref: np.ndarray, h_replicas: Sequence[Optional[np.ndarray]],
            title: str = "") -> Path:
    """h(r) of each replica (thin) and their mean against the reference."""
    fig, ax = _figure()
    ax = ax[0, 0]
    ax.plot(r, h_ref, color="black", lw=2.0, label="reference (dataset)")
    good = [h for h in h_replicas if h is not None]
    for k, h in enumerate(h_replicas):
        if h is not None:
            ax.plot(r, h, lw=0.7, alpha=0.6, color="tab:orange", label="replicas" if k == 0 else None)
    if good:
        ax.plot(r, np.mean(good, axis=0), lw=1.5, ls="--", color="tab:red", label="model (mean)")
    ax.set_xlabel("r (Å)")
    ax.set_ylabel("h(r)")
    ax.set_xlim(0, float(r[-1]) + float(r[1] - r[0]) / 2)
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_thermo(path, thermo: Dict[str, np.ndarray], target_temperature: Optional[float] = None,
                title: str = "") -> Path:
    """Temperature and total / conserved energy of each replica against time."""
    fig, axes = _figure(2, 1, size=(6.4, 6.0))
    t_ax, e_ax = axes[0, 0], axes[1, 0]
    reps = np.unique(thermo["replica"]) if len(thermo["replica"]) else []
    for r in reps:
        m = thermo["replica"] == r
        line, = t_ax.plot(thermo["time_ps"][m], thermo["T"][m], lw=0.8, label=f"replica {r}")
        e_ax.plot(thermo["time_ps"][m], thermo["Etot"][m] - thermo["Etot"][m][0], lw=0.8, color=line.get_color())
        e_ax.plot(thermo["time_ps"][m], thermo["Econs"][m] - thermo["Econs"][m][0], lw=0.8, ls=":",
                  color=line.get_color())
    if target_temperature:
        t_ax.axhline(target_temperature, color="black", ls="--", lw=1.0, label="target")
    t_ax.set_ylabel("T (K)")
    t_ax.set_title(title)
    t_ax.legend(fontsize="small", ncol=3)
    e_ax.set_xlabel("time (ps)")
    e_ax.set_ylabel("E − E(0) (eV)\nsolid: Etot, dotted: conserved")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_parity(path, reference: np.ndarray, model: np.ndarray, title: str = "",
                xlabel: str = "DFT force (eV/Å)", ylabel: str = "model force (eV/Å)") -> Path:
    """Parity plot of force components."""
    fig, ax = _figure(size=(4.8, 4.8))
    ax = ax[0, 0]
    a, b = np.asarray(reference).reshape(-1), np.asarray(model).reshape(-1)
    lim = float(max(np.abs(a).max(initial=0), np.abs(b).max(initial=0))) * 1.05 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
    ax.scatter(a, b, s=6, alpha=0.6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.savefig(path, dpi=120)
    return Path(path)
