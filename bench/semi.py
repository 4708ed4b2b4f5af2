"""What semi-supervision buys: arms of the label-fraction experiment against their control.

A synthetic cohort (default 120 patients) is ingested once; `bonescan tune` then trains the
demo-size model at each label share once per arm and training seed. An arm is a supervised
term, a semi-supervised method and its weight, written ``supervised/semi/weight``; the first
arm is the baseline every other is compared with, paired by seed (by default supervised-only
training: the same model, labeled scans, augmentation and epochs, the unlabeled scans unused).
Each trial keeps its checkpoint by validation DSC; the test split is scored once per trial, on
that kept model, and nothing is tuned on it.

Prints one row per label share and arm: test DSC (per-image mean over lesion-bearing test
scans) and lesion sensitivity, mean ± std over seeds, the ratio to the baseline arm, the
paired difference per seed, and the paired comparison the platform's sweeps report
(``bonescan_model.paired``: 95 % t interval, bootstrap over seeds and test images, p, the
seeds 80 % power at 0.03 needs, and the verdict by the rule in docs/design.md).

    python bench/semi.py [--patients 120 | --data SHARDS] [--epochs 16 | --max-steps N] [--seeds 3]
                         [--first-seed 0] [--fractions 0.15,0.62 | --labeled-scans 6,40]
                         [--val-fraction F] [--arms A,B,...] [--name experiment] [--out DIR]

``--data SHARDS``: any ingested shard folder as the cohort (another generator's, a clinic's)
instead of the synthetic one. ``--labeled-scans``: label budgets as counts (a few labeled
scans beside a large unlabeled pool), the labeled patients redrawn per seed. ``--max-steps``:
the same optimizer steps for every trial. The base is configs/demo.yaml, so batches are two
streams (2 labeled + 2 unlabeled scans a step; the supervised-only arm draws the labeled
stream alone). Both arms are scored by their student's weights: the mean teacher's EMA
teacher is not what is evaluated, so weight averaging is credited to neither arm.

``--test-patients N`` (or ``--test-data SHARDS``): a separate test cohort, made with another
seed of the generator (1) and ingested beside the experiment; every trial's kept model is
scored once on all of its labeled scans after the sweep, and the paired comparison is made on
it (the cohort's own test split is printed beside it).

The decision setting (issue 27; about 75 minutes on 2 CPU cores): ::

    bonescan synth --patients 300 --out OUT/cohort --seed 0
    bonescan ingest --dicom OUT/cohort/dicom --labels OUT/cohort/labels --out OUT/shards
    python bench/semi.py --data OUT/shards --labeled-scans 6,45 --max-steps 300 --seeds 6 \
        --val-fraction 0.4 --test-patients 225 --arms dice_ce/chan_vese/0,dice_ce/mean_teacher/1 \
        --name final --out OUT

6 and 45 labeled scans of 126 training scans (45 is about the paper's 37 % of the scans a run
trains on), validation 84 scans (about 65 lesion-bearing, what chooses each kept checkpoint),
a separate test cohort of 225 patients (about 150 lesion-bearing labeled scans).

On a GPU: ``--patients 1000 --max-steps 3000 --seeds 20 --test-patients 600`` (20 paired seeds
give 80 % power at +0.03 for the paired SD of ~0.045 seen so far).

The default arms (issue 12): supervised only (area-normalized Eq. 8), the paper's loss as
written (Eq. 7 + Eq. 8), the paper's loss as fixed (Eq. 7 on local contrast + area-normalized
Eq. 8) and the mean teacher (with the area-normalized Eq. 8). To compare supervised terms:
``--arms dice_ce/chan_vese/1,active_contour_normalized/chan_vese/1,active_contour/chan_vese/1``.

label_fraction is the share of original training scans; the paper counts its L_label over
all scans (train and test): the table prints both (budget.json of each run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARMS = ("active_contour_normalized/chan_vese/0,active_contour/chan_vese/1,"
        "active_contour_normalized/chan_vese_local/1,active_contour_normalized/mean_teacher/1")
# Eq. 7 on local contrast is priced in its own units (loss.SemiSupervisedLoss): nu 0.015,
# measured by bench/chan_vese_optimum.py on crops of another cohort seed, not on this test split.
LOCAL_NU = 0.015


def arm_case(arm: str) -> dict:
    """``supervised/semi/weight`` -> a case of the space (its overrides, named by the arm)."""
    supervised, semi, weight = arm.split("/")
    case = {"name": arm, "supervised": supervised, "semi": semi, "unsupervised_weight": float(weight)}
    if semi == "chan_vese_local":
        case["nu"] = LOCAL_NU
    return case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--data", help="an ingested shard folder to use as the cohort (default: a synthetic one)")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="training seeds first-seed .. first-seed + seeds - 1 (more seeds into the same --out)")
    parser.add_argument("--fractions", default="0.15,0.62")
    parser.add_argument("--labeled-scans", help="label budgets as counts of labeled scans (e.g. 6,40), in place "
                                                "of --fractions; the labeled patients are redrawn per seed")
    parser.add_argument("--max-steps", type=int, help="an equal step budget for every trial, in place of --epochs")
    parser.add_argument("--val-fraction", type=float, default=None, help="validation patients' share (default: the config's)")
    parser.add_argument("--test-runs", type=int, default=1)
    parser.add_argument("--arms", default=ARMS, help="supervised/semi/weight, comma-separated; the first is the baseline")
    parser.add_argument("--name", default="experiment",
                        help="the experiment folder under --out; --summarize reads every folder whose name starts with it")
    parser.add_argument("--out", default="/tmp/bonescan-bench-label-fraction")
    parser.add_argument("--test-patients", type=int, default=0,
                        help="also score every trial's kept model once on a separate synthetic cohort of this many "
                             "patients (generator seed 1; every labeled scan of it, both splits), the decision's test set")
    parser.add_argument("--test-data", help="a separate ingested shard folder as that test set, instead")
    parser.add_argument("--summarize", action="store_true",
                        help="print the table of the trials finished so far, train nothing")
    args = parser.parse_args()
    if args.summarize:
        return summarize(Path(args.out), args)
    print(describe())
    from bonescan_model.synth import write_cohort
    from bonescan_platform import ingest, tune
    from bonescan_platform.cluster import ray_session

    out = Path(args.out)
    data = Path(args.data).resolve() if args.data else out / "shards"
    out.mkdir(parents=True, exist_ok=True)
    # The experiment's own site secret, beside (not inside) its shards: a rerun into the same
    # --out keys the patients, and so draws the splits, as the first run did.
    os.environ.setdefault("BONESCAN_SECRET_FILE", str(out / "deid_secret"))
    started = time.perf_counter()
    with ray_session():
        if not args.data and not (data / "_manifest.json").is_file():
            write_cohort(out / "cohort", args.patients, seed=0)
            ingest.ingest(str(out / "cohort" / "dicom"), str(data), str(out / "cohort" / "labels"))
        base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
        # Each experiment's own base: a later one with other seeds leaves an earlier one resumable.
        budget = {"max_steps": args.max_steps} if args.max_steps else {"epochs": args.epochs}
        (out / f"{args.name}.base.yaml").write_text(yaml.safe_dump(
            {**base, **budget, "test_runs": args.test_runs, "seed": args.first_seed,
             **({"val_fraction": args.val_fraction} if args.val_fraction else {})}))
        labels = ({"labeled_scans": {"grid": [int(n) for n in args.labeled_scans.split(",")]}} if args.labeled_scans
                  else {"label_fraction": {"grid": [float(f) for f in args.fractions.split(",")]}})
        space = {"base": f"{args.name}.base.yaml", "fixed": {"dataset": "D1"},
                 "parameters": {**labels, "arm": {"grid": [arm_case(a) for a in args.arms.split(",")]}},
                 "num_samples": args.seeds, "metric": "val_dsc", "mode": "max"}
        exp = out / args.name
        space_file = out / f"{args.name}.space.yaml"
        space_file.write_text(yaml.safe_dump(space))
        from bonescan_platform.runs import Experiment

        resume = Experiment.is_experiment(exp)
        tune.sweep(str(data), str(space_file), str(exp), resume=resume)
        if args.test_patients and not args.test_data and not (out / "external" / "_manifest.json").is_file():
            write_cohort(out / "external-cohort", args.test_patients, seed=1)
            ingest.ingest(str(out / "external-cohort" / "dicom"), str(out / "external"),
                          str(out / "external-cohort" / "labels"))
    print(f"({time.perf_counter() - started:.0f} s)")
    return summarize(out, args)


def ratio(value: float, baseline: float) -> str:
    """value / baseline, or why there is none: a baseline that found nothing (DSC < 0.01) has
    no meaningful ratio, the paired difference says it all."""
    return f"{value / baseline:.2f}x" if baseline >= 0.01 else "n/a (baseline ~0)"


def external_tests(out: Path, args, runs: list[Path]) -> dict[Path, Path]:
    """Each trial's kept model scored once on the separate test cohort (``--test-patients`` /
    ``--test-data``): every labeled original scan of it, both of its splits, the run-0 protocol
    of ``evaluate``. Each score is a test.json in a folder of its own beside the experiment
    (``<name>.external/<trial>/``), which ``comparisons.per_image`` reads as it reads a run's;
    a trial is scored again only when its model is newer. {} when there is no such cohort."""
    from bonescan_platform import scoring, stream
    from bonescan_platform.runs import Run

    data = Path(args.test_data) if args.test_data else out / "external"
    if not (args.test_data or args.test_patients) or not (data / "_manifest.json").is_file():
        return {}
    crops, scored = None, {}
    for run in runs:
        if not run.test_score:
            continue
        # A folder holding only the kept model's score on the separate cohort (a Run's test score).
        external = Run(out / f"{args.name}.external" / run.name)
        if not external.any_test_score or external.any_test_score.get("model_mtime") != run.model_path.stat().st_mtime:
            crops = stream.crops(data, None) if crops is None else crops
            trained = run.kept_model()
            body = scoring.score_runs(trained.model, crops, 1, trained.threshold, label=run.name,
                                      split="separate cohort, all labeled scans")
            external.root.mkdir(parents=True, exist_ok=True)
            external.write_test_score({"split": f"all labeled scans of {data}", **body,
                                       "model_mtime": run.model_path.stat().st_mtime})
        scored[run.name] = external
    return scored


def summarize(out: Path, args) -> int:
    """The table, from the run folders of every experiment under ``out`` whose trials have
    their test score (test.json): a sweep cut short still shows what it measured. With a
    separate test cohort, the paired comparison is made on it (the decision's test set); the
    cohort's own test split is printed beside it."""

    from bonescan_model.paired import compare
    from bonescan_platform.comparisons import per_image
    from bonescan_platform.runs import Experiment

    runs = [run for exp in sorted(out.glob(f"{args.name}*")) if Experiment.is_experiment(exp)
            for run in Experiment.open(exp).trial_runs() if run.any_test_score]
    external = external_tests(out, args, runs)
    rows = []
    for run in runs:
        tested, budget, cfg = run.any_test_score, run.budget, run.config
        ext = external[run.name].any_test_score if run.name in external else None
        rows.append({"label_fraction": cfg.labeled_scans if cfg.labeled_scans is not None else cfg.label_fraction,
                     "seed": cfg.seed, "arm": f"{cfg.supervised}/{cfg.semi}/{cfg.unsupervised_weight:g}",
                     # the kept checkpoint's validation DSC: what chooses between arms (a weight)
                     "val_dsc": max(float(r["val_dsc"]) for r in run.history),
                     "dsc": tested.get("dsc", float("nan")),
                     "ext_dsc": ext["dsc"] if ext else float("nan"),
                     # the scores the paired comparison is made on: the separate cohort's where there is one
                     "scored": external.get(run.name, run), "decision_dsc": ext["dsc"] if ext else tested.get("dsc", float("nan")),
                     "lesion_sensitivity": (ext or tested).get("lesion_sensitivity", float("nan")),
                     "labeled_scans": budget["labeled_scans"], "labeled_share_of_all": budget["labeled_share_of_all"]})
    first = args.arms.split(",")[0].split("/")
    baseline = f"{first[0]}/{first[1]}/{float(first[2]):g}"
    cohort = f"cohort {args.data}" if args.data else f"{args.patients} synthetic patients"
    length = f"{args.max_steps} steps" if args.max_steps else f"{args.epochs} epochs"
    ext_images = next((f.any_test_score for f in external.values()), None)
    decided_on = (f"the separate test cohort ({ext_images['lesion_images']} lesion-bearing of {ext_images['images']} "
                  f"labeled scans)" if ext_images else "the cohort's test split")
    print(f"\n{cohort}, demo model, {length}, D1 + on-the-fly augmentation, "
          f"seeds {sorted({r['seed'] for r in rows})}; kept by val DSC; each test set scored once per trial; "
          f"{len(rows)} trials with a test score. Arm = supervised term / semi method / its weight; baseline {baseline}; "
          f"paired comparison on {decided_on}")
    print("label budget: share of training scans or a count (share of all scans) | labeled scans | arm | val DSC of the kept checkpoint "
          "(mean ± std) | test DSC, cohort's test split (mean ± std, n) | test DSC, separate cohort (mean ± std) "
          "| ratio to baseline | paired difference to baseline (per seed) "
          "| lesion sensitivity | paired comparison (95 % CI t; bootstrap; p; seeds for 80 % power at 0.03): verdict")
    order = list(dict.fromkeys(r["arm"] for r in rows))  # arms in the order they were found
    for fraction in sorted({r["label_fraction"] for r in rows}):
        here = [r for r in rows if r["label_fraction"] == fraction]
        share_all = np.mean([r["labeled_share_of_all"] for r in here])
        labeled = np.mean([r["labeled_scans"] for r in here])
        base_rows = {r["seed"]: r for r in here if r["arm"] == baseline}
        base = {seed: r["decision_dsc"] for seed, r in base_rows.items()}
        base_mean = float(np.mean(list(base.values()))) if base else float("nan")
        for arm in sorted({r["arm"] for r in here}, key=lambda a: (a != baseline, order.index(a))):
            mine = sorted((r for r in here if r["arm"] == arm), key=lambda r: r["seed"])
            decision = [r["decision_dsc"] for r in mine]
            dsc, ext = [r["dsc"] for r in mine], [r["ext_dsc"] for r in mine]
            val = [r["val_dsc"] for r in mine]
            sens = np.mean([r["lesion_sensitivity"] for r in mine])
            paired = [r["decision_dsc"] - base[r["seed"]] for r in mine if r["seed"] in base]
            diff = (f"{np.mean(paired):+.3f} ({', '.join(f'{d:+.3f}' for d in paired)})"
                    if paired and arm != baseline else "-")
            verdict = "-"
            if paired and arm != baseline:
                pairs = [(r, base_rows[r["seed"]]) for r in mine if r["seed"] in base_rows]
                images = [(per_image(a["scored"]), per_image(c["scored"])) for a, c in pairs]
                ok = all(a is not None and c is not None and len(a) == len(c) for a, c in images)
                c = compare([a["decision_dsc"] for a, _ in pairs], [b["decision_dsc"] for _, b in pairs],
                            [a for a, _ in images] if ok else None, [b for _, b in images] if ok else None)
                verdict = (f"{c.ci95_low:+.3f} to {c.ci95_high:+.3f}; {c.boot95_low:+.3f} to {c.boot95_high:+.3f}; "
                           f"p {c.p_value:.2f}; {c.seeds_for_power}: {c.verdict}")
            budget = f"{fraction} scans" if isinstance(fraction, int) else f"{fraction:.2f}"
            print(f"{budget} ({share_all:.0%}) | {labeled:.0f} | {arm} | "
                  f"{np.mean(val):.3f} ± {np.std(val):.3f} | {np.mean(dsc):.3f} ± {np.std(dsc):.3f} "
                  f"(n={len(dsc)}) | {np.mean(ext):.3f} ± {np.std(ext):.3f} | "
                  f"{ratio(float(np.mean(decision)), base_mean)} | {diff} | {sens:.2f} | {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
