import math

import numpy as np
import pytest
import torch

from bonescan_model.network import LESION_PRIOR_LOGIT
from bonescan_model.loss import (
    LENGTH_EPS,
    SemiSupervisedLoss,
    SUPERVISED_KINDS,
    active_contour_loss,
    chan_vese_loss,
    contour_length,
    dice_ce_loss,
    local_contrast,
    region_loss,
)


def _chan_vese_numpy(mask: np.ndarray, g: np.ndarray, nu: float) -> float:
    """Eq. 7 on a hard mask, in float64, divided by the pixel count."""
    inside, outside = g[mask], g[~mask]
    energy = nu * mask.sum()
    if inside.size:
        energy += ((inside - inside.mean()) ** 2).sum()
    if outside.size:
        energy += ((outside - outside.mean()) ** 2).sum()
    return energy / mask.size


def _batch(b=3, h=8, w=9, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 1, h, w, generator=gen, dtype=dtype)
    g = torch.rand(b, 1, h, w, generator=gen, dtype=dtype) * 2
    target = (torch.rand(b, 1, h, w, generator=gen) > 0.7).to(dtype)
    return logits, g, target


@pytest.mark.parametrize("shape", [(8, 8), (16, 12)])
@pytest.mark.parametrize("nu", [0.0, 0.004, 0.5])
@pytest.mark.parametrize("fill", ["partial", "empty", "full"])
def test_chan_vese_matches_numpy_on_hard_mask(shape, nu, fill):
    rng = np.random.default_rng(1)
    g = rng.random((2, *shape)) * 2
    masks = {
        "partial": rng.random((2, *shape)) > 0.6,
        "empty": np.zeros((2, *shape), bool),
        "full": np.ones((2, *shape), bool),
    }[fill]
    got = chan_vese_loss(torch.from_numpy(masks[:, None].astype(np.float64)), torch.from_numpy(g[:, None]), nu)
    want = [_chan_vese_numpy(m, gi, nu) for m, gi in zip(masks, g)]
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-12)


def test_chan_vese_is_independent_of_image_size():
    logits, g, _ = _batch(b=2)
    u = torch.sigmoid(logits)
    tiled = chan_vese_loss(u.repeat(1, 1, 2, 3), g.repeat(1, 1, 2, 3))
    torch.testing.assert_close(tiled, chan_vese_loss(u, g))


def test_chan_vese_prefers_the_hot_region():
    # A bright square on a dim background: outlining it costs less than any other answer.
    g = torch.full((1, 1, 12, 12), 0.2, dtype=torch.float64)
    g[..., 4:8, 4:8] = 1.5
    right = (g > 1).double()
    shifted = torch.roll(right, 2, dims=-1)
    assert chan_vese_loss(right, g) < chan_vese_loss(shifted, g)
    assert chan_vese_loss(right, g) < chan_vese_loss(torch.full_like(g, 0.5), g)


def test_region_term_known_values():
    v = torch.zeros(1, 1, 6, 5, dtype=torch.float64)
    v[..., 1:3, 1:4] = 1  # 6 lesion pixels
    assert region_loss(v, v).item() == 0.0  # a perfect hard prediction
    assert region_loss(torch.zeros_like(v), v).item() == pytest.approx(6 / 30)  # 6 missed pixels
    assert region_loss(torch.ones_like(v), v).item() == pytest.approx(24 / 30)  # 24 false pixels
    assert region_loss(torch.full_like(v, 0.5), v).item() == pytest.approx(0.5)


def test_region_term_equals_eq8_region_plus_label_constant():
    # Eq. 8's region part sum((1 - 2v) u) differs from ours by sum(v), independent of u.
    logits, _, v = _batch()
    u = torch.sigmoid(logits)
    eq8 = ((1 - 2 * v) * u).flatten(1).mean(1)
    torch.testing.assert_close(region_loss(u, v) - eq8, v.flatten(1).mean(1))


def _soft_dice_loss(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u, v = u.flatten(1), v.flatten(1)
    return 1 - (2 * (u * v).sum(1) + 1) / (u.sum(1) + v.sum(1) + 1)


def test_normalized_eq8_known_values_and_its_region_term_is_one_minus_soft_dice():
    v = torch.zeros(1, 1, 6, 5, dtype=torch.float64)
    v[..., 1:3, 1:4] = 1  # 6 lesion pixels, 24 background
    loss = lambda u: active_contour_loss(u, v, length_weight=0.0, normalized=True).item()  # noqa: E731
    assert loss(v) == 0.0
    assert loss(torch.zeros_like(v)) == pytest.approx(6 / 7)  # every lesion pixel missed
    assert loss(torch.ones_like(v)) == pytest.approx(24 / 37)  # every background pixel hit
    logits, _, target = _batch()
    u = torch.sigmoid(logits)
    torch.testing.assert_close(active_contour_loss(u, target, 0.0, normalized=True), _soft_dice_loss(u, target))


def test_normalized_eq8_on_a_lesion_free_image_pushes_every_false_positive_down():
    v = torch.zeros(2, 1, 4, 5, dtype=torch.float64)
    u = torch.rand(2, 1, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    got = active_contour_loss(u, v, length_weight=0.0, normalized=True)
    torch.testing.assert_close(got, u.flatten(1).sum(1) / (u.flatten(1).sum(1) + 1))
    got.sum().backward()
    assert torch.isfinite(u.grad).all() and (u.grad > 0).all()
    assert active_contour_loss(torch.zeros_like(v), v, normalized=True).abs().max().item() == 0.0


@pytest.mark.parametrize("normalized, logit, low, high", [
    (False, LESION_PRIOR_LOGIT, 2620, 2621), (True, LESION_PRIOR_LOGIT, 1.5, 3.0),
    (True, -7.6, 20, 26),  # a start at the true lesion share is worse for the normalized form
])
def test_region_gradient_balance_at_the_start(normalized, logit, low, high):
    # A 256 x 256 crop with one 5 x 5 lesion (0.04 %), every logit at the head's start
    # (network.LESION_PRIOR_LOGIT): the total pull on the background against that on the
    # lesion. Eq. 8 as written pushes "predict nothing" 2,620x harder; normalized, ~2x.
    v = torch.zeros(1, 1, 256, 256, dtype=torch.float64)
    v[..., 100:105, 100:105] = 1
    z = torch.full_like(v, logit).requires_grad_(True)
    active_contour_loss(torch.sigmoid(z), v, length_weight=0.0, normalized=normalized).sum().backward()
    pull = z.grad.abs()
    assert low < ((pull * (1 - v)).sum() / (pull * v).sum()).item() < high


def test_length_term_known_values():
    assert contour_length(torch.full((2, 1, 7, 7), 0.3, dtype=torch.float64)).abs().max().item() == 0.0
    # A vertical step edge: one unit jump on each of the H - 1 rows of the difference grid,
    # each worth sqrt(1 + eps) - sqrt(eps) (1 - 1e-4: the smoothing shaves a little off).
    h, w = 6, 8
    step = torch.zeros(1, 1, h, w, dtype=torch.float64)
    step[..., :, : w // 2] = 1
    jump = math.sqrt(1 + LENGTH_EPS) - math.sqrt(LENGTH_EPS)
    assert contour_length(step).item() == pytest.approx((h - 1) * jump / (h * w), rel=1e-12)
    # Turning the image does not change the length of a straight edge.
    assert contour_length(step.transpose(-1, -2)).item() == pytest.approx((h - 1) * jump / (h * w), rel=1e-12)


def test_active_contour_combines_length_and_region():
    logits, _, v = _batch()
    u = torch.sigmoid(logits)
    torch.testing.assert_close(active_contour_loss(u, v, 0.3), 0.3 * contour_length(u) + region_loss(u, v))
    area = u.flatten(1).sum(1) + v.flatten(1).sum(1) + 1
    torch.testing.assert_close(active_contour_loss(u, v, 0.3, normalized=True),
                               (0.3 * contour_length(u) + region_loss(u, v)) * u[0, 0].numel() / area)


@pytest.mark.parametrize("side", [1, 2])
def test_default_length_weight_does_not_erase_small_lesions(side):
    v = torch.zeros(1, 1, 10, 10, dtype=torch.float64)
    v[..., 4 : 4 + side, 4 : 4 + side] = 1
    loss = SemiSupervisedLoss()
    assert active_contour_loss(v, v, loss.length_weight) < active_contour_loss(torch.zeros_like(v), v, loss.length_weight)
    # The reason for the default: a weight of 1 makes erasing such a lesion cheaper.
    assert active_contour_loss(v, v, 1.0) > active_contour_loss(torch.zeros_like(v), v, 1.0)


def test_dice_ce_known_values():
    v = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    v[..., :2, :2] = 1
    # All logits 0: p = 0.5 everywhere, BCE = ln 2, Dice = (2 * 2 + 1) / (8 + 4 + 1).
    got = dice_ce_loss(torch.zeros_like(v), v).item()
    assert got == pytest.approx((1 - 5 / 13) + math.log(2))
    confident = dice_ce_loss((2 * v - 1) * 30, v).item()
    assert confident == pytest.approx(0.0, abs=1e-9)


def test_gradcheck_pure_terms():
    logits, g, v = _batch(b=2, h=5, w=6)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: chan_vese_loss(torch.sigmoid(x), g, 0.004), (logits,))
    assert torch.autograd.gradcheck(lambda x: active_contour_loss(torch.sigmoid(x), v, 0.1), (logits,))
    assert torch.autograd.gradcheck(lambda x: active_contour_loss(torch.sigmoid(x), v, 0.1, normalized=True), (logits,))
    assert torch.autograd.gradcheck(lambda x: dice_ce_loss(x, v), (logits,))


@pytest.mark.parametrize("supervised", SUPERVISED_KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_module_total(supervised, reduction):
    logits, g, v = _batch(b=3, h=5, w=6)
    labeled = torch.tensor([True, False, True])
    loss = SemiSupervisedLoss(supervised=supervised, reduction=reduction)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, g, v, labeled)["loss"], (logits,))


@pytest.mark.parametrize("supervised", SUPERVISED_KINDS)
def test_no_labeled_image_gives_unsupervised_loss_exactly(supervised):
    logits, g, v = _batch(dtype=torch.float32)
    logits.requires_grad_(True)
    out = SemiSupervisedLoss(supervised=supervised)(logits, g, v, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(out["loss"], out["unsupervised"])
    assert out["supervised"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("supervised", SUPERVISED_KINDS)
def test_unlabeled_targets_do_not_change_loss_or_gradient(supervised):
    logits, g, v = _batch()
    labeled = torch.tensor([True, False, False])
    other = v.clone()
    other[1:] = float("nan")  # garbage where there is no label
    loss = SemiSupervisedLoss(supervised=supervised)
    results = []
    for target in (v, other):
        x = logits.clone().requires_grad_(True)
        out = loss(x, g, target, labeled)
        out["loss"].backward()
        results.append((out["loss"].detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_reductions_agree():
    logits, g, v = _batch(b=4)
    labeled = torch.tensor([True, False, True, False])
    alpha = 0.4
    none = SemiSupervisedLoss(alpha=alpha, reduction="none")(logits, g, v, labeled)
    total = SemiSupervisedLoss(alpha=alpha, reduction="sum")(logits, g, v, labeled)
    mean = SemiSupervisedLoss(alpha=alpha, reduction="mean")(logits, g, v, labeled)
    assert none["loss"].shape == none["unsupervised"].shape == none["supervised"].shape == (4,)
    assert (none["supervised"][~labeled] == 0).all()
    torch.testing.assert_close(total["loss"], none["loss"].sum())
    # Eq. 6 under "mean": l_U over all images, l_S over the labeled ones only.
    want_s = active_contour_loss(torch.sigmoid(logits[labeled]), v[labeled], 0.1).mean()
    torch.testing.assert_close(mean["supervised"], want_s)
    torch.testing.assert_close(mean["unsupervised"], chan_vese_loss(torch.sigmoid(logits), g).mean())
    torch.testing.assert_close(mean["loss"], mean["unsupervised"] + alpha * want_s)
    assert mean["n_labeled"].item() == 2


def test_unsupervised_weight_scales_l_u_in_the_loss_only():
    logits, g, v = _batch(b=4)
    labeled = torch.tensor([True, False, True, False])
    for reduction in ("mean", "sum", "none"):
        paper = SemiSupervisedLoss(alpha=0.4, reduction=reduction)(logits, g, v, labeled)
        half = SemiSupervisedLoss(alpha=0.4, unsupervised_weight=0.5, reduction=reduction)(logits, g, v, labeled)
        torch.testing.assert_close(half["unsupervised"], paper["unsupervised"])  # reported unweighted
        torch.testing.assert_close(half["loss"], paper["loss"] - 0.5 * paper["unsupervised"])


def test_unsupervised_weight_zero_learns_from_labels_alone():
    logits, g, v = _batch(b=3)
    labeled = torch.tensor([True, False, False])
    x = logits.clone().requires_grad_(True)
    out = SemiSupervisedLoss(supervised="dice_ce", alpha=1.0, unsupervised_weight=0.0)(x, g, v, labeled)
    torch.testing.assert_close(out["loss"], dice_ce_loss(logits[:1], v[:1]).mean())
    out["loss"].backward()
    assert x.grad[0].abs().sum() > 0 and (x.grad[1:] == 0).all()  # unlabeled images teach nothing


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": 0.0, "unsupervised_weight": 0.0},
        {"unsupervised_weight": -1.0},
        {"alpha": -0.1},
        {"nu": -1.0},
        {"length_weight": -0.5},
        {"alpha": float("nan")},
        {"nu": float("inf")},
        {"supervised": "focal"},
        {"semi": "snake"},
        {"reduction": "max"},
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        SemiSupervisedLoss(**kwargs)


def test_bad_inputs_raise():
    logits, g, v = _batch(b=2)
    loss = SemiSupervisedLoss()
    with pytest.raises(ValueError, match="labeled"):
        loss(logits, g, v, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="labeled"):
        loss(logits, g, v, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="target"):
        loss(logits, g, v[..., :-1], torch.tensor([True, False]))
    with pytest.raises(ValueError, match="logits"):
        loss(logits[:, 0], g[:, 0], v[:, 0], torch.tensor([True, False]))


def _rib_with_a_focus() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, lesion, bone): a 64 x 64 image, soft tissue 0.2, a bone band of level 1 (rows
    20-35) and on it a 3 x 3 focus at 2 (a lesion of the synthetic cohort's size)."""
    g = torch.full((1, 1, 64, 64), 0.2, dtype=torch.float64)
    bone = torch.zeros_like(g)
    bone[..., 20:36, :] = 1
    lesion = torch.zeros_like(g)
    lesion[..., 27:30, 30:33] = 1
    g = g + 0.8 * bone + 1.0 * lesion
    return g, lesion, bone


def test_eq7_as_written_prefers_the_bone_and_on_local_contrast_the_lesion():
    g, lesion, bone = _rib_with_a_focus()
    # Eq. 7 on g: outlining the whole bone band costs less than outlining the lesion alone.
    assert chan_vese_loss(bone, g, 0.004) < chan_vese_loss(lesion, g, 0.004)
    # On local_contrast(g) at its measured nu the lesion is the cheaper outline, by far.
    h = local_contrast(g)
    assert chan_vese_loss(lesion, h, 0.015) < 0.5 * chan_vese_loss(bone, h, 0.015)
    assert chan_vese_loss(lesion, h, 0.015) < chan_vese_loss(torch.zeros_like(g), h, 0.015)
    # and the module applies it when asked
    loss = SemiSupervisedLoss(semi="chan_vese_local", nu=0.015)
    logits = (2 * lesion - 1) * 20
    none = torch.zeros(1, dtype=torch.bool)
    torch.testing.assert_close(loss(logits, g, g, none)["unsupervised"],
                               chan_vese_loss(torch.sigmoid(logits), h, 0.015)[0])


def test_local_contrast_is_zero_on_flat_images_and_has_no_gradient():
    flat = torch.full((2, 1, 16, 16), 0.7, dtype=torch.float64, requires_grad=True)
    h = local_contrast(flat)
    assert h.abs().max().item() < 1e-12 and not h.requires_grad
    with pytest.raises(ValueError, match="window"):
        local_contrast(flat, window=4)
