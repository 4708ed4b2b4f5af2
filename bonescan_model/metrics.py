"""Segmentation metrics: DSC, CPA, Recall (Eqs. 10-12) and lesion-wise detection; at the end,
the Fréchet distance between two sets of images (the DCGAN's training curve).

Inputs are boolean masks ``pred`` and ``truth`` of shape (B, H, W) or (B, 1, H, W); numpy
arrays in, numpy arrays out. Torch tensors are accepted and converted to numpy (detached, on
the CPU). Non-boolean masks are refused: threshold probabilities first, so a metric never
silently decides the threshold.

Per-image functions return (B,) arrays and leave averaging to the caller; the ``pooled_*``
functions sum the counts over a whole set first, then apply the formula.

Headline rules (``summarize``; the one place that decides what a reported number means):
- DSC / CPA / Recall are per-image means over the lesion-bearing scans only. A lesion-free
  scan has no lesion to outline: a model that predicts nothing would otherwise collect a free
  1.0 on it (on the synthetic cohort, predicting nothing scored a DSC of 0.125 that way).
- Lesion-free scans are scored by their false positives: ``lesion_free_fp_per_image`` (lesion
  components predicted per lesion-free scan) beside ``fp_per_image`` over every scan.
- Beside the means: pooled DSC / CPA / Recall (pixel counts summed over every scan first) and
  lesion-wise sensitivity (detected lesions / true lesions, over every scan).

Empty masks, one rule for every ratio of a per-image value:
- truth and prediction both empty: DSC = CPA = Recall = 1 (nothing to find, nothing falsely
  found: the image is segmented perfectly).
- any other 0/0 is 0. Prediction empty, truth not: CPA = 0 (as DSC = Recall = 0); truth
  empty, prediction not: Recall = 0 (as DSC = CPA = 0). An image with any error then never
  scores 1, a model that predicts nothing is not rewarded with a perfect precision, and no
  NaN reaches a mean over images.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from skimage import measure
from torch import nn


def _as_masks(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as numpy bool (B, H, W)."""
    out = []
    for name, x in (("pred", pred), ("truth", truth)):
        if hasattr(x, "detach"):  # a torch tensor; metrics need no torch import
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.dtype != np.bool_:
            raise ValueError(f"{name} must be a boolean mask, got dtype {x.dtype}; threshold it first")
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {x.shape}")
        out.append(x)
    if out[0].shape != out[1].shape:
        raise ValueError(f"pred and truth must have the same shape, got {out[0].shape} and {out[1].shape}")
    return out[0], out[1]


def confusion_counts(pred, truth) -> dict[str, np.ndarray]:
    """Pixel counts per image: {"tp", "fp", "fn"}, each (B,) int64."""
    pred, truth = _as_masks(pred, truth)
    return {
        "tp": (pred & truth).sum(axis=(1, 2), dtype=np.int64),
        "fp": (pred & ~truth).sum(axis=(1, 2), dtype=np.int64),
        "fn": (~pred & truth).sum(axis=(1, 2), dtype=np.int64),
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray, both_empty: np.ndarray) -> np.ndarray:
    """numerator / denominator with the module's empty-mask rule."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    value = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    return np.where(both_empty, 1.0, value)


def scores_from_counts(tp, fp, fn) -> dict[str, np.ndarray]:
    """{"dsc", "cpa", "recall"} from pixel counts (arrays or scalars), with the empty-mask rule."""
    tp, fp, fn = (np.asarray(c, dtype=np.int64) for c in (tp, fp, fn))
    both_empty = (tp + fp + fn) == 0
    return {
        "dsc": _ratio(2 * tp, fp + 2 * tp + fn, both_empty),  # Eq. 10
        "cpa": _ratio(tp, tp + fp, both_empty),  # Eq. 11
        "recall": _ratio(tp, tp + fn, both_empty),  # Eq. 12
    }


def pixel_metrics(pred, truth) -> dict[str, np.ndarray]:
    """{"dsc", "cpa", "recall"}, each (B,) float64, one value per image."""
    counts = confusion_counts(pred, truth)
    return scores_from_counts(counts["tp"], counts["fp"], counts["fn"])


def dsc(pred, truth) -> np.ndarray:
    """Dice similarity coefficient per image, Eq. 10. (B,) float64."""
    return pixel_metrics(pred, truth)["dsc"]


def cpa(pred, truth) -> np.ndarray:
    """Class pixel accuracy (precision) per image, Eq. 11. (B,) float64."""
    return pixel_metrics(pred, truth)["cpa"]


def recall(pred, truth) -> np.ndarray:
    """Recall per image, Eq. 12. (B,) float64."""
    return pixel_metrics(pred, truth)["recall"]


def pooled_metrics(pred, truth) -> dict[str, float]:
    """{"dsc", "cpa", "recall"} over the whole set: TP, FP, FN summed over all images first."""
    counts = confusion_counts(pred, truth)
    scores = scores_from_counts(counts["tp"].sum(), counts["fp"].sum(), counts["fn"].sum())
    return {name: float(value) for name, value in scores.items()}


def lesion_detection(pred, truth) -> dict[str, np.ndarray]:
    """Lesion-wise counts per image; lesions are 8-connected components.

    A true lesion is detected if some predicted component overlaps it by at least one pixel;
    a predicted component that overlaps no true lesion is a false positive. One predicted
    component spanning two true lesions detects both.
    Returns {"lesions", "detected", "false_positives"}, each (B,) int64.
    """
    pred, truth = _as_masks(pred, truth)
    counts = np.zeros((3, pred.shape[0]), dtype=np.int64)
    for i, (p, t) in enumerate(zip(pred, truth)):
        truth_labels, n_true = measure.label(t, connectivity=2, return_num=True)
        pred_labels, n_pred = measure.label(p, connectivity=2, return_num=True)
        # Pixels of p & t lie inside a component of each mask, so label 0 never appears here.
        hit_true = np.unique(truth_labels[p & t])
        hit_pred = np.unique(pred_labels[p & t])
        counts[:, i] = (n_true, hit_true.size, n_pred - hit_pred.size)
    return {"lesions": counts[0], "detected": counts[1], "false_positives": counts[2]}


def detection_summary(counts: dict[str, np.ndarray]) -> dict[str, float]:
    """Lesion sensitivity and false positives per image over a set.

    counts: the output of ``lesion_detection`` (or several concatenated).
    Returns {"sensitivity": detected / true lesions, summed over the set (1.0 when the set has
    no true lesion: nothing to find), "fp_per_image": false positives / number of images}.
    """
    lesions = int(np.sum(counts["lesions"]))
    detected = int(np.sum(counts["detected"]))
    n_images = len(counts["lesions"])
    if n_images == 0:
        raise ValueError("detection_summary needs at least one image")
    return {
        "sensitivity": detected / lesions if lesions else 1.0,
        "fp_per_image": int(np.sum(counts["false_positives"])) / n_images,
    }


def summarize(per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """The headline of a scored set, by the rules in this module's docstring.

    per_image: (N,) arrays ``dsc``, ``cpa``, ``recall``, ``lesions``, ``detected``,
    ``false_positives``, ``tp``, ``fp``, ``fn`` (what ``engine.evaluate`` returns).
    Returns {"images", "lesion_images", "lesions" (true lesions in the set), "dsc", "cpa", "recall", "pooled_dsc", "pooled_cpa",
    "pooled_recall", "lesion_sensitivity", "fp_per_image", "lesion_free_fp_per_image"};
    {"images": 0} for an empty set. A mean over no lesion-bearing scan is NaN, never 1."""
    n = len(per_image["dsc"])
    if n == 0:
        return {"images": 0}
    bearing = per_image["lesions"] > 0
    pooled = scores_from_counts(*(per_image[k].sum() for k in ("tp", "fp", "fn")))
    detection = detection_summary(per_image)
    free_fp = per_image["false_positives"][~bearing]

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else float("nan")

    return {
        "images": n,
        "lesion_images": int(bearing.sum()),
        "lesions": int(per_image["lesions"].sum()),
        **{k: mean(per_image[k][bearing]) for k in ("dsc", "cpa", "recall")},
        **{f"pooled_{k}": float(v) for k, v in pooled.items()},
        "lesion_sensitivity": detection["sensitivity"],
        "fp_per_image": detection["fp_per_image"],
        "lesion_free_fp_per_image": mean(free_fp),
    }


# ----------------------------------------------------------------------------------------------
# Fréchet distance between real and generated crops (the DCGAN's training curve, gan)


FEATURE_SEED = 0
FEATURE_CHANNELS = 16
FEATURES = 2 * FEATURE_CHANNELS


class FrechetFeatures(nn.Module):
    """A fixed, randomly initialized conv net (seed FEATURE_SEED): images (B, C, H, W) in
    [-1, 1] -> (B, FEATURES) features, the mean and the standard deviation over the image of
    each of its last FEATURE_CHANNELS feature maps.

    Not Inception: no downloadable weights exist for bone scans, and none can be fetched on a
    cluster without internet. Random conv features still respond to intensity, texture and
    structure at several scales (random-network FIDs rank generators much like the Inception
    one, Naeem et al. 2020), and fixed weights make distances comparable across checkpoints
    and runs. The means alone mostly follow the mean intensity, so a flat grey crop would
    score close to real ones; the standard deviations tell it from a skeleton.
    """

    def __init__(self, channels: int):
        super().__init__()
        widths = [channels, 16, 32, 32, FEATURE_CHANNELS]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        rng = torch.Generator().manual_seed(FEATURE_SEED)
        for conv in self.net:
            if isinstance(conv, nn.Conv2d):
                # He initialization keeps the features' scale through the ReLUs; PyTorch's
                # default shrinks it about 3x per layer, and the distance with it.
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=rng)
                nn.init.zeros_(conv.bias)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.net(images).flatten(2)  # (B, FEATURE_CHANNELS, h * w)
        return torch.cat([maps.mean(2), maps.std(2)], dim=1)  # (B, FEATURES)


@torch.no_grad()
def frechet_features(images: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """images (B, C, H, W) in [-1, 1] -> (B, FEATURES) float64."""
    images = torch.as_tensor(images, dtype=torch.float32).cpu()
    net = FrechetFeatures(images.shape[1])
    return torch.cat([net(images[i: i + batch_size]) for i in range(0, len(images), batch_size)]).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). 0 for equal sets; N, M >= 2."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"expected two (N, F) feature sets with N >= 2, got {a.shape} and {b.shape}")
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # Fewer samples than features make the covariances singular: expected, and harmless
        # to the square root's trace, which is all that is used.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    # Rounding leaves tiny imaginary parts (and few samples make the covariances singular).
    trace = np.trace(cov_a) + np.trace(cov_b) - 2 * float(np.real(np.trace(root)))
    return float(mu @ mu + max(trace, 0.0))
