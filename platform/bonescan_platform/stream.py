"""The Ray Data stream training reads: shards -> decoded, normalized batches.

``read_parquet`` streams the shard files (memory stays flat as the data grows: nothing is
materialized); ``map_batches`` decodes the crops and normalizes counts per image. Random
augmentation happens on the training worker (``train.augmenting``): seeded there by
(seed, epoch, rank, step), it repeats exactly, which it would not if it depended on how Ray
Data schedules its tasks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bonescan_model.preprocess import model_input
from bonescan_platform import shards

COLUMNS = ["patient_key", "ant", "post", "mask", "source"]
ORIGINAL_SOURCES = ("dicom", "synthetic")
# Small decode batches keep the stream flowing: a whole shard decoded at once would hold the
# first training batch back until every row of the shard is done.
DECODE_BATCH = 8


def labeled_patients(shard_dir: str | Path, fraction: float, seed: int, dataset: str = "all") -> list[str]:
    """The training patients whose masks the run may use (the paper's L_label).

    Patients with a ground-truth mask are taken in a seeded order until their scans reach
    ``fraction`` of the training scans of ``dataset``; the rest train unlabeled. Chosen per
    patient, so all scans of a patient (augmented copies included) are labeled or none is.
    """
    return _choose_labeled(_training_rows(shard_dir, dataset), fraction, seed)


def labeled_scans(shard_dir: str | Path, fraction: float, seed: int, dataset: str = "all") -> tuple[int, int]:
    """(labeled, all) training scans of ``dataset`` under ``labeled_patients``: a run's L_label."""
    rows = _training_rows(shard_dir, dataset)
    chosen = set(_choose_labeled(rows, fraction, seed))
    return sum(valid and key in chosen for key, valid in rows), len(rows)


def _training_rows(shard_dir: str | Path, dataset: str) -> list[tuple[str, bool]]:
    """(patient_key, has a mask) of every training row of ``dataset``."""
    table = pq.read_table(shards.shard_paths(shard_dir, "train"), columns=["patient_key", "mask", "source"])
    return [(key, valid) for key, valid, source in zip(
        table.column("patient_key").to_pylist(), pc.is_valid(table.column("mask")).to_pylist(),
        table.column("source").to_pylist()) if in_dataset(source, dataset)]


def _choose_labeled(rows: list[tuple[str, bool]], fraction: float, seed: int) -> list[str]:
    scans_of: dict[str, int] = {}
    for key, valid in rows:
        if valid:
            scans_of[key] = scans_of.get(key, 0) + 1
    target = round(fraction * len(rows))
    chosen, count = [], 0
    # A seeded shuffle independent of file order: patient keys are already keyed hashes.
    for key in sorted(scans_of, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()):
        if count >= target:
            break
        chosen.append(key)
        count += scans_of[key]
    return sorted(chosen)


def in_dataset(source: str, dataset: str) -> bool:
    """Whether a row of this ``source`` belongs to ``dataset`` (the paper's Table 1)."""
    kind = source.split(":", 1)[0]
    if dataset == "all":
        return True
    if kind in ORIGINAL_SOURCES:
        return True
    return {"D2": kind == "augmented", "D3": kind == "dcgan",
            "D4": kind in ("augmented", "dcgan")}.get(dataset, False)


def decode_batch(batch: dict[str, np.ndarray], labeled: frozenset[str] | None,
                 dataset: str = "all") -> dict[str, np.ndarray]:
    """Shard rows -> {"image": (B, 2, 256, 256) float32, "mask": (B, 1, 256, 256) float32,
    "labeled": (B,) bool}.

    labeled: the patients whose masks training may use; None means evaluation: only original
    scans with a mask are kept (augmented copies are for training, not for scoring).
    dataset: training keeps only the rows of this dataset (``in_dataset``)."""
    if labeled is None:
        keep = [i for i, source in enumerate(batch["source"])
                if batch["mask"][i] is not None and str(source) in ORIGINAL_SOURCES]
    else:
        keep = [i for i, source in enumerate(batch["source"]) if in_dataset(str(source), dataset)]
    size = shards.CROP
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


def training_dataset(shard_dir: str | Path, labeled: list[str], dataset: str = "all"):
    return _read(shard_dir, "train").map_batches(
        decode_batch, batch_format="numpy", batch_size=DECODE_BATCH,
        fn_kwargs={"labeled": frozenset(labeled), "dataset": dataset})


def evaluation_dataset(shard_dir: str | Path, split: str = "test"):
    """Labeled original scans of ``split``, every mask used, decoded once and materialized.

    Unlike the training stream this one is read again and again (validation after every
    epoch, 10 evaluation runs), and each streamed pass would start Ray Data afresh: 1-3.5 s
    before its first batch, against 0.02 s for a pass over the materialized blocks (9 test
    scans, 2 CPUs). It holds original scans only, never augmented copies, so it does not grow
    with `bonescan augment`; Ray's object store spills it to disk if it must."""
    return _read(shard_dir, split).map_batches(
        decode_batch, batch_format="numpy", batch_size=DECODE_BATCH, fn_kwargs={"labeled": None}).materialize()


def _read(shard_dir: str | Path, split: str):
    import ray

    return ray.data.read_parquet(shards.shard_paths(shard_dir, split)).select_columns(COLUMNS)
