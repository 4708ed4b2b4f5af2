"""Each view its own sample (aggregation "views", the paper's D2): masks that lie on each view's
lesion, a model that segments one view and merges a pair, and step budgets that hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonescan_model import engine, preprocess, views
from bonescan_model.loss import SemiSupervisedLoss
from bonescan_model.network import ModelConfig, build_model
from bonescan_model.synth import synth_patient
from bonescan_model.train_config import TrainConfig


def _one_lesion_patient():
    """The first synthetic patient with exactly one lesion, well off the midline (so that a
    mask left unmirrored on the POST view would miss it)."""
    for index in range(200):
        patient = synth_patient(5, index)
        if len(patient.lesions) == 1 and abs(patient.lesions[0].center_col - 127.5) > 20:
            return patient
    raise AssertionError("no one-lesion patient in 200")


def test_each_views_mask_lies_on_that_views_lesion():
    patient = _one_lesion_patient()
    # What ingest stores: ANT and mirrored POST cropped by one box, the mask in the ANT frame.
    post_mirrored = preprocess.mirror(patient.post)
    box = preprocess.thoracic_crop_box(patient.ant, post_mirrored)
    pair = preprocess.model_input(preprocess.crop(patient.ant, box), preprocess.crop(post_mirrored, box))
    mask = preprocess.crop(patient.lesion_mask, box).astype(np.float32)
    assert mask.sum() > 0
    image, masks, labeled = views.as_samples(torch.from_numpy(pair)[None], torch.from_numpy(mask)[None, None],
                                             torch.tensor([True]))
    assert image.shape == masks.shape == (2, 1, 256, 256) and labeled.tolist() == [True, True]

    # The POST sample is the camera's own POST view (cropped where the mirrored box lies), and its
    # mask is the exact lesion in that view's coordinates: the camera saw the lesion at the mirrored column.
    width = patient.post.shape[1]
    row0, col0, rows, cols = box
    post_box = (row0, width - col0 - cols, rows, cols)
    raw_post = preprocess.normalize_counts(preprocess.crop(patient.post, post_box))
    np.testing.assert_allclose(image[1, 0].numpy(), raw_post, rtol=1e-6)
    truth_in_post = preprocess.crop(patient.lesion_mask[:, ::-1], post_box)
    np.testing.assert_array_equal(masks[1, 0].numpy() > 0.5, truth_in_post)
    np.testing.assert_array_equal(masks[0, 0].numpy(), mask)

    # And on the pixels: each sample is hotter under its own mask than around it, and the POST
    # view under the ANT-frame mask (the unmirrored one) shows no lesion.
    def contrast(view: torch.Tensor, where: np.ndarray) -> float:
        ring = np.zeros_like(where)
        rr, cc = np.nonzero(where)
        ring[max(rr.min() - 6, 0): rr.max() + 7, max(cc.min() - 6, 0): cc.max() + 7] = True
        ring &= ~where
        return float(view[where].mean() / view[ring].mean())

    for k in (0, 1):
        assert contrast(image[k, 0].numpy(), masks[k, 0].numpy() > 0.5) > 1.2
    assert contrast(image[1, 0].numpy(), mask > 0.5) < contrast(image[1, 0].numpy(), masks[1, 0].numpy() > 0.5) - 0.2


def test_merge_undoes_the_split():
    pair = torch.rand(3, 2, 8, 8)
    singles, _, _ = views.as_samples(pair)
    # A "model" that returns its input: the merge of the views is the mean of ANT and mirrored POST.
    torch.testing.assert_close(views.merge_logits(singles), pair.mean(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="pairs of shape"):
        views.as_samples(torch.rand(3, 1, 8, 8))


@pytest.mark.parametrize("arch", ["recurrent", "unet"])
def test_a_single_view_model_takes_one_view_and_merges_a_pair(arch):
    model = build_model(ModelConfig(arch=arch, aggregation="views", width=4, recurrence=1,
                                    dilations=(1, 2), unet_depth=2)).eval()
    pair = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        per_view = model(views.as_samples(pair)[0])  # (4, 1, 32, 32)
        merged = model(pair)  # (2, 1, 32, 32)
    assert per_view.shape == (4, 1, 32, 32)
    torch.testing.assert_close(merged, views.merge_logits(per_view))
    assert model.config.aggregation == "views"
    with pytest.raises(ValueError, match="one view"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):  # a pair model takes pairs only
        build_model(ModelConfig(arch=arch, width=4, recurrence=1, dilations=(1, 2), unet_depth=2))(pair[:, :1])


def _batches(n: int, size: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(size, 2, 32, 32, generator=g), "mask": (torch.rand(size, 1, 32, 32, generator=g) > 0.99).float(),
             "labeled": torch.tensor([True, False] * (size // 2))} for _ in range(n)]


@pytest.mark.parametrize("aggregation, samples_per_scan", [("none", 1), ("views", 2)])
def test_train_epoch_counts_samples_and_stops_at_its_step_budget(aggregation, samples_per_scan):
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4, recurrence=1, dilations=(1, 2), aggregation=aggregation))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = SemiSupervisedLoss(supervised="dice_ce")
    stats = engine.train_epoch(model, iter(_batches(5)), loss_fn, optimizer, max_steps=3)
    assert stats["steps"] == 3 and stats["images"] == 3 * 4 * samples_per_scan
    assert stats["labeled_images"] == 3 * 2 * samples_per_scan
    assert engine.train_epoch(model, iter(_batches(2)), loss_fn, optimizer)["steps"] == 2  # no budget: all
    assert engine.train_epoch(model, iter(_batches(2)), loss_fn, optimizer, max_steps=0)["steps"] == 0


def test_a_step_budget_plans_the_epochs_it_takes():
    pairs = TrainConfig(batch_size=4, max_steps=10)
    assert pairs.schedule(25) == {"epochs": 2, "steps_per_epoch": 7, "steps": 10}  # 7 + 3
    assert pairs.schedule(25, workers=2) == {"epochs": 4, "steps_per_epoch": 3, "steps": 10}  # 12 rows each
    single_views = TrainConfig(batch_size=4, max_steps=10, model=ModelConfig(aggregation="views"))
    assert (single_views.samples_per_scan, single_views.scans_per_batch) == (2, 2)
    assert single_views.schedule(25) == {"epochs": 1, "steps_per_epoch": 13, "steps": 10}
    assert TrainConfig(batch_size=4, epochs=3).schedule(25) == {"epochs": 3, "steps_per_epoch": 7, "steps": 21}
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
