"""The real nnU-Net v2 (Isensee et al. 2021) as a supervised baseline, trained and scored in
bonescan's harness: what `bonescan nnunet` runs, and what a sweep's ``trainer: nnunet`` trial runs.

nnU-Net plans, preprocesses, trains and predicts with its own code (``nnunetv2``, the
``[nnunet]`` extra); bonescan only hands it the data and scores what it predicts:

1. export: the labeled original training scans of the run's label budget and the run's
   validation patients to nnU-Net's raw format (2D PNGs, ``dataset.json``), with the split
   as nnU-Net's fold 0 (``splits_final.json``: validation chooses nnU-Net's best checkpoint,
   as it chooses bonescan's); the test split as ``imagesTs`` without labels;
2. in one Ray task (a GPU where asked for, else CPUs): nnU-Net's fingerprint, plan and
   preprocess, then its trainer for a set length (``BudgetTrainer``: nnU-Net's own trainer
   with epochs and iterations per epoch set, its default being 1,000 epochs of 250), then its
   predictor on the test scans, from the checkpoint nnU-Net kept as best on validation
   (``nnunet_task``);
3. the test predictions scored once with bonescan's metrics into the run's test score (the
   body of ``bonescan evaluate --json``; run 0 only: nnU-Net's prediction of the scans as they are).

The run folder (``runs.Run``) holds, besides its test score: ``nnunet.json`` (what was trained:
budget, epochs, iterations, views, device), its splits and budget (as every run), and
nnU-Net's own folders ``nnUNet_raw/``, ``nnUNet_preprocessed/`` (plans) and ``nnUNet_results/``
(the training log, progress plot and checkpoints).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from bonescan_model import engine, metrics
from bonescan_model.errors import InputError
from bonescan_model.preprocess import aggregate_views
from bonescan_platform import shards, splits
from bonescan_model.train_config import NNUNET_VIEWS, NnunetConfig
from bonescan_platform.cluster import ray_session
from bonescan_platform.runs import Run
from bonescan_platform.scoring import HEADLINE, runs_body

INSTALL_HINT = "the nnU-Net extra is not installed: pip install -e '.[nnunet]'"
DATASET_ID, DATASET_NAME = 501, "Dataset501_BoneScan"
CONFIGURATION = "2d"
VIEWS = NNUNET_VIEWS  # the channels nnU-Net is given: both views, or their sum (the paper's D2_Agg)
# What a run's nnU-Net pipeline writes into its folder, besides the files every run has.
PRODUCTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "predictions", "predictions_val")
COLUMNS = ["patient_key", "scan_key", "ant", "post", "mask", "source", "split"]


def check_installed() -> None:
    if importlib.util.find_spec("nnunetv2") is None:
        raise InputError("nnunetv2", INSTALL_HINT)


def selection_for(data: str, cfg: NnunetConfig) -> splits.Selection:
    """The run's splits and label budget, drawn as a bonescan run with the same keys draws them
    (``splits.select``); its training: ``epochs`` of ``iterations`` (nnU-Net's own batches)."""
    selection = splits.select(data, val_fraction=cfg.val_fraction, val_seed=cfg.val_seed, seed=cfg.seed,
                              label_fraction=cfg.label_fraction, labeled_scans=cfg.labeled_scans, dataset=cfg.dataset)
    selection.budget.update({"samples_per_scan": 1, "training_samples": selection.budget["training_rows"],
                             "labeled_samples": selection.budget["labeled_rows"], "batching": "nnunet",
                             "planned_epochs": cfg.epochs, "planned_steps_per_epoch": cfg.iterations,
                             "planned_steps": cfg.epochs * cfg.iterations})
    return selection


def train_and_score(run: Run, gpus: bool = False) -> dict:
    """nnU-Net trained on ``run``'s data and config and scored in its folder: splits, budget,
    nnunet.json, nnU-Net's folders, the history (one row per nnU-Net epoch; val_dsc, bonescan's
    DSC on the validation patients, on the last row, for the kept model) and the test score,
    which it returns."""
    data, cfg, folder = run.record.data, run.config, run.root
    selection = selection_for(data, cfg)
    if selection.budget["labeled_scans"] == 0:
        raise InputError(data, "the label budget selects no labeled scan, and nnU-Net trains on labeled scans only: "
                               "raise --label-fraction or --labeled-scans")
    run.save_selection(selection)
    for product in PRODUCTS:  # a trial started again: what its first attempt wrote here
        shutil.rmtree(folder / product, ignore_errors=True)
    views = cfg.views
    truth = export_dataset(data, folder, selection, views)
    record = {"data": str(data), "epochs": cfg.epochs, "iterations_per_epoch": cfg.iterations,
              "views": views, "configuration": CONFIGURATION, "gpus": gpus, "trainer": "BudgetTrainer (nnUNetTrainer)",
              "labeled_scans": selection.budget["labeled_scans"], "train_cases": truth["train_cases"],
              "val_cases": len(truth["val"]), "test_cases": len(truth["test"])}
    (folder / "nnunet.json").write_text(json.dumps(record, indent=2))
    trained = _run_in_ray(folder, cfg.epochs, cfg.iterations, gpus)
    val = summary(folder / "predictions_val", truth["val"])
    history = _history(trained, cfg.iterations)
    history[-1].update({f"val_{k}": v for k, v in val.items() if k in HEADLINE or k == "images"})
    run.write_history(history)
    tested = {**score(folder / "predictions", truth["test"]), "model": "nnU-Net v2", "epochs": cfg.epochs,
              "labeled_scans": selection.budget["labeled_scans"], "parameters": trained["parameters"],
              "val_dsc": val["dsc"]}
    run.write_test_score(tested)
    return tested


def _history(trained: dict, iterations: int) -> list[dict]:
    """One row per nnU-Net epoch from its own log: its losses and its pseudo Dice on validation
    patches (``val_nnunet_pseudo_dice``, nnU-Net's measure, not bonescan's DSC)."""
    log, batch = trained["log"], trained["batch_size"]
    rows = []
    for i, (start, end) in enumerate(zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])):
        rows.append({"epoch": i + 1, "steps": (i + 1) * iterations, "samples": (i + 1) * iterations * batch,
                     "train_loss": float(log["train_losses"][i]), "val_nnunet_loss": float(log["val_losses"][i]),
                     "val_nnunet_pseudo_dice": float(log["mean_fg_dice"][i]), "train_seconds": float(end - start)})
    return rows


# ---------------------------------------------------------------- export to nnU-Net's raw format
def export_dataset(data: str, stage: Path, selection, views: str) -> dict:
    """The raw dataset under ``stage/nnUNet_raw``; returns the test and validation truths by
    case and the count of training cases."""
    from skimage import io

    raw = stage / "nnUNet_raw" / DATASET_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs", "imagesVal"):
        (raw / sub).mkdir(parents=True)
    labeled, val = set(selection.labeled), set(selection.splits.val)
    table = shards.read_table(shards.shard_paths(data), COLUMNS).sort_by("scan_key")
    train_cases, val_cases, test, listed = [], {}, {}, {}
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
        is_val = split == "train" and row["patient_key"] in val
        folders = ["imagesTs"] if split == "test" else ["imagesTr"] + (["imagesVal"] if is_val else [])
        names = [f"{case}_{c:04d}.png" for c in range(len(channels))]
        for folder in folders:  # imagesVal: the validation scans again, for the kept model's val_dsc
            for name, image in zip(names, channels):
                io.imsave(raw / folder / name, image, check_contrast=False)
        if split == "test":
            test[case] = mask.astype(bool)
            continue
        io.imsave(raw / "labelsTr" / f"{case}.png", mask.astype(np.uint8), check_contrast=False)
        listed[case] = {"images": [f"imagesTr/{name}" for name in names], "label": f"labelsTr/{case}.png"}
        if is_val:
            val_cases[case] = mask.astype(bool)
        else:
            train_cases.append(case)
    if not val_cases:
        raise InputError(data, "no validation scan with a mask to choose nnU-Net's checkpoint on")
    channel_names = {"0": "ANT", "1": "POST (mirrored)"} if views == "both" else {"0": "ANT + mirrored POST"}
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": channel_names, "labels": {"background": 0, "lesion": 1},
        "numTraining": len(train_cases) + len(val_cases), "file_ending": ".png",
        "name": "bonescan thoracic crops",
        # Each case's files listed (relative to the raw folder; nnU-Net's documented "dataset"
        # key): without the list, every nnU-Net step that reads the dataset matches file names
        # in a pool of 12 processes, which on a 2-CPU machine took ~15 s a step (4 steps).
        "dataset": listed,
    }, indent=2))
    # nnU-Net's fold 0 is bonescan's split: validation chooses its best checkpoint.
    (stage / "splits_final.json").write_text(json.dumps([{"train": train_cases, "val": sorted(val_cases)}], indent=1))
    return {"test": test, "val": val_cases, "train_cases": len(train_cases)}


def _aggregated(ant: np.ndarray, post: np.ndarray) -> np.ndarray:
    """Eq. 4 on counts, kept in uint16 (halved: the sum of two uint16 views may not fit)."""
    return (aggregate_views(ant, post) / 2).round().astype(np.uint16)


# ---------------------------------------------------------------- nnU-Net, in a Ray task
def _run_in_ray(stage: Path, epochs: int, iterations: int, gpus: bool) -> dict:
    import ray

    env = {"nnUNet_raw": str(stage / "nnUNet_raw"), "nnUNet_preprocessed": str(stage / "nnUNet_preprocessed"),
           "nnUNet_results": str(stage / "nnUNet_results"), "nnUNet_compile": "f",
           # nnU-Net's pools default to 8 processes: the task holds one CPU (or one GPU's worth).
           "nnUNet_def_n_proc": "1"}
    with ray_session():
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # Outside any placement group it is started in (a sweep's trial holds one for its own
        # driver only): the task takes its own CPU or GPU, as Ray Train's workers do.
        task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=0, runtime_env={"env_vars": env},
                          scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)
                          )(_plan_train_predict)
        return ray.get(task.remote(str(stage), epochs, iterations, gpus))


def _plan_train_predict(stage: str, epochs: int, iterations: int, gpus: bool) -> dict:
    from bonescan_platform import nnunet_task  # imports nnunetv2, which reads its folders from the environment

    return nnunet_task.plan_train_predict(Path(stage), epochs, iterations, gpus, dataset_id=DATASET_ID,
                                          dataset_name=DATASET_NAME, configuration=CONFIGURATION)


# ---------------------------------------------------------------- scoring, with bonescan's metrics
def summary(predictions: Path, truth: dict[str, np.ndarray]) -> dict:
    """nnU-Net's predicted masks (``predictions/<case>.png``) against the truth, by bonescan's
    metrics (``metrics.summarize``)."""
    from skimage import io

    cases = sorted(truth)
    pred = np.stack([io.imread(predictions / f"{case}.png") > 0 for case in cases])  # (N, H, W) bool
    true = np.stack([truth[case] for case in cases])
    return metrics.summarize(engine.score_masks(pred, true))


def score(predictions: Path, truth: dict[str, np.ndarray]) -> dict:
    """The test predictions scored -> the body of ``evaluate --json`` for one run (as
    ``evaluate --runs 1`` writes it), named as the test split's."""
    body = runs_body([{"run": 0, **summary(predictions, truth)}],
                     protocol="run 0 only: nnU-Net's prediction of the test scans as they are")
    return {"split": "test", **body}
