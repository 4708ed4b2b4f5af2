"""The training stream's decoding and the config it is driven by (no Ray needed)."""

import numpy as np
import pytest
import yaml

from bonescan_model.errors import InputError
from bonescan_platform import shards, stream
from bonescan_model.train_config import TrainConfig, load_train_config


def _rows(sources, masks):
    rng = np.random.default_rng(0)
    crop = lambda: shards.encode_image(rng.integers(0, 50, (256, 256)), "<u2")  # noqa: E731
    return {
        "patient_key": np.array([f"p{i}" for i in range(len(sources))], dtype=object),
        "ant": np.array([crop() for _ in sources], dtype=object),
        "post": np.array([None] + [crop() for _ in sources[1:]], dtype=object),
        "mask": np.array([shards.encode_image(np.ones((256, 256)), "u1") if m else None for m in masks],
                         dtype=object),
        "source": np.array(sources, dtype=object),
    }


@pytest.mark.parametrize("dataset, kept", [
    ("D1", ["dicom"]), ("D2", ["dicom", "augmented:rot"]), ("D3", ["dicom", "dcgan"]),
    ("D4", ["dicom", "augmented:rot", "dcgan"]), ("all", ["dicom", "augmented:rot", "dcgan"])])
def test_datasets_select_rows_by_source(dataset, kept):
    batch = _rows(["dicom", "augmented:rot", "dcgan"], [True, True, False])
    out = stream.decode_batch(batch, frozenset({"p0", "p1"}), dataset)
    assert len(out["labeled"]) == len(kept)
    assert out["image"].shape == (len(kept), 2, 256, 256) and out["image"].dtype == np.float32


def test_labels_are_used_only_for_chosen_patients_and_one_view_scans_repeat_their_view():
    batch = _rows(["dicom", "dicom", "dicom"], [True, True, False])
    out = stream.decode_batch(batch, frozenset({"p1"}))
    assert out["labeled"].tolist() == [False, True, False]
    assert out["mask"][0].sum() == 0 and out["mask"][1].sum() == 256 * 256
    np.testing.assert_array_equal(out["image"][0, 0], out["image"][0, 1])  # row 0 has no POST


def test_evaluation_keeps_only_labeled_originals():
    batch = _rows(["dicom", "augmented:rot", "dicom"], [True, True, False])
    out = stream.decode_batch(batch, None)
    assert out["labeled"].tolist() == [True]


def test_config_files_load_and_errors_name_the_key(tmp_path):
    for preset in ("configs/demo.yaml", "configs/paper.yaml"):
        assert isinstance(load_train_config(preset), TrainConfig)
    paper = load_train_config("configs/paper.yaml")
    assert (paper.lr, paper.beta1, paper.weight_decay, paper.epochs) == (0.0005, 0.9, 0.0001, 400)
    assert (paper.model.recurrence, paper.alpha, paper.nu) == (3, 0.4, 0.004)
    bad = tmp_path / "bad.yaml"
    for body, key in [({"epoch": 3}, "epoch"), ({"lr": "fast"}, "lr"), ({"model": {"widht": 8}}, "widht"),
                      ({"dataset": "D9"}, "dataset"), ({"label_fraction": 1.5}, "label_fraction"),
                      ({"alpha": 0, "unsupervised_weight": 0}, "unsupervised_weight")]:
        bad.write_text(yaml.safe_dump(body))
        with pytest.raises(InputError, match=key) as info:
            load_train_config(bad)
        assert str(bad) in str(info.value)


def test_validation_patients_are_kept_or_dropped_by_key():
    batch = _rows(["dicom", "dicom", "dicom"], [True, True, True])
    assert stream.decode_batch(batch, None, only=frozenset({"p2"}))["labeled"].tolist() == [True]
    assert len(stream.decode_batch(batch, frozenset(), without=frozenset({"p0", "p2"}))["labeled"]) == 1
