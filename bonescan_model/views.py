"""Each view its own sample: the paper's D2 without aggregation (``aggregation: views``).

A shard row holds one scan as a registered pair, ANT and POST mirrored into ANT orientation,
with one mask in the ANT frame. The paper's non-aggregated arm trains the views as separate
samples (its D2 counts 2,280 samples, twice D2_Agg's 1,140), each in its own coordinates. Here:

  ANT sample:  the ANT crop, the mask as it is;
  POST sample: the POST crop in its own orientation (the stored crop mirrored back), the mask
               mirrored the same way, so it lies on the POST view's lesions.

A model trained so segments one view at a time; on a pair (what predict, evaluate and export
hand every model) it segments both views and averages their logits in the ANT frame
(``merge_logits``), so its masks compare with the one ANT-frame truth like every other arm's.
The mean, not a max: every view was trained to give the pair's whole mask, so the two are
two estimates of one map, and their mean is the ensemble of them.
"""

from __future__ import annotations

import torch


def as_samples(image: torch.Tensor, mask: torch.Tensor | None = None, labeled: torch.Tensor | None = None):
    """A batch of pairs -> a batch of single views, ANT samples first, then POST.

    image: (B, 2, H, W) ANT and mirrored POST -> (2B, 1, H, W), each view in its own orientation.
    mask: (B, 1, H, W) in the ANT frame -> (2B, 1, H, W), each in its view's orientation.
    labeled: (B,) -> (2B,). Returns (image, mask, labeled), None where None was given.
    """
    if image.ndim != 4 or image.shape[1] != 2:
        raise ValueError(f"expected pairs of shape (B, 2, H, W) (ANT, mirrored POST), got {tuple(image.shape)}")
    ant, post = image[:, :1], image[:, 1:].flip(-1)  # (B, 1, H, W) each; POST back in its own orientation
    samples = torch.cat([ant, post])  # (2B, 1, H, W)
    masks = None if mask is None else torch.cat([mask, mask.flip(-1)])  # (2B, 1, H, W)
    flags = None if labeled is None else torch.cat([labeled, labeled])  # (2B,)
    return samples, masks, flags


def merge_logits(logits: torch.Tensor) -> torch.Tensor:
    """The logits of ``as_samples``' views (2B, 1, H, W) -> the pair's (B, 1, H, W) in the ANT
    frame: the mean of the ANT view's and the POST view's mirrored back."""
    if logits.ndim != 4 or logits.shape[0] % 2:
        raise ValueError(f"expected (2B, C, H, W) logits of ANT then POST views, got {tuple(logits.shape)}")
    ant, post = logits.chunk(2)  # (B, 1, H, W) each
    return (ant + post.flip(-1)) / 2
