"""``oreo``: train, evaluate, export, inspect models, fetch data. Parses arguments and calls the library."""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .settings import add_set_argument, add_state_argument, command_config, set_in
from .threads import add_threads_argument


def cmd_train(args) -> int:
    from .train import Trainer, config_from_dict
    cfg_dict = command_config(args.config, args.out, args.resume, args.set)
    if args.data_dir:
        set_in(cfg_dict, "data.data_dir", args.data_dir)
    if args.threads:
        set_in(cfg_dict, "optim.threads", args.threads)
    cfg = config_from_dict(cfg_dict)
    init_model = None
    if args.init_from and not args.resume:
        from .io import load_trainable_potential
        init_model = load_trainable_potential(args.init_from)
    trainer = Trainer(cfg, Path(args.out), progress=not args.no_progress, init_model=init_model,
                      state_file=args.state, init_cpu_hours=args.init_cpu_hours)
    metrics = trainer.fit(resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def frames_it_trained_on(meta: dict, cset, args) -> int:
    """How many frames of ``cset`` the model trained or validated on, by the frame ids its metadata records, when
    they come from the same source (the same rMD17 molecule, or the same file); 0 when that cannot be told."""
    import numpy as np
    used = set(meta.get("train_frame_ids") or []) | set(meta.get("val_frame_ids") or [])
    if not used:
        return 0
    if args.path:
        same = bool(meta.get("source")) and Path(str(meta["source"])).resolve() == Path(args.path).resolve()
    else:
        same = not meta.get("dataset") and (args.molecule or meta.get("molecule")) == meta.get("molecule")
    return int(np.isin(np.asarray(cset.frame_id), np.fromiter(used, dtype=np.int64)).sum()) if same else 0


def cmd_evaluate(args) -> int:
    from .data import load_ase, load_rmd17
    from .evaluate import evaluate, parity_plot
    from .devices import resolve_device
    from .io import load_potential, metadata_of
    args.device = resolve_device(args.device, "--device")
    pot = load_potential(args.model, device=args.device)
    meta = metadata_of(pot)
    if args.path:
        cset = load_ase(args.path, energy_unit=args.energy_unit)
    elif args.dataset == "poly24" or (not args.molecule and meta.get("dataset") == "poly24"):
        from .data.poly24 import load_poly24
        cset = load_poly24(args.split, polymers=args.polymers or meta.get("polymers"), data_dir=args.data_dir,
                           root=args.poly24_dir)
    else:
        molecule = args.molecule or meta.get("molecule")
        if not molecule:
            raise SystemExit("say which frames to evaluate on: --molecule NAME (rMD17) or --path FILE")
        # default to the split file and labels the model was trained with: another split's test file can hold
        # this model's training frames
        split_index = args.split_index or meta.get("split_index") or 1
        labels = args.labels or meta.get("labels") or "revised"
        if meta.get("split_index") and split_index != meta["split_index"] and args.split != "train":
            print(f"warning: the model was trained on rMD17 split {meta['split_index']}; the test frames of split "
                  f"{split_index} may include its training frames", file=sys.stderr)
        cset = load_rmd17(molecule, split=args.split, split_index=split_index, data_dir=args.data_dir,
                          labels=labels)
    if args.max_frames:
        cset = cset.subset(list(range(min(args.max_frames, len(cset)))))
    seen = frames_it_trained_on(meta, cset, args)
    metrics, pred = evaluate(pot, cset, batch_size=args.batch_size, device=args.device, progress=True)
    metrics["model"] = str(args.model)
    metrics["data"] = cset.source
    metrics["frames_in_its_training_data"] = seen
    if seen:
        print(f"note: {seen} of these {len(cset)} frames are among the model's training or validation frames "
              f"(its metadata lists them): these errors are not held-out errors", file=sys.stderr)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(text)
        parity_plot(pred, cset, out / "parity.png", title=f"{Path(str(args.model)).name} on {cset.source}")
        print(f"wrote {out / 'metrics.json'} and {out / 'parity.png'}")
    return 0


def cmd_export(args) -> int:
    import torch
    from .export import export_torchscript
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if args.format == "aoti":
        from .compiled import export_compiled
        path = export_compiled(args.model, args.output, dtype=dtype, device=args.device)
        print(f"wrote AOTInductor package {path} (load with OreoCalculator or forcefield.load_potential; "
              f"same torch version needed)")
        return 0
    path = export_torchscript(args.model, args.output, dtype=dtype)
    print(f"wrote TorchScript model {path} (load with torch.jit.load; forces included)")
    return 0


def cmd_committee(args) -> int:
    from .committee import save_committee
    from .io import load_potential
    path = save_committee(args.models, args.out)
    committee = load_potential(path)     # what every user of the file will get: proves it loads
    print(f"wrote committee of {committee.size} models {path} (OreoCalculator gives energy_std, forces_std, "
          f"forces_std_max; `oreo info {path}` shows its metadata)")
    return 0


def cmd_info(args) -> int:
    from .io import load_potential, metadata_of
    pot = load_potential(args.model)
    meta = metadata_of(pot)
    meta.pop("train_frame_ids", None)
    meta.pop("val_frame_ids", None)
    print(json.dumps({"cutoff_A": pot.cutoff, **meta}, indent=2))
    return 0


def cmd_models(args) -> int:
    from .io import shipped_models
    for name, path in shipped_models().items():
        card = path.with_suffix(".md")
        print(f"{name:14s} {path}" + (f"  (card: {card.name})" if card.exists() else ""))
    return 0


def cmd_data(args) -> int:
    from .data import registry
    if args.action == "download":
        paths = registry.download(args.name, args.data_dir, molecules=args.molecules)
        print(f"{len(paths)} file(s) ready under {registry.resolve_data_dir(args.data_dir)}")
        return 0
    # a named data set: every file it should have, so a missing one is reported; all: the files that are there
    statuses = registry.verify(args.data_dir, names=[args.name] if args.name else None,
                               molecules=args.molecules, present_only=not args.name)
    bad = [s for s in statuses if s.status in ("mismatch", "missing")]
    for s in statuses:
        print(f"{s.status:10s} {s.dataset:14s} {s.path}")
    print(f"{len(statuses)} file(s) checked, {len(bad)} bad")
    return 1 if bad else 0


def _poly24_names():
    from .data.poly24.catalog import POLYMERS
    return list(POLYMERS)


def cmd_poly24(args) -> int:
    from .data.poly24.generate import GenerationConfig, generate
    from .data.poly24.loader import poly24_root
    out = poly24_root(args.data_dir, args.out)
    options = {"polymers": args.polymers, "temperatures": args.temperatures, "replicas": args.replicas,
               "steps": args.steps, "equilibration_steps": args.equilibration_steps, "stride": args.stride,
               "timestep_fs": args.timestep, "seed": args.seed, "labels": args.labels, "dft_frames": args.dft_frames}
    config = GenerationConfig(**{k: v for k, v in options.items() if v is not None})
    manifest = generate(out, config, progress=not args.no_progress)
    counts = manifest["counts"]
    print(f"oreo-poly24 in {out}: " + ", ".join(f"{s} {c['frames']} frames / {c['trajectories']} trajectories"
                                                 for s, c in counts.items()) + f"; see {out / 'MANIFEST.md'}")
    return 0


def cmd_qm9_xtb(args) -> int:
    from .pretrain.qm9xtb import generate_qm9_xtb, qm9_xtb_root
    out = qm9_xtb_root(args.data_dir, args.out)
    manifest = generate_qm9_xtb(out, molecules=args.molecules, start=args.start, workers=args.workers,
                                data_dir=args.data_dir, temperature=args.temperature,
                                frames_per_molecule=args.frames_per_molecule, stride=args.stride,
                                equilibration_steps=args.equilibration_steps, timestep_fs=args.timestep,
                                seed=args.seed, qm9=args.qm9, shard_size=args.shard_size,
                                targets=args.targets)
    c = manifest["counts"]
    print(f"oreo-qm9-xtb in {out}: {c['frames']} frames of {c['sampled']} molecules ({c['skipped']} skipped as "
          f"fine-tuning targets, {c['failed']} failed) in {len(manifest['shards'])} shard(s); see {out / 'manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oreo", description="oreo machine-learning force field")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a potential on energies and forces")
    t.add_argument("--config", help="YAML config (see examples/configs/)")
    t.add_argument("--out", default="runs/train", help="output folder (checkpoints, logs, plots)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_set_argument(t)
    t.add_argument("--init-from", metavar="MODEL",
                   help="start from this model's weights (a shipped name, model file or checkpoint): continue "
                        "training it, or fine-tune it on new data; the config's model section is then ignored")
    t.add_argument("--init-cpu-hours", type=float, metavar="H",
                   help="CPU-hours already spent on the --init-from model (default: what its file records)")
    add_state_argument(t)
    t.add_argument("--data-dir", help="data folder (default: $OREO_DATA_DIR)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="energy/force errors of a model on labelled frames")
    e.add_argument("model", help="model file, checkpoint, export or shipped name")
    e.add_argument("--molecule", help="rMD17 molecule (default: the model's training molecule)")
    e.add_argument("--split", default="test", choices=["train", "val", "test", "all"], help="val: poly24 only")
    e.add_argument("--split-index", type=int, help="rMD17 split file 1..5 (default: the model's)")
    e.add_argument("--labels", choices=["revised", "original"], help="rMD17 labels (default: the model's)")
    e.add_argument("--path", help="evaluate on a file ase.io reads instead of rMD17")
    e.add_argument("--dataset", choices=["poly24"], help="evaluate on oreo-poly24 (default for poly24 models)")
    e.add_argument("--polymers", nargs="*", help="poly24: these polymers (default: the model's)")
    e.add_argument("--poly24-dir", help="poly24: the set's folder (default: $OREO_DATA_DIR/poly24)")
    e.add_argument("--energy-unit", default="eV")
    e.add_argument("--max-frames", type=int)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="cpu")
    e.add_argument("--data-dir")
    e.add_argument("--out", help="folder for metrics.json and parity.png")
    add_threads_argument(e)
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="TorchScript export (loads with torch.jit.load alone)")
    x.add_argument("model")
    x.add_argument("-o", "--output", required=True)
    x.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    x.add_argument("--format", default="torchscript", choices=["torchscript", "aoti"],
                   help="torchscript (loads with torch.jit.load alone) or aoti (compiled .pt2, faster; needs g++)")
    x.add_argument("--device", default="cpu",
                   help="aoti: the device its kernels are built for (cpu, or cuda: built on a GPU machine)")
    add_threads_argument(x)
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("committee", help="combine models of one molecule into a committee file (mean + spread)",
                       description="Write one model file holding MODEL1 MODEL2 ...: it loads like any model and gives "
                                   "their mean energy and forces; OreoCalculator adds energy_std, forces_std and "
                                   "forces_std_max (the uncertainty). Members must agree on cutoff, elements, units "
                                   "and molecule.")
    c.add_argument("models", nargs="+", metavar="MODEL",
                   help="two or more oreo model files, checkpoints or shipped names (not exports)")
    c.add_argument("-o", "--out", required=True, help="the committee file to write (.pt)")
    c.set_defaults(func=cmd_committee)

    i = sub.add_parser("info", help="print a model's metadata")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("data", help="download or verify reference data; generate the polymer and QM9-xTB sets")
    dsub = d.add_subparsers(dest="action", required=True)
    for action, text in (("download", "download a dataset (with SHA-256 checks)"),
                         ("verify", "check the SHA-256 of downloaded files")):
        a = dsub.add_parser(action, help=text)
        a.add_argument("name", nargs="?", default=None,
                       help="dataset: rmd17 (per-split npz, 110 MB), rmd17-figshare (upstream tarball, 1 GB), md17")
        a.add_argument("--molecules", nargs="*")
        a.add_argument("--data-dir")
        a.set_defaults(func=cmd_data)
    g = dsub.add_parser("poly24", help="generate oreo-poly24: 24 polymers, xTB MD sampling, labels, splits",
                        description="Generate (or continue) oreo-poly24 in --out: H-capped oligomers of 24 polymers, "
                                    "GFN2-xTB Langevin MD at each temperature, labelled frames, splits by trajectory. "
                                    "Needs: pip install 'oreo[poly24]' (rdkit, tblite).")
    g.add_argument("--out", help="folder (default: $OREO_DATA_DIR/poly24, where the loaders look)")
    g.add_argument("--data-dir", help="data folder whose poly24/ to write (instead of --out)")
    g.add_argument("--polymers", nargs="*", help="subset of the 24 (default all): " + " ".join(_poly24_names()))
    g.add_argument("--temperatures", nargs="*", type=float, help="K (default 300 600)")
    g.add_argument("--replicas", type=int, help="trajectories per polymer and temperature (default 4: "
                                                "1 test, 1 val, 2 train)")
    g.add_argument("--steps", type=int, help="production MD steps per trajectory (default 1000)")
    g.add_argument("--equilibration-steps", type=int, help="default 200")
    g.add_argument("--stride", type=int, help="keep every N-th production step (default 20)")
    g.add_argument("--timestep", type=float, help="fs (default 0.5)")
    g.add_argument("--seed", type=int, help="default 0")
    g.add_argument("--labels", choices=["xtb", "dft"], help="GFN2-xTB (default) or PySCF DFT relabelling")
    g.add_argument("--dft-frames", type=int, help="with --labels dft: DFT-label the first N kept frames per "
                                                  "trajectory (default all)")
    add_threads_argument(g, default=1)
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_poly24)

    q = dsub.add_parser("qm9-xtb", help="generate oreo-qm9-xtb: QM9 molecules, GFN2-xTB MD frames (pretraining)",
                        description="Generate (or continue) off-equilibrium conformations of QM9 molecules in --out: "
                                    "short GFN2-xTB Langevin MD from each QM9 geometry, every kept frame labelled; "
                                    "molecules of a fine-tuning target are skipped; sharded, resumable. Options not "
                                    "given come from the folder's recipe (or the defaults). Needs: pip install tblite.")
    q.add_argument("--out", help="folder (default: $OREO_DATA_DIR/qm9xtb, where the corpus looks)")
    q.add_argument("--data-dir", help="data folder (QM9 archive, rMD17 targets; its qm9xtb/ unless --out)")
    q.add_argument("--molecules", type=int, help="how many molecules of the fixed QM9 order (default: to the end)")
    q.add_argument("--start", type=int, default=0, help="first position in that order (default 0)")
    q.add_argument("--frames-per-molecule", type=int, help="kept MD frames per molecule (default 4)")
    q.add_argument("--temperature", type=float, help="K (default 800)")
    q.add_argument("--stride", type=int, help="MD steps between kept frames (default 10)")
    q.add_argument("--equilibration-steps", type=int, help="default 100")
    q.add_argument("--timestep", type=float, help="fs (default 0.5)")
    q.add_argument("--seed", type=int, help="default 0")
    q.add_argument("--qm9", help="QM9 source: qm9pack, archive, folder or .db (default: $OREO_DATA_DIR/qm9/ "
                                 "archive or db if there, else qm9pack)")
    q.add_argument("--shard-size", type=int, help="molecules per shard (default 500)")
    q.add_argument("--targets", nargs="*", help="fine-tuning targets whose molecules are skipped "
                                                "(default: aspirin ethanol naphthalene salicylic)")
    q.add_argument("--workers", type=int, default=1, help="processes, one thread each (default 1)")
    add_threads_argument(q, default=1)
    q.set_defaults(func=cmd_qm9_xtb)

    from .pretrain.cli import register_subcommands  # oreo pretrain / oreo finetune
    register_subcommands(sub)
    from .fit.cli import add_fit_parser             # oreo fit
    add_fit_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .threads import default_threads, set_thread_environment, threads_from_argv
    try:                     # before the parsers import torch and numpy: their thread pools start with this many
        set_thread_environment(threads_from_argv(sys.argv[1:] if argv is None else argv) or default_threads())
    except ValueError:
        pass                 # a bad $OREO_THREADS: configure_threads below says so
    args = build_parser().parse_args(argv)
    if args.command == "data" and args.action == "download" and not args.name:
        raise SystemExit("oreo data download: name the dataset, e.g. `oreo data download rmd17`")
    try:
        from .threads import configure_threads
        configure_threads(getattr(args, "threads", None))   # before torch loads: one thread unless told
        return args.func(args)
    # user errors, as one line each: missing or existing files (OSError), bad values, runs that diverged
    # (FloatingPointError), missing optional packages (ImportError)
    except (OSError, ValueError, RuntimeError, ArithmeticError, ImportError) as exc:
        print(f"oreo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
