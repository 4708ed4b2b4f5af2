"""`bonescan nnunet`: the real nnU-Net v2 (Isensee et al. 2021) as a supervised baseline, trained
and scored in bonescan's harness.

nnU-Net plans, preprocesses, trains and predicts with its own code (``nnunetv2``, the
``[nnunet]`` extra); bonescan only hands it the data and scores what it predicts:

1. export: the labeled original training scans of the run's label budget and the run's
   validation patients to nnU-Net's raw format (2D PNGs, ``dataset.json``), with the split
   as nnU-Net's fold 0 (``splits_final.json``: validation chooses nnU-Net's best checkpoint,
   as it chooses bonescan's); the test split as ``imagesTs`` without labels;
2. in one Ray task (a GPU where asked for, else CPUs): nnU-Net's fingerprint, plan and
   preprocess, then its trainer for a set length (``BudgetTrainer``: nnU-Net's own trainer
   with epochs and iterations per epoch set, its default being 1,000 epochs of 250), then its
   predictor on the test scans, from the checkpoint nnU-Net kept as best on validation;
3. the test predictions scored once with bonescan's metrics into ``RUN/test.json`` (the body
   of ``bonescan evaluate --json``; run 0 only: nnU-Net's prediction of the scans as they are).

The run folder holds, besides ``test.json``: ``nnunet.json`` (what was trained: budget, epochs,
iterations, views, device), ``splits.json`` / ``budget.json`` (as every run), and nnU-Net's
own folders ``nnUNet_raw/``, ``nnUNet_preprocessed/`` (plans) and ``nnUNet_results/`` (the
training log, progress plot and checkpoints). It is built in a stage beside RUN and moved into
place when complete, so a failed or stopped job leaves no half-written RUN.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bonescan_model import engine, metrics
from bonescan_model.errors import InputError
from bonescan_model.preprocess import aggregate_views
from bonescan_platform import shards, splits
from bonescan_platform.cluster import ray_session
from bonescan_platform.config import TrainConfig
from bonescan_platform.evaluate import HEADLINE, TEST_FILE

INSTALL_HINT = "the nnU-Net extra is not installed: pip install -e '.[nnunet]'"
DATASET_ID, DATASET_NAME = 501, "Dataset501_BoneScan"
CONFIGURATION = "2d"
VIEWS = ("both", "aggregated")
COLUMNS = ["patient_key", "scan_key", "ant", "post", "mask", "source", "split"]


def nnunet(data: str, out: str, *, label_fraction: float | None = None, labeled_scans: int | None = None,
           epochs: int = 50, iterations: int = 250, views: str = "both", gpus: bool = False, seed: int = 0,
           val_fraction: float = 0.15, val_seed: int = 0) -> int:
    """Train nnU-Net on the label budget's scans of ``data`` and score it on the test split."""
    if importlib.util.find_spec("nnunetv2") is None:
        raise InputError("nnunetv2", INSTALL_HINT)
    run = Path(out).resolve()
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise InputError(run, "exists and is not an empty folder: give a new folder for the nnU-Net run")
    if epochs < 1 or iterations < 1:
        raise InputError(out, "--epochs and --iterations must be at least 1")
    if views not in VIEWS:
        raise InputError(out, f"--views must be one of {', '.join(VIEWS)}, got {views!r}")
    shards.read_manifest(data)
    cfg = TrainConfig(label_fraction=1.0 if label_fraction is None else label_fraction, labeled_scans=labeled_scans,
                      seed=seed, val_fraction=val_fraction, val_seed=val_seed, dataset="D1")
    selection = splits.for_config(data, cfg)
    if selection.budget["labeled_scans"] == 0:
        raise InputError(data, "the label budget selects no labeled scan, and nnU-Net trains on labeled scans only: "
                               "raise --label-fraction or --labeled-scans")
    run.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{run.name}.partial-", dir=run.parent))
    try:
        selection.save(stage)
        truth = export(data, stage, selection, views)
        record = {"data": str(data), "epochs": epochs, "iterations_per_epoch": iterations, "views": views,
                  "configuration": CONFIGURATION, "gpus": gpus, "trainer": "BudgetTrainer (nnUNetTrainer)",
                  "labeled_scans": selection.budget["labeled_scans"], "train_cases": truth["train_cases"],
                  "val_cases": truth["val_cases"], "test_cases": len(truth["test"])}
        (stage / "nnunet.json").write_text(json.dumps(record, indent=2))
        _run_in_ray(stage, epochs, iterations, gpus)
        tested = score(stage, truth["test"], selection.budget["labeled_scans"], epochs)
        (stage / TEST_FILE).write_text(json.dumps(tested, indent=2))
        if run.exists():
            run.rmdir()  # empty: checked above
        os.replace(stage, run)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"nnU-Net: {epochs} epochs of {iterations} iterations on {selection.budget['labeled_scans']} labeled "
          f"scans; kept by validation; test split DSC {tested['dsc']:.3f} (CPA {tested['cpa']:.3f}, recall "
          f"{tested['recall']:.3f}) on {tested['images']} scans; run: {run}, test: {run / TEST_FILE}")
    return 0


# ---------------------------------------------------------------- export to nnU-Net's raw format
def export(data: str, stage: Path, selection, views: str) -> dict:
    """The raw dataset under ``stage/nnUNet_raw``; returns the test truths by case and counts."""
    from skimage import io

    raw = stage / "nnUNet_raw" / DATASET_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True)
    labeled, val = set(selection.labeled), set(selection.splits.val)
    table = shards.read_table(shards.shard_paths(data), COLUMNS).sort_by("scan_key")
    train_cases, val_cases, test = [], [], {}
    for row in table.to_pylist():
        if row["source"] not in splits.ORIGINAL_SOURCES or row["mask"] is None:
            continue  # nnU-Net is supervised: only original scans with a mask
        split = row["split"]
        if split == "train" and row["patient_key"] not in labeled | val:
            continue
        case = f"scan_{row['scan_key'][:16]}"  # a keyed hash: no patient identifier reaches nnU-Net
        ant, post, mask = shards.row_images(row)
        post = ant if post is None else post  # a one-view scan repeats its view, as model_input does
        channels = [ant, post] if views == "both" else [_aggregated(ant, post)]
        folder = "imagesTs" if split == "test" else "imagesTr"
        for c, image in enumerate(channels):
            io.imsave(raw / folder / f"{case}_{c:04d}.png", image, check_contrast=False)
        if split == "test":
            test[case] = mask.astype(bool)
        else:
            io.imsave(raw / "labelsTr" / f"{case}.png", mask.astype(np.uint8), check_contrast=False)
            (val_cases if row["patient_key"] in val else train_cases).append(case)
    if not val_cases:
        raise InputError(data, "no validation scan with a mask to choose nnU-Net's checkpoint on")
    channel_names = {"0": "ANT", "1": "POST (mirrored)"} if views == "both" else {"0": "ANT + mirrored POST"}
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": channel_names, "labels": {"background": 0, "lesion": 1},
        "numTraining": len(train_cases) + len(val_cases), "file_ending": ".png",
        "name": "bonescan thoracic crops",
    }, indent=2))
    # nnU-Net's fold 0 is bonescan's split: validation chooses its best checkpoint.
    (stage / "splits_final.json").write_text(json.dumps([{"train": train_cases, "val": val_cases}], indent=1))
    return {"test": test, "train_cases": len(train_cases), "val_cases": len(val_cases)}


def _aggregated(ant: np.ndarray, post: np.ndarray) -> np.ndarray:
    """Eq. 4 on counts, kept in uint16 (halved: the sum of two uint16 views may not fit)."""
    return (aggregate_views(ant, post) / 2).round().astype(np.uint16)


# ---------------------------------------------------------------- nnU-Net, in a Ray task
def _run_in_ray(stage: Path, epochs: int, iterations: int, gpus: bool) -> None:
    import ray

    env = {"nnUNet_raw": str(stage / "nnUNet_raw"), "nnUNet_preprocessed": str(stage / "nnUNet_preprocessed"),
           "nnUNet_results": str(stage / "nnUNet_results"), "nnUNet_compile": "f"}
    with ray_session():
        task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=0,
                          runtime_env={"env_vars": env})(_plan_train_predict)
        ray.get(task.remote(str(stage), epochs, iterations, gpus))


def _plan_train_predict(stage: str, epochs: int, iterations: int, gpus: bool) -> None:
    from bonescan_platform import nnunet_task  # imports nnunetv2, which reads its folders from the environment

    nnunet_task.plan_train_predict(Path(stage), epochs, iterations, gpus)


# ---------------------------------------------------------------- scoring, with bonescan's metrics
def score(stage: Path, truth: dict[str, np.ndarray], labeled_scans: int, epochs: int) -> dict:
    """nnU-Net's test predictions (``stage/predictions/<case>.png``) against the truth -> the
    body of ``evaluate --json`` (run 0 only), named as the test split's."""
    from skimage import io

    cases = sorted(truth)
    pred = np.stack([io.imread(stage / "predictions" / f"{case}.png") > 0 for case in cases])  # (N, H, W) bool
    true = np.stack([truth[case] for case in cases])
    summary = metrics.summarize(engine.score_masks(pred, true))
    return {"split": "test", **{k: summary[k] for k in HEADLINE}, "images": summary["images"],
            "lesion_images": summary["lesion_images"], "runs": [{"run": 0, **summary}],
            "model": "nnU-Net v2", "epochs": epochs, "labeled_scans": labeled_scans,
            "protocol": "run 0 only: nnU-Net's prediction of the test scans as they are"}
