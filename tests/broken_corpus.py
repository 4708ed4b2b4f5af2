"""A folder of bad inputs a clinic could hand us, beside good ones, built on demand.

Each entry is (file name, the words its rejection reason must contain). The DICOM ones are
valid scans first (from the real writer), then broken the way real files break.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import CTImageStorage, generate_uid

from bonescan_model.io.dicom import PatientIdentity, write_whole_body

IDENTITY = PatientIdentity(
    patient_id="BROKEN-99117", patient_name="Broken^Bob", birth_date="19500101",
    study_date="20240202", study_uid=generate_uid(), series_uid=generate_uid())

EXPECTED = {
    "truncated.dcm": "truncated",
    "ct.dcm": "modality is CT",
    "rgb.dcm": "SamplesPerPixel 3",
    "nopixels.dcm": "no pixel data",
    "square.dcm": "512x512",
    "three_ANT.dcm": "3 views",
    "notes.txt": "not a DICOM file",
}
BAD_LABELS = {
    "unreadable.json": "JSON",
    "circle.json": "circle",
}


def _counts(seed: int, shape=(1024, 256)) -> np.ndarray:
    return np.random.default_rng(seed).poisson(20, shape).astype(np.uint16)


def _identity(i: int) -> PatientIdentity:
    # Every broken scan is its own series of its own patient, so nothing groups by accident.
    return PatientIdentity(**{**IDENTITY.__dict__, "patient_id": f"{IDENTITY.patient_id}{i}",
                              "series_uid": generate_uid(), "study_uid": generate_uid()})


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def make_ct(ds) -> None:
    ds.Modality = "CT"
    ds.SOPClassUID = CTImageStorage


def make_rgb(ds) -> None:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.zeros((1024, 256, 3), np.uint8).tobytes()


def build(folder: Path) -> None:
    """Write every broken DICOM of EXPECTED into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (path,) = write_whole_body(folder, "truncated", _counts(0), _counts(1), identity=_identity(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    (path,) = write_whole_body(folder, "ct", _counts(2), None, identity=_identity(1))
    _edit(path, make_ct)
    (path,) = write_whole_body(folder, "rgb", _counts(3), None, identity=_identity(2))
    _edit(path, make_rgb)

    (path,) = write_whole_body(folder, "nopixels", _counts(4), None, identity=_identity(3))
    _edit(path, lambda ds: delattr(ds, "PixelData"))

    write_whole_body(folder, "square", _counts(5, (512, 512)), None, identity=_identity(4))

    files = write_whole_body(folder, "three", _counts(6), _counts(7), identity=_identity(5),
                             layout="two-files")
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "three_LAT.dcm")

    (folder / "notes.txt").write_text("not a scan")


def build_bad_labels(reader_folder: Path, scan_names: list[str]) -> None:
    """Two bad label files for real scans: broken JSON, and a circle shape."""
    (reader_folder / f"{scan_names[0]}.json").write_text("{ not json")
    (reader_folder / f"{scan_names[1]}.json").write_text(json.dumps({
        "shapes": [{"label": "lesion", "shape_type": "circle", "points": [[10, 10], [12, 12]]}],
        "imageHeight": 1024, "imageWidth": 256, "imagePath": "x.png"}))


# ---------------------------------------------------------------- a new user's probe (issue 15)
JPEG_XL = "1.2.840.10008.1.2.4.110"  # a standard transfer syntax newer than pydicom 3.0


def scan(folder: Path, name: str, seed: int, **header) -> Path:
    """A good one-file scan of a patient of its own; ``header`` keywords are then set on it."""
    (path,) = write_whole_body(folder, name, _counts(seed), _counts(seed + 1), identity=_identity(1000 + seed))
    if header:
        _edit(path, lambda ds: [setattr(ds, k, v) for k, v in header.items()])
    return path


def set_transfer_syntax(path: Path, uid: str) -> None:
    """Rewrite the file meta's TransferSyntaxUID in place (pydicom refuses to write a UID it
    does not know); the data set stays Explicit VR Little Endian."""
    old = b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00"
    data = path.read_bytes()
    assert data.count(old) == 1 and data[132:136] == b"\x02\x00\x00\x00"
    value = uid.encode() + b"\x00" * (len(uid) % 2)
    data = data.replace(old, b"\x02\x00\x10\x00UI" + len(value).to_bytes(2, "little") + value)
    group_length = int.from_bytes(data[140:144], "little") + len(value) - 20
    path.write_bytes(data[:140] + group_length.to_bytes(4, "little") + data[144:])


def no_body(folder: Path, name: str) -> Path:
    """A well-formed scan with no counts at all: nothing to crop."""
    zeros = np.zeros((1024, 256), np.uint16)
    (path,) = write_whole_body(folder, name, zeros, zeros, identity=_identity(2000))
    return path
