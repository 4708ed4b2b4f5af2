"""LabelMe JSON annotations (one file per reader and scan) and the readers' agreement rule.

Points are (row, col) everywhere in bonescan; LabelMe stores them as [x, y] = [col, row], so
this module swaps the two columns on the way in and out. A polygon is closed implicitly, as
LabelMe draws it: the first point is not repeated at the end.

Ground truth from several readers follows the paper (Section 2.2, Eq. 2): DeltaA = 1 - IoU;
if every pair of readers is within the threshold one reader's label is taken, otherwise the
scan is flagged for re-annotation and used as unlabeled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from bonescan_model.contours import polygons_to_mask
from bonescan_model.errors import InputError, quoted

LABELME_VERSION = "5.4.1"
LESION_LABEL = "lesion"
# The shape labels that mean a metastatic lesion (docs/design.md, "Labels"), compared after
# lower-casing and reading "_" and "-" as spaces. A reader's other shapes (benign_degenerative,
# fracture, injection site, ...) are left out of the ground truth and named in the ingest
# report, never drawn as lesions.
LESION_LABELS = ("lesion", "metastasis", "metastases", "bone metastasis", "bone metastases", "met", "mets")
# The paper's t_DeltaA (Section 2.2): 5 %.
AGREEMENT_THRESHOLD = 0.05
# Points may sit on the image edge: LabelMe's canvas runs to x = W, and contours of lesions
# touching the border run along -0.5 / W - 0.5 (bonescan_model.contours). One pixel of slack
# beyond the pixel centres accepts both and still rejects a label drawn for another image.
_EDGE_SLACK = 1.0


@dataclass(frozen=True, eq=False)
class LabelMeAnnotation:
    """One reader's label of one image.

    polygons: list of (N, 2) float64 arrays of (row, col) vertices, N >= 3, not repeating the
    first point; image_shape: (H, W) of the image the reader drew on (imageHeight,
    imageWidth); image_path: LabelMe's imagePath, as written.
    """

    polygons: list[np.ndarray]
    image_shape: tuple[int, int]
    image_path: str
    # "shapes[i] 'label'" of each shape whose label is not a lesion's (LESION_LABELS): not drawn
    ignored: tuple[str, ...] = ()


def is_lesion_label(label: object) -> bool:
    """Whether a LabelMe shape's label names a lesion (LESION_LABELS)."""
    return isinstance(label, str) and " ".join(label.lower().replace("_", " ").replace("-", " ").split()) in LESION_LABELS


def _positive_int(path: Path, data: dict, key: str) -> int:
    if key not in data:
        raise InputError(path, f"missing {key}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(path, f"{key} must be a positive integer, got {quoted(value)}")
    return value


def _polygon(path: Path, index: int, shape: object, image_shape: tuple[int, int]) -> np.ndarray:
    """Validate shapes[index] and return its (N, 2) (row, col) vertices."""
    where = f"shapes[{index}]"
    if not isinstance(shape, dict):
        raise InputError(path, f"{where} is not an object")
    shape_type = shape.get("shape_type", "polygon")  # LabelMe 3 files omit it: polygons
    if shape_type != "polygon":
        raise InputError(path, f"{where} has unsupported shape_type {quoted(shape_type)} (only 'polygon')")
    points = shape.get("points")
    if not isinstance(points, list) or not all(
        isinstance(p, list) and len(p) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
        for p in points
    ):
        raise InputError(path, f"{where} points must be a list of numeric [x, y] pairs")
    try:
        xy = np.array(points, dtype=np.float64).reshape(-1, 2)
    except OverflowError:  # an integer beyond any float, e.g. 10**400
        raise InputError(path, f"{where} has a coordinate too large to be a pixel position") from None
    if not np.isfinite(xy).all():
        raise InputError(path, f"{where} has a NaN or infinite point")
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]  # an explicitly closed polygon: the closing point adds no vertex
    if len(xy) < 3:
        raise InputError(path, f"{where} has {len(xy)} distinct points, a polygon needs at least 3")
    height, width = image_shape
    outside = ((xy[:, 0] < -_EDGE_SLACK) | (xy[:, 0] > width - 1 + _EDGE_SLACK)
               | (xy[:, 1] < -_EDGE_SLACK) | (xy[:, 1] > height - 1 + _EDGE_SLACK))
    if outside.any():
        x, y = xy[np.argmax(outside)]
        raise InputError(path, f"{where} point [x={x:g}, y={y:g}] lies outside the {height}x{width} image")
    return xy[:, ::-1].copy()  # [x, y] -> (row, col)


def read_labelme(path: str | os.PathLike) -> LabelMeAnnotation:
    """Read and validate one LabelMe JSON file. Raises InputError(path, reason) on bad input."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read: {err}") from err
    try:
        # Python's json accepts the non-standard NaN / Infinity literals; points holding them
        # are rejected below with the shape they belong to.
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, f"invalid JSON: {err}") from err
    except RecursionError:
        raise InputError(path, "invalid JSON: nested too deeply to be a LabelMe file") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise InputError(path, f"invalid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InputError(path, "not a LabelMe object (top level is not a JSON object)")
    image_shape = (_positive_int(path, data, "imageHeight"), _positive_int(path, data, "imageWidth"))
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise InputError(path, "missing shapes list")
    polygons, ignored = [], []
    for i, shape in enumerate(shapes):
        label = shape.get("label") if isinstance(shape, dict) else None
        if isinstance(shape, dict) and not is_lesion_label(label):
            ignored.append(f"shapes[{i}] {quoted(label)}")
            continue
        polygons.append(_polygon(path, i, shape, image_shape))
    image_path = data.get("imagePath") or ""
    if not isinstance(image_path, str):
        raise InputError(path, f"imagePath must be a string, got {quoted(image_path)}")
    return LabelMeAnnotation(polygons=polygons, image_shape=image_shape, image_path=image_path,
                             ignored=tuple(ignored))


def write_labelme(
    path: str | os.PathLike,
    polygons: Sequence[np.ndarray],
    image_shape: tuple[int, int],
    image_path: str,
    extra: Mapping[str, object] | None = None,
) -> None:
    """Write polygons as a LabelMe 5.x file, one "lesion" polygon shape each.

    polygons: (N, 2) (row, col) arrays, closed or not (a repeated first point is dropped);
    image_shape: (H, W) of the image the polygons are drawn on; image_path: LabelMe's
    imagePath (no image data is embedded). An empty list writes a file with no shapes.
    extra: more top-level keys (JSON values), e.g. predict's "burden". LabelMe keeps keys it
    does not know (its LabelFile's otherData) and writes them back on save; ``read_labelme``
    ignores them. A key of LabelMe's own is a ValueError.
    """
    shapes = []
    for polygon in polygons:
        polygon = np.asarray(polygon, dtype=np.float64)
        if polygon.ndim != 2 or polygon.shape[1] != 2:
            raise ValueError(f"each polygon must be (N, 2) (row, col), got shape {polygon.shape}")
        if len(polygon) > 1 and np.array_equal(polygon[0], polygon[-1]):
            polygon = polygon[:-1]
        if len(polygon) < 3:
            raise ValueError(f"a polygon needs at least 3 distinct points, got {len(polygon)}")
        shapes.append({
            "label": LESION_LABEL,
            "points": [[float(col), float(row)] for row, col in polygon],
            "group_id": None,
            "description": "",
            "shape_type": "polygon",
            "flags": {},
        })
    document = {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": image_path,
        "imageData": None,
        "imageHeight": int(image_shape[0]),
        "imageWidth": int(image_shape[1]),
    }
    for key, value in (extra or {}).items():
        if key in document:
            raise ValueError(f"extra key {key!r} is one of LabelMe's own")
        document[key] = value
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def rasterize(annotation: LabelMeAnnotation, shape: tuple[int, int]) -> np.ndarray:
    """The union of an annotation's polygons as an (H, W) bool mask.

    shape: (H, W) of the image the mask is for; it must be the shape the reader drew on,
    so a label drawn on a thoracic crop is never silently laid over a whole-body image.
    """
    shape = (int(shape[0]), int(shape[1]))
    if shape != annotation.image_shape:
        raise ValueError(
            f"annotation was drawn on a {annotation.image_shape[0]}x{annotation.image_shape[1]} "
            f"image ({annotation.image_path!r}), not {shape[0]}x{shape[1]}"
        )
    return polygons_to_mask(annotation.polygons, shape)


def delta_a(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Eq. 2: DeltaA = 1 - IoU of two (H, W) bool masks; two empty masks agree (DeltaA 0)."""
    union = np.count_nonzero(mask_a | mask_b)
    if union == 0:
        return 0.0
    return 1.0 - np.count_nonzero(mask_a & mask_b) / union


def readers_ground_truth(
    masks: Sequence[np.ndarray], threshold: float = AGREEMENT_THRESHOLD
) -> tuple[np.ndarray | None, bool]:
    """The paper's ground-truth rule over one scan's readers.

    masks: one (H, W) bool lesion mask per reader, all of one shape. Returns (the first
    reader's mask, True) when every pair has DeltaA <= threshold, else (None, False): the scan
    is flagged for re-annotation and used as unlabeled. One reader alone agrees with itself.

    DeltaA is computed on the whole scan's lesion mask, not per lesion. The paper states the
    rule per lesion, but at bone-scan resolution a lesion is often 5-50 pixels, where one
    boundary pixel is already more than 5 %: per lesion, almost every scan would be rejected.
    On the whole mask a missed or invented lesion or a much larger outline still fails.
    "The first reader" makes the paper's random choice deterministic.
    """
    if len(masks) == 0:
        raise ValueError("readers_ground_truth needs at least one reader's mask")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    masks = [np.asarray(m, dtype=bool) for m in masks]
    if any(m.shape != masks[0].shape for m in masks):
        raise ValueError(f"reader masks differ in shape: {[m.shape for m in masks]}")
    # The tolerance keeps an exact 5 % (95 of 100 pixels) within: 1 - 0.95 is 0.05000000000000004.
    if all(delta_a(a, b) <= threshold + 1e-12 for a, b in combinations(masks, 2)):
        return masks[0], True
    return None, False
