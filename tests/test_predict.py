"""`bonescan predict`: whole-body DICOM -> mask PNG, LabelMe JSON, overlay, in process and on Ray.

Checkpoints here are tiny models whose output is known: the final 1x1 convolution's weights
are zero and its bias +10 (every crop pixel a lesion) or -10 (none), so the expected whole-body
mask is exactly the crop box, or empty.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from skimage.io import imread

from bonescan_model import engine
from bonescan_model.checkpoint import load_checkpoint
from bonescan_model.contours import polygons_to_mask
from bonescan_model.io.deid import load_or_create_secret
from bonescan_model.io.dicom import PatientIdentity, WholeBodyScan, read_scan, write_whole_body
from bonescan_model.io.labelme import rasterize, read_labelme
from bonescan_model.network import ModelConfig, build_model
from bonescan_model.inference import (
    make_prediction,
    paste,
    predict_scan,
    predict_scans,
    scan_crop_box,
    write_prediction,
)
from bonescan_model.preprocess import crop, mirror, thoracic_crop_box
from bonescan_model.synth import synth_patient
from bonescan_platform.cli import main
from bonescan_platform.predict import plan_scans
from tiny import constant_run

GE_SCAN = pydicom.data.get_testdata_file("JPEG2000.dcm")
SHAPE = (1024, 256)
SEED = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"all": constant_run(root / "all", 10.0), "none": constant_run(root / "none", -10.0)}


@pytest.fixture(scope="module")
def models(runs):
    return {kind: load_checkpoint(run)[0] for kind, run in runs.items()}


@pytest.fixture(scope="module")
def secret(deid_secret):
    return load_or_create_secret(deid_secret)


def _box_mask(box, shape=SHAPE) -> np.ndarray:
    row0, col0, rows, cols = box
    mask = np.zeros(shape, dtype=bool)
    mask[max(row0, 0): row0 + rows, max(col0, 0): col0 + cols] = True
    return mask


def _scan(patient, *, with_ant: bool = True) -> WholeBodyScan:
    """A synthetic patient as read_scan would return it (POST mirrored into ANT orientation)."""
    post = np.ascontiguousarray(mirror(patient.post))
    return WholeBodyScan(name=patient.name, ant=patient.ant if with_ant else None, post=post,
                         views=("ANT", "POST") if with_ant else ("POST",), pixel_spacing_mm=2.26,
                         patient_key="k", scan_key="k", source_files=())


def _identifiers(*identities: PatientIdentity) -> set[str]:
    needles = {v for ident in identities for v in ident.__dict__.values() if len(v) >= 6}
    return needles | {n.replace("^", " ") for n in needles if "^" in n}


def _assert_absent(needles: set[str], folder: Path, text: str) -> None:
    blobs = [p.read_bytes() for p in folder.rglob("*") if p.is_file()]
    assert blobs
    for needle in needles:
        assert not any(needle.encode() in blob for blob in blobs), needle
        assert needle not in text, needle


# ------------------------------------------------------------------------ library


@pytest.mark.parametrize("box", [(100, 0, 256, 256), (-40, -30, 64, 64), (1000, 200, 64, 100), (2000, 0, 8, 8)])
def test_paste_puts_back_what_crop_took(box):
    image = np.random.default_rng(0).random(SHAPE) > 0.5
    back = paste(crop(image, box), box, SHAPE)
    np.testing.assert_array_equal(back, image & _box_mask(box))


def test_prediction_from_a_hand_made_crop_mask():
    patient = synth_patient(SEED, 0)
    scan = _scan(patient)
    box = (300, 0, 256, 256)
    crop_mask = np.zeros((256, 256), dtype=bool)
    crop_mask[10:13, 20:23] = True  # 9 pixels, first in raster order
    crop_mask[100:102, 50:54] = True  # 8 pixels
    prediction = make_prediction(scan, box, crop_mask)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[310:313, 20:23] = expected[400:402, 50:54] = True
    np.testing.assert_array_equal(prediction.mask, expected)
    assert prediction.lesions == 2
    assert prediction.lesion_areas_mm2 == pytest.approx((9 * 2.26**2, 8 * 2.26**2))
    np.testing.assert_array_equal(polygons_to_mask(prediction.polygons, SHAPE), expected)
    for polygon in prediction.polygons:
        np.testing.assert_array_equal(polygon[0], polygon[-1])


def test_all_lesion_model_marks_exactly_the_crop_box(models, secret):
    scan = read_scan([GE_SCAN], secret)
    prediction = predict_scan(models["all"], scan)
    box = thoracic_crop_box(scan.ant)
    assert prediction.crop_box == box and prediction.mask.shape == SHAPE
    np.testing.assert_array_equal(prediction.mask, _box_mask(box))
    (polygon,) = prediction.polygons
    np.testing.assert_array_equal(polygons_to_mask([polygon], SHAPE), _box_mask(box))
    assert prediction.lesion_areas_mm2 == pytest.approx((256 * 256 * scan.pixel_spacing_mm**2,))


def test_no_lesion_model_writes_empty_outputs(models, secret, tmp_path):
    scan = read_scan([GE_SCAN], secret)
    prediction = predict_scan(models["none"], scan)
    assert not prediction.mask.any() and prediction.polygons == [] and prediction.lesions == 0
    mask_png, labelme, overlay = write_prediction(tmp_path, prediction, scan.ant)
    assert not imread(mask_png).any()
    assert json.loads(labelme.read_text())["shapes"] == []
    assert imread(overlay).shape[:2] == (2 * SHAPE[0], 2 * SHAPE[1])


def test_a_batch_of_scans_keeps_each_scan_in_its_own_box(models, secret):
    patient, post_only = synth_patient(SEED, 1), synth_patient(SEED, 3)
    scans = [read_scan([GE_SCAN], secret), _scan(patient), _scan(post_only, with_ant=False)]
    predictions = predict_scans(models["all"], scans)
    boxes = [thoracic_crop_box(scans[0].ant), thoracic_crop_box(patient.ant),
             thoracic_crop_box(mirror(post_only.post))]
    assert len(set(boxes)) == 3  # otherwise a mix-up between scans would go unseen
    for scan, prediction, box in zip(scans, predictions, boxes):
        assert prediction.name == scan.name and prediction.crop_box == box == scan_crop_box(scan)
        np.testing.assert_array_equal(prediction.mask, _box_mask(box))


def test_crops_one_at_a_time_or_all_at_once_predict_the_same(secret, monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4, recurrence=1, dilations=(1, 2)))
    scans = [_scan(synth_patient(SEED, i)) for i in range(3)]
    results = []
    for step in (1, 3):  # the CPU default, and a GPU's whole batch
        monkeypatch.setattr(engine, "CPU_FORWARD_BATCH", step)
        results.append([p.mask for p in predict_scans(model, scans, threshold=0.02)])
    assert len(results[0]) == len(results[1]) == 3
    assert 0 < sum(m.sum() for m in results[0])  # a threshold low enough to mark something
    for one, together in zip(*results):  # float rounding may differ with the batch; scans may not
        assert (one != together).mean() < 1e-4


def test_plan_keeps_sub_folders_and_never_reuses_a_name(secret, tmp_path):
    dicom = tmp_path / "in"
    out = dicom / "predictions"  # outputs inside the input: never read as input
    image = synth_patient(SEED, 2)
    folders = [dicom, dicom, dicom / "study2", out]
    for i, (folder, layout) in enumerate(zip(folders, ["multiframe", "two-files", "multiframe", "multiframe"])):
        identity = PatientIdentity(f"PID{i}", "A^B", "", "20200101", f"1.2.{i}.1", f"1.2.{i}.2")
        write_whole_body(folder, "wb", image.ant, image.post, identity=identity, layout=layout)
    tasks, unreadable = plan_scans(dicom, out, secret)
    assert unreadable == []
    assert sorted((Path(t["out_dir"]).relative_to(out).as_posix(), t["name"]) for t in tasks) == [
        (".", "wb"), (".", "wb_2"), ("study2", "wb")]


# ------------------------------------------------------------------------ command line


def test_cli_predicts_the_real_ge_scan(runs, deid_secret, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(runs["all"]), "--dicom", GE_SCAN, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "predicted 1 scan(s), 1 lesion(s)" in stdout
    mask = imread(out / "JPEG2000.mask.png")
    assert mask.shape == SHAPE and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    labelme = json.loads((out / "JPEG2000.json").read_text())
    assert (labelme["imageHeight"], labelme["imageWidth"]) == SHAPE
    assert labelme["imagePath"] == "JPEG2000.mask.png"
    points = np.array([p for shape in labelme["shapes"] for p in shape["points"]])  # [x, y]
    # Curves run along pixel edges: at most half a pixel beyond the outermost pixel centres.
    assert points.min() >= -0.5 and points[:, 0].max() <= SHAPE[1] - 0.5 and points[:, 1].max() <= SHAPE[0] - 0.5
    np.testing.assert_array_equal(rasterize(read_labelme(out / "JPEG2000.json"), SHAPE), mask > 0)
    overlay = imread(out / "JPEG2000.overlay.png")
    assert overlay.shape[:2] == (2048, 512) and overlay[..., :3].std() > 10
    ds = pydicom.dcmread(GE_SCAN)
    needles = {str(ds.get(k)) for k in ("PatientName", "PatientID", "StudyDate", "StudyInstanceUID",
                                        "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName")}
    _assert_absent({n for n in needles if len(n) >= 4}, out, stdout)


@pytest.mark.parametrize("make", ["missing", "not_a_checkpoint"])
def test_bad_checkpoint_is_a_one_line_error(make, deid_secret, tmp_path, capsys):
    run = tmp_path / "run"
    if make == "not_a_checkpoint":
        run.mkdir()
        (run / "model.pt").write_text("weights")
    assert main(["predict", "--checkpoint", str(run), "--dicom", GE_SCAN, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(run) in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_nothing_predicted_exits_2(runs, deid_secret, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.dcm").write_text("a note, not a scan")
    assert main(["predict", "--checkpoint", str(runs["all"]), "--dicom", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "x.dcm: not a DICOM file" in capsys.readouterr().out  # `<file>: <reason>`, as the README promises


@pytest.mark.ray
def test_folder_runs_on_ray_and_skips_bad_files(runs, ray_local, deid_secret, tmp_path, capsys):
    dicom, out = tmp_path / "in", tmp_path / "out"
    patients = [synth_patient(SEED, i) for i in range(2)]
    write_whole_body(dicom, patients[0].name, patients[0].ant, patients[0].post, identity=patients[0].identity)
    write_whole_body(dicom / "ward2", patients[1].name, patients[1].ant, patients[1].post,
                     identity=patients[1].identity, layout="two-files", compressed=True)
    (dicom / "x.dcm").write_text("a note, not a scan")  # rejected by the driver (headers)
    (broken,) = write_whole_body(dicom, "truncated", patients[0].ant, patients[0].post,
                                 identity=PatientIdentity("TRUNC-1234", "Cut^Off", "19600101",
                                                          "20230303", "1.2.3.9", "1.2.3.10"))
    broken.write_bytes(broken.read_bytes()[:300_000])  # rejected by an actor (pixel data)
    blank = np.zeros(SHAPE, dtype=np.uint16)  # a valid file, but no body to crop
    (empty,) = write_whole_body(dicom, "empty", blank, blank, identity=PatientIdentity(
        "EMPTY-5678", "No^Body", "", "20230404", "1.2.3.11", "1.2.3.12"))

    assert main(["predict", "--checkpoint", str(runs["all"]), "--dicom", str(dicom), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "predicted 2 scan(s), 2 lesion(s) found; rejected 3 file(s)" in stdout
    lines = stdout.splitlines()
    assert any(line.strip().startswith(str(dicom / "x.dcm")) and "not a DICOM file" in line for line in lines)
    assert any(line.strip().startswith(str(broken)) and "truncated" in line for line in lines)
    assert any(line.strip().startswith(str(empty)) and "no body found" in line for line in lines)
    for patient, folder in zip(patients, [out, out / "ward2"]):
        mask = imread(folder / f"{patient.name}.mask.png") > 0
        np.testing.assert_array_equal(mask, _box_mask(thoracic_crop_box(patient.ant)))
        assert len(read_labelme(folder / f"{patient.name}.json").polygons) == 1
        assert (folder / f"{patient.name}.overlay.png").is_file()
    assert sorted(p.name for p in out.rglob("*.json")) == sorted(f"{p.name}.json" for p in patients)
    _assert_absent(_identifiers(*(p.identity for p in patients)) | {"TRUNC-1234", "Cut^Off", "20230303"},
                   out, stdout)
