"""The semi-supervised loss of the paper, Eq. 6: l = l_U + alpha * l_S.

- ``chan_vese_loss``: the unsupervised term l_U (Eq. 7), the Chan–Vese energy ("Active
  contours without edges", 2001) of the soft prediction ``u`` on the image ``g``. It needs no
  label and is applied to every image of a batch. ``semi: chan_vese_local`` applies
  the same energy to ``local_contrast(g)`` instead, the variant whose optimum sits on hot
  spots rather than on the whole skeleton.
- ``active_contour_loss``: the supervised term l_S (Eq. 8, garbled in the paper), taken from
  Chen et al., CVPR 2019 ("Learning Active Contour Models for Medical Image Segmentation"):
  a length term plus a region term against the label. Applied to labeled images only.
  ``normalized=True`` (``supervised: active_contour_normalized``) is the same form divided
  by the soft area of prediction and label, the fix for lesions of a few pixels.
- ``dice_ce_loss``: an alternative supervised term, soft Dice + binary cross-entropy.

Normalization, once for the whole module: every term is a per-pixel mean, i.e. the sum the
paper writes divided by the pixel count H*W of the image. All terms of one equation are
divided by the same H*W, so their ratios, and hence the meaning of nu, alpha and
length_weight, are exactly those of the sum form; the loss simply no longer grows with the
image size. (The Dice part of ``dice_ce_loss`` is a ratio and needs no normalization.)

Each function returns one value per sample, shape (B,); ``SemiSupervisedLoss`` reduces them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Keeps the soft inside/outside means defined when a prediction is all-outside or all-inside.
MEAN_EPS = 1e-8
# Smooths |grad u| at zero, as in Chen et al. (their epsilon is 1e-8).
LENGTH_EPS = 1e-8
# Dice smoothing in pixels: an empty prediction of an empty label scores a perfect 0 loss.
DICE_SMOOTH = 1.0

# active_contour: Eq. 8 as written (Chen et al.); active_contour_normalized: the same form
# divided by the soft area of prediction and label, the one that learns lesions of a few
# pixels (``active_contour_loss``); dice_ce: Dice + CE.
SUPERVISED_KINDS = ("active_contour", "active_contour_normalized", "dice_ce")
REDUCTIONS = ("mean", "sum", "none")
# chan_vese: Eq. 7 on g as written; chan_vese_local: Eq. 7 on local_contrast(g); mean_teacher:
# consistency with an EMA teacher's prediction (bonescan_model.consistency).
SEMI_KINDS = ("chan_vese", "chan_vese_local", "mean_teacher")
# local_contrast: a Gaussian of the camera's blur (~1 pixel at 2.26 mm/pixel), and a window
# a few lesion diameters wide for the local background. Measured, not tuned on test: the
# fixed points of Eq. 7 on synthetic lesion crops (bench/chan_vese_optimum.py).
CONTRAST_SIGMA = 1.0
CONTRAST_WINDOW = 9


def _check_image_batch(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, H, W), got {tuple(x.shape)}")


def chan_vese_loss(u: torch.Tensor, g: torch.Tensor, nu: float = 0.004) -> torch.Tensor:
    """Unsupervised loss l_U, Eq. 7, per-pixel mean.

    u: (B, 1, H, W) soft prediction in [0, 1] (sigmoid of the logits; a hard 0/1 mask works).
    g: (B, 1, H, W) per-image normalized counts.
    Returns (B,): (nu * sum(u) + sum(u (g - c1)^2) + sum((1 - u) (g - c2)^2)) / (H W), with
    c1, c2 the u-weighted means of g inside and outside. Area(f(g) > 0) of Eq. 7 is sum(u).
    """
    _check_image_batch("u", u)
    _check_image_batch("g", g)
    if u.shape != g.shape:
        raise ValueError(f"u and g must have the same shape, got {tuple(u.shape)} and {tuple(g.shape)}")
    u, g = u.flatten(1), g.flatten(1)  # (B, H*W)
    outside = 1.0 - u
    c1 = (u * g).sum(1, keepdim=True) / (u.sum(1, keepdim=True) + MEAN_EPS)  # (B, 1)
    c2 = (outside * g).sum(1, keepdim=True) / (outside.sum(1, keepdim=True) + MEAN_EPS)
    energy = nu * u + u * (g - c1) ** 2 + outside * (g - c2) ** 2  # (B, H*W)
    return energy.mean(1)


def local_contrast(g: torch.Tensor, sigma: float = CONTRAST_SIGMA, window: int = CONTRAST_WINDOW) -> torch.Tensor:
    """What is hotter than its surroundings: g smoothed, minus its local mean, clipped at 0.

    g: (B, 1, H, W) normalized counts -> (B, 1, H, W), no gradient (g is data). Why: on a
    whole crop, Eq. 7's two regions are "bone" and "the rest" (bone is most of what is bright,
    and a lesion is a few pixels of it), so its optimum outlines the skeleton: 3,800-16,600
    pixels against lesions of 2-67, DSC to the lesions < 0.02. A lesion is a focus hotter
    than the bone around it; subtracting a local mean of ``window`` pixels removes the bone's
    level (and soft tissue stays near 0, so the term is in effect restricted to bone), and
    the Gaussian of ``sigma`` pixels removes the per-pixel Poisson noise that high-pass
    filtering would otherwise amplify. Reflect padding: the crop's border is not a hot edge.
    """
    _check_image_batch("g", g)
    if sigma <= 0 or window < 3 or window % 2 == 0:
        raise ValueError(f"sigma must be > 0 and window an odd number >= 3, got {sigma!r}, {window!r}")
    with torch.no_grad():
        radius = max(1, int(math.ceil(3 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=g.dtype, device=g.device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        smooth = F.pad(g, (radius, radius, radius, radius), mode="reflect")
        smooth = F.conv2d(smooth, kernel.view(1, 1, 1, -1))  # (B, 1, H + 2r, W)
        smooth = F.conv2d(smooth, kernel.view(1, 1, -1, 1))  # (B, 1, H, W)
        half = window // 2
        local = F.avg_pool2d(F.pad(smooth, (half, half, half, half), mode="reflect"), window, stride=1)
        return (smooth - local).clamp_min(0.0)


def contour_length(u: torch.Tensor) -> torch.Tensor:
    """Length (total variation) term of Chen et al., per-pixel mean.

    u: (B, 1, H, W) soft prediction. Returns (B,): sum over pixels of
    sqrt(|d_row u|^2 + |d_col u|^2 + eps) - sqrt(eps), divided by H*W, with forward
    differences on the common (H-1, W-1) grid. Subtracting sqrt(eps) makes a constant image
    score exactly 0 (Chen et al. leave that offset in; it has no gradient).
    """
    _check_image_batch("u", u)
    height, width = u.shape[-2:]
    d_row = u[..., 1:, :-1] - u[..., :-1, :-1]  # (B, 1, H-1, W-1)
    d_col = u[..., :-1, 1:] - u[..., :-1, :-1]  # (B, 1, H-1, W-1)
    magnitude = torch.sqrt(d_row**2 + d_col**2 + LENGTH_EPS) - math.sqrt(LENGTH_EPS)
    return magnitude.flatten(1).sum(1) / (height * width)


def region_loss(u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Region term of Chen et al. against the label, per-pixel mean.

    u: (B, 1, H, W) soft prediction; target: (B, 1, H, W) label v in {0, 1}.
    Returns (B,): (sum u (v - 1)^2 + sum (1 - u) (v - 0)^2) / (H W), i.e. c1 = 1 inside and
    c2 = 0 outside. For a 0/1 label this is the soft count of wrongly classified pixels.

    Relation to the garbled Eq. 8: its region part sum(((1 - v)^2 - v^2) u) = sum((1 - 2v) u),
    while ours is sum(u (1 - v)^2 + (1 - u) v^2) = sum((1 - 2v) u) + sum(v^2); for a 0/1 label
    sum(v^2) = sum(v), a constant of the label. The two have the same gradient in u; ours is
    0 at a perfect prediction instead of -sum(v).
    """
    _check_image_batch("u", u)
    _check_image_batch("target", target)
    if u.shape != target.shape:
        raise ValueError(f"u and target must have the same shape, got {tuple(u.shape)} and {tuple(target.shape)}")
    region = u * (target - 1.0) ** 2 + (1.0 - u) * target**2  # (B, 1, H, W)
    return region.flatten(1).mean(1)


def active_contour_loss(u: torch.Tensor, target: torch.Tensor, length_weight: float = 0.1,
                        normalized: bool = False) -> torch.Tensor:
    """Supervised loss l_S (Eq. 8 as Chen et al. define it): length_weight * length + region.

    u: (B, 1, H, W) soft prediction in [0, 1]; target: (B, 1, H, W) label v in {0, 1}.
    Returns (B,). As written (``normalized=False``) a per-pixel mean: the sum form divided by
    H*W. ``normalized=True`` divides the sum form by sum(u) + sum(v) + DICE_SMOOTH instead:

        (length_weight * length_sum + region_sum) / (sum(u) + sum(v) + 1)

    Why Eq. 8 as written fails on bone scans. Its region term is the soft count of wrongly
    classified pixels; per pixel i, d(region)/du_i = 1 - 2 v_i: +1 on each of the N_bg
    background pixels, -1 on each of the N_fg lesion pixels. Through the sigmoid,
    d/dz_i = sigma'(z_i) (1 - 2 v_i), and at the start (every z_i alike) the background pulls
    with a total of N_bg sigma' against the lesions' N_fg sigma'. Lesions cover ~0.04 % of a
    crop, so "predict nothing" is pushed ~2,600x harder than "find the lesion"; the term is L1
    in u, so nothing in it slows that push near the optimum, and once z is far below 0 on the
    lesions too, sigma'(z) leaves them no gradient to recover with. (Dividing by H*W changes
    nothing of this: it is a constant, and Adam is invariant to a constant factor.)

    The fix keeps the form, length plus region against the label, and changes only what it is
    divided by. region_sum = sum(u (1 - v)) + sum((1 - u) v) = sum(u) + sum(v) - 2 sum(u v), so
    region_sum / (sum(u) + sum(v) + 1) = 1 - (2 sum(u v) + 1) / (sum(u) + sum(v) + 1), exactly
    1 - soft Dice (``dice_ce_loss``'s Dice, with its one pixel of smoothing): missing a lesion
    of area A now costs about A / (its share of the lesion and prediction area), not A / (H W).
    The length term is divided by the same area, so length_weight weighs it against the region
    term exactly as in the sum form (the trade-off in ``SemiSupervisedLoss``'s docstring holds).
    At the start the background's total pull is ~2x the lesions' (test_loss), not ~2,600x.
    The head's start (network.LESION_PRIOR_LOGIT, -4) does not saturate this form: a start
    nearer the true lesion share is worse for it, since the background's pull is then that of
    the smoothing pixel against a small area (measured: 7.9x at logit -6, 23x at -7.6).
    The smoothing is the guard for lesion-free images: sum(v) = 0 gives sum(u) / (sum(u) + 1),
    0 for an empty prediction and pushing every false positive down.

    Measured and dropped: Chan–Vese's own region weights set to the inverse region areas
    (lambda1 = 1 / N_fg, lambda2 = 1 / N_bg) balance the start 1:1, but that term is the false
    positive rate plus the false negative rate, and a false positive pixel then costs
    N_fg / N_bg ~ 1/2,600 of a missed one: on the synthetic cohort it learned to outline far
    too much (9.3 false positive lesions per test scan, validation DSC falling from 0.22 to
    0.02-0.05 after epoch 2; bench/RESULTS.md, "Eq. 8 that learns").
    """
    if not normalized:
        return length_weight * contour_length(u) + region_loss(u, target)
    pixels = u.shape[-1] * u.shape[-2]
    total = (length_weight * contour_length(u) + region_loss(u, target)) * pixels  # (B,): the sum form
    area = u.flatten(1).sum(1) + target.flatten(1).sum(1)  # (B,)
    return total / (area + DICE_SMOOTH)


def consistency_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean-teacher consistency: per-pixel mean of (sigmoid(logits) - sigmoid(teacher))^2.

    logits, teacher_logits: (B, 1, H, W); the teacher's carry no gradient. Returns (B,).
    Squared error on probabilities, not cross-entropy against the teacher: it is bounded, and
    it does not turn a weak teacher's soft guesses into confident targets (Tarvainen & Valpola
    2017 found it the more robust of the two).
    """
    _check_image_batch("logits", logits)
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    diff = torch.sigmoid(logits) - torch.sigmoid(teacher_logits.detach())
    return (diff**2).flatten(1).mean(1)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss + binary cross-entropy, per sample.

    logits: (B, 1, H, W) raw network output; target: (B, 1, H, W) label in {0, 1}.
    Returns (B,): (1 - soft Dice) + per-pixel mean BCE. Takes logits, not probabilities, so
    the cross-entropy is computed in its numerically stable form.
    """
    _check_image_batch("logits", logits)
    _check_image_batch("target", target)
    if logits.shape != target.shape:
        raise ValueError(
            f"logits and target must have the same shape, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    probs = torch.sigmoid(logits).flatten(1)  # (B, H*W)
    truth = target.flatten(1)
    overlap = (probs * truth).sum(1)
    dice = (2.0 * overlap + DICE_SMOOTH) / (probs.sum(1) + truth.sum(1) + DICE_SMOOTH)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(1), truth, reduction="none").mean(1)
    return (1.0 - dice) + bce


class SemiSupervisedLoss(nn.Module):
    """l = w_U * l_U + alpha * l_S (Eq. 6, where w_U = 1), defaults from the paper: alpha = 0.4, nu = 0.004.

    l_U is applied to every image, l_S only to the images marked labeled. supervised: one of
    SUPERVISED_KINDS; semi: one of SEMI_KINDS (for chan_vese_local, nu is in
    the units of the local-contrast image, whose values are ~10x smaller than g's: its
    measured nu is ~0.015, see bench/chan_vese_optimum.py).

    unsupervised_weight (default 1, the paper) multiplies l_U: l = w_U * l_U + alpha * l_S.
    0 trains on the labels alone (a supervised baseline, or the ablation of what l_U brings);
    l_U is still computed and returned, so it can be watched. Both weights 0 is an error.

    length_weight (default 0.1) weighs the length term inside l_S against the region term.
    Both are per-pixel means over the same H*W, so their ratio is that of the sum form; for a
    hard mask the length is about the lesion's perimeter and the region term counts wrong
    pixels. Erasing a lesion of area A and perimeter P lowers l_S only if
    length_weight * P > A; for a disk of radius r that is r < 2 * length_weight. With 0.1 no
    lesion of even one pixel is cheaper to erase than to outline (a single pixel: P ~ 3.4,
    A = 1), yet the term still smooths ragged borders. An equal weight of 1 would already
    favour erasing a 2x2 lesion (P ~ 7.4 > A = 4), and bone-scan lesions can be that small.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.4,
        nu: float = 0.004,
        supervised: str = "active_contour",
        semi: str = "chan_vese",
        length_weight: float = 0.1,
        unsupervised_weight: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__()
        for name, value in (("alpha", alpha), ("nu", nu), ("length_weight", length_weight),
                            ("unsupervised_weight", unsupervised_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if alpha == 0 and unsupervised_weight == 0:
            raise ValueError("alpha and unsupervised_weight are both 0: nothing would be learned")
        if supervised not in SUPERVISED_KINDS:
            raise ValueError(f"supervised must be one of {SUPERVISED_KINDS}, got {supervised!r}")
        if semi not in SEMI_KINDS:
            raise ValueError(f"semi must be one of {SEMI_KINDS}, got {semi!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.alpha = float(alpha)
        self.nu = float(nu)
        self.supervised = supervised
        self.semi = semi
        self.length_weight = float(length_weight)
        self.unsupervised_weight = float(unsupervised_weight)
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, nu={self.nu}, supervised={self.supervised!r}, semi={self.semi!r}, "
            f"length_weight={self.length_weight}, unsupervised_weight={self.unsupervised_weight}, "
            f"reduction={self.reduction!r}"
        )

    def _supervised_terms(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.supervised == "dice_ce":
            return dice_ce_loss(logits, target)
        return active_contour_loss(torch.sigmoid(logits), target, self.length_weight,
                                   normalized=self.supervised == "active_contour_normalized")

    def forward(
        self, logits: torch.Tensor, g: torch.Tensor, target: torch.Tensor, labeled: torch.Tensor,
        teacher_logits: torch.Tensor | None = None, unsupervised_scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """logits: (B, 1, H, W) raw network output; g: (B, 1, H, W) float normalized counts;
        target: (B, 1, H, W) float label in {0, 1}, anything (e.g. zeros) for unlabeled images;
        labeled: (B,) bool, which images carry a label; teacher_logits: (B, 1, H, W), the
        teacher's prediction (mean_teacher only, where l_U is ``consistency_loss``);
        unsupervised_scale: a factor on w_U for this step (the mean teacher's ramp-up).

        Returns {"loss", "unsupervised", "supervised", "n_labeled"}.
        w_U = unsupervised_weight * unsupervised_scale weighs l_U in "loss" only; "unsupervised"
        is l_U itself, unweighted, so it can be watched at any weight.
        - "mean": loss = w_U * mean over all images of l_U + alpha * mean over labeled images of
          l_S; "supervised" is that labeled mean (0 when no image is labeled, so loss == w_U * l_U).
        - "sum": the same with sums.
        - "none": (B,) tensors, loss_i = w_U * l_U_i + alpha * l_S_i with l_S_i = 0 for unlabeled
          images; their mean is therefore not the "mean" loss unless every image is labeled.
        """
        _check_image_batch("logits", logits)
        for name, x in (("g", g), ("target", target)):
            if x.shape != logits.shape:
                raise ValueError(f"{name} must have the shape of logits {tuple(logits.shape)}, got {tuple(x.shape)}")
        if labeled.dtype != torch.bool or labeled.shape != logits.shape[:1]:
            raise ValueError(
                f"labeled must be a bool tensor of shape ({logits.shape[0]},), "
                f"got {labeled.dtype} {tuple(labeled.shape)}"
            )
        if self.semi == "mean_teacher":
            if teacher_logits is None:
                raise ValueError("semi='mean_teacher' needs teacher_logits")
            unsupervised = consistency_loss(logits, teacher_logits)  # (B,)
        else:
            image = local_contrast(g) if self.semi == "chan_vese_local" else g
            unsupervised = chan_vese_loss(torch.sigmoid(logits), image, self.nu)  # (B,)
        w_u = self.unsupervised_weight * float(unsupervised_scale)
        # Select the labeled images before computing l_S: whatever an unlabeled target holds
        # (even NaN) then cannot reach the loss or its gradient.
        n_labeled = int(labeled.sum())
        supervised = logits.new_zeros(logits.shape[0])  # (B,)
        if n_labeled:
            terms = self._supervised_terms(logits[labeled], target[labeled])  # (L,)
            supervised = supervised.index_put((labeled,), terms)
        n = logits.new_tensor(float(n_labeled))
        if self.reduction == "none":
            return {
                "loss": w_u * unsupervised + self.alpha * supervised,
                "unsupervised": unsupervised,
                "supervised": supervised,
                "n_labeled": n,
            }
        if self.reduction == "sum":
            l_u, l_s = unsupervised.sum(), supervised.sum()
        else:
            l_u = unsupervised.mean()
            l_s = supervised.sum() / n_labeled if n_labeled else supervised.sum()
        loss = w_u * l_u + self.alpha * l_s
        return {"loss": loss, "unsupervised": l_u, "supervised": l_s, "n_labeled": n}
