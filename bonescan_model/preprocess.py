"""Thoracic crop, count normalization and view aggregation.

Counts have no fixed range (the paper, Section 2.1: c_max varies largely from patient to
patient), so every image is normalized on its own before it reaches the network or the loss.

The thoracic crop follows the paper's three steps (Section 2.1, after Li et al. 2022):
whole-body image -> body area -> upper body -> thoracic region (256 x 256).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import remove_small_objects

# The side of the square thoracic crop the model sees (the paper's 256 x 256): the one
# definition, which the shards, the cases, the GAN and the export contract all use.
CROP_SIZE = 256

# Normalize by a high percentile rather than the maximum: a single hot spot (an injection
# site, the bladder) would otherwise squash the whole skeleton towards zero.
NORMALIZATION_PERCENTILE = 99.5


def mirror(image: np.ndarray) -> np.ndarray:
    """Mirr(.) of Eq. 4: horizontal flip of the last axis. image: (..., H, W)."""
    return image[..., ::-1]


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """Per-image count normalization.

    counts: (..., H, W) raw counts (any integer or float dtype). Each (H, W) image is divided
    by its own ``NORMALIZATION_PERCENTILE`` percentile of non-zero pixels and clipped to
    [0, 2], so bone sits near [0, 1] and lesions up to 2. Returns float32 of the same shape;
    an all-zero image stays zero.
    """
    x = np.asarray(counts, dtype=np.float32)
    return np.clip(x / count_scale(x)[..., None, None], 0.0, 2.0)


def count_scale(counts: np.ndarray) -> np.ndarray:
    """What ``normalize_counts`` divides each image by: counts (..., H, W) -> (...) float32,
    the NORMALIZATION_PERCENTILE percentile of the image's non-zero pixels (1 if it has none)."""
    x = np.asarray(counts, dtype=np.float32)
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])  # (N, H*W)
    scale = np.ones(flat.shape[0], dtype=np.float32)
    for i, row in enumerate(flat):
        body = row[row > 0]
        if body.size:
            scale[i] = max(float(np.percentile(body, NORMALIZATION_PERCENTILE)), 1e-6)
    return scale.reshape(x.shape[:-2])


def model_input(ant: np.ndarray | None, post: np.ndarray | None) -> np.ndarray:
    """The network's input for one crop: (2, H, W) float32, normalized ANT then mirrored POST.

    ant, post: (H, W) raw counts in ANT orientation; a missing view (one-view scan) is
    replaced by the present one, so aggregation still means "the lesion as seen".
    Training, evaluation and prediction all build their input here.
    """
    if ant is None and post is None:
        raise ValueError("a scan needs at least one view")
    ant = post if ant is None else ant
    post = ant if post is None else post
    return normalize_counts(np.stack([ant, post]))  # (2, H, W)


def aggregate_views(ant: np.ndarray, post_mirrored: np.ndarray) -> np.ndarray:
    """Eq. 4 on images: I_agg = I_ant + Mirr(I_post), with POST already mirrored.

    ant, post_mirrored: (..., H, W) in ANT orientation. Returns float32, same shape.
    """
    return np.asarray(ant, dtype=np.float32) + np.asarray(post_mirrored, dtype=np.float32)


# --- Thoracic crop ---------------------------------------------------------------------------
# Body outline: counts smoothed over ~3 px (about 7 mm at 2.26 mm/px) so that Poisson noise
# neither punches holes in soft tissue nor lights up background, then a threshold relative to
# the image's own 95th percentile (counts vary by patient; a percentile ignores hot spots).
BODY_SMOOTHING_SIGMA_PX = 3.0
BODY_THRESHOLD_FRACTION = 0.1
# Upper body: the head, neck and shoulders lie in the top 40% of the body; the neck is looked
# for within 7% of the body's length above the shoulders (chin to shoulders in adults is about
# 5-7% of body height), so the crown of the head, which also narrows, is never taken for it.
UPPER_BODY_FRACTION = 0.4
NECK_SEARCH_FRACTION = 0.07


def _body_mask(image: np.ndarray) -> np.ndarray:
    """Step 1, whole body -> body area: (H, W) bool mask of the patient's body."""
    smoothed = ndi.gaussian_filter(image.astype(np.float32), BODY_SMOOTHING_SIGMA_PX)
    level = float(np.percentile(smoothed, 95))
    if level <= 0:
        raise ValueError("no body found: the image holds (almost) no counts")
    mask = smoothed > BODY_THRESHOLD_FRACTION * level
    labels, n = ndi.label(mask)
    if n > 1:
        # Keep the body and the parts of it that the threshold cut off (a hand, the head);
        # drop specks of noise: anything below 1% of the largest part.
        sizes = np.bincount(labels.ravel())[1:]
        mask = remove_small_objects(labels, max_size=int(0.01 * sizes.max())) > 0
    return mask


def _upper_body(mask: np.ndarray) -> tuple[int, int, int]:
    """Step 2, body area -> upper body: rows of the head top, the neck and the shoulder line.

    Works on the row-width profile (body pixels per row), so arms at the sides count towards
    the shoulders' width, as in the image.
    """
    width = ndi.uniform_filter1d(mask.sum(axis=1).astype(np.float32), size=5)  # (H,)
    rows = np.flatnonzero(width >= 3)
    if rows.size == 0:
        raise ValueError("no body found: nothing in the image is wider than a few pixels")
    top, bottom = int(rows[0]), int(rows[-1])
    length = bottom - top + 1
    search_end = top + max(int(UPPER_BODY_FRACTION * length), 8)
    # The chest's width: widest rows of the upper body (upper arms at the sides included).
    chest = float(np.percentile(width[top:search_end], 90))
    # The shoulders have begun where the width first nears the chest's.
    wide = np.flatnonzero(width[top:search_end] >= 0.7 * chest)
    if wide.size == 0:
        return top, top, top
    first_wide = top + int(wide[0])
    start = max(first_wide - max(int(NECK_SEARCH_FRACTION * length), 4), top + 1)
    if first_wide - start < 2:
        return top, top, top  # no head above the shoulders: the scan starts at the trunk
    # Narrowest row; of rows within 5% of it, the lowest: the neck just above the shoulders,
    # not a chin or jaw narrowing that the blur of a lossy or noisy image left as deep.
    window = width[start:first_wide]
    neck = start + int(np.flatnonzero(window <= 1.05 * window.min() + 0.5)[-1])
    # Shoulder line: halfway from the neck's width to the chest's.
    halfway = 0.5 * (width[neck] + chest)
    shoulder = neck + int(np.argmax(width[neck:search_end] >= halfway))
    return top, neck, shoulder


def thoracic_crop_box(
    ant: np.ndarray, post: np.ndarray | None = None, size: int = CROP_SIZE
) -> tuple[int, int, int, int]:
    """Where to crop the thoracic region from a whole-body scan.

    ant: (H, W) counts, ANT orientation, head at row 0 (1024 x 256 for a standard scan; for a
    POST-only scan pass the mirrored POST here). post: (H, W) counts already mirrored into ANT
    orientation, or None; when given it is added to ant so that the body outline rests on
    twice the counts. Returns (row0, col0, rows, cols) with rows = cols = size: the box starts
    a quarter of the neck-to-shoulder-line distance above the shoulder line, just above the
    clavicles, and runs down over sternum, scapulae, ribs and thoracic spine; it is centred on
    the body across and kept inside the image where the image is large enough. Step 3 of the
    paper's crop, upper body -> thoracic region.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    image = np.asarray(ant, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"ant must be (H, W), got shape {image.shape}")
    if post is not None:
        post = np.asarray(post, dtype=np.float32)
        if post.shape != image.shape:
            raise ValueError(f"post {post.shape} and ant {image.shape} differ in shape")
        image = image + post
    height, width = image.shape
    mask = _body_mask(image)
    top, neck, shoulder = _upper_body(mask)
    # The clavicles run out to the acromion at the top of the shoulder, at or below the
    # outline's shoulder line; the quarter margin keeps them inside when shoulders droop.
    row0 = shoulder - (shoulder - neck) // 4
    row0 = min(max(row0, 0), height - size) if height >= size else (height - size) // 2

    # Across: centre on the body within the box's rows.
    cols = np.flatnonzero(mask[max(row0, 0): row0 + size].any(axis=0))
    centre = (int(cols[0]) + int(cols[-1]) + 1) // 2 if cols.size else width // 2
    col0 = centre - size // 2
    col0 = min(max(col0, 0), width - size) if width >= size else (width - size) // 2
    return int(row0), int(col0), int(size), int(size)


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """image[..., row0:row0+rows, col0:col0+cols], zero-padded where the box leaves the image.

    image: (..., H, W) any dtype. box: (row0, col0, rows, cols). Returns (..., rows, cols),
    same dtype.
    """
    row0, col0, rows, cols = (int(v) for v in box)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"box must have positive rows and cols, got {box}")
    image = np.asarray(image)
    height, width = image.shape[-2:]
    out = np.zeros(image.shape[:-2] + (rows, cols), dtype=image.dtype)
    r_lo, r_hi = max(row0, 0), min(row0 + rows, height)
    c_lo, c_hi = max(col0, 0), min(col0 + cols, width)
    if r_lo < r_hi and c_lo < c_hi:
        out[..., r_lo - row0: r_hi - row0, c_lo - col0: c_hi - col0] = (
            image[..., r_lo:r_hi, c_lo:c_hi])
    return out
