"""Does oreo-qm9-xtb help pretraining? (issue 13, item 1: measured at equal pretraining steps before relying on it)

Two arms that differ only in their corpus: ``base`` (the corpus file given, by default the ET-OREO corpus) and
``+qm9-xtb`` (the same sources plus the off-equilibrium QM9 frames with GFN2-xTB forces that ``oreo data qm9-xtb``
makes). Each arm pretrains one backbone with the same method, batch size and number of optimiser steps, then
fine-tunes it on the same rMD17 molecules, training-set size, seeds and fine-tuning steps
(``benchmarks/pretrain_finetune.py``, run once per arm, side by side with one thread each). The verdict compares
the test force MAE of the two arms seed by seed (the same training frames and initial head in both)::

    python benchmarks/qm9_xtb_study.py --out runs/qm9xtb-study --xtb-molecules 2000 --pretrain-steps 3000 \\
        --finetune-molecules aspirin ethanol --size 50 --seeds 2 --finetune-steps 2000

Writes ``OUT/qm9xtb/`` (the generated set: reproduced by the command, never committed), ``OUT/<arm>/`` (the runs
of each arm), ``OUT/corpus-<arm>.yaml`` and ``OUT/comparison.md`` / ``comparison.json`` (copied to
``--results``, default ``benchmarks/results/qm9_xtb_study/``). Every stage resumes: rerun the same command after a
kill. The GFN2-xTB labels need ``pip install tblite``; QM9 comes from qm9pack or ``$OREO_DATA_DIR/qm9``.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("base", "+qm9-xtb")


def arm_folder(arm: str) -> str:
    return "base" if arm == "base" else "plus-qm9-xtb"


def write_corpora(out: Path, corpus: Path, xtb_dir: Path) -> Dict[str, Path]:
    """``corpus-base.yaml`` (the corpus as given) and ``corpus-plus-qm9-xtb.yaml`` (plus the generated set, with the
    same leakage protocol): the only difference between the arms."""
    base = yaml.safe_load(corpus.read_text())
    if any(s.get("reader") == "qm9-xtb" for s in base["sources"]):
        raise SystemExit(f"{corpus} already reads qm9-xtb; give a corpus without it (the base arm)")
    plus = json.loads(json.dumps(base))
    plus["sources"].append({"name": "qm9-xtb", "reader": "qm9-xtb", "kind": "off-equilibrium",
                            "path": str(xtb_dir.resolve())})
    paths = {}
    for arm, d in zip(ARMS, (base, plus)):
        paths[arm] = out / f"corpus-{arm_folder(arm)}.yaml"
        paths[arm].write_text(yaml.safe_dump(d, sort_keys=False))
    return paths


def arm_command(arm: str, corpus: Path, args) -> List[str]:
    """The pretrain_finetune.py invocation of one arm: everything but the corpus is the same for both."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pretrain_finetune.py"), "--out",
           str(Path(args.out) / arm_folder(arm)), "--corpus", str(corpus), "--methods", args.method,
           "--pretrain-steps", str(args.pretrain_steps), "--pretrain-batch-size", str(args.pretrain_batch_size),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--threads", "1",
           "--molecules", *args.finetune_molecules, "--sizes", str(args.size),
           "--seeds", f"{args.size}:{args.seeds}", "--finetune-steps", str(args.finetune_steps),
           "--properties", "--no-progress"]
    if args.compile:
        cmd.append("--compile")
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd


def run_arms(commands: Dict[str, List[str]], out: Path, parallel: int) -> None:
    """Run the arms' commands, ``parallel`` at a time, one thread each. An arm that fails lets the others finish
    (their work is kept), then is an error naming its log; this process ending (an error, Ctrl-C, SIGTERM) ends
    the arms it started, so that a rerun never finds a second copy writing the same folders."""
    import signal
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OREO_THREADS": "1"}
    pending, running, failed = list(commands.items()), [], []

    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}; rerun the same command to continue (finished runs are kept)")
    old_handler = signal.signal(signal.SIGTERM, stop)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                arm, cmd = pending.pop(0)
                log = out / f"{arm_folder(arm)}.log"
                print(f"[study] {arm}: {' '.join(cmd[1:])}\n        log {log}", flush=True)
                with open(log, "a") as fh:
                    running.append((arm, log, subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)))
            time.sleep(2.0)
            for item in list(running):
                arm, log, proc = item
                if proc.poll() is not None:
                    running.remove(item)
                    if proc.returncode != 0:
                        failed.append(f"arm {arm} failed (exit {proc.returncode}); see {log}")
                        print(f"[study] {failed[-1]}", flush=True)
                    else:
                        print(f"[study] {arm}: done", flush=True)
    finally:
        for _, _, proc in running:
            proc.terminate()
        for _, _, proc in running:
            proc.wait()
        signal.signal(signal.SIGTERM, old_handler)
    if failed:
        raise SystemExit("; ".join(failed) + "; then rerun the same command (finished runs are kept)")


#: the arguments that define a study's results (not where they go, nor how many processes make them)
DEFINING = ("corpus", "xtb_dir", "xtb_molecules", "method", "pretrain_steps", "pretrain_batch_size", "hidden",
            "layers", "finetune_molecules", "size", "seeds", "finetune_steps")


def claim_study_folder(out: Path, args, manifest: Optional[Dict]) -> None:
    """``OUT/study.json``: the study's defining arguments and the qm9-xtb set's counts. A folder begun with others
    (another set at the same path, other steps or sizes) is refused: its finished backbones and runs would be taken
    for this study's, as their folders are named by method and cell only. Without ``manifest`` (before the set is
    generated) only the arguments are checked, so that other arguments fail before any labelling."""
    from forcefield.files import write_json
    settings = {"arguments": {k: getattr(args, k) for k in DEFINING}}
    if manifest is not None:
        settings["qm9_xtb"] = {"counts": manifest.get("counts"), "recipe": manifest.get("recipe")}
    settings = json.loads(json.dumps(settings, default=str))
    path = out / "study.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in settings["arguments"] if old.get("arguments", {}).get(k) != settings["arguments"][k]]
        if manifest is not None and old.get("qm9_xtb") != settings["qm9_xtb"]:
            diff.append("the qm9-xtb set (its counts or recipe)")
        if diff:
            raise SystemExit(f"{out} holds a study with other settings ({', '.join(diff)}): its backbones and runs "
                             f"are not this study's; use another --out, or the same settings")
    elif manifest is not None:
        write_json(path, settings, indent=1)


def lock_study_folder(out: Path) -> None:
    """``OUT/study.lock`` holds this process's id while it runs; a second process on the same folder is refused
    (two copies would write the same checkpoints). A lock whose process is gone is taken over."""
    import atexit
    lock = out / "study.lock"
    if lock.is_file():
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pass                                   # its process ended without removing it
        except PermissionError:
            raise SystemExit(f"{out} is in use by process {lock.read_text().strip()} ({lock}); wait for it")
        else:
            if pid != os.getpid():
                raise SystemExit(f"{out} is in use by process {pid} ({lock}); wait for it or end it (kill {pid})")
    lock.write_text(f"{os.getpid()}\n")
    atexit.register(lambda: lock.unlink(missing_ok=True))


def compare(out: Path, args, xtb_manifest: Dict) -> Dict:
    """Test force MAE of the two arms per molecule, seed by seed: the mean of each, the mean paired difference and
    how many seeds the qm9-xtb arm won."""
    rows = {}
    for arm in ARMS:
        res = json.loads((out / arm_folder(arm) / "results.json").read_text())["forcefield"]
        rows[arm] = {(r["molecule"], r.get("seed", 1)): r["forces_mae_meV_per_A"] for r in res
                     if r["method"] == args.method and r["size"] == args.size and not r.get("failed")}
    table = []
    for mol in args.finetune_molecules:
        seeds = sorted(s for (m, s) in rows["base"] if m == mol and (m, s) in rows["+qm9-xtb"])
        if not seeds:
            continue
        base = np.array([rows["base"][(mol, s)] for s in seeds])
        plus = np.array([rows["+qm9-xtb"][(mol, s)] for s in seeds])
        table.append({"molecule": mol, "seeds": seeds, "base": base.tolist(), "plus_qm9_xtb": plus.tolist(),
                      "ratio": float(plus.mean() / base.mean()), "paired_difference": float((plus - base).mean()),
                      "wins": int((plus < base).sum())})
    c = xtb_manifest.get("counts", {})
    return {"method": args.method, "pretrain_steps": args.pretrain_steps,
            "pretrain_batch_size": args.pretrain_batch_size, "model": f"ET {args.layers}x{args.hidden}",
            "size": args.size, "finetune_steps": args.finetune_steps,
            "qm9_xtb": {"molecules": c.get("sampled"), "frames": c.get("frames"),
                        "level_of_theory": xtb_manifest.get("level_of_theory")},
            "rows": table}


def comparison_markdown(result: Dict, command: str) -> str:
    lines = ["# Does oreo-qm9-xtb help pretraining?", "",
             f"{result['method']} backbones ({result['model']}), {result['pretrain_steps']} pretraining steps of "
             f"{result['pretrain_batch_size']} in both arms; the `+qm9-xtb` arm's corpus adds "
             f"{result['qm9_xtb']['frames']} GFN2-xTB frames of {result['qm9_xtb']['molecules']} QM9 molecules. "
             f"Fine-tuned on {result['size']} frames, {result['finetune_steps']} steps, the same seeds in both arms "
             f"(same training frames); test force MAE on the 1000 rMD17 test frames (meV/Å).", "",
             "| molecule | seeds | base | +qm9-xtb | ratio | mean paired difference | seeds won by +qm9-xtb |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        def ms(v):
            return f"{np.mean(v):.1f}" + (f" ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else "")
        lines.append(f"| {r['molecule']} | {len(r['seeds'])} | {ms(r['base'])} | {ms(r['plus_qm9_xtb'])} | "
                     f"{r['ratio']:.2f} | {r['paired_difference']:+.1f} | {r['wins']} / {len(r['seeds'])} |")
    if not result["rows"]:
        lines.append("| (no molecule has both arms yet) | | | | | | |")
    lines += ["", "How far this reaches: each arm is one pretraining run (the same pretraining seed in both); the "
              "seeds vary only the fine-tuning draw of frames and the head's initialisation. So the table measures "
              "one backbone against one backbone: the paired difference includes the noise of a pretraining run, "
              "which this study does not measure, and two seeds carry no significance (2 / 2 wins happens a quarter "
              "of the time by chance). The two sets of labels also differ in level of theory (GFN2-xTB beside the "
              "corpus's DFT) and share one force output, so a null result may be that conflict rather than that the "
              "frames do not help. Read it as a pilot: a clear, consistent gap across molecules and seeds is worth a "
              "larger study (more pretraining seeds); a small or mixed one is not evidence either way.",
              "", "Reproduce:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/qm9xtb-study")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "qm9_xtb_study"),
                   help="where comparison.md/json are copied ('' for nowhere)")
    p.add_argument("--corpus", default=str(ROOT / "examples" / "configs" / "pretrain_corpus.yaml"),
                   help="the base arm's corpus (the other arm adds qm9-xtb to it)")
    p.add_argument("--xtb-dir", help="an existing oreo-qm9-xtb set to use (default: OUT/qm9xtb, generated)")
    p.add_argument("--xtb-molecules", type=int, default=2000, help="QM9 molecules to sample (positions 0..N-1)")
    p.add_argument("--xtb-workers", type=int, help="processes that label the set (one thread each; default: "
                                                   "--parallel, the cores the arms will use)")
    p.add_argument("--method", default="et-oro", choices=["et-oro", "et-oreo"],
                   help="pretraining method (et-oro: force matching only, where qm9-xtb frames enter directly)")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--pretrain-batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--finetune-molecules", nargs="+", default=["aspirin", "ethanol"])
    p.add_argument("--size", type=int, default=50, help="fine-tuning training frames")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=2000)
    p.add_argument("--compile", action="store_true",
                   help="pretrain and fine-tune through the compiled graphs (the same steps, faster on a CPU)")
    p.add_argument("--parallel", type=int, default=2, help="arms run side by side (one thread each)")
    p.add_argument("--data-dir", default=os.environ.get("OREO_DATA_DIR"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lock_study_folder(out)
    claim_study_folder(out, args, None)
    xtb_dir = Path(args.xtb_dir) if args.xtb_dir else out / "qm9xtb"
    if not args.xtb_dir:
        from forcefield.pretrain.qm9xtb import generate_qm9_xtb
        generate_qm9_xtb(xtb_dir, molecules=args.xtb_molecules, workers=args.xtb_workers or max(1, args.parallel),
                         data_dir=args.data_dir)
    manifest_path = xtb_dir / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{xtb_dir} holds no oreo-qm9-xtb set (no manifest.json); make one with `oreo data qm9-xtb "
                         f"--out {xtb_dir} --molecules N`, or leave out --xtb-dir")
    manifest = json.loads(manifest_path.read_text())
    claim_study_folder(out, args, manifest)
    corpora = write_corpora(out, Path(args.corpus), xtb_dir)
    run_arms({arm: arm_command(arm, corpora[arm], args) for arm in ARMS}, out, max(1, args.parallel))
    result = compare(out, args, manifest)
    command = "python benchmarks/qm9_xtb_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from forcefield.files import write_json
    write_json(out / "comparison.json", result, indent=1)
    (out / "comparison.md").write_text(comparison_markdown(result, command))
    if args.results:
        Path(args.results).mkdir(parents=True, exist_ok=True)
        for name in ("comparison.md", "comparison.json"):
            shutil.copy(out / name, Path(args.results) / name)
    print((out / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
