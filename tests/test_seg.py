"""DICOM SEG output (`bonescan_model.io.seg`, `bonescan predict --seg`): valid DICOM by dciodvfy,
read back by highdicom to the very mask, referencing the source images; de-identified on request.

No Ray: a single scan predicts in process. dciodvfy is Debian's dicom3tools (README's second
command); without it the validating tests skip and say so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage.io import imread

hd = pytest.importorskip("highdicom", reason="highdicom is the 'seg' extra: pip install -e '.[seg]' (or '.[test]')")

from bonescan_model.errors import InputError  # noqa: E402
from bonescan_model.io.deid import keyed_hash, load_or_create_secret  # noqa: E402
from bonescan_model.io.dicom import write_whole_body  # noqa: E402
from bonescan_model.io.seg import keyed_uid, segmentation, to_bytes, write_segmentation  # noqa: E402
from bonescan_model.preprocess import mirror  # noqa: E402
from bonescan_model.synth import synth_patient  # noqa: E402
from bonescan_platform.cli import main  # noqa: E402
from tiny import constant_run  # noqa: E402

GE_SCAN = pydicom.data.get_testdata_file("JPEG2000.dcm")
SHAPE = (1024, 256)
DCIODVFY = shutil.which("dciodvfy")


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's "Error - ..." and "Warning - ..." lines for one file (it prints to stderr)."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy is not on PATH: install Debian's dicom3tools (apt-get install dicom3tools)")
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if "Error" in line], [line for line in lines if line.startswith("Warning")]


@pytest.fixture(scope="module")
def patient():
    return synth_patient(3, 0)


@pytest.fixture(scope="module")
def secret(deid_secret):
    return load_or_create_secret(deid_secret)


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    """A few lesion blobs, off the midline so that mirroring moves them."""
    m = np.zeros(SHAPE, dtype=bool)
    m[300:309, 40:47] = True
    m[420:424, 200:203] = True
    m[610, 31] = True
    rows, cols = np.ogrid[:SHAPE[0], :SHAPE[1]]
    m |= (rows - 500) ** 2 + (cols - 90) ** 2 <= 25
    return m


def _write_scan(folder: Path, patient, layout: str) -> list[Path]:
    """layout: "multiframe" (ANT+POST in one file), "two-files" or "ant-only"."""
    post = None if layout == "ant-only" else patient.post
    return write_whole_body(folder, patient.name, patient.ant, post, identity=patient.identity,
                            layout="two-files" if layout == "two-files" else "multiframe")


def _sop_uids(files) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sorted(files)]


def _frames_by_source(seg, files: list[Path], layout: str, uid=lambda u: u) -> np.ndarray:
    """The SEG's frames as (views, H, W) bool, looked up by the source frames they reference."""
    uids = [uid(u) for u in _sop_uids(files)]
    if layout == "multiframe":
        pixels = seg.get_pixels_by_source_frame(uids[0], [1, 2], combine_segments=True)
    else:  # one instance per view, ANT file first (sorted: <name>_ANT.dcm < <name>_POST.dcm)
        pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    return pixels > 0


def _identifiers(patient, files) -> set[str]:
    ident = patient.identity
    needles = {ident.patient_id, ident.patient_name, ident.patient_name.replace("^", " "), ident.birth_date,
               ident.study_date, ident.study_uid, ident.series_uid, *_sop_uids(files)}
    return {n for n in needles if len(n) >= 6}


# ----------------------------------------------------------------------------- library


@pytest.mark.parametrize("layout", ["multiframe", "two-files", "ant-only"])
def test_seg_of_each_layout_is_valid_and_reads_back_as_the_mask(layout, patient, mask, tmp_path):
    files = _write_scan(tmp_path / "scan", patient, layout)
    path = write_segmentation(tmp_path / f"{patient.name}.seg.dcm", files, mask)
    assert path.is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    errors, warnings = _dciodvfy(path)
    assert errors == [], errors
    # What dciodvfy still says: a DICOMDIR would want a Study ID, which the source has not either.
    assert all("DICOMDIR" in w for w in warnings), warnings

    seg = hd.seg.segread(path)
    views = ["ANT"] if layout == "ant-only" else ["ANT", "POST"]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.number_of_frames == len(views)
    assert [f.FrameContentSequence[0].FrameLabel for f in seg.PerFrameFunctionalGroupsSequence] == views
    expected = np.stack([mask, mirror(mask)][: len(views)])  # POST back in its own orientation
    np.testing.assert_array_equal(_frames_by_source(seg, files, layout), expected)

    # It references exactly the source's images, and keeps the source's patient and study.
    assert sorted(u for _, _, u in seg.get_source_image_uids()) == sorted(_sop_uids(files))
    assert {item.ReferencedSOPInstanceUID for item in seg.SourceImageSequence} == set(_sop_uids(files))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == patient.identity.series_uid
    assert (seg.PatientID, str(seg.PatientName), seg.StudyInstanceUID) == (
        patient.identity.patient_id, patient.identity.patient_name, patient.identity.study_uid)

    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "bone metastasis lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert (segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            segment.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("49755003", "14799000")
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "bonescan" and algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"


def test_a_real_view_less_scan_gets_a_valid_one_frame_seg(mask, tmp_path):
    """pydicom's GE scan: one frame without view information (taken as ANT), a Secondary
    Capture SOP class, a Frame of Reference without plane positions."""
    path = write_segmentation(tmp_path / "ge.seg.dcm", [GE_SCAN], mask)
    errors, _ = _dciodvfy(path)
    assert errors == [], errors
    seg = hd.seg.segread(path)
    uid = _sop_uids([GE_SCAN])[0]
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance([uid], combine_segments=True)[0] > 0, mask)
    assert "FrameOfReferenceUID" not in seg  # its frames are tied to the source by reference only


@pytest.mark.parametrize("layout", ["multiframe", "two-files"])
def test_deidentified_seg_carries_no_identifier_and_keyed_references(layout, patient, mask, secret, tmp_path):
    files = _write_scan(tmp_path / "scan", patient, layout)
    path = write_segmentation(tmp_path / "deid.seg.dcm", files, mask, patient="deidentified", secret=secret)
    blob = path.read_bytes()
    for needle in _identifiers(patient, files):
        assert needle.encode() not in blob, needle
    errors, _ = _dciodvfy(path)
    assert errors == [], errors

    seg = hd.seg.segread(path)
    assert seg.PatientID == keyed_hash(secret, patient.identity.patient_id)
    assert str(seg.PatientName) == "ANONYMOUS^" and seg.PatientIdentityRemoved == "YES"
    assert seg.PatientBirthDate == "" and seg.StudyDate == ""
    assert seg.StudyInstanceUID == keyed_uid(secret, patient.identity.study_uid)
    # The references are the source's UIDs under the same keyed mapping: the masks are found by them.
    assert sorted(u for _, _, u in seg.get_source_image_uids()) == sorted(
        keyed_uid(secret, u) for u in _sop_uids(files))
    np.testing.assert_array_equal(_frames_by_source(seg, files, layout, lambda u: keyed_uid(secret, u)),
                                  np.stack([mask, mirror(mask)]))
    again = segmentation(files, mask, patient="deidentified", secret=secret)
    assert again.StudyInstanceUID == seg.StudyInstanceUID  # the same on every run
    assert to_bytes(again)[128:132] == b"DICM"


def test_bad_input_is_one_clear_line_naming_the_file(patient, mask, tmp_path):
    (scan,) = _write_scan(tmp_path / "scan", patient, "multiframe")
    needles = _identifiers(patient, [scan])
    out = tmp_path / "out" / "x.seg.dcm"

    with pytest.raises(InputError) as err:
        write_segmentation(out, [scan], mask[:512])
    assert err.value.path == str(scan)
    assert "mask is 512x256 but the source frames are 1024x256" in err.value.reason

    ct = pydicom.dcmread(scan)
    ct.Modality = "CT"
    ct.save_as(tmp_path / "ct.dcm")
    with pytest.raises(InputError, match="modality is CT, expected NM"):
        write_segmentation(out, [tmp_path / "ct.dcm"], mask)

    with pytest.raises(ValueError, match="patient must be one of"):
        segmentation([scan], mask, patient="anonymous")
    with pytest.raises(ValueError, match="bool or 0/1"):
        segmentation([scan], mask.astype(np.uint8) * 255)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing half written
    for e in (err.value,):
        assert "\n" not in str(e) and not any(n in str(e) for n in needles)


def test_a_failed_write_leaves_no_file(patient, mask, tmp_path, monkeypatch):
    files = _write_scan(tmp_path / "scan", patient, "two-files")

    def full_disk(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", full_disk)
    with pytest.raises(OSError):
        write_segmentation(tmp_path / "out" / "x.seg.dcm", files, mask)
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder whose model calls every pixel of the crop a lesion (final bias +10), as
    tests/test_predict.py makes its checkpoints: the mask is the crop box, never empty."""
    return constant_run(tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("layout,seg_patient", [("multiframe", "source"), ("two-files", "deidentified")])
def test_cli_writes_a_seg_equal_to_the_mask_png(layout, seg_patient, run, patient, deid_secret, tmp_path, capsys):
    files = _write_scan(tmp_path / "in", patient, layout)
    dicom = files[0] if layout == "multiframe" else tmp_path / "in"  # a file, or a folder of one series
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(run), "--dicom", str(dicom), "--out", str(out), "--seg"]
    if seg_patient != "source":
        args += ["--seg-patient", seg_patient]
    assert main(args) == 0
    stdout, stderr = capsys.readouterr()
    assert "predicted 1 scan(s)" in stdout and "<name>.seg.dcm" in stdout

    path = out / f"{patient.name}.seg.dcm"
    errors, _ = _dciodvfy(path)
    assert errors == [], errors
    predicted = imread(out / f"{patient.name}.mask.png") > 0
    assert predicted.any()
    uid = (lambda u: u) if seg_patient == "source" else (lambda u: keyed_uid(load_or_create_secret(deid_secret), u))
    np.testing.assert_array_equal(_frames_by_source(hd.seg.segread(path), files, layout, uid),
                                  np.stack([predicted, mirror(predicted)]))
    needles = _identifiers(patient, files)
    assert not any(n in stdout + stderr for n in needles)  # nothing printed names the patient
    if seg_patient == "deidentified":
        assert not any(n.encode() in p.read_bytes() for p in out.iterdir() for n in needles)


def test_cli_without_seg_writes_no_seg(run, patient, deid_secret, tmp_path, capsys):
    (scan,) = _write_scan(tmp_path / "in", patient, "multiframe")
    assert main(["predict", "--checkpoint", str(run), "--dicom", str(scan), "--out", str(tmp_path / "out")]) == 0
    assert "seg.dcm" not in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{patient.name}{suffix}" for suffix in (".mask.png", ".json", ".overlay.png"))


def test_cli_bad_seg_patient_is_a_clear_error(run, patient, deid_secret, tmp_path, capsys):
    (scan,) = _write_scan(tmp_path / "in", patient, "multiframe")
    base = ["predict", "--checkpoint", str(run), "--dicom", str(scan), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        main(base + ["--seg", "--seg-patient", "nobody"])
    assert exited.value.code == 2
    assert "--seg-patient: invalid choice: 'nobody' (choose from" in capsys.readouterr().err

    assert main(base + ["--seg-patient", "deidentified"]) == 2  # without --seg it would do nothing
    err = capsys.readouterr().err.strip()
    assert err == "error: --seg-patient: applies to the DICOM SEG only: add --seg"
    assert not (tmp_path / "out").exists()


def test_cli_seg_without_highdicom_says_what_to_install(run, patient, deid_secret, tmp_path, capsys, monkeypatch):
    (scan,) = _write_scan(tmp_path / "in", patient, "multiframe")
    monkeypatch.setitem(sys.modules, "highdicom", None)  # `import highdicom` now fails
    monkeypatch.delitem(sys.modules, "bonescan_model.io.seg")
    assert main(["predict", "--checkpoint", str(run), "--dicom", str(scan), "--out", str(tmp_path / "out"),
                 "--seg"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --seg: writing DICOM SEG: it needs highdicom: pip install 'bonescan[seg]'"
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cli_a_seg_that_cannot_be_built_rejects_the_scan_and_keeps_no_outputs(
        run, patient, deid_secret, tmp_path, capsys, monkeypatch):
    (scan,) = _write_scan(tmp_path / "in", patient, "multiframe")
    from bonescan_model.io import seg as seg_module

    real = seg_module.write_segmentation

    def mismatch(path, source_files, mask, **kwargs):  # as if the mask were of another scan
        return real(path, source_files, mask[:512], **kwargs)

    monkeypatch.setattr(seg_module, "write_segmentation", mismatch)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(run), "--dicom", str(scan), "--out", str(out), "--seg"]) == 2
    stdout = capsys.readouterr().out
    assert f"{scan}: its DICOM SEG could not be written: mask is 512x256 but the source frames are 1024x256" in stdout
    assert list(out.iterdir()) == []  # no mask PNG without the SEG that was asked for
