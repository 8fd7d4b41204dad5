"""``oreo fit``: from a molecule to its own force field, with labels chosen by the model's own uncertainty.

Stages (each recorded in ``DIR/fit.json`` when done; layout in :mod:`.state`):

1. ``conformers`` - RDKit ETKDG + MMFF from SMILES, or the frames of ``--structure`` (:mod:`.pool`);
2. ``pool`` - GFN2-xTB Langevin MD from every conformer at every temperature: the candidate pool;
3. ``split`` - the held-out frames (``test_frames`` drawn at random from the pool, seeded, labelled like the
   rest and never trained on: every round is scored on them) and the first batch (``initial_frames`` by
   farthest-point sampling in the backbone's features, or sorted inverse distances with ``--from scratch``;
   at random with ``--select random``) (:mod:`.select`);
4. rounds r = 0, 1, ...: ``label`` the round's frames (:mod:`.label`), ``train`` the committee on every label so
   far (:mod:`.training`), ``evaluate`` it on the held-out frames, ``explore`` with committee MD (:mod:`.explore`);
   then stop when the label budget is used or when every MD replica ran its full length with the committee's force
   spread below ``stop_std``; else round r + 1 labels the ``frames_per_round`` MD frames with the largest spread
   (``--select random``: random MD frames);
5. ``committee.pt`` (the last round's), ``check`` (labels along the final model's MD frames and its force error
   there), ``report`` (:mod:`.report`).

Rerunning the command continues from the last finished stage; inside a stage, finished labels and training
checkpoints are kept.
"""
from __future__ import annotations

import shutil
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..data.poly24.sampling import write_extxyz
from ..files import atomic_write, write_json
from .config import FitConfig
from .label import LabelStore, Level
from .state import ROUND_ID_BASE, FitState, md_frame_id, round_dir

#: no pool frame within this many strides of a held-out frame of the same trajectory is labelled for training
HOLD_OUT_GAP_STRIDES = 5
#: uncertainty picks of one committee-MD replica are at least this many candidate strides apart (while others remain)
PICK_GAP_STRIDES = 3


class _Run:
    """One invocation: the settings, the manifest, the pool, the label store, the backbone."""

    def __init__(self, state: FitState, cfg: FitConfig, log: Callable[[str], None]):
        self.state, self.cfg, self.log = state, cfg, log
        self.out = state.out
        self.level = Level(cfg.labels, cfg.xc, cfg.basis)
        self.pool: List[Any] = []
        self.conformers: List[Any] = []
        self.backbone = None
        self.store: Optional[LabelStore] = None
        self._candidates: Dict[int, List[Any]] = {}

    # ------------------------------------------------------------------ helpers
    def timed(self, r: Optional[int], stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        if r is not None:
            self.state.round_seconds(r, stage, time.perf_counter() - t0)
            self.state.save()
        return result

    @property
    def numbers(self) -> np.ndarray:
        return self.conformers[0].numbers

    def candidates(self, r: int) -> List[Any]:
        """The committee-MD frames of round ``r`` (ase.Atoms with frame_id and forces_std_max)."""
        if r not in self._candidates:
            from ase.io import read
            path = round_dir(self.out, r) / "md" / "candidates.extxyz"
            self._candidates[r] = read(str(path), index=":") if path.stat().st_size else []
        return self._candidates[r]

    def frame(self, fid: int):
        """(numbers, positions) of a pool frame or a committee-MD frame."""
        if fid < ROUND_ID_BASE:
            a = self.pool[fid]
        else:
            r, k = fid // ROUND_ID_BASE - 1, fid % ROUND_ID_BASE
            a = self.candidates(r)[k]
            assert int(a.info["frame_id"]) == fid
        return a.numbers, a.positions

    def descriptors(self) -> np.ndarray:
        """Standardised descriptors of every pool frame (the backbone's features, or inverse distances)."""
        from .select import backbone_descriptors, geometric_descriptors, standardise
        pos = np.stack([a.positions for a in self.pool])
        if self.backbone is not None:
            return standardise(backbone_descriptors(self.backbone, self.numbers, pos))
        return standardise(geometric_descriptors(self.numbers, pos))

    # ------------------------------------------------------------------ stages 1-3
    def conformer_stage(self) -> None:
        from ase.io import read
        from .pool import conformers_from_file, conformers_from_smiles
        path = self.out / "pool" / "conformers.extxyz"
        cfg = self.cfg
        if not self.state.done("conformers"):
            t0 = time.perf_counter()
            confs = conformers_from_smiles(cfg.smiles, cfg.conformers, cfg.seed) if cfg.smiles \
                else conformers_from_file(cfg.structure)
            write_extxyz(path, confs)
            a = confs[0]
            self.state.data["molecule"] = {"smiles": cfg.smiles, "structure": cfg.structure, "name": cfg.name,
                                           "formula": a.get_chemical_formula(), "n_atoms": len(a),
                                           "conformers": len(confs)}
            self.state.finish("conformers", time.perf_counter() - t0)
            self.log(f"molecule {a.get_chemical_formula()} ({len(a)} atoms), {len(confs)} conformer(s)")
        self.conformers = read(str(path), index=":")

    def pool_stage(self) -> None:
        from .pool import PoolSettings, build_pool, read_pool
        cfg = self.cfg
        if self.state.done("pool"):
            self.pool = read_pool(self.out / "pool")
            return
        t0 = time.perf_counter()
        settings = PoolSettings(temperatures=cfg.temperatures, steps=cfg.pool_steps,
                                equilibration=cfg.pool_equilibration, stride=cfg.pool_stride,
                                relax_steps=cfg.pool_relax_steps, timestep_fs=cfg.timestep, friction=cfg.friction,
                                seed=cfg.seed)
        from ..reference import xtb_level
        self.pool = build_pool(self.out / "pool", self.conformers, settings, self.log)
        self.state.finish("pool", time.perf_counter() - t0, frames=len(self.pool), sampled_with=xtb_level())
        self.log(f"pool: {len(self.pool)} frames")

    def bond_reference(self):
        from ..bonds import bond_lengths, find_bonds
        bonds = find_bonds(self.numbers, self.conformers[0].positions)
        pos = np.stack([a.positions for a in self.pool])
        return bonds, bond_lengths(pos, bonds).mean(axis=0) if len(bonds) else np.zeros(0)

    def split_stage(self) -> None:
        from .select import farthest_point_sampling, select_random
        cfg, state = self.cfg, self.state
        if state.done("split"):
            return
        t0 = time.perf_counter()
        n = len(self.pool)
        if n < cfg.test_frames + cfg.initial_frames:
            raise ValueError(f"the pool has {n} frames, fewer than the held-out ({cfg.test_frames}) plus first batch "
                             f"({cfg.initial_frames}); sample more (--pool-steps, --conformers, --temperatures) or "
                             f"lower --test-frames / --initial-frames")
        test = select_random(n, cfg.test_frames, np.random.default_rng([cfg.seed, 7]))
        rest = sorted(set(range(n)) - self.near_held_out(test))
        if len(rest) < cfg.initial_frames:
            raise ValueError(f"the pool has {len(rest)} frames away from the {len(test)} held-out ones, fewer than the "
                             f"first batch ({cfg.initial_frames}); sample more (--pool-steps, --conformers, "
                             f"--temperatures) or lower --test-frames / --initial-frames")
        if cfg.select == "random":
            picks = [rest[i] for i in select_random(len(rest), cfg.initial_frames,
                                                    np.random.default_rng([cfg.seed, 11]))]
            how = "at random from the pool"
        else:
            picks = farthest_point_sampling(self.descriptors(), cfg.initial_frames, candidates=rest)
            how = f"farthest-point sampling of the pool in {state.data['descriptor']}"
        state.data["test_ids"] = [int(i) for i in test]
        rec = state.round(0)
        rec.update(selected=[int(i) for i in picks], criterion=how)
        state.finish("split", time.perf_counter() - t0)
        self.log(f"held out {len(test)} pool frames (random); first batch: {len(picks)} frames, {how}")

    def near_held_out(self, test) -> set:
        """Pool frames a held-out frame's trajectory neighbours (within :data:`HOLD_OUT_GAP_STRIDES` strides of it, the
        same temperature and conformer), the held-out frames included: frames 5 fs apart are near copies, so none of
        them may train a model that is scored on the held-out ones."""
        gap = HOLD_OUT_GAP_STRIDES * self.cfg.pool_stride

        def traj(a):
            return a.info.get("temperature_K"), a.info.get("conformer")
        held = {}
        for t in test:
            held.setdefault(traj(self.pool[t]), []).append(int(self.pool[t].info.get("step", 0)))
        near = {int(t) for t in test}
        for j, a in enumerate(self.pool):
            steps = held.get(traj(a))
            if steps and min(abs(int(a.info.get("step", 0)) - s) for s in steps) <= gap:
                near.add(j)
        return near

    # ------------------------------------------------------------------ a round
    def labelled_ids(self, r: int) -> List[int]:
        """The training + validation frames of round ``r``: every frame selected up to it that has its label."""
        ids = [fid for k in range(r + 1) for fid in self.state.round(k).get("selected", [])]
        return [fid for fid in ids if self.store.path(fid).is_file()]

    def splits(self, r: int):
        from ..train.datasets import Splits
        ids = self.labelled_ids(r)
        val = [fid for p, fid in enumerate(ids) if p % self.cfg.val_every == 0]
        train = [fid for fid in ids if fid not in set(val)]
        test = [fid for fid in self.state.data["test_ids"] if self.store.path(fid).is_file()]
        if len(train) < 1 or not test:
            raise RuntimeError(f"round {r}: too few labelled frames to train ({len(train)} training, {len(val)} "
                               f"validation, {len(test)} held-out; failed labels are in {self.store.folder}); raise "
                               f"--initial-frames / --test-frames")
        src = f"oreo fit {self.cfg.system_name}"
        return Splits(self.store.conformation_set(train, src + " train"),
                      self.store.conformation_set(val, src + " val"),
                      self.store.conformation_set(test, src + " held-out"))

    def label_round(self, r: int) -> None:
        rec = self.state.round(r)
        ids = list(rec["selected"]) + (list(self.state.data["test_ids"]) if r == 0 else [])
        # done when every frame has its label or its failure on record; a failure file removed (the log says how to
        # retry one) is labelled again
        if rec.get("labelled") and all(self.store.has(f) for f in ids):
            return
        stats = self.store.label({fid: self.frame(fid) for fid in ids}, self.cfg.workers, self.log,
                                 what=f"round {r} labels")
        rec.update(labelled=True, label_failed=[fid for fid in ids if self.store.failed(fid)])
        rec["label_stats"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.items()}

    def metadata(self, r: int, n_train: int) -> Dict[str, Any]:
        cfg = self.cfg
        return {"molecule": cfg.name, "labels": None, "split_index": None, "smiles": cfg.smiles,
                "source": f"oreo fit {cfg.smiles or cfg.structure}", "level_of_theory": self.store.level_text,
                "fit": {"round": r, "training_labels": n_train, "backbone": self.state.data["backbone"],
                        "select": cfg.select, "committee": cfg.committee}}

    def train_round(self, r: int):
        from .training import train_committee
        rec = self.state.round(r)
        if rec.get("trained"):
            return
        splits = self.splits(r)
        fresh = r == 0 or self.cfg.retrain == "fresh"
        previous = None if fresh else round_dir(self.out, r - 1)
        _, results = train_committee(round_dir(self.out, r), self.cfg, splits, self.backbone, previous,
                                     self.metadata(r, len(splits.train)), self.log)
        rec.update(trained=True, n_train=len(splits.train), n_val=len(splits.val), n_test=len(splits.test),
                   members=[{"forces_mae_meV_per_A": m.get("forces_mae_meV_per_A"),
                             "energy_mae_meV": m.get("energy_mae_meV"), "epochs": m.get("epochs"),
                             "stop_reason": m.get("stop_reason")} for m in results])

    def evaluate_round(self, r: int) -> None:
        from ..evaluate import mae_rmse
        from ..io import load_potential
        from .training import committee_predictions
        rec = self.state.round(r)
        if rec.get("test"):
            return
        test = self.splits(r).test
        committee = load_potential(round_dir(self.out, r) / "committee.pt")
        pred = committee_predictions(committee, test)
        f_mae, f_rmse = mae_rmse(pred["forces"] - test.forces)
        e_mae, _ = mae_rmse(pred["energy"] - test.energy)
        result = {"n_frames": len(test), "forces_mae_meV_per_A": f_mae, "forces_rmse_meV_per_A": f_rmse,
                  "energy_mae_meV": e_mae, "spread_mean_eV_per_A": float(pred["forces_std_max"].mean()),
                  "spread_max_eV_per_A": float(pred["forces_std_max"].max())}
        write_json(round_dir(self.out, r) / "test.json", result)
        rec["test"] = result
        self.log(f"round {r}: {rec['n_train']} training labels, held-out force MAE {f_mae:.1f} meV/Å, energy MAE "
                 f"{e_mae:.1f} meV (committee mean); spread on the held-out frames {result['spread_mean_eV_per_A']:.3f}"
                 f" eV/Å (mean forces_std_max)")

    def explore_round(self, r: int, bonds, reference) -> None:
        from ase import Atoms
        from .explore import STOP_UNCERTAIN, STOP_UNSTABLE, ExploreSettings, explore
        rec = self.state.round(r)
        if rec.get("md"):
            return
        cfg = self.cfg
        ids = self.labelled_ids(r)
        picks = np.random.default_rng([cfg.seed, 13, r]).choice(len(ids), size=cfg.md_replicas,
                                                                replace=cfg.md_replicas > len(ids))
        starts = []
        for p in picks:
            lab = self.store.load(ids[int(p)])
            a = Atoms(numbers=lab["numbers"], positions=lab["positions"])
            a.info["frame_id"] = ids[int(p)]
            starts.append(a)
        settings = ExploreSettings(steps=cfg.md_steps, replicas=cfg.md_replicas, temperatures=cfg.md_temperatures,
                                   stride=cfg.md_stride, timestep_fs=cfg.timestep, friction=cfg.friction,
                                   max_std=cfg.md_max_std, bond_threshold=cfg.bond_threshold)
        folder = round_dir(self.out, r) / "md"
        cands, records = explore(round_dir(self.out, r) / "committee.pt", starts, settings, cfg.seed * 100 + r,
                                 bonds, reference, self.log, what=f"round {r} committee MD")
        for k, a in enumerate(cands):
            a.info["frame_id"] = md_frame_id(r, k)
        write_extxyz(folder / "candidates.extxyz", cands)
        self._candidates[r] = cands
        spreads = [a.info["forces_std_max"] for a in cands]
        summary = {"replicas": len(records), "steps": cfg.md_steps, "ps": cfg.md_ps,
                   "full_length": sum(x["stop_reason"] is None for x in records),
                   "stopped_uncertain": sum(x["stop_kind"] == STOP_UNCERTAIN for x in records),
                   "unstable": sum(x["stop_kind"] == STOP_UNSTABLE for x in records),
                   "mean_time_ps": float(np.mean([x["time_ps"] for x in records])),
                   "candidates": len(cands),
                   "spread_max": float(max(spreads)) if spreads else None,
                   "spread_median": float(np.median(spreads)) if spreads else None}
        write_json(folder / "md.json", {"settings": settings.__dict__, "summary": summary, "replicas": records})
        rec["md"] = summary
        self.log(f"round {r} committee MD: {summary['full_length']}/{summary['replicas']} replicas ran "
                 f"{cfg.md_ps:g} ps, {summary['stopped_uncertain']} stopped on spread > {cfg.md_max_std:g} eV/Å, "
                 f"{summary['unstable']} unstable; max spread "
                 + (f"{summary['spread_max']:.3f} eV/Å" if spreads else "n/a"))

    # ------------------------------------------------------------------ between rounds
    def used(self) -> int:
        return len(self.store.ids())

    def decide(self, r: int) -> Optional[str]:
        """Why to stop after round ``r`` (None: go on)."""
        cfg = self.cfg
        md = self.state.round(r)["md"]
        if md["full_length"] == md["replicas"] and md["spread_max"] is not None and md["spread_max"] < cfg.stop_std:
            return (f"converged: every committee MD replica ran {cfg.md_ps:g} ps with a force spread below --stop-std "
                    f"{cfg.stop_std:g} eV/Å (max {md['spread_max']:.3f})")
        if self.used() >= cfg.dft_frames:
            return f"label budget used: {self.used()} of --dft-frames {cfg.dft_frames}"
        return None

    def select_next(self, r: int) -> None:
        """Choose round ``r``'s frames from round ``r - 1``'s committee MD."""
        from .select import farthest_point_sampling, select_random, select_uncertain
        cfg = self.cfg
        t0 = time.perf_counter()
        k = min(cfg.frames_per_round, cfg.dft_frames - self.used())
        cands = [a for a in self.candidates(r - 1) if np.isfinite(a.info["forces_std_max"])]
        spread = [float(a.info["forces_std_max"]) for a in cands]
        if cfg.select == "random":
            idx = select_random(len(cands), k, np.random.default_rng([cfg.seed, 17, r]))
            how = f"at random from round {r - 1}'s committee MD"
        else:          # the largest spreads, no two within PICK_GAP_STRIDES candidate strides of one replica
            idx = select_uncertain(spread, k, [a.info.get("replica", 0) for a in cands],
                                   [a.info.get("step", 0) for a in cands], PICK_GAP_STRIDES * cfg.md_stride)
            how = f"largest committee force spread in round {r - 1}'s committee MD"
        picks = [int(cands[i].info["frame_id"]) for i in idx]
        filled = 0
        if len(picks) < k:                       # too few MD frames: the rest from the pool, for diversity
            taken = set(self.state.data["test_ids"]) | {f for q in range(r) for f in self.state.round(q)["selected"]}
            banned = taken | self.near_held_out(self.state.data["test_ids"])
            rest = [i for i in range(len(self.pool)) if i not in banned]
            more = farthest_point_sampling(self.descriptors(), k - len(picks), candidates=rest,
                                           chosen=[f for f in taken if f < ROUND_ID_BASE])
            picks += more
            filled = len(more)
        rec = self.state.round(r)
        rec.update(selected=picks, criterion=how, filled_from_pool=filled,
                   selected_spread=[spread[i] for i in idx])
        self.state.round_seconds(r, "select", time.perf_counter() - t0)
        self.state.save()
        if picks:
            self.log(f"round {r}: {len(picks)} frames to label, {how}"
                     + (f" (spread {min(rec['selected_spread']):.3f}-{max(rec['selected_spread']):.3f} eV/Å)"
                        if rec["selected_spread"] else "") + (f"; {filled} from the pool" if filled else ""))

    # ------------------------------------------------------------------ the end
    def check_stage(self, r: int) -> None:
        """Labels at the fit's level on ``check_frames`` frames of the final committee's MD, and its errors there."""
        from ..evaluate import mae_rmse
        from ..io import load_potential
        from .training import committee_predictions
        cfg, state = self.cfg, self.state
        done = state.stage("check")
        if cfg.check_frames == 0 or (done.get("done") and done.get("round") == r
                                     and done.get("frames_asked") == cfg.check_frames):
            return
        t0 = time.perf_counter()
        cands = self.candidates(r)
        if not cands:
            state.finish("check", 0.0, round=r, frames_asked=cfg.check_frames, n_frames=0,
                         note="the final committee MD left no stable frame to check")
            return
        from .select import select_random
        pick = select_random(len(cands), cfg.check_frames, np.random.default_rng([cfg.seed, 19]))
        store = LabelStore(self.out / "check" / "labels", self.level, self.store.level_text)
        frames = {int(cands[i].info["frame_id"]): (cands[i].numbers, cands[i].positions) for i in pick}
        store.label(frames, cfg.workers, self.log, what="check labels")
        ids = [fid for fid in frames if not store.failed(fid)]
        if not ids:
            state.finish("check", time.perf_counter() - t0, round=r, frames_asked=cfg.check_frames, n_frames=0,
                         note="every check label failed")
            return
        check = store.conformation_set(ids, "check")
        committee = load_potential(self.out / "committee.pt")
        pred = committee_predictions(committee, check)
        f_mae, f_rmse = mae_rmse(pred["forces"] - check.forces)
        result = {"round": r, "n_frames": len(ids), "level_of_theory": store.level_text,
                  "forces_mae_meV_per_A": f_mae, "forces_rmse_meV_per_A": f_rmse,
                  "spread_mean_eV_per_A": float(pred["forces_std_max"].mean()), "frame_ids": ids}
        write_json(self.out / "check" / "check.json", result)
        from ..evaluate import parity_plot
        parity_plot(pred, check, self.out / "check" / "parity.png",
                    title=f"final committee vs {store.level_text} along its own MD")
        state.finish("check", time.perf_counter() - t0, frames_asked=cfg.check_frames, **result)
        self.log(f"check: force MAE {f_mae:.1f} meV/Å on {len(ids)} frames of the final committee's own MD "
                 f"({store.level_text})")


def run_fit(settings: Dict[str, Any], out, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or continue) ``oreo fit`` in ``out`` with ``settings`` (FitConfig fields; None = not given, the stored or
    default value is used). Returns the manifest."""
    t_start = time.perf_counter()
    state, cfg = FitState.open(out, settings)
    run = _Run(state, cfg, log)
    run.level.require()
    if not state.done("pool"):          # the pool is sampled with GFN2-xTB whatever the labels are
        Level("xtb").require()
    level_text = state.data.setdefault("level_of_theory", run.level.describe())
    run.store = LabelStore(state.out / "labels", run.level, level_text)
    log(f"oreo fit {cfg.system_name} in {state.out} ({'continuing' if state.resumed else 'new run'}): labels "
        f"{level_text}, budget {cfg.dft_frames} labels ({run.used()} used), committee of {cfg.committee}, "
        f"selection: {cfg.select}")
    run.conformer_stage()
    run.pool_stage()
    if "backbone" not in state.data:
        from .training import resolve_backbone
        _, name = resolve_backbone(cfg.backbone, sorted(set(run.numbers.tolist())), log)
        state.data["backbone"] = name
        state.data["descriptor"] = (f"the mean-pooled per-atom features of the backbone {name}" if name != "scratch"
                                    else "inverse distances sorted within each element pair")
    if state.data["backbone"] != "scratch":
        from ..pretrain.finetune import load_pretrained
        run.backbone, _ = load_pretrained(state.data["backbone"])
    run.split_stage()
    bonds, reference = run.bond_reference()
    r = 0
    while True:
        rec = state.round(r)
        if not rec.get("selected"):
            raise RuntimeError(f"round {r} has no frames to label: the manifest {state.out / 'fit.json'} is "
                               f"inconsistent; use a new --out")
        run.timed(r, "label", run.label_round, r)
        run.timed(r, "train", run.train_round, r)
        run.timed(r, "evaluate", run.evaluate_round, r)
        run.timed(r, "explore", run.explore_round, r, bonds, reference)
        if state.n_rounds > r + 1 and state.round(r + 1).get("selected"):
            r += 1
            continue
        reason = run.decide(r)
        if reason is None:
            run.select_next(r + 1)
            if not state.round(r + 1)["selected"]:
                reason = "no frame left to label (no committee MD frame and no unlabelled pool frame)"
                state.data["rounds"].pop()
        if reason is not None:
            state.data["stop_reason"] = reason
            state.data["final_round"] = r
            state.save()
            log(f"stop after round {r}: {reason}")
            break
        r += 1
    atomic_write(state.out / "committee.pt", lambda tmp: shutil.copyfile(round_dir(state.out, r) / "committee.pt",
                                                                        tmp))
    run.check_stage(r)
    state.data["labels_used"] = run.used()
    state.data.setdefault("invocations", []).append(round(time.perf_counter() - t_start, 2))
    state.save()
    from .report import write_report
    path = write_report(state.out, state.data)
    log(f"wrote {state.out / 'committee.pt'} (a committee of {cfg.committee}; OreoCalculator gives forces_std_max) "
        f"and the report {path}")
    return state.data
