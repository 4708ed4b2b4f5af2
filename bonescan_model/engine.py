"""train_epoch / evaluate in plain PyTorch: a DataLoader on a laptop or a Ray dataset shard.

A batch is a dict of tensors (what ``iter_torch_batches`` yields, and what a DataLoader over
``bonescan_model`` data yields):
  image:   (B, 2, H, W) float32, per-image normalized counts, ANT then POST (mirrored)
  mask:    (B, 1, H, W) float32 in {0, 1}; anything for unlabeled images
  labeled: (B,) bool, which images carry a mask the supervised term may use
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from bonescan_model import metrics
from bonescan_model.consistency import MeanTeacher
from bonescan_model.loss import SemiSupervisedLoss
from bonescan_model.views import as_samples


def intensity_image(image: torch.Tensor) -> torch.Tensor:
    """The image g the Chan–Vese term segments: the mean of ANT and mirrored POST.

    image: (B, 2, H, W) -> (B, 1, H, W). A lesion shows in g whichever view it is brighter
    in (Eq. 4's aggregation, halved to stay in the normalized range). A single view
    (B, 1, H, W), a sample of ``aggregation: views``, is its own g.
    """
    return image.mean(dim=1, keepdim=True)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    # float16 with a GradScaler on GPUs; bfloat16 (no scaler needed) on CPUs.
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: SemiSupervisedLoss,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str = "cpu",
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    teacher: MeanTeacher | None = None,
    unsupervised_scale: float = 1.0,
    max_steps: int | None = None,
) -> dict[str, float]:
    """One pass over ``batches``, or its first ``max_steps`` batches (a step budget's last
    epoch). Returns means of the loss parts per sample, the sample and optimizer-step counts,
    the epoch's seconds and the seconds spent waiting for the next batch (data-bound time).

    A single-view model (``aggregation: views``) trains each view of a batch's pairs as its own
    sample (``views.as_samples``): a batch of B scans is 2B samples, each with its view's mask.

    teacher: a mean teacher (``semi: mean_teacher``): the student sees the batch as it is, the
    teacher a perturbed view (``MeanTeacher.predict``), and the teacher follows the student
    after every step. unsupervised_scale: a factor on the weight of l_U for this epoch (the
    teacher's ramp-up)."""
    device = torch.device(device)
    model.train()
    config = getattr(getattr(model, "module", model), "config", None)  # a ModelConfig; none on a bare nn.Module
    single_view = getattr(config, "aggregation", None) == "views"
    totals = {"loss": 0.0, "unsupervised": 0.0, "supervised": 0.0}
    images = labeled_images = steps = 0
    wait = 0.0
    start = tick = time.perf_counter()
    if max_steps is not None and max_steps <= 0:
        batches = ()
    for batch in batches:
        wait += time.perf_counter() - tick
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        labeled = batch["labeled"].to(device, non_blocking=True).bool()
        if single_view:
            image, mask, labeled = as_samples(image, mask, labeled)  # (2B, 1, H, W), (2B, 1, H, W), (2B,)
        teacher_logits = None
        with _autocast(device, amp):
            logits = model(image)  # (B, 1, H, W): the control's forward, with or without a teacher
            if teacher is not None:
                teacher_logits = teacher.predict(image).float()  # (B, 1, H, W), of a perturbed view
        # The loss runs in float32: its squared deviations underflow in half precision.
        parts = loss_fn(logits.float(), intensity_image(image), mask, labeled,
                        teacher_logits=teacher_logits, unsupervised_scale=unsupervised_scale)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(parts["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            parts["loss"].backward()
            optimizer.step()
        if teacher is not None:
            teacher.update(getattr(model, "module", model))  # DDP keeps the students, so the teachers, alike
        n = image.shape[0]
        n_lab = int(labeled.sum())
        totals["loss"] += parts["loss"].item() * n
        totals["unsupervised"] += parts["unsupervised"].item() * n
        totals["supervised"] += parts["supervised"].item() * n_lab
        images += n
        labeled_images += n_lab
        steps += 1
        tick = time.perf_counter()
        if steps == max_steps:  # before pulling a batch that would not be used
            break
    seconds = time.perf_counter() - start
    return {
        "loss": totals["loss"] / max(images, 1),
        "unsupervised": totals["unsupervised"] / max(images, 1),
        "supervised": totals["supervised"] / max(labeled_images, 1),
        "images": images,
        "labeled_images": labeled_images,
        "steps": steps,
        "seconds": seconds,
        "data_wait_seconds": wait,
    }


# Images per forward pass at inference on a CPU. One at a time is fastest there: in a batch of
# 8 the full-resolution activations no longer fit the caches and each image costs 1.6-2.1x as
# much (bench/predict.py, quiet 2-core EPYC). On a GPU the whole batch goes in one pass.
CPU_FORWARD_BATCH = 1


@torch.no_grad()
def predict_masks(model: nn.Module, image: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """image: (B, 2, H, W) normalized, on the model's device -> (B, H, W) bool lesion masks
    (sigmoid > threshold). Eval mode; on a CPU in passes of CPU_FORWARD_BATCH images."""
    model.eval()
    step = CPU_FORWARD_BATCH if image.device.type == "cpu" else max(1, len(image))
    masks = [torch.sigmoid(model(image[i:i + step])) > threshold for i in range(0, len(image), step)]  # (b, 1, H, W) each
    return torch.cat(masks)[:, 0] if masks else image.new_zeros((0, *image.shape[2:]), dtype=torch.bool)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """Per-image metrics on labeled images (unlabeled ones carry no truth and are skipped).

    Returns (N,) arrays ``dsc``, ``cpa``, ``recall`` and the lesion-wise counts ``lesions``,
    ``detected``, ``false_positives``; averaging is the caller's (see ``metrics.summarize``).
    """
    device = torch.device(device)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        labeled = batch["labeled"].bool()
        if not labeled.any():
            continue
        pred = predict_masks(model, batch["image"][labeled].to(device), threshold).cpu().numpy()
        truth = batch["mask"][labeled][:, 0].numpy() > 0.5
        for key, value in score_masks(pred, truth).items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(parts[k]) if k in parts else np.zeros(0) for k in SCORE_KEYS}


SCORE_KEYS = ("dsc", "cpa", "recall", "lesions", "detected", "false_positives", "tp", "fp", "fn")


def score_masks(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image metrics of predicted masks against the truth, both (N, H, W) bool: what
    ``evaluate`` returns, for masks from any model (a baseline that is not a torch module)."""
    return {**metrics.pixel_metrics(pred, truth), **metrics.lesion_detection(pred, truth),
            **metrics.confusion_counts(pred, truth)}
