"""How far the DFT check's PySCF forces are from rMD17's own labels, on the same frames.

``oreo-md dft-check`` compares a model with PBE/def2-SVP from PySCF on frames of its MD trajectory, and the MD17
table puts that beside the model's test-set error, which is measured against rMD17's labels (PBE/def2-SVP from
another program). The two references differ by grids, SCF settings and density fitting; this measures by how much,
on test frames of the molecule, with the DFT check's own settings, so that the two numbers can be read side by side::

    python benchmarks/dft_calibration.py --molecules salicylic aspirin --frames 5

Writes ``benchmarks/results/dft_calibration/<molecule>.json`` (per frame: rMD17 frame id, force MAE and RMSE between
the two, the energy difference) and prints a table. Resumes: frames already computed with the same settings are
kept.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forcefield.data.rmd17 import load_rmd17  # noqa: E402
from forcefield.files import write_json  # noqa: E402
from md.dft import dft_forces, nested_pick  # noqa: E402


def calibrate(molecule: str, n_frames: int, out: Path, seed: int = 0, data_dir=None, **settings) -> dict:
    """PySCF against rMD17's labels on ``n_frames`` test frames (split 01, picked as the DFT check picks)."""
    test = load_rmd17(molecule, "test", 1, data_dir=data_dir)
    path = out / f"{molecule}.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    if done.get("settings") != settings:
        done = {"settings": settings, "frames": []}
    have = {r["frame_id"] for r in done["frames"]}
    for k in nested_pick(len(test), n_frames, seed):
        fid = int(test.frame_id[k])
        if fid in have:
            continue
        t0 = time.process_time()
        e, f = dft_forces(test.frame_numbers(k), test.frame_positions(k), **settings)
        ref = test.forces[test.atom_index(np.array([k]))]
        diff = f - ref
        done["frames"].append({"frame_id": fid, "force_mae_meV_per_A": 1e3 * float(np.abs(diff).mean()),
                               "force_rmse_meV_per_A": 1e3 * float(np.sqrt((diff ** 2).mean())),
                               "energy_difference_eV": float(e - test.energy[k]),
                               "cpu_seconds": time.process_time() - t0})
        write_json(path, done, indent=1)
        print(f"{molecule} frame {fid}: PySCF vs rMD17 force MAE {done['frames'][-1]['force_mae_meV_per_A']:.2f} "
              f"meV/Å ({done['frames'][-1]['cpu_seconds']:.0f} CPU-s)", flush=True)
    maes = [r["force_mae_meV_per_A"] for r in done["frames"]]
    de = [r["energy_difference_eV"] for r in done["frames"]]
    done.update(molecule=molecule, n_frames=len(maes), force_mae_meV_per_A=float(np.mean(maes)),
                energy_difference_spread_meV=1e3 * float(np.std(de)) if len(de) > 1 else None)
    write_json(path, done, indent=1)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", nargs="+", default=["salicylic", "aspirin"])
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dft_calibration"))
    p.add_argument("--data-dir", default=os.environ.get("OREO_DATA_DIR"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the DFT check's settings (md/dft.py defaults, as its reports record them)
    settings = {"xc": "pbe", "basis": "def2-svp", "grid_level": 4, "conv_tol": 1e-10}
    rows = [calibrate(m, args.frames, out, data_dir=args.data_dir, **settings) for m in args.molecules]
    print("| molecule | frames | PySCF vs rMD17 labels, force MAE (meV/Å) | energy difference spread (meV) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        spread = "–" if r["energy_difference_spread_meV"] is None else f"{r['energy_difference_spread_meV']:.1f}"
        print(f"| {r['molecule']} | {r['n_frames']} | {r['force_mae_meV_per_A']:.2f} | {spread} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
