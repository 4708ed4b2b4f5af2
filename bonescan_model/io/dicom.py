"""Whole-body NM bone scans in DICOM: a writer (for the synthetic cohort and tests) and a reader.

A clinic stores a whole-body scan (1024 rows x 256 cols, head at row 0, 16-bit counts) as
either one file with two frames (ANT, POST) or two single-frame files of one series; the view
of each frame is coded in DetectorInformationSequence/ViewCodeSequence, in ImageID, or only in
free text. See docs/design.md, "Inputs as a clinic has them".
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import __version__ as pydicom_version
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    NuclearMedicineImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

from bonescan_model.errors import InputError, describe
from bonescan_model.io.deid import keyed_hash
from bonescan_model.preprocess import mirror

# SNOMED CT codes of the two whole-body projections (DICOM CID 26 "Nuclear Medicine Projections").
SCT_ANTERIOR = ("399321004", "Anterior projection")
SCT_POSTERIOR = ("399001007", "Posterior projection")
_VIEW_CODES = {"ANT": SCT_ANTERIOR, "POST": SCT_POSTERIOR}

LAYOUTS = ("multiframe", "two-files")
VIEW_CODINGS = ("code", "imageid", "description")


@dataclass(frozen=True)
class PatientIdentity:
    """What a writer puts in the headers. Never leaves the reader (see ``WholeBodyScan``)."""

    patient_id: str
    patient_name: str
    birth_date: str  # DICOM DA, "YYYYMMDD" or ""
    study_date: str  # DICOM DA, "YYYYMMDD"
    study_uid: str
    series_uid: str


def _as_counts(image: np.ndarray, what: str) -> np.ndarray:
    """Validate one (H, W) image of counts and return it as C-ordered uint16."""
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"{what} must be (H, W), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must hold integer counts, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) > 0xFFFF):
        raise ValueError(f"{what} counts must lie in [0, 65535]")
    return np.ascontiguousarray(a, dtype=np.uint16)


def _code_item(view: str) -> Dataset:
    value, meaning = _VIEW_CODES[view]
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def _detector_item(view: str, with_code: bool) -> Dataset:
    item = Dataset()
    if with_code:
        item.ViewCodeSequence = DicomSequence([_code_item(view)])
    return item


def _base_dataset(
    identity: PatientIdentity, rows: int, cols: int, pixel_spacing_mm: float
) -> Dataset:
    """The headers every file of one scan shares: patient, study, series, image pixel module."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = NuclearMedicineImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SOPClassUID = NuclearMedicineImageStorage
    ds.Modality = "NM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"]
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.StudyDate = identity.study_date
    ds.SeriesDate = identity.study_date
    ds.ContentDate = identity.study_date
    ds.StudyTime = "120000"
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    ds.StudyDescription = "Whole Body Bone"
    ds.BodyPartExamined = "WHOLE BODY"
    ds.SeriesNumber = 1
    ds.PatientPosition = "HFS"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]
    return ds


def _finish(ds: Dataset, frames: list[np.ndarray], views: list[str], series_views: list[str],
            view_coding: str, detector_index: list[int], instance_number: int,
            compressed: bool) -> Dataset:
    """Add frames, per-frame view information and pixel data to a copy of the shared headers."""
    ds = copy.deepcopy(ds)  # Dataset.copy() is shallow: its elements would be shared
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = instance_number
    ds.NumberOfFrames = len(frames)
    # NM multi-frame module: frame i was seen by detector DetectorVector[i] (1-based items of
    # DetectorInformationSequence), which is where the view code lives.
    ds.FrameIncrementPointer = 0x00540020  # DetectorVector
    ds.DetectorVector = detector_index
    ds.NumberOfDetectors = len(detector_index)
    ds.DetectorInformationSequence = DicomSequence(
        [_detector_item(v, with_code=view_coding == "code") for v in views]
    )
    if view_coding == "imageid":
        # ImageID has one value per frame here (frame order), as vendors write it for
        # multi-frame whole-body files.
        ds.ImageID = views if len(views) > 1 else views[0]
    elif view_coding == "description":
        # Free text only, as older cameras write it: the image's comment names its view(s) in
        # frame order; the series description (shared by both files of a two-file scan)
        # names the whole series.
        ds.ImageComments = "Whole body " + " / ".join(views)
        ds.SeriesDescription = "WB BONE " + "/".join(series_views)
    pixels = np.stack(frames) if len(frames) > 1 else frames[0]  # (F, H, W) or (H, W)
    ds.PixelData = pixels.astype("<u2").tobytes()
    if compressed:
        # pylibjpeg-openjpeg is the JPEG 2000 encoder pydicom 3 supports; lossless so that a
        # round trip is exact.
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def write_whole_body(
    out_dir: str | os.PathLike,
    name: str,
    ant: np.ndarray,
    post: np.ndarray | None,
    *,
    identity: PatientIdentity,
    pixel_spacing_mm: float = 2.26,
    layout: str = "multiframe",
    view_coding: str = "code",
    compressed: bool = False,
) -> list[Path]:
    """Write one whole-body scan as NM DICOM and return the files written.

    ant, post: (H, W) integer counts in [0, 65535] as the camera records them: POST in
    posterior orientation (not mirrored). post None writes a one-view (ANT) scan.
    layout "multiframe": ``<name>.dcm`` holding ANT then POST as frames;
    "two-files": ``<name>_ANT.dcm`` and ``<name>_POST.dcm``, single-frame, one series.
    view_coding "code": ViewCodeSequence (SCT) in DetectorInformationSequence items;
    "imageid": ImageID "ANT"/"POST" only; "description": only free text (ImageComments,
    SeriesDescription). compressed: JPEG 2000 lossless.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if view_coding not in VIEW_CODINGS:
        raise ValueError(f"view_coding must be one of {VIEW_CODINGS}, got {view_coding!r}")
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    if not pixel_spacing_mm > 0:
        raise ValueError(f"pixel_spacing_mm must be > 0, got {pixel_spacing_mm}")
    frames = [_as_counts(ant, "ant")]
    views = ["ANT"]
    if post is not None:
        frames.append(_as_counts(post, "post"))
        views.append("POST")
        if frames[1].shape != frames[0].shape:
            raise ValueError(f"ant {frames[0].shape} and post {frames[1].shape} differ in shape")
    rows, cols = frames[0].shape

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = _base_dataset(identity, rows, cols, pixel_spacing_mm)
    if layout == "multiframe":
        files = {out / f"{name}.dcm": _finish(
            base, frames, views, views, view_coding, list(range(1, len(views) + 1)), 1,
            compressed)}
    else:
        files = {out / f"{name}_{view}.dcm": _finish(
            base, [frame], [view], views, view_coding, [1], i + 1, compressed)
            for i, (frame, view) in enumerate(zip(frames, views))}
    for path, ds in files.items():
        ds.save_as(path, enforce_file_format=True)
    return list(files)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------

# The whole-body contract (paper, Section 2.1): 256 (width) x 1024 (height), head at row 0.
WHOLE_BODY_ROWS = 1024
WHOLE_BODY_COLS = 256
# 1024 rows of 10 mm are a 10 m tall image: a larger pixel is a broken header, not a body.
MAX_PIXEL_SPACING_MM = 10.0

# View words, matched as whole tokens so "POSTERIOR" counts but "POSTOP" or "IRREVERSIBLE" don't.
_VIEW_WORDS = {"ANT": "ANT", "ANTERIOR": "ANT", "POST": "POST", "POSTERIOR": "POST"}
_TOKEN = re.compile(r"[A-Z]+")

# Header values that identify a person or a study; scrubbed from any library message we relay.
_IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "AccessionNumber", "StudyID", "InstitutionName", "ReferringPhysicianName",
)


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class WholeBodyScan:
    """One de-identified whole-body scan in ANT orientation.

    ant: (1024, 256) uint16 counts, or None when the scan has only a POST view.
    post: (1024, 256) uint16 counts, already mirrored into ANT orientation (Mirr of Eq. 4),
    or None for an ANT-only scan. views: the views present, always ordered ("ANT", "POST").
    patient_key / scan_key: keyed hashes of PatientID / Study+Series Instance UID; no name,
    ID, date or UID of the source files is kept.
    """

    name: str
    ant: np.ndarray | None = field(repr=False)
    post: np.ndarray | None = field(repr=False)
    views: tuple[str, ...]
    pixel_spacing_mm: float
    patient_key: str
    scan_key: str
    source_files: tuple[str, ...]


def _scrub(message: str, ds: Dataset | None) -> str:
    """A library message with every identifying header value of ``ds`` blanked out."""
    if ds is not None:
        for keyword in _IDENTIFYING_KEYWORDS:
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 3:
                message = message.replace(value, "<redacted>")
    return message


@contextmanager
def _quiet() -> Iterator[list]:
    """pydicom's value checks, silenced while a file is read and its values decoded.

    pydicom warns *and* logs (its "pydicom" logger) each value that breaks its VR's rules, with
    the value itself: ``Invalid value for VR UI: '1.2.840...19470723.1'`` carries a UID that
    may hold a birth date, and reached stderr and Ray's worker logs. The reader checks what it
    uses itself, so the library's checks are turned off (``reading_validation_mode`` IGNORE:
    nothing is warned or logged) and any other warning is kept in the returned list, never
    shown. pydicom's setting is process-wide; it is put back on exit."""
    settings = pydicom_config.settings
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        settings.reading_validation_mode = before


def _decode_all(path: Path, ds: Dataset) -> None:
    """Decode every header value now, inside the reader's guard, so that no later read of a
    value can raise (or warn) outside it. pydicom decodes lazily; a value whose bytes do not
    fit its VR (a PatientID whose VR was changed to FL) would otherwise raise wherever it is
    first read, with the raw value in the message. Such an element is named by its tag alone;
    a private one, which bonescan never reads, is dropped instead."""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except Exception:  # noqa: BLE001 - pydicom raises many types; the value is never quoted
            if tag.is_private:
                del ds[tag]
                continue
            raise InputError(path, f"header element {tag} ({keyword_for_tag(tag) or 'unknown'}) cannot be "
                                   "decoded: its bytes do not fit its value representation") from None
        if element.VR == "SQ":
            for item in element.value:
                _decode_all(path, item)


def _read(path: Path, *, stop_before_pixels: bool) -> Dataset:
    """dcmread that turns every way a file can fail to parse into an InputError; every header
    value is decoded here (``_decode_all``), with pydicom's value warnings silenced (``_quiet``)."""
    try:
        with _quiet() as caught:
            ds = dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise InputError(path, "not a DICOM file (no DICM header)") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a DICOM file") from None
    except OSError as e:
        raise InputError(path, f"cannot read file ({describe(e, redact=True)})") from None
    except Exception as e:  # pydicom raises many types on garbage; one line is what users need
        raise InputError(path, f"unreadable DICOM file ({describe(e, redact=True)})") from None
    # pydicom stops quietly at the end of a cut-off file, keeping a short last value; it warns
    # only when the cut was inside an undefined-length element (encapsulated pixel data).
    if any("end of file" in str(w.message).lower() for w in caught):
        raise InputError(path, "truncated file: it ends inside the encapsulated pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    if not syntax.is_transfer_syntax:  # a private UID, or a standard one newer than pydicom
        raise InputError(path, f"transfer syntax {syntax} is not one pydicom {pydicom_version} "
                               "knows; convert the file (e.g. to Explicit VR Little Endian)")
    # Deflated files hold offsets into the inflated stream, which the file's size can't check.
    if len(ds) and not syntax.is_deflated:
        last = ds.get_item(max(ds.keys()))  # still raw: it knows where its value lay
        if isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF:
            end, size = last.value_tell + last.length, path.stat().st_size
            if end > size:
                raise InputError(path, f"truncated file: it ends inside element {last.tag}")
            if end < size and not stop_before_pixels:
                raise InputError(path, f"truncated file: it ends inside an element header "
                                       f"after {last.tag}")
    with _quiet():  # after the checks above, which read the last element still raw
        _decode_all(path, ds)
    return ds


@dataclass(frozen=True)
class SeriesGroup:
    """The files of one series and its patient's keyed hash (None: no PatientID; read_scan
    will reject it). The ingest assigns train/test per patient from this before any pixel
    data is read."""

    files: tuple[Path, ...]
    patient_key: str | None


def group_series(
    paths: Iterable[str | os.PathLike], secret: bytes
) -> tuple[list[SeriesGroup], list[InputError]]:
    """Group DICOM files by series, reading headers only.

    Returns (groups, rejected): each group lists the files of one series (sorted; groups in
    order of their first file); files that cannot be read as DICOM become InputErrors.
    A file without a SeriesInstanceUID forms a group of its own. Files holding the same
    instance (SOPInstanceUID) are copies of one image, e.g. a backup or a half-finished copy
    beside the original: one is kept (a complete one, the shortest path first) and each other
    copy is rejected, saying which file the series uses instead.
    """
    groups: dict[tuple[str, ...], dict[str, list[Path]]] = {}
    patients: dict[tuple[str, ...], str | None] = {}
    rejected: list[InputError] = []
    for path in sorted(Path(p) for p in paths):
        try:  # every read of a header value inside the guard: one odd header must not stop the folder
            ds = _read(path, stop_before_pixels=True)
            series = str(ds.get("SeriesInstanceUID", "") or "")
            key = (str(ds.get("StudyInstanceUID", "") or ""), series) if series else (str(path),)
            instance = str(ds.get("SOPInstanceUID", "") or "") or str(path)
            patient_id = str(ds.get("PatientID", "") or "").strip()
        except InputError as e:
            rejected.append(e)
            continue
        except Exception as e:  # noqa: BLE001
            rejected.append(InputError(path, f"unreadable DICOM header ({describe(e, redact=True)})"))
            continue
        groups.setdefault(key, {}).setdefault(instance, []).append(path)
        patients.setdefault(key, keyed_hash(secret, patient_id) if patient_id else None)
    out = []
    for key, instances in groups.items():
        kept = []
        for copies in instances.values():
            use, left_out = _one_copy(copies)
            kept.append(use)
            rejected += left_out
        out.append(SeriesGroup(tuple(sorted(kept)), patients[key]))
    return out, rejected


def _one_copy(copies: list[Path]) -> tuple[Path, list[InputError]]:
    """The copy of one instance to use, and a rejection for each other copy. Only files
    that share an instance are read in full here, to find the complete ones."""
    if len(copies) == 1:
        return copies[0], []
    problems: dict[Path, InputError | None] = {}
    for path in copies:
        try:
            _read(path, stop_before_pixels=False)
            problems[path] = None
        except InputError as e:
            problems[path] = e
    ordered = sorted(copies, key=lambda p: (problems[p] is not None, len(p.parts), str(p)))
    use = ordered[0]
    left_out = []
    for path in ordered[1:]:
        problem = problems[path]
        why = f"{problem.reason}; " if problem else ""
        left_out.append(InputError(path, f"{why}a copy of the image in {use} (same SOPInstanceUID), "
                                         "which the series uses instead"))
    return use, left_out


def _view_of_tokens(text: str) -> list[str]:
    """The view words of ``text`` in order of appearance ("ANT"/"POST"), repeats removed."""
    found: list[str] = []
    for token in _TOKEN.findall(text.upper()):
        view = _VIEW_WORDS.get(token)
        if view and view not in found:
            found.append(view)
    return found


def _values(value) -> list[str]:
    """A DICOM value of any multiplicity as a list of strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _views_from_codes(ds: Dataset, n_frames: int) -> list[str | None]:
    items = ds.get("DetectorInformationSequence") or []
    item_views: list[str | None] = []
    for item in items:
        view = None
        for code in item.get("ViewCodeSequence") or []:
            value = str(code.get("CodeValue", ""))
            if value == SCT_ANTERIOR[0]:
                view = "ANT"
            elif value == SCT_POSTERIOR[0]:
                view = "POST"
            else:  # another coding scheme: trust its meaning if it says one view
                words = _view_of_tokens(str(code.get("CodeMeaning", "")))
                view = words[0] if len(words) == 1 else None
        item_views.append(view)
    # Frame i was seen by detector DetectorVector[i] (1-based); without it, items are frames.
    vector = [int(v) for v in _values(ds.get("DetectorVector"))]
    if len(vector) == n_frames and all(1 <= v <= len(item_views) for v in vector):
        return [item_views[v - 1] for v in vector]
    if len(item_views) == n_frames:
        return item_views
    return [None] * n_frames


def _views_from_image_id(ds: Dataset, n_frames: int) -> list[str | None]:
    ids = _values(ds.get("ImageID"))
    if len(ids) != n_frames:
        return [None] * n_frames
    views = [_view_of_tokens(i) for i in ids]
    return [v[0] if len(v) == 1 else None for v in views]


def _views_from_text(ds: Dataset, n_frames: int) -> list[str | None]:
    # Most specific text first: the image's own comment, then the series' description. A text
    # naming as many distinct views as there are frames gives them in frame order.
    for keyword in ("ImageComments", "SeriesDescription"):
        words = _view_of_tokens(str(ds.get(keyword, "") or ""))
        if len(words) == n_frames:
            return list(words)
    return [None] * n_frames


def _frame_views(ds: Dataset, n_frames: int) -> list[str | None]:
    """The view of each frame: coded views first, then ImageID, then free text."""
    for source in (_views_from_codes, _views_from_image_id, _views_from_text):
        views = source(ds, n_frames)
        if all(views):
            return views
    return [None] * n_frames


def _check_image(path: Path, ds: Dataset) -> int:
    """Reject what is not a whole-body NM count image; return the number of frames."""
    modality = str(ds.get("Modality", "") or "").strip() or "missing"
    if modality != "NM":
        raise InputError(path, f"modality is {modality}, expected NM (a bone scan)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if samples != 1:
        raise InputError(path, f"colour image (SamplesPerPixel {samples}, {photometric}), "
                               "expected one channel of counts")
    # An NM image is MONOCHROME2 or PALETTE COLOR (PS3.3 C.8.4.9); one sample of a palette
    # image is an index into a colour table, not a count. MONOCHROME1 only inverts the display.
    if photometric not in ("", "MONOCHROME2", "MONOCHROME1"):
        raise InputError(path, f"colour image (PhotometricInterpretation {photometric}: its values index "
                               "a colour table), expected one channel of counts")
    if "PixelData" not in ds:
        raise InputError(path, "no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if (rows, cols) != (WHOLE_BODY_ROWS, WHOLE_BODY_COLS):
        raise InputError(path, f"image is {rows}x{cols} (rows x cols), expected a "
                               f"{WHOLE_BODY_ROWS}x{WHOLE_BODY_COLS} whole-body image")
    frames = ds.get("NumberOfFrames")
    try:  # absent (or empty) means one frame; a 0 is a broken header, not one frame
        n_frames = 1 if frames is None or str(frames).strip() == "" else int(frames)
    except (TypeError, ValueError):
        raise InputError(path, "NumberOfFrames is not a number") from None
    if n_frames < 1:
        raise InputError(path, f"NumberOfFrames is {n_frames}")
    try:
        bits = int(ds.get("BitsAllocated", 16))
    except (TypeError, ValueError):
        raise InputError(path, "BitsAllocated is not a number") from None
    if bits not in (8, 16, 32):
        raise InputError(path, f"BitsAllocated is {bits}: not an image of counts (expected 8, 16 or 32 "
                               "bits per pixel)")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise InputError(path, "no TransferSyntaxUID in the file meta information")
    if not syntax.is_compressed:
        expected = rows * cols * n_frames * bits // 8
        if len(ds.PixelData) < expected:
            raise InputError(path, f"truncated file: pixel data holds {len(ds.PixelData)} of "
                                   f"{expected} bytes")
    return n_frames


def _counts(path: Path, ds: Dataset, n_frames: int) -> np.ndarray:
    """Decoded frames as (F, H, W) uint16 counts."""
    try:
        with _quiet():  # the pixel handlers warn about header values too
            pixels = ds.pixel_array
    except Exception as e:
        syntax = ds.file_meta.TransferSyntaxUID.name
        raise InputError(path, f"cannot decode pixel data ({syntax}): {type(e).__name__}: "
                               f"{_scrub(str(e), ds)}") from None
    if pixels.size != n_frames * WHOLE_BODY_ROWS * WHOLE_BODY_COLS:
        raise InputError(path, f"pixel data decodes to shape {pixels.shape}, expected "
                               f"{n_frames} frame(s) of {WHOLE_BODY_ROWS}x{WHOLE_BODY_COLS}")
    pixels = pixels.reshape(n_frames, WHOLE_BODY_ROWS, WHOLE_BODY_COLS)  # (F, H, W)
    if not np.issubdtype(pixels.dtype, np.integer):
        raise InputError(path, f"pixel data is {pixels.dtype}, expected integer counts")
    if int(pixels.max(initial=0)) > 0xFFFF:
        raise InputError(path, "counts exceed 16 bits")
    # Counts cannot be negative; signed images (the GE Millennium scan pydicom ships is int16,
    # lossy JPEG 2000) hold small negative values only as compression undershoot around the
    # body, so they are clipped to 0 rather than rejected.
    return np.clip(pixels, 0, None).astype(np.uint16)


def _common_stem(paths: list[Path]) -> str:
    """The file stem for one file; for ``<name>_ANT.dcm``/``<name>_POST.dcm`` the common stem
    with trailing ``_ -.`` stripped; "" when the stems share nothing."""
    stems = [p.name[: -len(p.suffix)] if p.suffix.lower() == ".dcm" else p.name for p in paths]
    if len(stems) == 1:
        return stems[0]
    return os.path.commonprefix(stems).rstrip("_ -.")


def scan_name(paths: list[Path]) -> str:
    """``<stem>`` for one file; for ``<name>_ANT.dcm``/``<name>_POST.dcm`` the common stem
    with trailing ``_ -.`` stripped; the folder's name when the stems share nothing."""
    return _common_stem(paths) or Path(os.path.realpath(paths[0])).parent.name


def scan_path(paths: list[Path], root: Path) -> str:
    """A scan's relative name in the folder ``root`` it was found in, as labels find it:
    ``<sub-folder>/<scan_name>``, except that a scan named after its folder (a study folder
    ``P0004/`` holding ``ANT.dcm`` and ``POST.dcm``) is at that folder's own path, ``P0004``."""
    folder = paths[0].parent.relative_to(root)
    stem = _common_stem(paths)
    if stem:
        return (folder / stem).as_posix()
    return folder.as_posix() if folder != Path(".") else scan_name(paths)


def read_scan(paths: Sequence[str | os.PathLike], secret: bytes) -> WholeBodyScan:
    """Read one whole-body scan (one file, or the files of one series) and de-identify it.

    paths: the file(s) of one series (as grouped by ``group_series``). secret: the site secret
    for ``keyed_hash``. Raises InputError naming the file and the reason for anything that is
    not a readable 1024x256 NM whole-body scan with one ANT and/or one POST view.
    A single frame with no view information (the GE Millennium scan pydicom ships) is taken
    as ANT: an anterior whole-body image is what a one-view bone scan records.
    A POST-only scan keeps ant None and carries the mirrored POST.
    """
    paths = sorted(Path(p) for p in paths)
    if not paths:
        raise ValueError("read_scan needs at least one file")
    datasets = [_read(p, stop_before_pixels=False) for p in paths]
    counted = [(path, ds, _check_image(path, ds)) for path, ds in zip(paths, datasets)]
    series = {str(ds.get("SeriesInstanceUID", "") or "") for ds in datasets}
    if len(series) > 1:
        raise InputError(paths[0], f"the {len(paths)} files given belong to {len(series)} "
                                   "different series")
    # A mis-merged series (one patient's ANT beside another's POST under one SeriesInstanceUID)
    # must not become one scan of the first patient. Only the count of IDs is said, never an ID.
    patient_ids = {str(ds.get("PatientID", "") or "").strip() for ds in datasets}
    if len(patient_ids) > 1:
        raise InputError(paths[0], f"the {len(paths)} files of this series name {len(patient_ids)} different "
                                   "patients (PatientID differs): a mis-merged series, not one scan; "
                                   f"files: {', '.join(p.name for p in paths)}")

    total = sum(n for _, _, n in counted)
    if total > 2:
        raise InputError(paths[0], f"series holds {total} views (frames), expected ANT and/or "
                                   "POST (at most 2)")
    # Views first (headers only), pixels after: a file is decoded only once it is known useful.
    found: dict[str, list[tuple[Path, Dataset, int, int]]] = {"ANT": [], "POST": []}
    for path, ds, n_frames in counted:
        views = _frame_views(ds, n_frames)
        if total == 1 and views == [None]:
            views = ["ANT"]
        for i, view in enumerate(views):
            if view is None:
                raise InputError(path, f"views cannot be told apart: frame {i + 1} has no "
                                       "ANT/POST view code, ImageID or description")
            found[view].append((path, ds, n_frames, i))
    for view, frames in found.items():
        if len(frames) > 1:
            raise InputError(frames[0][0], f"views cannot be told apart: {len(frames)} frames "
                                           f"of the series are {view}")
    image: dict[str, np.ndarray | None] = {}
    for view, frames in found.items():
        image[view] = None
        if frames:
            path, ds, n_frames, i = frames[0]
            image[view] = _counts(path, ds, n_frames)[i]  # (H, W)

    first = datasets[0]
    patient_id = str(first.get("PatientID", "") or "").strip()
    if not patient_id:
        raise InputError(paths[0], "no PatientID: the scan cannot be assigned to a patient "
                                   "(needed to split train/test per patient)")
    study_uid = str(first.get("StudyInstanceUID", "") or "").strip()
    series_uid = str(first.get("SeriesInstanceUID", "") or "").strip()
    if not study_uid or not series_uid:
        raise InputError(paths[0], "no StudyInstanceUID or SeriesInstanceUID")
    spacing = _values(first.get("PixelSpacing"))
    if not spacing:
        raise InputError(paths[0], "no PixelSpacing")
    try:
        # Row spacing (PixelSpacing[0]): the one value the shard schema keeps.
        pixel_spacing_mm = float(spacing[0])
    except ValueError:
        raise InputError(paths[0], "PixelSpacing is not a number") from None
    if not 0 < pixel_spacing_mm <= MAX_PIXEL_SPACING_MM:  # False for NaN and inf too
        raise InputError(paths[0], f"PixelSpacing {spacing[0]} mm is not a whole-body pixel size (expected "
                                   f"above 0 and at most {MAX_PIXEL_SPACING_MM:g} mm)")

    post = image["POST"]
    return WholeBodyScan(
        name=scan_name(paths),
        ant=image["ANT"],
        post=None if post is None else np.ascontiguousarray(mirror(post)),
        views=tuple(v for v in ("ANT", "POST") if found[v]),
        pixel_spacing_mm=pixel_spacing_mm,
        patient_key=keyed_hash(secret, patient_id),
        scan_key=keyed_hash(secret, study_uid, series_uid),
        source_files=tuple(str(p) for p in paths),
    )
