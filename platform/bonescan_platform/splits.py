"""Which rows a run may use: three patient-level splits and the label budget.

``test`` is assigned at ingest (a keyed hash of the patient, in the shards' ``split`` column);
``val`` is drawn here, seeded, from the training side; the rest is ``train``. No patient is in
two splits. Validation chooses everything that is chosen (the kept checkpoint, early stopping,
ASHA, a baseline's threshold); the test split is scored once, at the end, on the kept model.

The label budget is counted on original training scans only: augmented copies and generated
(DCGAN) rows can never carry a label of their own, so they are neither in the numerator nor in
the denominator. Masks are kept per patient (a labeled patient's augmented copies keep theirs).

A run keeps its ``Selection`` (``runs.Run.save_selection``): its splits ({"train": [...],
"val": [...], "test": [...]}, keyed hashes only) and its budget (how many scans and patients
were labeled, beside the totals).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from bonescan_model.errors import InputError
from bonescan_model.preprocess import CROP_SIZE
from bonescan_platform import shards

ORIGINAL_SOURCES = ("dicom", "synthetic")


@dataclass(frozen=True)
class Row:
    patient_key: str
    has_mask: bool
    source: str
    split: str  # the shards' split: "train" or "test"
    has_lesion: bool = False  # a mask with at least one lesion pixel

    @property
    def original(self) -> bool:
        return self.source in ORIGINAL_SOURCES


@dataclass(frozen=True)
class Splits:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_json(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


@dataclass(frozen=True)
class Selection:
    """A run's splits, the patients whose masks it trains on, and the counts it records."""

    splits: Splits
    labeled: tuple[str, ...]
    budget: dict


# A lesion-free mask, as shards.encode_image writes it: compared in Arrow, no pixel decoded.
_EMPTY_MASK = pa.scalar(bytes(CROP_SIZE * CROP_SIZE), pa.binary())


def read_rows(shard_dir: str | Path) -> list[Row]:
    """Every row of the shards, without its pixels: a read of five columns, a shard at a time
    (masks are only compared with the empty mask)."""
    rows: list[Row] = []
    for path in shards.shard_paths(shard_dir):
        table = shards.read_table([path], ["patient_key", "mask", "source", "split"])
        mask = table.column("mask")
        lesion = pc.fill_null(pc.not_equal(mask, _EMPTY_MASK), False)
        rows += [Row(*values) for values in zip(
            table.column("patient_key").to_pylist(), pc.is_valid(mask).to_pylist(),
            table.column("source").to_pylist(), table.column("split").to_pylist(), lesion.to_pylist())]
    return rows


def in_dataset(source: str, dataset: str) -> bool:
    """Whether a row of this ``source`` belongs to ``dataset`` (the paper's Table 1)."""
    kind = source.split(":", 1)[0]
    if dataset == "all":
        return True
    if kind in ORIGINAL_SOURCES:
        return True
    return {"D2": kind == "augmented", "D3": kind == "dcgan",
            "D4": kind in ("augmented", "dcgan")}.get(dataset, False)


def _order(keys, salt: str) -> list[str]:
    """A seeded shuffle independent of file order (patient keys are already keyed hashes)."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{salt}:{k}".encode()).hexdigest())


def draw_splits(rows: list[Row], val_fraction: float, val_seed: int) -> Splits:
    """Val patients: ``val_fraction`` of the original training patients (one at least, one
    training patient left at least), drawn seeded from those with a mask (a validation patient
    without one could not score anything), stratified by whether a patient has a lesion: the
    headline DSC is taken over lesion-bearing scans (metrics.summarize), so a validation split
    without one could choose no checkpoint. Lesion-bearing patients get their share, one at
    least; lesion-free ones theirs (they score the false positives)."""
    train = sorted({r.patient_key for r in rows if r.original and r.split == "train"})
    test = sorted({r.patient_key for r in rows if r.original and r.split == "test"})
    with_mask = {r.patient_key for r in rows if r.original and r.split == "train" and r.has_mask}
    lesions = sorted({r.patient_key for r in rows if r.original and r.split == "train" and r.has_lesion})
    lesion_free = sorted(with_mask - set(lesions))
    n_val = max(0, min(max(1, round(val_fraction * len(train))), len(with_mask), len(train) - 1))
    n_lesions = min(len(lesions), max(1, round(n_val * len(lesions) / len(with_mask)))) if lesions and n_val else 0
    n_free = min(len(lesion_free), n_val - n_lesions)
    n_lesions = min(len(lesions), n_val - n_free)  # too few lesion-free patients: lesions fill in
    val = set(_order(lesions, f"val:{val_seed}")[:n_lesions] + _order(lesion_free, f"val:{val_seed}")[:n_free])
    return Splits(train=tuple(k for k in train if k not in val), val=tuple(sorted(val)), test=tuple(test))


def select(shard_dir: str | Path, *, val_fraction: float, val_seed: int, seed: int,
           label_fraction: float, labeled_scans: int | None = None, dataset: str = "all") -> Selection:
    """The splits and the labeled patients of one run (the paper's L_label, stated both ways).

    Patients with a mask are taken in an order seeded by ``seed`` until their original scans
    reach ``labeled_scans`` (when given) or ``label_fraction`` of the original training scans."""
    rows = read_rows(shard_dir)
    splits = draw_splits(rows, val_fraction, val_seed)
    if not any(r.has_lesion and r.patient_key in splits.val for r in rows):
        raise InputError(shard_dir, "no training patient has a labeled lesion: the validation split "
                                    "could score no DSC, so it could choose no checkpoint")
    train, val, test = set(splits.train), set(splits.val), set(splits.test)
    originals = [r for r in rows if r.original]
    scans_of: dict[str, int] = {}
    for r in originals:
        if r.patient_key in train and r.has_mask:
            scans_of[r.patient_key] = scans_of.get(r.patient_key, 0) + 1
    train_scans = sum(r.patient_key in train for r in originals)
    available = sum(scans_of.values())
    if labeled_scans is not None:
        if labeled_scans > available:
            raise InputError(shard_dir, f"labeled_scans: {labeled_scans} asked, the training split has "
                                        f"{available} original scans with a mask")
        target = labeled_scans
    else:
        target = round(label_fraction * train_scans)
    labeled, count = [], 0
    for key in _order(scans_of, str(seed)):
        if count >= target:
            break
        labeled.append(key)
        count += scans_of[key]
    chosen = set(labeled)
    all_scans = len(originals)
    training = [r for r in rows if r.split == "train" and r.patient_key not in val and in_dataset(r.source, dataset)]
    training_rows = len(training)
    budget = {
        "label_fraction": label_fraction, "labeled_scans_asked": labeled_scans,
        "labeled_scans": count, "labeled_patients": len(chosen),
        "train_scans": train_scans, "train_patients": len(train),
        "val_scans": sum(r.patient_key in val for r in originals), "val_patients": len(val),
        "test_scans": sum(r.patient_key in test for r in originals), "test_patients": len(test),
        "all_scans": all_scans,
        "labeled_share_of_train": count / train_scans if train_scans else 0.0,
        # The paper's L_label: labeled scans over every scan, train and test together.
        "labeled_share_of_all": count / all_scans if all_scans else 0.0,
        "dataset": dataset, "training_rows": training_rows,
        # Rows whose mask trains: the labeled patients' scans with their copies in `dataset`.
        "labeled_rows": sum(r.patient_key in chosen and r.has_mask for r in training),
    }
    return Selection(splits=splits, labeled=tuple(sorted(chosen)), budget=budget)


def for_config(shard_dir: str | Path, cfg, workers: int = 1) -> Selection:
    """``select`` with a TrainConfig's keys; the budget also counts the training samples (a
    scan gives two under aggregation "views") and the run's epochs and optimizer steps
    (``TrainConfig.schedule``) for ``workers`` training workers."""
    selection = select(shard_dir, val_fraction=cfg.val_fraction, val_seed=cfg.val_seed, seed=cfg.seed,
                       label_fraction=cfg.label_fraction, labeled_scans=cfg.labeled_scans, dataset=cfg.dataset)
    budget = selection.budget
    per_scan = cfg.samples_per_scan
    plan = cfg.schedule(budget["training_rows"], workers)
    budget.update({"samples_per_scan": per_scan, "training_samples": budget["training_rows"] * per_scan,
                   "labeled_samples": budget["labeled_rows"] * per_scan, "batch_size": cfg.batch_size,
                   "batching": "two_stream" if cfg.two_stream else "mixed",
                   **{f"planned_{k}": v for k, v in plan.items()}})
    if cfg.two_stream:  # what each step draws, on every worker: the same at every label fraction
        unlabeled = cfg.unlabeled_batch_size if cfg.unsupervised_weight > 0 else 0
        budget.update({"labeled_batch_size": cfg.labeled_scans_per_step * per_scan,
                       "unlabeled_batch_size": cfg.unlabeled_scans_per_step * per_scan if unlabeled else 0,
                       "planned_labeled_seen": plan["steps"] * cfg.labeled_scans_per_step * per_scan * workers})
    return selection
