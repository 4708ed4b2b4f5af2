"""`bonescan demo`: the whole platform on the built-in synthetic cohort, on one machine.

synth -> ingest -> train (configs/demo.yaml; the kept model chosen on the validation patients and
scored once on the test split) -> the same test split against a count threshold tuned on the
validation patients -> predict on one test scan -> report (one HTML page). One local Ray
instance serves every step.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bonescan_model.baseline import ThresholdModel, fit_threshold
from bonescan_model.errors import InputError
from bonescan_model.synth import write_cohort
from bonescan_platform import ingest, predict, report, scoring, shards, stream, train
from bonescan_platform.cluster import ray_session
from bonescan_platform.runs import Run

PATIENTS = 40
MIN_PATIENTS = 6
STEPS = 6
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo(out: str = "bonescan-demo", patients: int | None = None, config: str | Path | None = None) -> int:
    out_dir = Path(out).resolve()
    patients = PATIENTS if patients is None else patients
    config = CONFIG if config is None else config
    if patients < MIN_PATIENTS:
        raise InputError(out_dir, f"--patients must be at least {MIN_PATIENTS} (to fill a training and a test split)")
    if not Path(config).is_file():
        raise InputError(config, "demo config not found (bonescan demo runs from a source checkout)")
    started = time.perf_counter()
    with ray_session():
        _step(1, f"synthesizing {patients} patients (DICOM, three readers' LabelMe labels, exact masks)")
        write_cohort(out_dir / "cohort", patients, seed=0)
        _step(2, "ingesting: read, de-identify, crop the thorax, readers' agreement, Parquet shards")
        data = out_dir / "shards"
        ingest.ingest(str(out_dir / "cohort" / "dicom"), str(data), str(out_dir / "cohort" / "labels"))
        _step(3, f"training on Ray Train ({Path(config).name})")
        train.train(str(data), str(config), str(out_dir / "run"))
        run = Run.open(out_dir / "run")
        _step(4, "the test split, scored once: the kept model against a count threshold tuned on validation")
        model_result = run.test_score  # the run's end scored its kept model, once
        baseline_result = _evaluate_baseline(data, run)
        _step(5, "predicting one test scan: whole-body mask, LabelMe contours, overlay")
        scan = _one_test_scan(out_dir, data)
        predict.predict(str(run.root), str(scan), str(out_dir / "predictions"))
    summary = {"split": "test", "model": model_result, "count_threshold_baseline": baseline_result}
    (out_dir / "demo_metrics.json").write_text(json.dumps(summary, indent=2))
    _step(6, "reporting: training curves, scores, test scans with labels and predictions")
    report.report(str(run.root), str(out_dir / "report.html"))
    print(f"\nbonescan demo finished in {time.perf_counter() - started:.0f} s")
    scoring.print_summary(model_result, "trained model       ")
    scoring.print_summary(baseline_result, f"count threshold {baseline_result['tau']:.2f}")
    beaten = model_result["dsc"] > baseline_result["dsc"]
    print(f"the model {'beats' if beaten else 'does NOT beat'} the count-threshold baseline on DSC")
    for label, path in [("cohort", out_dir / "cohort"), ("shards", data), ("run (model, history)", run.root),
                        ("metrics", out_dir / "demo_metrics.json"), ("predictions", out_dir / "predictions"),
                        ("report (open in a browser)", out_dir / "report.html")]:
        print(f"  {label:<28} {path}")
    return 0


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/{STEPS}] {text}", flush=True)


def _evaluate_baseline(data: Path, run: Run) -> dict:
    """The count threshold, tuned on the run's validation patients (as the model's checkpoint
    was chosen), scored like the model on the test split."""
    val = stream.crops(data, "train", only=list(run.splits.val))
    tau = fit_threshold(stream.batches(val, scoring.BATCH))
    result = scoring.score_runs(ThresholdModel(tau), stream.crops(data, "test"), runs=run.config.test_runs,
                                label="evaluate threshold")
    return {"split": "test", **result, "tau": tau, "tuned_on": "val"}


def _one_test_scan(out_dir: Path, data: Path) -> Path:
    """A folder holding the DICOM file(s) of one test scan, a labeled one if there is one (its
    overlay can be set beside the readers' outlines), found through the ingest report (a
    two-file series must travel together, or predict would see one view)."""
    scans = [e for e in shards.read_manifest(data)["report"]["scans"] if e["split"] == "test"]
    candidates = sorted(scans, key=lambda e: not e["labeled"])
    if not candidates:
        raise InputError(data, "no test scan to predict on")
    folder = out_dir / "predict_input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for file in candidates[0]["files"]:
        shutil.copy(file, folder)
    return folder
