"""Whole-body NM DICOM: writer -> reader round trips, the real GE scan, and every bad input."""

import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from broken_corpus import make_ct, make_rgb
from bonescan_model.errors import InputError
from bonescan_model.io.deid import keyed_hash
from bonescan_model.io.dicom import (
    LAYOUTS,
    VIEW_CODINGS,
    PatientIdentity,
    group_series,
    read_scan,
    write_whole_body,
)

SECRET = b"k" * 32
IDENTITY = PatientIdentity(
    patient_id="PID-12345",
    patient_name="Doe^Jane",
    birth_date="19610203",
    study_date="20240105",
    study_uid=generate_uid(),
    series_uid=generate_uid(),
)
IDENTIFYING = [IDENTITY.patient_id, IDENTITY.patient_name, "Doe", "Jane", IDENTITY.birth_date,
               IDENTITY.study_date, IDENTITY.study_uid, IDENTITY.series_uid]


def _counts(seed: int, shape=(1024, 256)) -> np.ndarray:
    # Full 16-bit range, so that any lossy step or sign mix-up shows.
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)


def _assert_anonymous(text: str):
    for value in IDENTIFYING:
        assert value not in text


def _edit(path, change):
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)
    return path


def _read_error(paths) -> str:
    with pytest.raises(InputError) as info:
        read_scan(paths, SECRET)
    message = str(info.value)
    assert "\n" not in message
    _assert_anonymous(message)
    return message


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("view_coding", VIEW_CODINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip(tmp_path, layout, view_coding, compressed):
    ant, post = _counts(0), _counts(1)
    files = write_whole_body(tmp_path, "scan01", ant, post, identity=IDENTITY, layout=layout,
                             view_coding=view_coding, compressed=compressed)
    assert len(files) == (1 if layout == "multiframe" else 2)
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "NM" and ds.PatientID == IDENTITY.patient_id
    assert ds.file_meta.TransferSyntaxUID.is_compressed == compressed

    scan = read_scan(files, SECRET)
    assert scan.name == "scan01"
    assert scan.views == ("ANT", "POST")
    assert scan.ant.dtype == np.uint16 and scan.post.dtype == np.uint16
    np.testing.assert_array_equal(scan.ant, ant)
    np.testing.assert_array_equal(scan.post, post[:, ::-1])  # mirrored into ANT orientation
    assert scan.pixel_spacing_mm == pytest.approx(2.26)
    assert scan.patient_key == keyed_hash(SECRET, IDENTITY.patient_id)
    assert scan.scan_key == keyed_hash(SECRET, IDENTITY.study_uid, IDENTITY.series_uid)
    assert scan.source_files == tuple(str(f) for f in sorted(files))
    _assert_anonymous(repr(scan))


def test_file_order_does_not_matter(tmp_path):
    files = write_whole_body(tmp_path, "scan01", _counts(0), _counts(1), identity=IDENTITY,
                             layout="two-files", view_coding="imageid")
    a, b = read_scan(files, SECRET), read_scan(files[::-1], SECRET)
    np.testing.assert_array_equal(a.ant, b.ant)
    np.testing.assert_array_equal(a.post, b.post)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_view_scan(tmp_path, layout):
    ant = _counts(2)
    files = write_whole_body(tmp_path, "scan02", ant, None, identity=IDENTITY, layout=layout)
    assert len(files) == 1
    scan = read_scan(files, SECRET)
    assert scan.views == ("ANT",) and scan.post is None
    np.testing.assert_array_equal(scan.ant, ant)


def test_post_only_scan_keeps_ant_empty(tmp_path):
    post = _counts(3)
    files = write_whole_body(tmp_path, "scan03", _counts(4), post, identity=IDENTITY,
                             layout="two-files", view_coding="code")
    scan = read_scan([files[1]], SECRET)
    assert scan.views == ("POST",) and scan.ant is None
    np.testing.assert_array_equal(scan.post, post[:, ::-1])
    assert scan.name == "scan03_POST"


def test_views_follow_the_codes_not_the_frame_order(tmp_path):
    ant, post = _counts(5), _counts(6)
    (path,) = write_whole_body(tmp_path, "scan04", ant, post, identity=IDENTITY)

    def point_frames_at_swapped_detectors(ds):
        items = list(ds.DetectorInformationSequence)
        ds.DetectorInformationSequence = pydicom.Sequence(items[::-1])
        ds.DetectorVector = [2, 1]

    scan = read_scan([_edit(path, point_frames_at_swapped_detectors)], SECRET)
    np.testing.assert_array_equal(scan.ant, ant)
    np.testing.assert_array_equal(scan.post, post[:, ::-1])


def test_view_words_in_free_text(tmp_path):
    ant, post = _counts(7), _counts(8)
    files = write_whole_body(tmp_path, "scan05", ant, post, identity=IDENTITY,
                             layout="two-files", view_coding="description")
    for path, text in zip(files, ["Anterior whole body", "Posterior whole body"]):
        _edit(path, lambda ds, text=text: setattr(ds, "ImageComments", text))
    scan = read_scan(files, SECRET)
    np.testing.assert_array_equal(scan.ant, ant)
    np.testing.assert_array_equal(scan.post, post[:, ::-1])


def test_signed_counts_clip_negative_to_zero(tmp_path):
    signed = np.random.default_rng(9).integers(-40, 3000, (1024, 256)).astype(np.int16)
    (path,) = write_whole_body(tmp_path, "scan06", np.zeros((1024, 256), np.uint16), None,
                               identity=IDENTITY)

    def make_signed(ds):
        ds.PixelRepresentation = 1
        ds.PixelData = signed.astype("<i2").tobytes()

    scan = read_scan([_edit(path, make_signed)], SECRET)
    np.testing.assert_array_equal(scan.ant, np.clip(signed, 0, None).astype(np.uint16))


@pytest.mark.parametrize("filename", ["JPEG2000.dcm", "JPGExtended.dcm"])
def test_real_ge_whole_body_scan_reads(filename):
    # The same GE Millennium bone scan, JPEG 2000 and 12-bit JPEG Extended encoded.
    path = get_testdata_file(filename)
    scan = read_scan([path], SECRET)
    assert scan.name == filename.removesuffix(".dcm")
    assert scan.views == ("ANT",) and scan.post is None
    assert scan.ant.shape == (1024, 256) and scan.ant.dtype == np.uint16
    assert scan.pixel_spacing_mm == pytest.approx(2.26)
    raw = pydicom.dcmread(path).pixel_array  # int16, with lossy-compression undershoot
    np.testing.assert_array_equal(scan.ant, np.clip(raw, 0, None))
    assert scan.patient_key == keyed_hash(SECRET, "8NM1")
    for value in ("8NM1", "CompressedSamples", "1.3.6.1.4.1.5962"):
        assert value not in repr(scan)


def test_group_series(tmp_path):
    one = write_whole_body(tmp_path, "a", _counts(0), _counts(1), identity=IDENTITY,
                           layout="two-files")
    other = dataclasses.replace(IDENTITY, series_uid=generate_uid())
    two = write_whole_body(tmp_path, "b", _counts(2), _counts(3), identity=other)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a scan")
    groups, rejected = group_series([*two, junk, *one[::-1]], SECRET)
    assert sorted(g.files for g in groups) == sorted([tuple(sorted(one)), tuple(two)])
    assert {g.patient_key for g in groups} == {read_scan(one, SECRET).patient_key}
    assert len(rejected) == 1 and rejected[0].path == str(junk)
    assert "not a DICOM file" in str(rejected[0])


# --- bad input: each is one InputError naming the file and the reason -----------------------

@pytest.mark.parametrize("keep", ["half", "header"])
@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_file(tmp_path, compressed, keep):
    (path,) = write_whole_body(tmp_path, "cut", _counts(0), _counts(1), identity=IDENTITY,
                               compressed=compressed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep == "half" else 700])
    message = _read_error([path])
    assert str(path) in message and "truncated" in message


def test_not_dicom(tmp_path):
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x00" * 64)
    message = _read_error([path])
    assert str(path) in message and "not a DICOM file" in message


def test_ct_image_is_rejected(tmp_path):
    (path,) = write_whole_body(tmp_path, "ct", _counts(0), None, identity=IDENTITY)

    message = _read_error([_edit(path, make_ct)])
    assert str(path) in message and "modality is CT" in message


def test_rgb_image_is_rejected(tmp_path):
    (path,) = write_whole_body(tmp_path, "rgb", _counts(0), None, identity=IDENTITY)

    message = _read_error([_edit(path, make_rgb)])
    assert str(path) in message and "SamplesPerPixel 3" in message


def test_missing_pixel_data(tmp_path):
    (path,) = write_whole_body(tmp_path, "empty", _counts(0), None, identity=IDENTITY)
    message = _read_error([_edit(path, lambda ds: delattr(ds, "PixelData"))])
    assert str(path) in message and "no pixel data" in message


def test_wrong_size_is_rejected(tmp_path):
    (path,) = write_whole_body(tmp_path, "square", _counts(0, (512, 512)), None,
                               identity=IDENTITY)
    message = _read_error([path])
    assert str(path) in message and "512x512" in message and "1024x256" in message


def test_three_views_in_one_series(tmp_path):
    files = write_whole_body(tmp_path, "three", _counts(0), _counts(1), identity=IDENTITY,
                             layout="two-files")
    third = tmp_path / "three_LAT.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(third)
    groups, rejected = group_series([*files, third], SECRET)
    assert len(groups) == 1 and not rejected
    message = _read_error(groups[0].files)
    assert "three_" in message and "3 views" in message


def test_two_frames_without_view_information(tmp_path):
    (path,) = write_whole_body(tmp_path, "blind", _counts(0), _counts(1), identity=IDENTITY)

    def drop_codes(ds):
        for item in ds.DetectorInformationSequence:
            del item.ViewCodeSequence

    message = _read_error([_edit(path, drop_codes)])
    assert str(path) in message and "views cannot be told apart" in message


def test_two_anterior_files(tmp_path):
    files = write_whole_body(tmp_path, "twice", _counts(0), _counts(1), identity=IDENTITY,
                             layout="two-files", view_coding="imageid")
    _edit(files[1], lambda ds: setattr(ds, "ImageID", "ANT"))
    message = _read_error(files)
    assert "twice_" in message and "views cannot be told apart" in message and "ANT" in message


def test_files_of_different_series(tmp_path):
    one = write_whole_body(tmp_path, "a", _counts(0), None, identity=IDENTITY)
    two = write_whole_body(tmp_path, "b", _counts(1), None,
                           identity=dataclasses.replace(IDENTITY, series_uid=generate_uid()))
    assert "different series" in _read_error([*one, *two])
