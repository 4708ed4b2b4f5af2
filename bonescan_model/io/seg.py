"""A predicted lesion mask as a DICOM Segmentation (SEG) of its whole-body NM source, with highdicom.

Needs the ``seg`` extra (``pip install 'bonescan[seg]'``: highdicom); nothing else in bonescan
imports this module, so the rest runs without it. Framework-free: never imports ray.

What the SEG holds. One BINARY segment, "bone metastasis lesion", made by an AUTOMATIC
algorithm ("bonescan", family DCM 123110 "Artificial Intelligence"), and one SEG frame per view
frame of the source: ANT first (the mask as ``bonescan_model.inference`` gives it, in whole-body
ANT coordinates), then POST (the same mask mirrored back into POST's own orientation, as the
camera recorded that frame). Each SEG frame references its source frame in its Derivation Image
functional group: the SOP Instance UID, plus the frame number where the source file holds both
views; its Frame Content item carries the view as Frame Label ("ANT" / "POST"). A view-less
single frame counts as ANT, as ``read_scan`` takes it. Empty frames are kept: "no lesion on this
view" is said, not left out.

Why not highdicom alone. A whole-body NM scan has no Frame of Reference and no plane positions
(the two frames are two projections, not two places in space), and highdicom 0.28 builds a SEG
of such a source for one source frame only ("Only a single frame is supported when the source
image has no Frame of Reference UID"; with more frames or files it has no dimension to index
them by). NM is also a multi-frame IOD to highdicom, which then expects the Enhanced
multi-frame Shared Functional Groups that an NM file does not have. So highdicom builds the SEG
for the first view frame from a header-only stand-in of its source (one frame, its PixelSpacing
as a shared Pixel Measures item), and this module then adds the other view's frame, sets every
frame's source reference and packs the pixel data of all frames. The limitation: the frames
share one Dimension Index Value (the segment number, highdicom's only index without a Frame of
Reference), so a reader tells ANT from POST by each frame's source reference (or Frame Label),
not by a dimension; highdicom's own reader does exactly that
(``get_pixels_by_source_frame`` / ``get_pixels_by_source_instance``). The SEG has no Pixel
Measures: highdicom's reader requires a Slice Thickness there, which a planar projection has
not; without a Frame of Reference a SEG frame is pixel for pixel its source frame, whose
PixelSpacing applies. PatientOrientation (required without a Frame of Reference) is the source's
where all its files say the same, else empty (Type 2): two files may give their views' own.

Patient and study. ``patient="source"`` (the default) keeps the source's Patient and Study
modules and references the source images by their own UIDs: the SEG is a result that goes back
to the PACS the scans came from, and is filed beside them only under the same patient and
study. This is the one output of bonescan that carries identifiers, by design.
``patient="deidentified"`` is for a SEG that leaves the clinic: PatientID is the patient's keyed
hash (HMAC-SHA256 under the site secret, the ``patient_key`` of the shards), PatientName
"ANONYMOUS", and birth date, sex, study date and time, accession number, study ID and referring
physician are empty; PatientIdentityRemoved is YES. Its Study, Series and SOP Instance UIDs, and
the source UIDs it references, are replaced by keyed UIDs (``2.25.`` + 128 bits of the keyed
hash of the source UID): referencing the source study under its own UID would leak that UID,
while a fresh random one would break the SEG's link to its images. The keyed UIDs are the same
on every run, so a SEG and the source images, if they are de-identified with the same site
secret and mapping, still line up; and only the secret's holder can map them back.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.sr.codedict import codes

from bonescan_model.errors import InputError, describe
from bonescan_model.io.deid import default_secret_path, keyed_hash, load_or_create_secret
from bonescan_model.io.dicom import _frame_views, _read, _values
from bonescan_model.preprocess import mirror

PATIENT_MODES = ("source", "deidentified")
# A series number far above a camera's own (1, 2, ...), so a PACS lists the SEG after the scan.
SERIES_NUMBER = 900
SEGMENT_LABEL = "bone metastasis lesion"
SERIES_DESCRIPTION = "bonescan lesion segmentation"  # what a PACS lists beside the scan's series
# SNOMED CT, as DICOM's segmentation context groups have them (pydicom.sr.codedict.codes):
# category 49755003 "Morphologically Abnormal Structure" (CID 7150), type 14799000 "Neoplasm,
# Secondary" (CID 7151 / 7194: the morphologic abnormality "Neoplasm, metastatic"), in the
# anatomic region 272673000 "Bone". 128462008 (secondary malignant neoplastic disease) is a
# disorder, not a structure one can outline, and no segmentation property type group has it.
CATEGORY = codes.cid7150.MorphologicallyAbnormalStructure
PROPERTY_TYPE = codes.cid7151.NeoplasmSecondary
ANATOMIC_REGION = codes.SCT.Bone
# Red, as the overlay draws lesions (CIE L*a*b* of sRGB (255, 0, 0)).
DISPLAY_COLOR = (53.24, 80.09, 67.20)
ANONYMOUS_NAME = "ANONYMOUS^"  # one family-name component, the caret says so (PS3.5 6.2.1.2)
DEIDENTIFICATION_METHOD = "bonescan: keyed-hash PatientID and UIDs, no dates"  # LO: <= 64 chars
# Type 2 attributes highdicom reads from the source; an NM file may lack them (they are empty then).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
# What a de-identified stand-in keeps of its source besides UIDs: nothing about the person.
_KEPT_WHEN_DEIDENTIFIED = ("SOPClassUID", "Modality", "Rows", "Columns", "PixelSpacing",
                           "PatientOrientation", "LossyImageCompression",
                           "LossyImageCompressionRatio", "LossyImageCompressionMethod")


@dataclass(frozen=True)
class _SourceFrame:
    """One view frame of the source: where it is and which UIDs the SEG references it by."""

    path: Path
    view: str  # "ANT" or "POST"
    sop_class_uid: str
    sop_instance_uid: str  # as referenced: the source's own, or its keyed UID
    series_instance_uid: str
    frame_number: int | None  # 1-based, only where the source file holds several frames
    orientation: str  # the file's PatientOrientation, "\\"-joined; "" when it has none


def default_software_version() -> str:
    """The installed bonescan's version, recorded as the algorithm's and the software's."""
    try:
        return version("bonescan")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def keyed_uid(secret: bytes, uid: str) -> str:
    """A UID standing for ``uid`` in de-identified output: ``2.25.`` and the first 128 bits of
    its keyed hash, as a decimal (the UUID-derived form). Same secret and UID, same result."""
    return "2.25." + str(int(keyed_hash(secret, "dicom-uid", uid)[:32], 16))


def segmentation(
    source_paths: Sequence[str | os.PathLike],
    mask: np.ndarray,
    *,
    patient: str = "source",
    secret: bytes | None = None,
    series_number: int = SERIES_NUMBER,
    software_version: str | None = None,
) -> hd.seg.Segmentation:
    """The DICOM SEG of ``mask`` on the whole-body scan in ``source_paths``.

    source_paths: the file(s) of one scan, as ``read_scan`` takes them (``scan.source_files``):
    one file with ANT and POST frames, an ANT file and a POST file of one series, or one view.
    mask: (H, W) bool (or 0/1) lesion mask in whole-body ANT coordinates, H x W the source's
    Rows x Columns (``Prediction.mask``). patient: "source" or "deidentified" (module docstring).
    secret: the site secret keying a de-identified SEG's IDs and UIDs; default the site's own
    (``io.deid.default_secret_path``), as the reader's. series_number: the SEG series' number.
    software_version: recorded as the algorithm's version; default the installed bonescan's.
    Raises InputError naming the file for a source that is not an NM image of that shape, or
    whose views cannot be told apart; ValueError for a bad mask or argument. No message quotes
    a header value.
    """
    if patient not in PATIENT_MODES:
        raise ValueError(f"patient must be one of {PATIENT_MODES}, got {patient!r}")
    if patient == "deidentified" and secret is None:
        secret = load_or_create_secret(default_secret_path())  # the one read_scan's callers use
    paths = sorted(Path(p) for p in source_paths)
    if not paths:
        raise ValueError("segmentation needs at least one source file")
    lesions = _as_mask(mask)
    datasets = [_read(path, stop_before_pixels=True) for path in paths]
    for path, ds in zip(paths, datasets):
        _check_source(path, ds, lesions.shape)
    series = {str(ds.get("SeriesInstanceUID", "") or "") for ds in datasets}
    if len(series) > 1 or "" in series:
        raise InputError(paths[0], f"the {len(paths)} source files are not one series (SeriesInstanceUID "
                                   "differs or is missing): a SEG references one scan")
    uid = (lambda value: keyed_uid(secret, value)) if patient == "deidentified" else (lambda value: value)
    frames = _source_frames(paths, datasets, uid)
    pixels = np.stack([lesions if f.view == "ANT" else mirror(lesions) for f in frames])  # (F, H, W)

    stand_in = _stand_in(datasets[paths.index(frames[0].path)], patient, secret, uid)
    try:
        with _silenced():
            return _build(stand_in, frames, pixels, series_number, software_version or default_software_version())
    except Exception as err:  # noqa: BLE001 - highdicom raises many types; never quote its values
        raise InputError(paths[0], f"cannot build the DICOM SEG ({describe(err, redact=True)})") from None


def _build(stand_in: Dataset, frames: list[_SourceFrame], pixels: np.ndarray, series_number: int,
           software_version: str) -> hd.seg.Segmentation:
    """highdicom's SEG of the first view frame, completed to one frame per view (``_all_frames``)."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name="bonescan", family=codes.cid7162.ArtificialIntelligence, version=software_version)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL, segmented_property_category=CATEGORY,
        segmented_property_type=PROPERTY_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=[ANATOMIC_REGION],
        display_color=hd.color.CIELabColor(*DISPLAY_COLOR))
    seg = hd.seg.Segmentation(
        source_images=[stand_in], pixel_array=pixels[0], segmentation_type="BINARY",
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="bonescan",
        manufacturer_model_name="bonescan", software_versions=software_version,
        device_serial_number="0", content_label="LESIONS", series_description=SERIES_DESCRIPTION,
        content_description=f"bone metastasis lesions, {'/'.join(f.view for f in frames)}",
        omit_empty_frames=False,  # a view without lesions is said, not left out
    )
    _all_frames(seg, frames, pixels)
    # Parsed again, so the returned object's frame index (get_pixels_by_source_frame, ...) is
    # that of the finished dataset, not of highdicom's one-frame draft.
    return hd.seg.Segmentation.from_dataset(seg, copy=False)


@contextmanager
def _silenced() -> Iterator[None]:
    """No header value reaches a log while a SEG is built and written: pydicom's value checks
    (which warn and log the value) are off, as in ``io.dicom._quiet``; highdicom's warnings
    (e.g. on a one-component PatientName, quoting it) are caught and dropped, and its logger
    (which logs the source's SOP Instance UID at INFO) is raised above CRITICAL. Both
    settings are process-wide; they are put back on exit."""
    settings = pydicom_config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    log = logging.getLogger("highdicom")
    level = log.level
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
        log.setLevel(level)


def write_segmentation(path: str | os.PathLike, source_paths: Sequence[str | os.PathLike], mask: np.ndarray,
                       **options) -> Path:
    """``segmentation(source_paths, mask, **options)`` written to ``path`` (``<name>.seg.dcm``
    by convention) atomically: into a temporary file beside it, renamed into place, and removed
    if anything fails, so no half SEG is ever left for a PACS to take. Returns ``path``."""
    seg = segmentation(source_paths, mask, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _silenced():
            seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def to_bytes(seg: Dataset) -> bytes:
    """The SEG as the bytes of a DICOM file (Part 10, with its file meta), e.g. for an HTTP answer."""
    buffer = io.BytesIO()
    with _silenced():
        seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ the parts


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """``mask`` as (H, W) bool; ValueError for another shape or values other than 0 and 1."""
    a = np.asarray(mask)
    if a.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {a.shape}")
    if a.dtype != bool:
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)) or \
                not np.isin(a, (0, 1)).all():
            raise ValueError(f"mask must hold bool or 0/1 values, got dtype {a.dtype} with other values")
        a = a.astype(bool)
    return a


def _check_source(path: Path, ds: Dataset, shape: tuple[int, int]) -> None:
    """An NM image whose frames are the mask's size, with the UIDs a reference needs."""
    modality = str(ds.get("Modality", "") or "").strip() or "missing"
    if modality != "NM":
        raise InputError(path, f"modality is {modality}, expected NM: a SEG is written for bone scans only")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if (rows, cols) != tuple(shape):
        raise InputError(path, f"mask is {shape[0]}x{shape[1]} but the source frames are {rows}x{cols} "
                               "(rows x cols): the mask is not of this scan")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise InputError(path, f"no {keyword}: the SEG could not reference this image")


def _n_frames(path: Path, ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise InputError(path, "NumberOfFrames is not a number") from None


def _source_frames(paths: list[Path], datasets: list[Dataset], uid) -> list[_SourceFrame]:
    """The view frames of the source, ANT then POST, each found as ``read_scan`` finds it."""
    counts = [_n_frames(path, ds) for path, ds in zip(paths, datasets)]
    found: dict[str, list[_SourceFrame]] = {"ANT": [], "POST": []}
    for path, ds, n_frames in zip(paths, datasets, counts):
        views = _frame_views(ds, n_frames)
        if sum(counts) == 1 and views == [None]:
            views = ["ANT"]  # one view-less frame: an anterior whole-body image, as read_scan takes it
        for i, view in enumerate(views):
            if view is None:
                raise InputError(path, f"views cannot be told apart: frame {i + 1} has no ANT/POST "
                                       "view code, ImageID or description")
            found[view].append(_SourceFrame(
                path=path, view=view, sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=uid(str(ds.SOPInstanceUID)), series_instance_uid=uid(str(ds.SeriesInstanceUID)),
                frame_number=i + 1 if n_frames > 1 else None,
                orientation="\\".join(_values(ds.get("PatientOrientation")))))
    for view, frames in found.items():
        if len(frames) > 1:
            raise InputError(frames[0].path, f"views cannot be told apart: {len(frames)} frames are {view}")
    return found["ANT"] + found["POST"]


def _stand_in(ds: Dataset, patient: str, secret: bytes | None, uid) -> Dataset:
    """The header highdicom builds the SEG from: the first view's source as one frame, with its
    PixelSpacing as the shared Pixel Measures highdicom expects of a multi-frame IOD. For
    "source" a copy of the whole header; for "deidentified" only what describes the image
    (``_KEPT_WHEN_DEIDENTIFIED``), keyed UIDs and the de-identified patient module."""
    if patient == "source":
        out = copy.deepcopy(ds)
    else:
        out = Dataset()
        for keyword in _KEPT_WHEN_DEIDENTIFIED:
            if keyword in ds:
                setattr(out, keyword, copy.deepcopy(ds[keyword].value))
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(out, keyword, uid(str(ds[keyword].value)))
        patient_id = str(ds.get("PatientID", "") or "").strip()
        out.PatientID = keyed_hash(secret, patient_id) if patient_id else ""
        out.PatientName = ANONYMOUS_NAME
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = DEIDENTIFICATION_METHOD
        method = Dataset()
        profile = codes.DCM.BasicApplicationConfidentialityProfile
        method.CodeValue, method.CodingSchemeDesignator, method.CodeMeaning = (
            profile.value, profile.scheme_designator, profile.meaning)
        out.DeidentificationMethodCodeSequence = [method]
    for keyword in _TYPE2:
        if keyword not in out or out[keyword].value is None:
            setattr(out, keyword, "")
    # No Frame of Reference and no position: highdicom then takes the one path it has for such
    # sources (frames tied to source frames by reference), even where the source names a Frame
    # of Reference without plane positions (the GE scan pydicom ships does).
    for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
                    "ImageOrientationPatient"):
        if keyword in out:
            delattr(out, keyword)
    out.NumberOfFrames = 1
    measures = Dataset()
    measures.PixelSpacing = ds.get("PixelSpacing") or [1, 1]  # removed again: see _all_frames
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    out.SharedFunctionalGroupsSequence = [shared]
    return out


def _all_frames(seg: Dataset, frames: list[_SourceFrame], pixels: np.ndarray) -> None:
    """Turn highdicom's one-frame SEG into one frame per view: per-frame source references
    (with the frame number in a two-frame source) and Frame Labels, the references of the
    whole instance, the packed pixel data of every frame (BINARY: 1 bit a pixel, little-endian
    bit order, frames back to back)."""
    template = seg.PerFrameFunctionalGroupsSequence[0]
    items = []
    for frame in frames:
        item = copy.deepcopy(template)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        source.ReferencedSOPClassUID = frame.sop_class_uid
        source.ReferencedSOPInstanceUID = frame.sop_instance_uid
        if frame.frame_number is not None:
            source.ReferencedFrameNumber = frame.frame_number
        elif "ReferencedFrameNumber" in source:
            del source.ReferencedFrameNumber
        item.FrameContentSequence[0].FrameLabel = frame.view
        items.append(item)
    seg.PerFrameFunctionalGroupsSequence = items
    seg.NumberOfFrames = len(frames)
    seg.PixelData = pack_bits(pixels.astype(np.uint8).ravel(), pad=True)
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared:
        del shared.PixelMeasuresSequence  # see the module docstring
    instances: dict[str, _SourceFrame] = {}
    for frame in frames:
        instances.setdefault(frame.sop_instance_uid, frame)
    references = []
    for frame in instances.values():
        ref = Dataset()
        ref.ReferencedSOPClassUID = frame.sop_class_uid
        ref.ReferencedSOPInstanceUID = frame.sop_instance_uid
        references.append(ref)
    seg.SourceImageSequence = references
    series = Dataset()
    series.SeriesInstanceUID = frames[0].series_instance_uid
    series.ReferencedInstanceSequence = copy.deepcopy(references)
    seg.ReferencedSeriesSequence = [series]
    # Type 2C without a Frame of Reference: the source's, where every frame's file says the
    # same; empty (unknown) where the files differ or say nothing.
    orientations = {frame.orientation for frame in frames}
    seg.PatientOrientation = orientations.pop().split("\\") if len(orientations) == 1 and "" not in orientations else ""
