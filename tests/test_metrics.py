import numpy as np
import pytest
import torch

from bonescan_model import metrics
from bonescan_model.metrics import (
    confusion_counts,
    cpa,
    detection_summary,
    dsc,
    lesion_detection,
    pixel_metrics,
    pooled_metrics,
    recall,
)


def _pair():
    """Two 6x6 images with hand-counted TP / FP / FN."""
    pred = np.zeros((2, 6, 6), bool)
    truth = np.zeros((2, 6, 6), bool)
    truth[0, 1:4, 1:4] = True  # 9 true pixels
    pred[0, 1:4, 2:5] = True  # 9 predicted, 6 of them on the truth
    truth[1, 0:2, 0:2] = True  # 4 true pixels, 1 found
    pred[1, 1:3, 1:3] = True  # 4 predicted, 1 right
    return pred, truth  # image 0: TP 6, FP 3, FN 3; image 1: TP 1, FP 3, FN 3


def test_counts_and_formulas_on_known_masks():
    pred, truth = _pair()
    counts = confusion_counts(pred, truth)
    np.testing.assert_array_equal(counts["tp"], [6, 1])
    np.testing.assert_array_equal(counts["fp"], [3, 3])
    np.testing.assert_array_equal(counts["fn"], [3, 3])
    np.testing.assert_allclose(dsc(pred, truth), [12 / 18, 2 / 8])
    np.testing.assert_allclose(cpa(pred, truth), [6 / 9, 1 / 4])
    np.testing.assert_allclose(recall(pred, truth), [6 / 9, 1 / 4])


def test_precision_and_recall_differ_when_prediction_is_a_subset():
    truth = np.zeros((1, 5, 5), bool)
    truth[0, :, :2] = True  # 10 pixels
    pred = np.zeros_like(truth)
    pred[0, :2, :2] = True  # 4 pixels, all right
    scores = pixel_metrics(pred, truth)
    assert scores["cpa"][0] == 1.0
    assert scores["recall"][0] == pytest.approx(0.4)
    assert scores["dsc"][0] == pytest.approx(8 / 14)


def test_pooled_sums_counts_before_the_formula():
    pred, truth = _pair()
    pooled = pooled_metrics(pred, truth)  # TP 7, FP 6, FN 6
    assert pooled == pytest.approx({"dsc": 14 / 26, "cpa": 7 / 13, "recall": 7 / 13})
    assert pooled["dsc"] != pytest.approx(dsc(pred, truth).mean())


def test_empty_mask_rules():
    empty = np.zeros((4, 4), bool)
    blob = np.zeros((4, 4), bool)
    blob[1:3, 1:3] = True
    pred = np.stack([empty, empty, blob])
    truth = np.stack([empty, blob, empty])
    scores = pixel_metrics(pred, truth)
    # Both empty: perfect. Missed lesion: all 0 (CPA's 0/0 included). False alarm: all 0
    # (Recall's 0/0 included).
    np.testing.assert_array_equal(scores["dsc"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(scores["cpa"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(scores["recall"], [1.0, 0.0, 0.0])
    assert pooled_metrics(pred[:1], truth[:1]) == {"dsc": 1.0, "cpa": 1.0, "recall": 1.0}
    assert pooled_metrics(pred[:2], truth[:2]) == {"dsc": 0.0, "cpa": 0.0, "recall": 0.0}


@pytest.mark.parametrize("layout", ["numpy", "torch", "channel"])
def test_accepts_torch_and_channel_axis(layout):
    pred, truth = _pair()
    want = pixel_metrics(pred, truth)
    if layout == "torch":
        pred, truth = torch.from_numpy(pred), torch.from_numpy(truth)
    elif layout == "channel":
        pred, truth = pred[:, None], truth[:, None]
    got = pixel_metrics(pred, truth)
    for name in want:
        assert isinstance(got[name], np.ndarray)
        np.testing.assert_array_equal(got[name], want[name])


def test_bad_masks_raise():
    pred, truth = _pair()
    with pytest.raises(ValueError, match="boolean"):
        dsc(pred.astype(np.float32), truth)
    with pytest.raises(ValueError, match="same shape"):
        dsc(pred[:, :5], truth)
    with pytest.raises(ValueError, match="shape"):
        dsc(pred[0], truth[0])


def test_lesion_detection_on_known_components():
    truth = np.zeros((1, 12, 12), bool)
    truth[0, 1:3, 1:3] = True  # lesion A: found
    truth[0, 1:3, 8:10] = True  # lesion B: missed
    truth[0, 6, 6] = truth[0, 7, 7] = True  # lesion C: diagonal pair, one lesion in 8-connectivity
    pred = np.zeros_like(truth)
    pred[0, 2:4, 2:4] = True  # overlaps A by one pixel
    pred[0, 7, 7] = True  # hits C through its second pixel
    pred[0, 10:12, 0:2] = True  # false positive
    pred[0, 10, 10] = pred[0, 11, 11] = True  # one more false positive (diagonal pair)
    counts = lesion_detection(pred, truth)
    np.testing.assert_array_equal(counts["lesions"], [3])
    np.testing.assert_array_equal(counts["detected"], [2])
    np.testing.assert_array_equal(counts["false_positives"], [2])


def test_one_component_over_two_lesions_detects_both():
    truth = np.zeros((1, 5, 9), bool)
    truth[0, 2, 1:3] = True
    truth[0, 2, 6:8] = True
    pred = np.zeros_like(truth)
    pred[0, 2, 1:8] = True
    counts = lesion_detection(pred, truth)
    assert (counts["lesions"][0], counts["detected"][0], counts["false_positives"][0]) == (2, 2, 0)


def test_detection_summary_over_a_set():
    truth = np.zeros((3, 8, 8), bool)
    pred = np.zeros_like(truth)
    truth[0, 1:3, 1:3] = truth[0, 5:7, 5:7] = True  # two lesions, one found
    pred[0, 1:3, 1:3] = True
    truth[1, 3:5, 3:5] = True  # one lesion, found, plus two false positives
    pred[1, 3:5, 3:5] = pred[1, 0, 7] = pred[1, 7, 0] = True
    pred[2, 4, 4] = True  # no lesion, one false positive
    summary = detection_summary(lesion_detection(pred, truth))
    assert summary == pytest.approx({"sensitivity": 2 / 3, "fp_per_image": 3 / 3})
    nothing = detection_summary(lesion_detection(np.zeros_like(truth), np.zeros_like(truth)))
    assert nothing == {"sensitivity": 1.0, "fp_per_image": 0.0}


def test_headline_cannot_be_won_by_predicting_nothing():
    """Two scans with a lesion, two without: predicting nothing scores 0, not a free 1.0 on the
    lesion-free half; a false positive on a lesion-free scan counts there."""
    truth = np.zeros((4, 8, 8), bool)
    truth[0, 1:3, 1:3] = truth[1, 5:7, 5:7] = True
    empty = np.zeros_like(truth)
    def per_image(pred):
        return {**metrics.pixel_metrics(pred, truth), **metrics.lesion_detection(pred, truth),
                **metrics.confusion_counts(pred, truth)}

    nothing = metrics.summarize(per_image(empty))
    assert nothing["dsc"] == 0.0 and nothing["lesion_images"] == 2 and nothing["images"] == 4
    assert nothing["lesion_free_fp_per_image"] == 0.0 and nothing["lesion_sensitivity"] == 0.0
    perfect_plus_fp = truth.copy()
    perfect_plus_fp[2, 4, 4] = True
    scored = metrics.summarize(per_image(perfect_plus_fp))
    assert scored["dsc"] == 1.0 and scored["lesion_sensitivity"] == 1.0
    assert scored["lesion_free_fp_per_image"] == 0.5 and scored["fp_per_image"] == 0.25
    only_free = metrics.summarize({k: v[2:] for k, v in per_image(empty).items()})
    assert np.isnan(only_free["dsc"])  # no lesion-bearing scan: no headline, never 1
