"""The DCGAN's networks (Radford et al. 2015) and the config that rebuilds them, beside the
segmentation network (``network``): config, then generator and discriminator. The training
loop, sampling and checkpoints are in ``gan``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bonescan_model.errors import quoted
from bonescan_model.frozen import from_mapping
from bonescan_model.preprocess import CROP_SIZE


VIEWS = ("both", "aggregated")

# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class GanConfig:
    """The whole GAN recipe, saved into every GAN checkpoint (dataclasses.asdict).

    Architecture (enough to rebuild the generator from a checkpoint):
    views:  "both" (2 channels: ANT, mirrored POST) or "aggregated" (1 channel, their mean).
    size:   crop side in pixels, a power of two >= 16; the shards hold 256 x 256 crops.
    latent: length of the noise vector z.
    width:  channels of the discriminator's first level and of the generator's last; each
            level towards 4 x 4 doubles them, up to 8 * width (Radford et al.'s 64-128-256-512
            is width 64 at 64 x 64).
    Training (the paper gives only k; the rest are Radford et al.'s):
    d_steps: k of Fig. 6, discriminator updates per generator update (the paper's 3).
    lr, beta1, beta2: Adam, both networks; beta1 0.5 as Radford et al. found stable.
    batch_size, epochs, seed; checkpoint_every: epochs between checkpoints (and Fréchet
            distances), the last epoch always included.
    """

    views: str = "both"
    size: int = CROP_SIZE
    latent: int = 100
    width: int = 32
    d_steps: int = 3
    lr: float = 0.0002
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 16
    epochs: int = 200
    checkpoint_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views not in VIEWS:
            raise ValueError(f"GanConfig: views must be one of {VIEWS}, got {quoted(self.views)}")
        minimum = {"size": 16, "latent": 1, "width": 1, "d_steps": 1, "batch_size": 1, "epochs": 1,
                   "checkpoint_every": 1, "seed": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            # bool is an int subclass: `width: true` in a YAML file must not become width 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"GanConfig: {name} must be an int >= {low}, got {quoted(value)}")
        if self.size & (self.size - 1):
            raise ValueError(f"GanConfig: size must be a power of two, got {self.size}")
        for name, low, high in (("lr", 0.0, math.inf), ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < high
            if not ok or (name == "lr" and value == 0):
                raise ValueError(f"GanConfig: {name} must be a number in [{low}, {high}), got {quoted(value)}")

    @property
    def channels(self) -> int:
        return 2 if self.views == "both" else 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GanConfig:
        """Rebuild from dataclasses.asdict output (or a YAML mapping); unknown keys are errors."""
        return from_mapping(cls, d)


def _level_channels(config: GanConfig) -> list[int]:
    """Channels of the feature maps at 4 x 4, 8 x 8, ..., size/2 x size/2 (the generator's order)."""
    sides = [4 * 2**i for i in range(int(math.log2(config.size)) - 2)]  # 4 .. size/2
    return [min(config.width * config.size // (2 * side), 8 * config.width) for side in sides]


# ----------------------------------------------------------------------------------------------
# Networks (Radford et al. 2015: strided convolutions, BatchNorm, ReLU / LeakyReLU, tanh out)


def _dcgan_init(module: nn.Module) -> None:
    """Weights from N(0, 0.02), BatchNorm scales from N(1, 0.02), as Radford et al."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z: (B, latent) -> images (B, C, size, size) in [-1, 1]."""

    def __init__(self, config: GanConfig):
        super().__init__()
        self.latent = config.latent
        channels = _level_channels(config)
        # No conv bias before BatchNorm: its shift replaces it.
        layers: list[nn.Module] = [nn.ConvTranspose2d(config.latent, channels[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(channels[-1], config.channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent:
            raise ValueError(f"expected noise of shape (B, {self.latent}), got {tuple(z.shape)}")
        return self.net(z[:, :, None, None])  # (B, latent, 1, 1) -> (B, C, size, size)


class Discriminator(nn.Module):
    """images (B, C, size, size) in [-1, 1] -> (B,) logits, > 0 for "real"."""

    def __init__(self, config: GanConfig):
        super().__init__()
        self.shape = (config.channels, config.size, config.size)
        channels = _level_channels(config)[::-1]  # size/2 .. 4
        # No BatchNorm on the input layer (Radford et al.: it made samples oscillate).
        layers: list[nn.Module] = [nn.Conv2d(config.channels, channels[0], 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(channels[-1], 1, 4, 1, 0)]  # (B, c, 4, 4) -> (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(images.shape)}")
        return self.net(images).flatten()  # (B,)
