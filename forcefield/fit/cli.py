"""``oreo fit``: argument parsing only; :func:`forcefield.fit.loop.run_fit` does the work.

Every option defaults to None here: what is not given comes from the run already in ``--out`` (a rerun continues
it) or from :class:`~forcefield.fit.config.FitConfig`'s defaults.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..threads import add_threads_argument

__all__ = ["add_fit_parser", "cmd_fit"]

#: command-line option -> FitConfig field (where the names differ)
RENAMED = {"backbone_from": "backbone", "set": "train_set"}


def cmd_fit(args: argparse.Namespace) -> int:
    from .config import FitConfig
    from .loop import run_fit
    names = set(FitConfig.__dataclass_fields__)
    given = {}
    for key, value in vars(args).items():
        field = RENAMED.get(key, key)
        if field in names:
            given[field] = value
    for key in ("structure", "backbone"):         # files by absolute path: a rerun may start elsewhere
        if given.get(key) and Path(given[key]).is_file():
            given[key] = str(Path(given[key]).resolve())
    if not (Path(args.out) / "fit.json").is_file() and not (args.smiles or args.structure):
        raise SystemExit("oreo fit: give the molecule: --smiles SMILES or --structure FILE (or --out DIR of a fit "
                         "to continue)")
    run_fit(given, args.out)
    return 0


def add_fit_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "fit", help="from a molecule to its own force field: xTB MD pool, DFT labels chosen by a committee's "
                    "uncertainty, fine-tuning, report",
        description="Build a committee force field for one molecule: conformers (RDKit) and GFN2-xTB MD give a "
                    "pool of conformations; a diverse first batch (farthest-point sampling) and then, round after "
                    "round, the frames of the committee's own MD where its members disagree most "
                    "(forces_std_max) are labelled (PySCF PBE/def2-SVP by default, each frame saved as it "
                    "finishes); the committee is fine-tuned from the pretrained backbone after every round. Stops "
                    "at the label budget or when the disagreement along the MD falls below --stop-std. Writes "
                    "DIR/committee.pt and DIR/report.md. Rerun the same command (or `oreo fit --out DIR`) to "
                    "continue a killed or finished run (a larger --dft-frames continues the active learning). "
                    "Needs: pip install 'oreo[fit]' (rdkit, tblite, pyscf).")
    mol = p.add_mutually_exclusive_group()
    mol.add_argument("--smiles", help="the molecule as SMILES (neutral, closed shell), e.g. CCO")
    mol.add_argument("--structure", help="or an ASE-readable file; its frames are the starting conformers")
    p.add_argument("--out", required=True, help="the run folder (rerun with it to continue)")
    p.add_argument("--name", help="the model's molecule name in its metadata (e.g. ethanol)")
    g = p.add_argument_group("labels and budget")
    g.add_argument("--labels", choices=["dft", "xtb"], help="dft: PySCF (default); xtb: GFN2-xTB (fast, for tests)")
    g.add_argument("--xc", help="DFT functional (default pbe)")
    g.add_argument("--basis", help="DFT basis (default def2-svp: with PBE, the level of revised MD17)")
    g.add_argument("--workers", type=int, help="label processes in parallel (default 1)")
    g.add_argument("--dft-frames", type=int, help="label budget: every label computed, held-out frames included "
                                                  "(default 100)")
    g.add_argument("--test-frames", type=int, help="held-out labelled frames, random from the pool (default N/10)")
    g.add_argument("--initial-frames", type=int, help="first batch, by farthest-point sampling (default N/4)")
    g.add_argument("--frames-per-round", type=int, help="labels per active-learning round (default N/10)")
    g.add_argument("--select", choices=["uncertainty", "random"],
                   help="uncertainty (default): FPS, then the largest committee spread; random: the same budget at "
                        "random, to measure what active learning gains")
    g.add_argument("--stop-std", type=float, help="eV/Å: stop when the committee spread along every MD run stays "
                                                  "below this (default 0.05)")
    g.add_argument("--check-frames", type=int, help="frames of the final model's MD labelled as a check, "
                                                    "outside the budget (default 10; 0: none)")
    g = p.add_argument_group("candidate pool (GFN2-xTB MD)")
    g.add_argument("--conformers", type=int, help="RDKit conformers (default 2)")
    g.add_argument("--temperatures", type=float, nargs="+", help="K (default 300 600)")
    g.add_argument("--pool-steps", type=int, help="production steps per trajectory (default 1000)")
    g.add_argument("--pool-equilibration", type=int, help="default 100")
    g.add_argument("--pool-stride", type=int, help="keep every N-th step (default 10)")
    g.add_argument("--pool-relax-steps", type=int, help="xTB FIRE steps before the MD (default 50)")
    g.add_argument("--timestep", type=float, help="fs (default 0.5)")
    g.add_argument("--friction", type=float, help="Langevin friction, 1/fs (default 0.02)")
    g = p.add_argument_group("committee")
    g.add_argument("--from", dest="backbone_from", metavar="BACKBONE",
                   help="pretrained backbone to fine-tune (shipped name or file), or 'scratch' (default: the shipped "
                        "pretrained-et-oro when it knows the molecule's elements, else scratch)")
    g.add_argument("--committee", type=int, help="members (default 3)")
    g.add_argument("--retrain", choices=["warm", "fresh"],
                   help="warm (default): each round continues every member; fresh: each round from the backbone")
    g.add_argument("--epochs", type=int, help="per member and round (default 300; early stopping may end sooner)")
    g.add_argument("--train-minutes", type=float, help="wall-clock limit per member and round")
    g.add_argument("--batch-size", type=int, help="default 4")
    g.add_argument("--lr", type=float, help="default 5e-4")
    g.add_argument("--val-every", type=int, help="every N-th labelled frame, in the order chosen, is a validation "
                                                 "frame (early stopping, best model) instead of a training frame "
                                                 "(default 5)")
    g.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override the members' training config, e.g. --set optim.ema_decay=0.9 or (--from scratch) "
                        "--set model.hidden=32; repeatable")
    g = p.add_argument_group("committee MD (exploration)")
    g.add_argument("--md-ps", type=float, help="ps per replica and round (default 0.5)")
    g.add_argument("--md-replicas", type=int, help="default 4")
    g.add_argument("--md-temperatures", type=float, nargs="+", help="K (default: --temperatures)")
    g.add_argument("--md-stride", type=int, help="steps between candidate frames (default 10)")
    g.add_argument("--md-max-std", type=float, help="eV/Å: a replica whose spread passes this stops (default 1.0)")
    g.add_argument("--bond-threshold", type=float, help="Å: bond deviation that makes a replica unstable (0.5)")
    p.add_argument("--seed", type=int, help="default 0")
    add_threads_argument(p)
    p.set_defaults(func=cmd_fit)
    return p
