"""The Ray Data stream training reads: shards -> decoded, normalized batches.

``read_parquet`` streams the shard files (memory stays flat as the data grows: nothing is
materialized); ``map_batches`` decodes the crops and normalizes counts per image. Shuffling
and random augmentation happen on the training worker (``bonescan_model.batching``: the
shuffle buffer seeded by (seed, epoch, rank), ``transforms.augmenting`` by a generator of
(seed, epoch, rank) drawn batch after batch): they repeat exactly, which they would not if
they depended on how Ray Data schedules its tasks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonescan_model.preprocess import CROP_SIZE, model_input
from bonescan_platform import shards
from bonescan_platform.splits import ORIGINAL_SOURCES, in_dataset

COLUMNS = ["patient_key", "ant", "post", "mask", "source"]
# Small decode batches keep the stream flowing: a whole shard decoded at once would hold the
# first training batch back until every row of the shard is done.
DECODE_BATCH = 8


def decode_batch(batch: dict[str, np.ndarray], labeled: frozenset[str] | None,
                 dataset: str = "all", only: frozenset[str] | None = None,
                 without: frozenset[str] = frozenset(), part: str | None = None) -> dict[str, np.ndarray]:
    """Shard rows -> {"image": (B, 2, 256, 256) float32, "mask": (B, 1, 256, 256) float32,
    "labeled": (B,) bool}.

    labeled: the patients whose masks training may use; None means evaluation: only original
    scans with a mask are kept (augmented copies are for training, not for scoring).
    dataset: training keeps only the rows of this dataset (``in_dataset``).
    only / without: keep only the rows of these patients / drop the rows of these (the
    validation patients live on the training side of the shards).
    part: of training rows, keep only the "labeled" ones (a mask the run may use) or the
    "unlabeled" ones (the two streams of two-stream batches); None keeps both."""
    def wanted(i: int) -> bool:
        key = batch["patient_key"][i]
        if part is not None and (part == "labeled") != (batch["mask"][i] is not None and key in labeled):
            return False
        return (only is None or key in only) and key not in without

    if labeled is None:
        keep = [i for i, source in enumerate(batch["source"])
                if batch["mask"][i] is not None and str(source) in ORIGINAL_SOURCES and wanted(i)]
    else:
        keep = [i for i, source in enumerate(batch["source"]) if in_dataset(str(source), dataset) and wanted(i)]
    size = CROP_SIZE
    images = np.zeros((len(keep), 2, size, size), np.float32)
    masks = np.zeros((len(keep), 1, size, size), np.float32)
    is_labeled = np.zeros(len(keep), bool)
    for out, i in enumerate(keep):
        ant, post, mask = batch["ant"][i], batch["post"][i], batch["mask"][i]
        images[out] = model_input(
            None if ant is None else shards.decode_image(ant, "<u2"),
            None if post is None else shards.decode_image(post, "<u2"))
        if mask is not None and (labeled is None or batch["patient_key"][i] in labeled):
            masks[out, 0] = shards.decode_image(mask, "u1")
            is_labeled[out] = True
    return {"image": images, "mask": masks, "labeled": is_labeled}


def training_dataset(shard_dir: str | Path, labeled: list[str], dataset: str = "all",
                     without: list[str] = (), part: str | None = None):
    """The training rows of ``dataset``, the validation patients (``without``) left out;
    part: only the "unlabeled" rows (the unlabeled stream), or all (None)."""
    return _read(shard_dir, "train").map_batches(
        decode_batch, batch_format="numpy", batch_size=DECODE_BATCH,
        fn_kwargs={"labeled": frozenset(labeled), "dataset": dataset, "without": frozenset(without), "part": part})


def labeled_dataset(shard_dir: str | Path, labeled: list[str], dataset: str = "all"):
    """The labeled stream of two-stream batches: the labeled patients' training rows of
    ``dataset`` that carry a mask (their copies too), decoded once here (pyarrow, in this
    process) and held in Ray's object store; every worker reads it whole into memory
    (segmentation.train_loop) and draws from it step after step. It is small: the labeled scans of
    one run."""
    import pyarrow.compute as pc
    import ray

    where = pc.field("patient_key").isin(sorted(labeled)) & pc.field("mask").is_valid()
    table = shards.read_table(shards.shard_paths(shard_dir, "train"), COLUMNS + ["scan_key"], where)
    table = table.sort_by("scan_key")
    decoded = decode_batch({k: np.array(v, dtype=object) for k, v in table.to_pydict().items()},
                           frozenset(labeled), dataset, part="labeled")
    return ray.data.from_items([{k: v[i] for k, v in decoded.items()} for i in range(len(decoded["labeled"]))])


def evaluation_dataset(shard_dir: str | Path, split: str = "test", only: list[str] | None = None):
    """Labeled original scans of ``split`` (of the patients ``only``, when given: the validation
    patients sit in the shards' training split), every mask used, decoded once, as a dataset
    held in Ray's object store.

    Unlike the training stream this one is read again and again (validation after every
    epoch), and each streamed pass would start Ray Data afresh: 1-3.5 s before its first
    batch, against 0.02 s for a pass over blocks in the object store (9 scans, 2 CPUs). It is
    decoded here, by ``crops`` (pyarrow, in this process): materializing it through Ray Data's
    tasks took 3-4 s of every run's start on 2 CPUs, for a split of a few scans. It holds
    original scans only, never augmented copies, so it does not grow with `bonescan augment`
    (15 % of the paper's 1,596 scans: ~180 MB); Ray's object store spills it to disk if it must."""
    import ray

    decoded = crops(shard_dir, split, only)
    return ray.data.from_items([{k: v[i] for k, v in decoded.items()} for i in range(len(decoded["labeled"]))])


def crops(shard_dir: str | Path, split: str = "test", only: list[str] | None = None) -> dict[str, np.ndarray]:
    """The labeled original scans of ``split`` (of the patients ``only``), decoded in this
    process without Ray: {"image": (N, 2, 256, 256) float32, "mask": (N, 1, 256, 256),
    "labeled": (N,), "pixel_spacing_mm": (N,) float32}, in scan_key order. For scoring a kept
    model once and for the report (the spacing: lesion areas in cm², ``bonescan_model.burden``)."""
    import pyarrow.compute as pc

    # Only what decode_batch keeps for evaluation is read: a training split of augmented copies
    # holds many rows besides the validation patients' originals.
    where = pc.field("source").isin(list(ORIGINAL_SOURCES)) & pc.field("mask").is_valid()
    if only is not None:
        where &= pc.field("patient_key").isin(sorted(only))
    columns = COLUMNS + ["scan_key", "pixel_spacing_mm"]
    table = shards.read_table(shards.shard_paths(shard_dir, split), columns, where)
    table = table.sort_by("scan_key")
    decoded = decode_batch({k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}, None,
                           only=None if only is None else frozenset(only))
    # The filter above is decode_batch's own, so every row read is kept, in order.
    spacing = table.column("pixel_spacing_mm").to_numpy().astype(np.float32)
    assert len(spacing) == len(decoded["labeled"]), (len(spacing), len(decoded["labeled"]))
    return {**decoded, "pixel_spacing_mm": spacing}


def batches(crops: dict[str, np.ndarray], batch_size: int):
    """In-memory crops as the batches of tensors ``engine.evaluate`` iterates."""
    import torch

    for i in range(0, len(crops["labeled"]), batch_size):
        yield {k: torch.from_numpy(v[i:i + batch_size]) for k, v in crops.items()}


def _read(shard_dir: str | Path, split: str):
    import ray

    return ray.data.read_parquet(shards.shard_paths(shard_dir, split)).select_columns(COLUMNS)
