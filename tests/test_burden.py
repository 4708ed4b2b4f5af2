"""The lesion burden per scan (bonescan_model.burden) and where it is reported: predict's LabelMe
JSON and summary, evaluate's body and summary line, the report's prediction panels. No Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pydicom
import pytest

from bonescan_model.baseline import ThresholdModel
from bonescan_model.burden import Burden, burden, region_mask, skeleton_mask
from bonescan_model.io.dicom import WholeBodyScan
from bonescan_model.io.labelme import rasterize, read_labelme, write_labelme
from bonescan_model.inference import make_prediction, write_prediction
from bonescan_model.preprocess import crop, mirror, model_input, thoracic_crop_box
from bonescan_model.synth import PIXEL_SPACING_MM, synth_patient
from bonescan_platform import report, scoring, shards, stream
from bonescan_platform.runs import Run
from bonescan_platform.cli import main
from tiny import constant_run

GE_SCAN = pydicom.data.get_testdata_file("JPEG2000.dcm")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _banded_counts() -> np.ndarray:
    """40 x 40 counts: soft tissue (10) everywhere, a bone band (100) in rows 10-29."""
    counts = np.full((40, 40), 10.0)
    counts[10:30] = 100.0
    return counts


# ------------------------------------------------------------------------ definitions


def test_two_3x3_blobs_at_2_mm_are_2_lesions_and_0_72_cm2():
    mask = np.zeros((40, 40), dtype=bool)
    mask[12:15, 5:8] = mask[20:23, 30:33] = True  # 9 pixels each, 4 mm² a pixel
    b = burden(mask, _banded_counts(), 2.0)
    assert b.lesions == 2
    assert b.lesion_area_cm2 == pytest.approx(0.72)
    # The band is the skeleton, give or take the row of blur at each edge.
    assert 18 * 40 * 0.04 <= b.skeleton_area_cm2 <= 24 * 40 * 0.04
    assert b.skeleton_share == pytest.approx(b.lesion_area_cm2 / b.skeleton_area_cm2)
    assert b.skeleton_share == pytest.approx(18 / 800, rel=0.2)


def test_diagonal_neighbours_are_one_lesion():  # 8-connectivity, as make_prediction counts
    mask = np.zeros((40, 40), dtype=bool)
    mask[15, 15] = mask[16, 16] = True
    assert burden(mask, _banded_counts(), 1.0).lesions == 1


def test_only_the_region_counts():
    mask = np.zeros((40, 40), dtype=bool)
    mask[12:15, 5:8] = mask[20:23, 30:33] = True
    box = (-5, -5, 25, 25)  # reaches outside the image, as a crop box may: rows/cols 0-19
    b = burden(mask, _banded_counts(), 2.0, region=box)
    assert (b.lesions, b.lesion_area_cm2) == (1, pytest.approx(0.36))
    assert b.skeleton_area_cm2 <= 20 * 20 * 0.04 + 1e-9  # nothing outside the box
    as_mask = burden(mask, _banded_counts(), 2.0, region=region_mask(box, (40, 40)))
    assert as_mask == b
    assert not skeleton_mask(_banded_counts(), box)[20:].any()


def test_share_is_in_0_1_and_lesions_off_the_skeleton_count_as_bone():
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.poisson(rng.uniform(1, 50), (32, 32)) * (rng.random((32, 32)) < 0.8)
        mask = rng.random((32, 32)) < rng.uniform(0, 0.6)
        b = burden(mask, counts, 2.26)
        assert 0.0 <= b.skeleton_share <= 1.0
        assert b.lesion_area_cm2 <= b.skeleton_area_cm2 + 1e-12
    empty = np.zeros((16, 16))
    lesion = np.zeros((16, 16), dtype=bool)
    lesion[4:6, 4:6] = True
    assert burden(lesion, empty, 1.0) == Burden(1, 0.04, 0.04, 1.0)  # no counts: the lesion is all the bone
    assert burden(np.zeros((16, 16), bool), empty, 1.0) == Burden(0, 0.0, 0.0, 0.0)
    assert burden(np.zeros((40, 40), bool), _banded_counts(), 1.0).skeleton_share == 0.0


@pytest.mark.parametrize("mask, counts, spacing, region", [
    (np.zeros((4, 4), bool), np.zeros((4, 5)), 1.0, None),
    (np.zeros(16, bool), np.zeros(16), 1.0, None),
    (np.zeros((4, 4), bool), np.zeros((4, 4)), 0.0, None),
    (np.zeros((4, 4), bool), np.zeros((4, 4)), -2.26, None),
    (np.zeros((4, 4), bool), np.zeros((4, 4)), float("nan"), None),
    (np.zeros((4, 4), bool), np.zeros((4, 4)), "2.26 mm", None),
    (np.zeros((4, 4), bool), np.zeros((4, 4)), 1.0, np.ones((3, 3), bool)),
    (np.zeros((4, 4), bool), np.zeros((4, 4)), 1.0, (0, 0, -1, 2)),
])
def test_bad_input_is_a_value_error(mask, counts, spacing, region):
    with pytest.raises(ValueError):
        burden(mask, counts, spacing, region=region)


def test_json_round_trip():
    b = Burden(3, 1.2345678, 40.1, 0.0307)
    assert Burden.from_json(json.loads(json.dumps(b.to_json()))) == b
    with pytest.raises(ValueError):
        Burden.from_json({"lesions": 1})


# ------------------------------------------------------------------------ the skeleton


@pytest.fixture(scope="module")
def patients():
    return [synth_patient(0, i) for i in range(6)]


def test_skeleton_matches_the_phantoms_bone_in_the_thorax(patients):
    """Against the generator's true bone (SyntheticPatient.bone_mask), inside the thoracic crop:
    Dice 0.79-0.91 on these six (0.86 on 60); the body outline taken as skeleton scores ~0.69, so
    0.75 each and 0.82 on average say the method segments bone, not the body."""
    scores = []
    for p in patients:
        box = thoracic_crop_box(p.ant)
        inside = region_mask(box, p.ant.shape)
        skeleton = skeleton_mask(p.ant, box)
        assert not (skeleton & ~inside).any()
        scores.append(_dice(skeleton, p.bone_mask & inside))
        # Sanity, anatomy: the thoracic spine (midline, the crop's middle rows) is bone, air is not.
        rows = np.flatnonzero(inside.any(axis=1))
        spine_row = int(rows[len(rows) // 2])
        spine_col = int(np.argmax(np.where(p.bone_mask[spine_row], p.ant[spine_row], 0)))
        assert skeleton[spine_row, spine_col]
        assert not skeleton_mask(p.ant)[0:4, 0:4].any()
    assert min(scores) >= 0.75, scores
    assert np.mean(scores) >= 0.82, scores


def test_skeleton_of_the_normalized_crop_is_the_whole_bodys_in_the_box(patients):
    """What evaluate segments (the model input's ANT channel) is what predict segments (raw
    whole-body counts, the crop box as region)."""
    for p in patients[:3]:
        box = thoracic_crop_box(p.ant)
        whole = crop(skeleton_mask(p.ant, box).astype(np.uint8), box) > 0
        normalized = skeleton_mask(model_input(crop(p.ant, box), crop(mirror(p.post), box))[0])
        assert _dice(whole, normalized) >= 0.97


# ------------------------------------------------------------------------ predict


def _scan(patient) -> WholeBodyScan:
    return WholeBodyScan(name=patient.name, ant=patient.ant, post=np.ascontiguousarray(mirror(patient.post)),
                         views=("ANT", "POST"), pixel_spacing_mm=2.26, patient_key="k", scan_key="k",
                         source_files=())


def test_predictions_labelme_json_carries_the_burden(patients, tmp_path):
    patient = patients[0]
    scan = _scan(patient)
    box = thoracic_crop_box(patient.ant)
    crop_mask = np.zeros((256, 256), dtype=bool)
    crop_mask[60:63, 120:123] = crop_mask[150:152, 100:104] = True
    prediction = make_prediction(scan, box, crop_mask)
    assert prediction.burden.lesions == 2
    assert prediction.burden.lesion_area_cm2 == pytest.approx(17 * 2.26**2 / 100)
    assert prediction.burden == burden(prediction.mask, patient.ant, 2.26, region=box)
    _, labelme, _ = write_prediction(tmp_path, prediction, scan.ant)
    document = json.loads(labelme.read_text())
    assert document["burden"] == prediction.burden.to_json()
    assert Burden.from_json(document["burden"]) == prediction.burden
    # Our reader reads the file as it reads one without the key.
    plain = tmp_path / "plain.json"
    write_labelme(plain, prediction.polygons, prediction.mask.shape, document["imagePath"])
    ours, theirs = read_labelme(labelme), read_labelme(plain)
    assert (ours.image_shape, ours.image_path, ours.ignored) == (theirs.image_shape, theirs.image_path, ())
    np.testing.assert_array_equal(rasterize(ours, ours.image_shape), prediction.mask)
    # Real LabelMe keeps a key it does not know (LabelFile.otherData), but no key of its own may be shadowed.
    with pytest.raises(ValueError, match="imagePath"):
        write_labelme(plain, [], (4, 4), "x.png", extra={"imagePath": "y.png"})


def test_predict_summary_has_area_and_skeleton_share(deid_secret, tmp_path, capsys):
    run = constant_run(tmp_path / "all", 10.0)
    assert main(["predict", "--checkpoint", str(run), "--dicom", GE_SCAN, "--out", str(tmp_path / "out")]) == 0
    stdout = capsys.readouterr().out
    header = next(line for line in stdout.splitlines() if "lesions" in line and "scan " in line)
    assert "area cm²" in header and "skeleton %" in header
    saved = Burden.from_json(json.loads((tmp_path / "out" / "JPEG2000.json").read_text())["burden"])
    row = next(line for line in stdout.splitlines() if line.strip().startswith("JPEG2000"))
    # Every crop pixel a lesion: the share is 1 (the lesions are the skeleton's whole region).
    assert row.split()[1:] == ["1", f"{saved.lesion_area_cm2:.2f}", "100.00"]


# ------------------------------------------------------------------------ evaluate, report


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, patients):
    """A shard folder of four labeled test scans (three with lesions), written without Ray."""
    rows = []
    for i, p in enumerate(patients[:4]):
        box = thoracic_crop_box(p.ant)
        rows.append(shards.shard_row(
            patient_key=f"patient{i}", scan_key=f"scan{i}", ant=crop(p.ant, box), post=crop(mirror(p.post), box),
            mask=crop(p.lesion_mask.astype(np.uint8), box), crop_box=box, pixel_spacing_mm=PIXEL_SPACING_MM,
            readers_agree=True, source="synthetic", split="test", views="ANT+POST"))
    path = tmp_path_factory.mktemp("burden") / "shards"
    path.mkdir()
    info = shards.write_shard(rows, path / "test-00000.parquet")
    shards.write_manifest(path, [info], {"job": "test"})
    return path


def test_crops_carry_their_pixel_spacing(shard_dir):
    crops = stream.crops(shard_dir, "test")
    assert crops["pixel_spacing_mm"].shape == (4,)
    np.testing.assert_allclose(crops["pixel_spacing_mm"], PIXEL_SPACING_MM, rtol=1e-6)


def test_burden_agreement_of_the_truth_with_itself_is_perfect(shard_dir):
    crops = stream.crops(shard_dir, "test")
    body = scoring.burden_agreement(crops["mask"][:, 0] > 0.5, crops)
    assert (body["split"], body["images"], body["order"]) == ("test", 4, "scan_key")
    for name in scoring.BURDEN_FIELDS:
        assert body[name]["pearson"] == pytest.approx(1.0)
        assert body[name]["spearman"] == pytest.approx(1.0)
        assert body[name]["mean_abs_error"] == 0.0
    assert any(v > 0 for v in body["lesion_area_cm2"]["true"])
    assert all(0.0 <= v <= 1.0 for v in body["skeleton_share"]["true"])


def test_score_runs_reports_the_burden_correlation(shard_dir, capsys):
    crops = stream.crops(shard_dir, "test")
    body = scoring.score_runs(ThresholdModel(0.9), crops, runs=1)
    agreement = body["burden"]
    assert agreement["split"] == "test" and agreement["images"] == 4
    for name in scoring.BURDEN_FIELDS:
        for stat in ("pearson", "spearman"):
            value = agreement[name][stat]
            assert math.isnan(value) or -1.0 <= value <= 1.0
        assert len(agreement[name]["predicted"]) == len(agreement[name]["true"]) == 4
    scoring.print_summary({"split": "test", **body})
    assert "burden (test): lesion area r " in capsys.readouterr().out


def test_evaluate_json_has_the_burden(shard_dir, tmp_path, capsys):
    run = constant_run(tmp_path / "all", 10.0)
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(shard_dir), "--runs", "1",
                 "--json", str(out)]) == 0
    body = json.loads(out.read_text())
    assert body["split"] == "test" and body["burden"]["split"] == "test"
    # Every crop pixel predicted: the same area on every scan, so no correlation is defined.
    assert body["burden"]["lesion_area_cm2"]["predicted"] == [pytest.approx(256 * 256 * PIXEL_SPACING_MM**2 / 100,
                                                                            rel=1e-5)] * 4
    assert math.isnan(body["burden"]["lesion_area_cm2"]["pearson"])
    assert "burden (test)" in capsys.readouterr().out


def test_prediction_panel_titles_carry_the_burden(shard_dir, tmp_path, monkeypatch):
    run = constant_run(tmp_path / "none", -10.0)
    titles = []
    real = report._burden_title

    def recording(*args):
        titles.append(real(*args))
        return titles[-1]

    monkeypatch.setattr(report, "_burden_title", recording)
    html = report.prediction_panel(shard_dir, [("constant", Run(run))])
    assert "<img" in html
    assert len(titles) == 2 * 3  # the label's and the model's, for each of the three scans shown
    assert sum(t.startswith("0 lesions, 0.00 cm²") for t in titles) == 3  # the model finds nothing
