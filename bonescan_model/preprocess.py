"""Count normalization and view aggregation (the thoracic crop joins this module).

Counts have no fixed range (the paper, Section 2.1: c_max varies largely from patient to
patient), so every image is normalized on its own before it reaches the network or the loss.
"""

from __future__ import annotations

import numpy as np

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
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])  # (N, H*W)
    scale = np.ones(flat.shape[0], dtype=np.float32)
    for i, row in enumerate(flat):
        body = row[row > 0]
        if body.size:
            scale[i] = max(float(np.percentile(body, NORMALIZATION_PERCENTILE)), 1e-6)
    out = flat / scale[:, None]
    return np.clip(out, 0.0, 2.0).reshape(x.shape)


def aggregate_views(ant: np.ndarray, post_mirrored: np.ndarray) -> np.ndarray:
    """Eq. 4 on images: I_agg = I_ant + Mirr(I_post), with POST already mirrored.

    ant, post_mirrored: (..., H, W) in ANT orientation. Returns float32, same shape.
    """
    return np.asarray(ant, dtype=np.float32) + np.asarray(post_mirrored, dtype=np.float32)
