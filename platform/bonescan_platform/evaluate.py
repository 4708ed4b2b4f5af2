"""`bonescan evaluate`: DSC / CPA / Recall on the test split, averaged over seeded runs.

The paper ran its trained model 10 times on the test subset and averaged (Section 3.3). A
trained network is deterministic, so here what varies between runs is the test images
themselves: run 0 scores them as they are; run k >= 1 scores them after a seeded random
label-preserving geometric transform (flip, rotation, shift: the training augmentation, with
seed k). The spread across runs therefore says how stable the segmentation is under the
positioning differences a camera produces, not just how lucky one pass was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from bonescan_model import engine
from bonescan_model.augment import augment_batch
from bonescan_model.checkpoint import load_checkpoint, run_threshold
from bonescan_model.errors import InputError
from bonescan_model.progress import progress
from bonescan_platform import shards, stream
from bonescan_platform.cluster import ray_session

HEADLINE = ("dsc", "cpa", "recall", "lesion_sensitivity", "fp_per_image")
BATCH = 8


def transformed(batches: Iterable[dict], run: int) -> Iterator[dict]:
    if run == 0:
        yield from batches
        return
    rng = np.random.default_rng(run)
    for batch in batches:
        images, masks = augment_batch(batch["image"].numpy(), batch["mask"].numpy(), rng)
        yield {**batch, "image": torch.from_numpy(images), "mask": torch.from_numpy(masks)}


def score_runs(model: torch.nn.Module, dataset, runs: int, threshold: float = 0.5, label: str = "evaluate") -> dict:
    """Score ``model`` on a Ray dataset (evaluation_dataset) ``runs`` times -> the --json body.
    ``label`` names the progress bar (on a terminal only)."""
    per_run = []
    for run in progress(range(runs), desc=label, unit="run"):
        batches = transformed(dataset.iter_torch_batches(batch_size=BATCH), run)
        per_run.append({"run": run, **engine.summarize(engine.evaluate(model, batches, threshold=threshold))})
    if not per_run[0]["images"]:
        return {"images": 0, "runs": per_run}
    body = {k: float(np.mean([r[k] for r in per_run])) for k in HEADLINE}
    body["std"] = {k: float(np.std([r[k] for r in per_run])) for k in HEADLINE}
    return {**body, "images": per_run[0]["images"], "runs": per_run}


def evaluate(checkpoint: str, data: str, runs: int = 10, json_path: str | None = None) -> int:
    if runs < 1:
        raise InputError(checkpoint, "--runs must be at least 1")
    model, _config, meta = load_checkpoint(checkpoint)
    shards.read_manifest(data)
    threshold = run_threshold(meta)
    with ray_session():
        result = score_runs(model, stream.evaluation_dataset(data), runs, threshold)
    if not result["images"]:
        raise InputError(data, "the test split has no labeled scan to evaluate on")
    result = {**result, "checkpoint": str(Path(checkpoint).resolve()), "epoch": meta.get("epoch"),
              "protocol": "run 0: test images as they are; run k: a seeded random flip/rotation/shift (seed k)"}
    print_summary(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
        print(f"metrics: {json_path}")
    return 0


def print_summary(result: dict, label: str = "model") -> None:
    std = result["std"]
    print(f"{label}: {result['images']} test images x {len(result['runs'])} runs: "
          f"DSC {result['dsc']:.3f} ± {std['dsc']:.3f}, CPA {result['cpa']:.3f} ± {std['cpa']:.3f}, "
          f"Recall {result['recall']:.3f} ± {std['recall']:.3f}; lesion sensitivity "
          f"{result['lesion_sensitivity']:.2f}, {result['fp_per_image']:.2f} false positives per image")
