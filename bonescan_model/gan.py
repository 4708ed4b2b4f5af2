"""The DCGAN that makes the paper's D3 samples (Lin et al. 2022, Section 3.2.2, Fig. 6; Radford
et al. 2015), in plain PyTorch. Reads top to bottom: losses, one training epoch, back to counts, sampling,
checkpoints, the sample sheet. The config and the networks are in ``gan_network``, the
Fréchet distance that tracks training with the metrics (``metrics.frechet_distance``).

The GAN sees and makes normalized counts shifted into tanh's range:
    images: (B, C, H, W) float32 in [-1, 1] = preprocess.normalize_counts(counts) - 1
    C = 2 for views "both" (ANT, then POST mirrored into ANT orientation), C = 1 for
    "aggregated" (the mean of the two normalized views: Eq. 4's aggregation, halved, the same
    image engine.intensity_image gives the Chan-Vese term).
Normalized counts have no unit (each crop is divided by its own count level); ``to_counts``
turns a generated image back into uint16 counts with a level drawn from the real crops.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bonescan_model import checkpoint
from bonescan_model.errors import InputError
from bonescan_model.gan_network import VIEWS, Discriminator, GanConfig, Generator
from bonescan_model.preprocess import count_scale

FILENAME = "gan.pt"
# Normalized counts live in [0, 2] (normalize_counts clips there); tanh's range is [-1, 1].
_SHIFT = 1.0

# ----------------------------------------------------------------------------------------------
# Losses


def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Per-sample terms of Eq. 9: -log D(x) for samples labeled real, -log(1 - D(x)) for fake.

    logits: (B,) discriminator logits. Returns (B,). The generator minimizes the "real" term
    of its samples (-log D(G(z)), Goodfellow et al.'s non-saturating form) rather than
    log(1 - D(G(z))), whose gradient vanishes while D still tells fakes apart easily.
    """
    # softplus(-l) = -log sigmoid(l); softplus(l) = -log(1 - sigmoid(l)), both without overflow.
    return F.softplus(-logits) if real else F.softplus(logits)


# ----------------------------------------------------------------------------------------------
# Training


def train_gan_epoch(
    generator: nn.Module,
    discriminator: nn.Module,
    batches: Iterable[torch.Tensor],
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    *,
    noise: torch.Generator,
    d_steps: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """One pass over ``batches`` (Fig. 6): each real batch updates D once, against as many fakes;
    after every ``d_steps`` D updates G updates once, on fresh noise of the same batch size. A
    last group shorter than ``d_steps`` still ends with a G update.

    batches: (B, C, H, W) float32 in [-1, 1], real crops. noise: the generator of every z drawn
    (on the CPU, so a seed gives the same z on any device). Works on DDP-wrapped networks:
    each forward pass with gradients has its own backward pass. Returns the mean D and G losses
    per update, D's mean probability of "real" for real and fake images, the update and image
    counts, the epoch's seconds and the seconds spent waiting for data.
    """
    if d_steps < 1:
        raise ValueError(f"d_steps must be >= 1, got {d_steps}")
    device = torch.device(device)
    latent = getattr(generator, "module", generator).latent
    generator.train()
    discriminator.train()
    sums = {"d_loss": 0.0, "g_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
    d_updates = g_updates = images = 0
    wait = 0.0
    start = tick = time.perf_counter()

    def z(n: int) -> torch.Tensor:
        return torch.randn(n, latent, generator=noise).to(device)

    def g_update(n: int) -> None:
        nonlocal g_updates
        opt_g.zero_grad(set_to_none=True)
        loss = adversarial_loss(discriminator(generator(z(n))), real=True).mean()
        loss.backward()  # also leaves gradients on D; every D update starts from zero_grad
        opt_g.step()
        sums["g_loss"] += loss.item()
        g_updates += 1

    n = 0
    for real in batches:
        wait += time.perf_counter() - tick
        real = real.to(device, non_blocking=True)
        n = real.shape[0]
        opt_d.zero_grad(set_to_none=True)
        real_logits = discriminator(real)
        loss_real = adversarial_loss(real_logits, real=True).mean()
        loss_real.backward()
        with torch.no_grad():
            fake = generator(z(n))
        fake_logits = discriminator(fake)
        loss_fake = adversarial_loss(fake_logits, real=False).mean()
        loss_fake.backward()
        opt_d.step()
        sums["d_loss"] += loss_real.item() + loss_fake.item()
        sums["d_real"] += torch.sigmoid(real_logits).mean().item()
        sums["d_fake"] += torch.sigmoid(fake_logits).mean().item()
        d_updates += 1
        images += n
        if d_updates % d_steps == 0:
            g_update(n)
        tick = time.perf_counter()
    if d_updates % d_steps:
        g_update(n)
    return {
        "d_loss": sums["d_loss"] / max(d_updates, 1),
        "g_loss": sums["g_loss"] / max(g_updates, 1),
        "d_real": sums["d_real"] / max(d_updates, 1),
        "d_fake": sums["d_fake"] / max(d_updates, 1),
        "d_updates": d_updates,
        "g_updates": g_updates,
        "images": images,
        "seconds": time.perf_counter() - start,
        "data_wait_seconds": wait,
    }


# ----------------------------------------------------------------------------------------------
# Between counts and the GAN's images


def gan_images(normalized: np.ndarray | torch.Tensor, views: str) -> np.ndarray | torch.Tensor:
    """Model input -> what the GAN sees.

    normalized: (B, 2, H, W) normalized counts in [0, 2], ANT then mirrored POST
    (preprocess.model_input). Returns (B, C, H, W) in [-1, 1], same array type.
    """
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    if normalized.ndim != 4 or normalized.shape[1] != 2:
        raise ValueError(f"expected (B, 2, H, W) normalized views, got {tuple(normalized.shape)}")
    x = normalized if views == "both" else normalized.mean(1, keepdims=True)
    return x - _SHIFT


def count_levels(counts: np.ndarray, views: str) -> np.ndarray:
    """The count level of each channel the GAN makes, for real crops.

    counts: (B, 2, H, W) raw counts, ANT then mirrored POST (a one-view crop repeats its
    view). A view's level is the scale normalize_counts divides it by: the
    NORMALIZATION_PERCENTILE percentile of its non-zero pixels (1 for an empty view). The
    aggregated image is the mean of the normalized views, so its level is the mean of theirs.
    Returns (B, C) float32.
    """
    x = np.asarray(counts)
    if x.ndim != 4 or x.shape[1] != 2:
        raise ValueError(f"expected (B, 2, H, W) counts, got {x.shape}")
    levels = count_scale(x)  # (B, 2)
    return levels if views == "both" else levels.mean(1, keepdims=True)


def to_counts(images: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Generated images -> uint16 counts.

    images: (B, C, H, W) in [-1, 1]; levels: (B, C) count levels (``count_levels`` of real
    crops). A pixel's counts are round((image + 1) * level), the inverse of normalize_counts
    at that level: a real crop's own image and level give its counts back (up to the clip at
    twice the level), and a sample gets counts on a real crop's scale. Rounded, not
    Poisson-sampled: the generator learned the real crops' noise already, and a second draw
    would double it. Returns (B, C, H, W) uint16.
    """
    images = np.asarray(images, dtype=np.float32)
    levels = np.asarray(levels, dtype=np.float32)
    if images.ndim != 4 or levels.shape != images.shape[:2]:
        raise ValueError(f"expected images (B, C, H, W) and levels (B, C), got {images.shape} and {levels.shape}")
    counts = np.rint(np.clip(images + _SHIFT, 0.0, 2.0) * levels[:, :, None, None])
    return np.clip(counts, 0, np.iinfo(np.uint16).max).astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_noise(latent: int, indices: Sequence[int], seed: int) -> torch.Tensor:
    """z of samples ``indices``: (n, latent) float32, each a function of (seed, index) alone,
    so sample i is the same whatever batch it is drawn in."""
    return torch.from_numpy(np.stack(
        [np.random.default_rng([seed, i]).standard_normal(latent, dtype=np.float32) for i in indices]))


# Noise draws that set the generator's BatchNorm statistics before sampling (see calibrated).
CALIBRATION_SAMPLES = 128


@torch.no_grad()
def calibrated(generator: nn.Module, samples: int = CALIBRATION_SAMPLES, batch_size: int = 32) -> nn.Module:
    """A copy of the generator, in eval mode, whose BatchNorm running statistics are the exact
    means and variances of its layers over ``samples`` noise draws ("precise BN").

    Sampling in eval mode makes each sample independent of the others in its batch, but the
    running statistics lag the weights (momentum 0.1): early in training they are far off and
    eval-mode samples are nearly blank. Recomputing them for the current weights fixes that;
    the original generator, and its training, are untouched. The noise is drawn with a fixed
    seed: the same weights always give the same statistics.
    """
    module = copy.deepcopy(getattr(generator, "module", generator))
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
    module.train()
    device = next(module.parameters()).device
    noise = torch.Generator().manual_seed(0)
    for start in range(0, samples, batch_size):
        module(torch.randn(min(batch_size, samples - start), module.latent, generator=noise).to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return module.eval()


@torch.no_grad()
def sample_images(generator: nn.Module, indices: Sequence[int], seed: int, batch_size: int = 32) -> np.ndarray:
    """Samples ``indices`` (n >= 1) of ``seed``: (n, C, H, W) float32 in [-1, 1].

    The generator runs in eval mode, so a sample depends neither on the others drawn beside it
    nor on the batch size; a generator straight from training should be ``calibrated`` first
    (checkpoints hold calibrated generators)."""
    module = getattr(generator, "module", generator)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    out = [module(sample_noise(module.latent, indices[i: i + batch_size], seed).to(device)).float().cpu().numpy()
           for i in range(0, len(indices), batch_size)]
    module.train(was_training)
    return np.concatenate(out)


def sample_counts(generator: nn.Module, levels: np.ndarray, indices: Sequence[int], seed: int) -> np.ndarray:
    """Samples as uint16 counts: (n, C, H, W).

    levels: (N, C) count levels of the real training crops (saved in the GAN checkpoint).
    Sample i takes the levels of one real crop, drawn with a generator seeded by (seed, i):
    count levels follow the real crops' distribution, and ANT and POST keep their real pairing.
    """
    levels = np.asarray(levels, dtype=np.float32)
    if levels.ndim != 2 or len(levels) == 0:
        raise ValueError(f"expected (N, C) count levels of real crops, N >= 1, got {levels.shape}")
    rows = [int(np.random.default_rng([seed, i, 1]).integers(len(levels))) for i in indices]
    return to_counts(sample_images(generator, indices, seed), levels[rows])


# ----------------------------------------------------------------------------------------------
# Checkpoints (plain containers only, read and written by bonescan_model.checkpoint)


def save_gan_checkpoint(path: str | os.PathLike, generator: nn.Module, discriminator: nn.Module,
                        config: GanConfig, levels: np.ndarray, **meta) -> Path:
    """Both networks, the GanConfig, the real crops' count levels (N, C) and ``meta``; a
    generator rebuilt from this file alone can write counts. Pass a ``calibrated`` generator
    so that sampling from the file needs no further step."""
    # DDP wraps the networks: save the inner modules' keys so any process can load them.
    state = {name: {k: v.detach().cpu() for k, v in getattr(net, "module", net).state_dict().items()}
             for name, net in (("generator", generator), ("discriminator", discriminator))}
    return checkpoint.write_file(path, {"gan_config": dataclasses.asdict(config), **state,
                                   "count_levels": torch.as_tensor(np.asarray(levels, np.float32)), "meta": meta})


def load_gan_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                        ) -> tuple[Generator, Discriminator, GanConfig, np.ndarray, dict]:
    """A GAN checkpoint file, or a folder holding ``gan.pt`` -> (generator, discriminator,
    config, count levels (N, C), meta); networks in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise InputError(path, f"no GAN checkpoint here (expected a {FILENAME} or a folder holding one)")
    blob = checkpoint.read_file(path, map_location, kind="GAN checkpoint")
    try:
        config = GanConfig.from_dict(blob["gan_config"])
        generator, discriminator = Generator(config), Discriminator(config)
        generator.load_state_dict(blob["generator"])
        discriminator.load_state_dict(blob["discriminator"])
        levels = blob["count_levels"].numpy()
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise InputError(path, f"not a bonescan GAN checkpoint ({type(err).__name__}: {err})") from None
    return generator.eval(), discriminator.eval(), config, levels, blob.get("meta", {})


def generator_digest(generator: nn.Module) -> str:
    """SHA-256 of the generator's weights: names the GAN that made a sample."""
    h = hashlib.sha256()
    for name, value in getattr(generator, "module", generator).state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The sample sheet


def write_sample_sheet(real: np.ndarray, generated: np.ndarray, path: str | os.PathLike) -> Path:
    """A PNG of real crops (left) beside generated ones (right), one crop per row, its views
    side by side (ANT then mirrored POST, or the aggregated view).

    real, generated: (n, C, H, W) in [-1, 1], the same C. Shown as bone scans are read: dark
    uptake on white, normalized counts 0..1 (bone) over the full grey range.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from skimage.util import montage

    real, generated = np.asarray(real, np.float32), np.asarray(generated, np.float32)
    if real.ndim != 4 or real.shape[1:] != generated.shape[1:] or not len(real) or not len(generated):
        raise ValueError(f"expected two non-empty (n, C, H, W) sets of the same C, H, W, "
                         f"got {real.shape} and {generated.shape}")
    rows = max(len(real), len(generated))
    channels, height, width = real.shape[1:]
    fig = Figure(figsize=(2 * channels * width / 100 + 0.5, rows * height / 100 + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    for column, (title, images) in enumerate((("real (training crops)", real), ("generated (DCGAN)", generated))):
        grid = montage(images.reshape(-1, height, width) + _SHIFT, grid_shape=(rows, channels), fill=0.0,
                       padding_width=4)  # (rows * (H + pad), C * (W + pad))
        ax = fig.add_subplot(1, 2, column + 1)
        ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
