"""One whole-body scan and its readers' labels -> the thoracic case training uses.

Reads the DICOM (de-identified on read), finds the thoracic crop box, crops both views, and
applies the paper's ground-truth rule (Section 2.2) to the readers' LabelMe annotations,
whether they were drawn on the whole-body image or on the crop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonescan_model.errors import InputError, describe
from bonescan_model.io.dicom import WHOLE_BODY_COLS, WHOLE_BODY_ROWS, WholeBodyScan, read_scan
from bonescan_model.io.labelme import LESION_LABELS, rasterize, read_labelme, readers_ground_truth
from bonescan_model.preprocess import CROP_SIZE, crop, thoracic_crop_box


@dataclass(frozen=True, eq=False)
class ThoracicCase:
    """ant / post: (256, 256) uint16 counts in ANT orientation (None: view absent).
    mask: (256, 256) uint8 0/1 ground truth, None when unlabeled (no labels, or readers
    disagree). readers_agree: None when no reader labeled the scan.
    label_errors: annotations that were rejected (the scan itself is still usable)."""

    name: str
    patient_key: str
    scan_key: str
    views: tuple[str, ...]
    ant: np.ndarray | None = field(repr=False)
    post: np.ndarray | None = field(repr=False)
    mask: np.ndarray | None = field(repr=False)
    crop_box: tuple[int, int, int, int]
    pixel_spacing_mm: float
    readers_agree: bool | None
    label_errors: tuple[InputError, ...] = ()


def reference_view(scan: WholeBodyScan) -> np.ndarray:
    """The image every coordinate is in: ANT, or the mirrored POST of a POST-only scan.
    (H, W) uint16 counts."""
    return scan.ant if scan.ant is not None else scan.post


def scan_crop_box(scan: WholeBodyScan) -> tuple[int, int, int, int]:
    """The thoracic crop box, from the reference view alone: labels drawn on the crop were
    drawn on this box, and ingest, training and prediction must all see the same crop."""
    return thoracic_crop_box(reference_view(scan), size=CROP_SIZE)


def prepare_case(
    dicom_files: Sequence[str | os.PathLike],
    label_files: Sequence[str | os.PathLike],
    secret: bytes,
) -> ThoracicCase:
    """Raises InputError when the scan itself cannot be used; a bad label only drops that
    label (listed in ``label_errors``)."""
    scan = read_scan(dicom_files, secret)
    try:
        box = scan_crop_box(scan)
    except ValueError as err:  # e.g. "no body found": the scan's own reason, named by its file
        raise InputError(scan.source_files[0], f"no thoracic crop: {err}") from None
    masks, errors = [], []
    for path in label_files:
        try:
            mask, ignored = _label_mask(path, box)
            masks.append(mask)
            if ignored:
                errors.append(InputError(path, f"{', '.join(ignored)}: not a lesion label ({', '.join(LESION_LABELS)}), "
                                               "left out of the ground truth; the label's lesion shapes are used"))
        except InputError as err:
            errors.append(err)
        except Exception as err:  # noqa: BLE001 - a label the reader did not foresee drops only itself
            errors.append(InputError(path, f"cannot be used as a label ({describe(err)})"))
    if masks:
        truth, agree = readers_ground_truth(masks)
    else:
        truth, agree = None, None
    return ThoracicCase(
        name=scan.name,
        patient_key=scan.patient_key,
        scan_key=scan.scan_key,
        views=scan.views,
        ant=None if scan.ant is None else crop(scan.ant, box),
        post=None if scan.post is None else crop(scan.post, box),
        mask=None if truth is None else truth.astype(np.uint8),
        crop_box=box,
        pixel_spacing_mm=scan.pixel_spacing_mm,
        readers_agree=agree,
        label_errors=tuple(errors),
    )


def _label_mask(path: str | os.PathLike, box: tuple[int, int, int, int]) -> tuple[np.ndarray, tuple[str, ...]]:
    """One reader's lesion mask on the crop, from a label on the whole body or on the crop,
    and the shapes left out of it (``LabelMeAnnotation.ignored``)."""
    annotation = read_labelme(path)
    if annotation.image_shape == (WHOLE_BODY_ROWS, WHOLE_BODY_COLS):
        return crop(rasterize(annotation, annotation.image_shape), box), annotation.ignored
    if annotation.image_shape == (CROP_SIZE, CROP_SIZE):
        return rasterize(annotation, annotation.image_shape), annotation.ignored
    rows, cols = annotation.image_shape
    raise InputError(
        Path(path),
        f"label drawn on a {rows}x{cols} image, which matches neither the whole-body scan "
        f"({WHOLE_BODY_ROWS}x{WHOLE_BODY_COLS}) nor the thoracic crop ({CROP_SIZE}x{CROP_SIZE})",
    )
