"""Patient-level train / val / test splits and label budgets counted on original scans (no Ray)."""

import numpy as np
import pytest

from bonescan_model.errors import InputError
from bonescan_platform import shards, splits

CROP = shards.encode_image(np.zeros((256, 256)), "<u2")
MASK = shards.encode_image(np.ones((256, 256)), "u1")
EMPTY = shards.encode_image(np.zeros((256, 256)), "u1")  # a labeled, lesion-free scan


def _row(patient, scan, *, mask=True, source="dicom", split="train"):
    return {"patient_key": patient, "scan_key": scan, "ant": CROP, "post": None, "mask": MASK if mask else None,
            "crop_box": [0, 0, 256, 256], "pixel_spacing_mm": 2.26, "readers_agree": None, "source": source,
            "split": split, "views": "ANT"}


def _cohort(tmp_path, *, copies=0, generated=0, lesion_free=()):
    """20 training patients (p0..p9 with a mask on each of their 2 scans, p10..p19 unlabeled, 1
    scan), 6 test patients; each original with ``copies`` augmented copies, and ``generated``
    DCGAN rows. Hand counts: 30 original training scans, 20 with a mask."""
    rows = []
    for i in range(20):
        for s in range(2 if i < 10 else 1):
            original = _row(f"p{i}", f"p{i}s{s}", mask=i < 10)
            if i in lesion_free:
                original["mask"] = EMPTY
            rows.append(original)
            rows += [{**original, "scan_key": f"p{i}s{s}a{c}", "source": "augmented:rot"} for c in range(copies)]
    rows += [_row(f"t{i}", f"t{i}", split="test") for i in range(6)]
    rows += [_row(f"dcgan-{i}", f"g{i}", mask=False, source="dcgan") for i in range(generated)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    shards.write_manifest(tmp_path, [shards.write_shard(train, tmp_path / "train-00000.parquet"),
                                     shards.write_shard(test, tmp_path / "test-00000.parquet")], {})
    return tmp_path


@pytest.mark.parametrize("dataset, copies, generated", [("D1", 0, 0), ("D2", 3, 0), ("D3", 0, 40), ("D4", 3, 40)])
def test_no_patient_in_two_splits_and_budgets_count_original_scans(tmp_path, dataset, copies, generated):
    data = _cohort(tmp_path, copies=copies, generated=generated)
    chosen = splits.select(data, val_fraction=0.15, val_seed=0, seed=0, label_fraction=0.4, dataset=dataset)
    train, val, test = (set(getattr(chosen.splits, k)) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(val) == 3 and val <= {f"p{i}" for i in range(10)}  # 0.15 of 20, drawn from patients with a mask
    assert test == {f"t{i}" for i in range(6)}
    assert not any(k.startswith("dcgan") for k in train | val | test)  # generated rows are nobody
    budget = chosen.budget
    # Originals only, the val patients' 6 scans out: 24 training scans, whatever the copies.
    assert (budget["train_scans"], budget["val_scans"], budget["test_scans"], budget["all_scans"]) == (24, 6, 6, 36)
    # 40 % of 24 = 9.6 -> 10 scans, taken two at a time from the labeled patients: 10 exactly.
    assert (budget["labeled_scans"], budget["labeled_patients"]) == (10, 5)
    assert set(chosen.labeled) <= train
    assert budget["labeled_share_of_all"] == pytest.approx(10 / 36)
    per_original = 1 + (copies if dataset in ("D2", "D4") else 0)
    assert budget["training_rows"] == 24 * per_original + (generated if dataset in ("D3", "D4") else 0)


def test_val_does_not_move_with_the_training_seed_and_labels_do(tmp_path):
    data = _cohort(tmp_path)
    runs = [splits.select(data, val_fraction=0.15, val_seed=0, seed=seed, label_fraction=0.4) for seed in range(6)]
    assert len({r.splits.val for r in runs}) == 1
    assert len({r.labeled for r in runs}) > 1
    other = splits.select(data, val_fraction=0.15, val_seed=1, seed=0, label_fraction=0.4)
    assert other.splits.val != runs[0].splits.val


def test_labeled_scans_takes_a_count_and_refuses_more_than_there_are(tmp_path):
    data = _cohort(tmp_path)
    chosen = splits.select(data, val_fraction=0.15, val_seed=0, seed=0, label_fraction=0.0, labeled_scans=4)
    assert chosen.budget["labeled_scans"] == 4 and chosen.budget["labeled_scans_asked"] == 4
    with pytest.raises(InputError, match="labeled_scans: 99 asked"):
        splits.select(data, val_fraction=0.15, val_seed=0, seed=0, label_fraction=0.0, labeled_scans=99)


def test_a_run_writes_its_splits_and_budget(tmp_path):
    data = _cohort(tmp_path / "d")
    from bonescan_platform.runs import Run

    run = Run(tmp_path / "run")
    run.root.mkdir()
    chosen = splits.select(data, val_fraction=0.15, val_seed=0, seed=0, label_fraction=1.0)
    run.save_selection(chosen)
    assert run.splits == chosen.splits
    assert run.budget["labeled_scans"] == 14  # every masked scan the 7 labeled patients have


def test_val_holds_lesion_bearing_patients_in_their_share(tmp_path):
    # 8 of the 10 labeled patients are lesion-free: a draw blind to lesions often takes none
    # of the other 2, and a val split without a lesion can score no DSC.
    data = _cohort(tmp_path, lesion_free=range(2, 10))
    for val_seed in range(12):
        val = set(splits.select(data, val_fraction=0.15, val_seed=val_seed, seed=0, label_fraction=0.4).splits.val)
        assert len(val) == 3 and len(val & {"p0", "p1"}) == 1


def test_no_lesion_on_the_training_side_is_refused(tmp_path):
    data = _cohort(tmp_path, lesion_free=range(10))
    with pytest.raises(InputError, match="no training patient has a labeled lesion"):
        splits.select(data, val_fraction=0.15, val_seed=0, seed=0, label_fraction=0.4)
