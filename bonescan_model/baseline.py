"""The non-learned baseline a trained model must beat: one count threshold.

A pixel is a lesion when the normalized intensity image g (engine.intensity_image) exceeds
tau, with tau tuned on the labeled training images to maximize pooled DSC. On bone scans this
is the classic "hot spot" rule; it cannot tell a lesion from a degenerative joint or an
injection site, which is exactly what the model has to learn.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from bonescan_model import metrics
from bonescan_model.engine import intensity_image

CANDIDATES = np.round(np.arange(0.3, 2.0, 0.02), 2)


def _counts_per_threshold(batches: Iterable[dict]) -> np.ndarray:
    """(len(CANDIDATES), 3) pooled TP, FP, FN of every candidate over labeled images."""
    totals = np.zeros((len(CANDIDATES), 3), np.int64)
    for batch in batches:
        labeled = batch["labeled"].bool()
        if not labeled.any():
            continue
        g = intensity_image(batch["image"][labeled])[:, 0].numpy()  # (B, H, W)
        truth = batch["mask"][labeled][:, 0].numpy() > 0.5
        for i, tau in enumerate(CANDIDATES):
            c = metrics.confusion_counts(g > tau, truth)
            totals[i] += [c["tp"].sum(), c["fp"].sum(), c["fn"].sum()]
    return totals


def fit_threshold(batches: Iterable[dict]) -> float:
    """The candidate tau with the best pooled DSC on the labeled images of ``batches``."""
    tp, fp, fn = _counts_per_threshold(batches).T
    dsc = metrics.scores_from_counts(tp, fp, fn)["dsc"]
    return float(CANDIDATES[int(np.argmax(dsc))])


class ThresholdModel(torch.nn.Module):
    """The baseline as a model: logits whose sigmoid crosses 0.5 exactly where g > tau, so
    ``engine.evaluate`` scores it like any network."""

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (intensity_image(image) - self.tau) * 50.0  # (B, 1, H, W)
