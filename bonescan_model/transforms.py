"""Label-preserving geometric augmentation: the paper's D2 (Section 3.2.1, Table 1).

The paper names flipping, rotation and translation and gives no parameters. Here a transform
is a composition, in this order, of a horizontal flip, a vertical flip, a rotation about the
image centre and a translation with zero fill. It is applied identically to every count view
(ANT, and POST already mirrored into ANT orientation, so both stay registered) and to the
lesion mask: views are interpolated linearly, the mask by nearest neighbour so it stays binary.

Flips are array reversals (exact involutions, no interpolation). Rotation and translation are
one ``scipy.ndimage.affine_transform`` call, so a rotated and shifted image is resampled once,
not twice. Outside the image counts are zero, which is what a bone scan's background is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

# A thoracic crop is 256 x 256 px (about 58 cm at 2.26 mm/px): +-15 degrees is the tilt of a
# patient lying a little askew on the table, +-16 px (about 3.6 cm) a crop placed a little off.
# Larger moves would push the shoulders and upper ribs out of the crop.
MAX_ANGLE_DEG = 15.0
MAX_SHIFT_PX = 16
# Each op of a random composition is switched on with this probability.
P_OP = 0.5
# Vertical flip is off by default: it is not anatomically sensible. A whole-body scan is always
# acquired head up, so an upside-down thorax (shoulders at the bottom of the crop) never
# reaches the model at test time, and the vertical layout (clavicles, ribs, then spine) is a
# prior worth keeping. The horizontal flip is sensible: the skeleton is close to left-right
# symmetric and lesions occur on either side. The op exists for experiments (``p_vflip``).
P_VFLIP = 0.0

_UINT16_MAX = np.iinfo(np.uint16).max


@dataclass(frozen=True)
class Transform:
    """One geometric transform; ops run in field order: flips, then rotation, then shift.

    angle_deg: rotation about the image centre, counter-clockwise as displayed (the
    convention of ``skimage.transform.rotate``). shift_px: (rows, cols) in pixels, positive
    moves the content down and to the right.
    """

    hflip: bool = False
    vflip: bool = False
    angle_deg: float = 0.0
    shift_px: tuple[int, int] = (0, 0)

    @property
    def name(self) -> str:
        """The ops this transform performs, e.g. ``"hflip+rot+shift"``; ``"identity"`` if none.

        Used as ``source = "augmented:<name>"`` in the shards.
        """
        ops = [
            op
            for op, on in (
                ("hflip", self.hflip),
                ("vflip", self.vflip),
                ("rot", self.angle_deg != 0),
                ("shift", any(s != 0 for s in self.shift_px)),
            )
            if on
        ]
        return "+".join(ops) or "identity"


def random_transform(
    rng: np.random.Generator,
    *,
    max_angle_deg: float = MAX_ANGLE_DEG,
    max_shift_px: int = MAX_SHIFT_PX,
    p_vflip: float = P_VFLIP,
) -> Transform:
    """A random composition of flips, rotation and shift; never the identity.

    Horizontal flip, rotation (uniform in +-max_angle_deg) and shift (integer, uniform in
    +-max_shift_px per axis) are each on with probability ``P_OP``, the vertical flip with
    ``p_vflip``. Draws that come out as the identity are redrawn: a materialized copy equal
    to its original would only weight that scan twice.
    """
    if max_angle_deg < 0 or max_shift_px < 0:
        raise ValueError("max_angle_deg and max_shift_px must be >= 0")
    if not 0.0 <= p_vflip <= 1.0:
        raise ValueError(f"p_vflip must be in [0, 1], got {p_vflip}")
    while True:
        t = Transform(
            hflip=bool(rng.random() < P_OP),
            vflip=bool(rng.random() < p_vflip),
            angle_deg=float(rng.uniform(-max_angle_deg, max_angle_deg)) if rng.random() < P_OP else 0.0,
            shift_px=tuple(int(s) for s in rng.integers(-max_shift_px, max_shift_px + 1, size=2))
            if rng.random() < P_OP
            else (0, 0),
        )
        if t.name != "identity":
            return t


def distinct_transforms(rng: np.random.Generator, n: int, **kwargs) -> list[Transform]:
    """``n`` random transforms (``random_transform(rng, **kwargs)``), no two equal.

    For the K materialized copies of one scan: a plain "hflip" comes up with probability
    about 1/7 per draw, so independent draws would often repeat it, giving identical copies.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    transforms: list[Transform] = []
    repeats = 0
    while len(transforms) < n:
        t = random_transform(rng, **kwargs)
        if t not in transforms:
            transforms.append(t)
            repeats = 0
        elif (repeats := repeats + 1) > 1000:  # e.g. no rotation, no shift: only flips are left
            raise ValueError(f"these settings allow fewer than {n} distinct transforms")
    return transforms


def apply(
    transform: Transform, views: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``transform`` to count views and their mask.

    views: (H, W) or (C, H, W) uint16 raw counts (C = 2: ANT, then mirrored POST).
    mask: (H, W) uint8 0/1 or bool, or None for an unlabeled scan.
    Returns views of the same shape, uint16 (linear interpolation, rounded), and the mask of
    the same shape and dtype (nearest neighbour), or None.
    """
    views = np.asarray(views)
    if views.dtype != np.uint16:
        raise ValueError(f"views must be uint16 counts, got {views.dtype}")
    if views.ndim not in (2, 3):
        raise ValueError(f"views must be (H, W) or (C, H, W), got shape {views.shape}")
    if mask is not None and np.shape(mask) != views.shape[-2:]:
        raise ValueError(f"mask shape {np.shape(mask)} does not match views {views.shape[-2:]}")
    warped = _warp(views.astype(np.float32), transform, order=1)
    # Linear interpolation is a convex combination of counts and zeros, so the result is
    # within [0, max]; the clip only guards against float rounding at the top of the range.
    out_views = np.clip(np.rint(warped), 0, _UINT16_MAX).astype(np.uint16)
    if mask is None:
        return out_views, None
    mask = np.asarray(mask)
    out_mask = _warp(mask.astype(np.uint8), transform, order=0).astype(mask.dtype)
    return out_views, out_mask


def augment_batch(
    images: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    *,
    max_angle_deg: float = MAX_ANGLE_DEG,
    max_shift_px: int = MAX_SHIFT_PX,
    p_vflip: float = P_VFLIP,
) -> tuple[np.ndarray, np.ndarray]:
    """Training-time augmentation: an independent ``random_transform`` per sample.

    images: (B, C, H, W) float32 (normalized counts); masks: (B, 1, H, W) float32 0/1.
    Returns new arrays of the same shapes and dtype; the inputs are not modified.

    scipy rather than torch's grid_sample: the batches arrive from Ray Data as numpy, and
    sharing ``_warp`` with ``apply`` makes the stream and the materialized D2 the very same
    geometry (no align_corners half-pixel conventions to keep in step). Measured on 2 CPU
    cores, B = 16, 2 + 1 channels of 256 x 256: about 90 ms per batch here against about
    60 ms for grid_sample, small next to a training step.
    """
    if images.ndim != 4 or masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"expected images (B, C, H, W) and masks (B, 1, H, W), got {images.shape}, {masks.shape}")
    if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[2:]:
        raise ValueError(f"images {images.shape} and masks {masks.shape} disagree on batch or size")
    out_images = np.empty(images.shape, dtype=np.float32)
    out_masks = np.empty(masks.shape, dtype=np.float32)
    for b in range(images.shape[0]):
        t = random_transform(rng, max_angle_deg=max_angle_deg, max_shift_px=max_shift_px, p_vflip=p_vflip)
        out_images[b] = _warp(images[b].astype(np.float32, copy=False), t, order=1)  # (C, H, W)
        out_masks[b] = _warp(masks[b].astype(np.float32, copy=False), t, order=0)  # (1, H, W)
    return out_images, out_masks


def _warp(image: np.ndarray, t: Transform, order: int) -> np.ndarray:
    """image: (..., H, W); every (H, W) plane gets the same transform. Same shape and dtype."""
    if t.hflip:
        image = image[..., :, ::-1]
    if t.vflip:
        image = image[..., ::-1, :]
    if t.angle_deg == 0 and not any(t.shift_px):
        return np.ascontiguousarray(image)
    matrix, offset = _inverse_affine(t, image.shape[-2:])
    planes = image.reshape(-1, *image.shape[-2:])  # (N, H, W)
    out = np.empty(planes.shape, dtype=image.dtype)
    for src, dst in zip(planes, out):
        # 2-D calls per plane: a 3-D call with an identity channel axis was ~30% slower.
        # grid-constant: zero fill that is also interpolated at the border (skimage's choice).
        ndi.affine_transform(src, matrix, offset, output=dst, order=order, mode="grid-constant", cval=0.0)
    return out.reshape(image.shape)


def _inverse_affine(t: Transform, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """affine_transform maps output to input coordinates: (row, col)_in = M @ out + offset.

    Forward: out = R (in - c) + c + s, with R the counter-clockwise (as displayed, rows
    pointing down) rotation in (row, col) coordinates, c the centre, s the shift.
    """
    theta = np.deg2rad(t.angle_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    rotation = np.array([[cos, -sin], [sin, cos]])
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    inverse = rotation.T
    offset = centre - inverse @ (centre + np.asarray(t.shift_px, dtype=np.float64))
    return inverse, offset


def augmenting(batches: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
    """Random label-preserving geometric augmentation, per sample, on the worker."""
    for batch in batches:
        images, masks = augment_batch(batch["image"].numpy(), batch["mask"].numpy(), rng)
        yield {**batch, "image": torch.from_numpy(images), "mask": torch.from_numpy(masks)}
