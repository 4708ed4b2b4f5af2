"""The paper's segmentation network (Lin et al. 2022, Sections 2.3-2.4, Fig. 1-5) and the U-Net
baseline of Table 6, as plain nn.Modules. Reads top to bottom: config, blocks, models.

Every model has one contract:
    views:  (B, 2, H, W) float32 normalized counts, channel 0 = ANT, channel 1 = POST already
            mirrored into ANT orientation (bonescan_model.preprocess).
    logits: (B, 1, H, W) float32 lesion-vs-background logits at the input resolution.
Any H, W works; sizes divisible by 2 ** (len(dilations) + 1) (16 by default) avoid interpolation
rounding, and 256 x 256 is what the paper trains on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bonescan_model.errors import quoted
from bonescan_model.frozen import from_mapping
from bonescan_model.views import as_samples, merge_logits

ARCHS = ("recurrent", "unet")
RECURRENT_WEIGHTS = ("shared", "unrolled")
AGGREGATIONS = ("none", "input", "features", "views")
# Table 4 of the paper studies t = 1..4; outside that range nothing has been measured.
MAX_RECURRENCE = 4
# Upper bounds on every size, so a config cannot ask for a model no machine holds (width 4194304
# asked for 633 TB): width 512 is ten times the paper's (48) and already ~100x its parameters;
# a rate beyond 64 reaches past a 256-pixel crop from its centre; 6 levels halve 256 to 4.
MAX_WIDTH = 512
MAX_DILATION = 64
MAX_LEVELS = 6


def _check_int(owner: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    # bool is an int subclass: `width: true` in a YAML file must not become width 1.
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{owner}: {name} must be an int {bound}, got {quoted(value)}")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {quoted(value)}")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be a bool, got {quoted(value)}")


def _check_views(x: torch.Tensor, config: "ModelConfig") -> None:
    if config.aggregation == "views" and x.ndim == 4 and x.shape[1] == 1:
        return  # one view, in its own orientation (bonescan_model.views)
    if x.ndim != 4 or x.shape[1] != 2:
        single = " or (B, 1, H, W) (one view)" if config.aggregation == "views" else ""
        raise ValueError(f"expected views of shape (B, 2, H, W) (ANT, mirrored POST){single}, got {tuple(x.shape)}")


def _is_pair_to_split(x: torch.Tensor, config: "ModelConfig") -> bool:
    """A single-view model ("views") given a pair: it segments each view (``views``)."""
    return config.aggregation == "views" and x.shape[1] == 2


# sigmoid(-4) = 1.8 %: the share of lesion pixels the head starts from (see _init_lesion_prior).
LESION_PRIOR_LOGIT = -4.0

# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved into every checkpoint with dataclasses.asdict.

    arch:              "recurrent" (the paper's model) or "unet" (the supervised baseline, Table 6).
    width:             base channels; level i of the encoder has width * 2**i. 16 is a CPU-sized
                       default; width 48 gives 3.87M parameters at t = 1, near the paper's 3.654M
                       (Table 4), with channel counts that stay multiples of 16.
    recurrence:        t of Eq. 5, 1..4; t = 1 is the plain feed-forward network.
    recurrent_weights: "shared" (Eq. 5 has one W_R, the faithful default) or "unrolled" (each
                       step its own W_F and W_R, so parameters grow with t as in Table 4).
    dilated, inception, residual: the three switches of the Table 5 ablation. dilated: true
                       gives each encoder block its level's rate from `dilations`, false
                       rate 1 everywhere; so the blocks the switch changes are those whose
                       rate in `dilations` is above 1 (with the demo's (1, 2): the second
                       only). tune_spaces/ablation.yaml sets `dilations` to rates above 1 at
                       every level, so that there it changes every block.
    long_skip:         the stem's full-resolution features joined before the head (our
                       departure from Fig. 1, see RecurrentSegNet). false: the paper's network,
                       as the Table 5 cases train it.
    aggregation:       Eq. 4. "none" feeds ANT and POST as two channels (an early fusion of
                       ours); "input" sums them before the network (the paper's D2_Agg);
                       "features" runs one shared stem on each view and adds the feature
                       maps; "views" trains each view as its own sample, in its own
                       orientation (the paper's D2, ``bonescan_model.views``): the model
                       takes one view (B, 1, H, W), and on a pair it segments both views and
                       averages their logits in the ANT frame. The U-Net takes "none",
                       "input" or "views".
    dilations:         dilation rate of each encoder level's residual block, full resolution
                       first; its length is the number of encoder levels.
    unet_depth:        number of 2x downsamplings of the U-Net (arch "unet" only).
    """

    arch: str = "recurrent"
    width: int = 16
    recurrence: int = 3
    recurrent_weights: str = "shared"
    dilated: bool = True
    inception: bool = True
    residual: bool = True
    long_skip: bool = True
    aggregation: str = "none"
    # Rate 1 at full resolution: lesions are 1-9 pixels, and a rate-2 3x3 kernel there would skip
    # every other pixel (gridding) at exactly the scale of the smallest lesions. Coarser levels
    # double the rate to widen the context without losing resolution (Yu and Koltun 2015).
    dilations: tuple[int, ...] = (1, 2, 4)
    unet_depth: int = 4

    def __post_init__(self) -> None:
        owner = "ModelConfig"
        _check_choice(owner, "arch", self.arch, ARCHS)
        # >= 4 so that every inception branch (out_channels // 4) keeps at least one channel.
        _check_int(owner, "width", self.width, 4, MAX_WIDTH)
        _check_int(owner, "recurrence", self.recurrence, 1, MAX_RECURRENCE)
        _check_choice(owner, "recurrent_weights", self.recurrent_weights, RECURRENT_WEIGHTS)
        for name in ("dilated", "inception", "residual", "long_skip"):
            _check_bool(owner, name, getattr(self, name))
        _check_choice(owner, "aggregation", self.aggregation, AGGREGATIONS)
        if self.arch == "unet" and self.aggregation == "features":
            raise ValueError(f"{owner}: aggregation 'features' needs arch 'recurrent' (the U-Net has no shared stem)")
        # JSON and YAML give tuples back as lists; keep the config hashable and comparable.
        if isinstance(self.dilations, list):
            object.__setattr__(self, "dilations", tuple(self.dilations))
        if not isinstance(self.dilations, tuple) or not self.dilations:
            raise ValueError(f"{owner}: dilations must be a non-empty tuple of ints >= 1, got {quoted(self.dilations)}")
        if len(self.dilations) > MAX_LEVELS:
            raise ValueError(f"{owner}: dilations has {len(self.dilations)} levels, at most {MAX_LEVELS} "
                             f"(a 256-pixel crop halves {MAX_LEVELS} times to 4 pixels)")
        for d in self.dilations:
            _check_int(owner, "dilations", d, 1, MAX_DILATION)
        _check_int(owner, "unet_depth", self.unet_depth, 1, 6)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Rebuild from dataclasses.asdict output (or a YAML/JSON mapping); unknown keys are errors."""
        return from_mapping(cls, d)


# ----------------------------------------------------------------------------------------------
# Blocks


class ConvBNAct(nn.Sequential):
    """Conv -> BatchNorm -> PReLU, the unit the paper's blocks are made of (Fig. 2).

    (B, in_channels, H, W) -> (B, out_channels, ceil(H / sh), ceil(W / sw)) for stride (sh, sw):
    padding keeps the grid ("same") for odd kernels at any dilation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        dilation: int = 1,
    ):
        _check_int("ConvBNAct", "in_channels", in_channels, 1)
        _check_int("ConvBNAct", "out_channels", out_channels, 1)
        _check_int("ConvBNAct", "dilation", dilation, 1)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"ConvBNAct: kernel_size must be odd to keep the grid aligned, got {kernel_size!r}")
        padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
        super().__init__(
            # No conv bias: BatchNorm's shift replaces it.
            nn.Conv2d(
                in_channels, out_channels, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=False
            ),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(),
        )


class DilatedResidualBlock(nn.Module):
    """The residual dilated convolution block of Fig. 2.

    Residual path: two dilated 3x3 convolutions, each followed by BN + PReLU. Identity path: a
    1x1 convolution (it maps in_channels to out_channels). residual=False drops the identity
    path (Table 5, cases 1#-3#); dilation=1 is the undilated ablation.
    (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int = 1, residual: bool = True):
        super().__init__()
        _check_int("DilatedResidualBlock", "in_channels", in_channels, 1)
        _check_int("DilatedResidualBlock", "out_channels", out_channels, 1)
        _check_int("DilatedResidualBlock", "dilation", dilation, 1)
        _check_bool("DilatedResidualBlock", "residual", residual)
        self.conv1 = ConvBNAct(in_channels, out_channels, dilation=dilation)
        self.conv2 = ConvBNAct(out_channels, out_channels, dilation=dilation)
        # Bias kept: no normalization follows the sum.
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x) if self.shortcut is not None else None
        x = self.conv2(self.conv1(x))
        if shortcut is not None:
            x = x + shortcut
        return x


class InceptionBlock(nn.Module):
    """The inception block of Fig. 3, which also halves the grid.

    Five branches, each ending at half resolution: 1x3 -> 3x1, 1x7 -> 7x1, 1x1, 5x5 (all strided),
    and a 1x1 convolution followed by a stride-2 max pooling; DepthConcat, then a 1x1 fuse.
    (B, in_channels, H, W) -> (B, out_channels, ceil(H / 2), ceil(W / 2)).
    """

    def __init__(self, in_channels: int, out_channels: int, *, branch_channels: int | None = None):
        super().__init__()
        _check_int("InceptionBlock", "in_channels", in_channels, 1)
        _check_int("InceptionBlock", "out_channels", out_channels, 1)
        if branch_channels is None:
            branch_channels = max(1, out_channels // 4)
        _check_int("InceptionBlock", "branch_channels", branch_channels, 1)
        b = branch_channels
        # The factorized pairs stride along the axis their kernel spans (1x3 along W, 3x1 along H),
        # so no stride skips pixels the kernel never saw.
        self.branches = nn.ModuleList(
            [
                nn.Sequential(
                    ConvBNAct(in_channels, b, kernel_size=(1, 3), stride=(1, 2)),
                    ConvBNAct(b, b, kernel_size=(3, 1), stride=(2, 1)),
                ),
                nn.Sequential(
                    ConvBNAct(in_channels, b, kernel_size=(1, 7), stride=(1, 2)),
                    ConvBNAct(b, b, kernel_size=(7, 1), stride=(2, 1)),
                ),
                ConvBNAct(in_channels, b, kernel_size=1, stride=2),
                ConvBNAct(in_channels, b, kernel_size=5, stride=2),
                # 3x3 window, padding 1: the same ceil(H / 2) grid as the strided convolutions.
                nn.Sequential(ConvBNAct(in_channels, b, kernel_size=1), nn.MaxPool2d(3, stride=2, padding=1)),
            ]
        )
        self.fuse = ConvBNAct(len(self.branches) * b, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([branch(x) for branch in self.branches], dim=1)  # (B, 5 * b, H/2, W/2)
        return self.fuse(x)  # (B, out_channels, H/2, W/2)


class RecurrentConvLayer(nn.Module):
    """Eq. 5, the recurrent convolutional layer of Liang and Hu (2015).

    z(t) = W_F * u + W_R * x(t-1) + b,  x(t) = PReLU(BN_t(z(t))),  x(0) = 0, for t = 1..steps,
    with 3x3 kernels; the output is x(steps). At t = 1 the recurrent term vanishes, so steps = 1
    is a plain conv-BN-PReLU layer and has no W_R at all. BN's shift plays the role of b.
    shared=True: one W_F and one W_R for all steps (Eq. 5 as written). shared=False ("unrolled"):
    every step has its own W_F and W_R, so parameters grow with steps as in the paper's Table 4.
    Both modes keep one BatchNorm per step: z(1) lacks the recurrent term and z(t) drifts with t,
    so a single set of running statistics would be wrong at evaluation time for every step.
    (B, in_channels, H, W) -> (B, channels, H, W).
    """

    def __init__(self, in_channels: int, channels: int, *, steps: int, shared: bool = True):
        super().__init__()
        _check_int("RecurrentConvLayer", "in_channels", in_channels, 1)
        _check_int("RecurrentConvLayer", "channels", channels, 1)
        _check_int("RecurrentConvLayer", "steps", steps, 1)
        _check_bool("RecurrentConvLayer", "shared", shared)
        self.shared = shared
        n_feedforward = 1 if shared else steps
        n_recurrent = min(steps - 1, 1) if shared else steps - 1
        self.feedforward = nn.ModuleList(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False) for _ in range(n_feedforward)
        )
        self.recurrent = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(n_recurrent)
        )
        self.norms = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU()) for _ in range(steps))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # u does not change across steps, so with shared weights W_F * u is computed once.
        feedforward = self.feedforward[0](u) if self.shared else None
        x = None
        for t, norm in enumerate(self.norms):
            z = feedforward if self.shared else self.feedforward[t](u)
            if x is not None:
                z = z + self.recurrent[0 if self.shared else t - 1](x)
            x = norm(z)  # (B, channels, H, W)
        return x


# ----------------------------------------------------------------------------------------------
# Models


class RecurrentSegNet(nn.Module):
    """The paper's model (Fig. 1B): feature extraction whose deepest layer recurs, then upsampling
    and convolutions to per-pixel logits. views (B, 2, H, W) -> logits (B, 1, H, W).

    Encoder, L = len(dilations) levels: level 0 is the stem, a DilatedResidualBlock at full
    resolution (ANT and POST joined per `aggregation`); level i >= 1 is a 2x max pooling and a
    DilatedResidualBlock with width * 2**i channels. The inception block (or, ablated, a strided
    3x3 convolution) then halves the grid to H / 2**L with width * 2**L channels; its output is
    the feed-forward input u of Eq. 5.

    What recurs, and why: the RecurrentConvLayer at that coarsest grid. Table 4 shows the test
    time barely growing (2.19 s -> 4.21 s) while parameters grow 13x, which fits recurrence on a
    low-resolution, many-channel layer, where each step costs 1 / 4**L of a full-resolution
    layer yet widens the receptive field by 2 * 2**L input pixels, the context integration RCNN
    recurrence is for. Recurring the full-resolution blocks would multiply the whole network's
    time by t.

    Decoder: L steps of bilinear 2x upsampling (to the encoder's exact sizes) followed by a 3x3
    conv-BN-PReLU ("traditional convolution"), halving channels each step. Departure from the
    paper, whose Fig. 1 is ambiguous about it, unless ``long_skip`` is false: the stem's
    full-resolution features are concatenated before the head. Lesions are 1-9 pixels (2-20 mm at 2.26 mm/pixel), below one
    cell of the H / 8 grid; without the skip their outlines would be only as sharp as bilinear
    upsampling from that grid.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "recurrent":
            raise ValueError(f"RecurrentSegNet: config.arch must be 'recurrent', got {config.arch!r}")
        self.config = config
        levels = len(config.dilations)
        dilations = config.dilations if config.dilated else (1,) * levels
        widths = [config.width * 2**i for i in range(levels + 1)]  # level i at H / 2**i
        stem_in = 2 if config.aggregation == "none" else 1
        self.stem = DilatedResidualBlock(stem_in, widths[0], dilation=dilations[0], residual=config.residual)
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.MaxPool2d(2),
                DilatedResidualBlock(widths[i - 1], widths[i], dilation=dilations[i], residual=config.residual),
            )
            for i in range(1, levels)
        )
        if config.inception:
            self.reduce = InceptionBlock(widths[-2], widths[-1])
        else:
            self.reduce = ConvBNAct(widths[-2], widths[-1], kernel_size=3, stride=2)
        self.recurrent = RecurrentConvLayer(
            widths[-1], widths[-1], steps=config.recurrence, shared=config.recurrent_weights == "shared"
        )
        self.up = nn.ModuleList(ConvBNAct(widths[i + 1], widths[i]) for i in reversed(range(levels)))
        head_in = 2 * widths[0] if config.long_skip else widths[0]
        self.head = nn.Sequential(ConvBNAct(head_in, widths[0]), nn.Conv2d(widths[0], 1, 1))
        _init_lesion_prior(self.head[-1])

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        _check_views(views, self.config)
        if _is_pair_to_split(views, self.config):
            return merge_logits(self(as_samples(views)[0]))  # (2B, 1, H, W) views -> (B, 1, H, W)
        ant, post = views[:, :1], views[:, 1:]  # (B, 1, H, W) each
        if self.config.aggregation == "input":
            x = self.stem(ant + post)  # Eq. 4 on images: (B, w, H, W)
        elif self.config.aggregation == "features":
            x = self.stem(ant) + self.stem(post)  # Eq. 4 on features: (B, w, H, W)
        else:
            x = self.stem(views)  # (B, 2 or 1 for "views", H, W) -> (B, w, H, W)
        skip = x
        sizes = [x.shape[-2:]]
        for down in self.down:
            x = down(x)  # (B, w * 2**i, H / 2**i, W / 2**i)
            sizes.append(x.shape[-2:])
        x = self.reduce(x)  # u of Eq. 5: (B, w * 2**L, H / 2**L, W / 2**L)
        x = self.recurrent(x)  # x(t): same shape
        for up, size in zip(self.up, reversed(sizes)):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = up(x)  # (B, w * 2**i, H / 2**i, W / 2**i)
        if self.config.long_skip:
            x = torch.cat([x, skip], dim=1)  # (B, 2w, H, W)
        return self.head(x)  # (B, 1, H, W)


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    # Ronneberger et al.'s two 3x3 convolutions with ReLU, plus the BatchNorm every modern U-Net has.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A standard 2D U-Net (Ronneberger et al. 2015), the supervised baseline of Table 6.

    unet_depth max-pool downsamplings, widths width * 2**i, 2x2 transposed-convolution upsampling,
    skip concatenation at every level. Padded ("same") convolutions instead of the original valid
    ones, so the logits come out at the input resolution. aggregation "input" sums ANT and POST
    into one channel first (the D2_Agg setting of Table 6).
    views (B, 2, H, W) -> logits (B, 1, H, W).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "unet":
            raise ValueError(f"UNet: config.arch must be 'unet', got {config.arch!r}")
        self.config = config
        depth = config.unet_depth
        widths = [config.width * 2**i for i in range(depth + 1)]
        in_channels = 2 if config.aggregation == "none" else 1
        self.encoder = nn.ModuleList(
            _double_conv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth + 1)
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], 1, 1)
        _init_lesion_prior(self.head)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        _check_views(views, self.config)
        if _is_pair_to_split(views, self.config):
            return merge_logits(self(as_samples(views)[0]))  # (2B, 1, H, W) views -> (B, 1, H, W)
        x = views.sum(dim=1, keepdim=True) if self.config.aggregation == "input" else views  # (B, 1 or 2, H, W)
        skips = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = block(x)  # (B, w * 2**i, H / 2**i, W / 2**i)
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = up(x)  # (B, w * 2**i, ~H / 2**i, ~W / 2**i)
            # Odd sizes lose a row or column to pooling; pad it back (right/bottom) to match.
            x = F.pad(x, (0, skip.shape[-1] - x.shape[-1], 0, skip.shape[-2] - x.shape[-2]))
            x = block(torch.cat([x, skip], dim=1))  # (B, w * 2**i, H / 2**i, W / 2**i)
        return self.head(x)  # (B, 1, H, W)


def _init_lesion_prior(head: nn.Conv2d) -> None:
    """Start the logits at the lesion prior, not at p = 0.5 (the focal-loss initialization of
    Lin et al., ICCV 2017). Lesions cover well under 1 % of a thoracic crop: from p = 0.5 a
    model spends its first few hundred steps unlearning "everything is lesion" (measured on
    the synthetic cohort: no lesion found after 30 epochs), from the prior it finds lesions
    within ten."""
    nn.init.constant_(head.bias, LESION_PRIOR_LOGIT)


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config describes, freshly initialized."""
    if config.arch == "unet":
        return UNet(config)
    return RecurrentSegNet(config)


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def training_memory_bytes(config: ModelConfig, batch_size: int, size: int = 256) -> int:
    """About what one float32 training step of ``batch_size`` (size x size) crops holds: the
    weights, their gradients and Adam's two moments (4 copies of the parameters), and each
    module's output, kept for the backward pass. Found on PyTorch's meta device, where
    nothing is allocated, so a config that would not fit is refused before anything is built
    for real (``bonescan train`` checks it against the machine's memory before Ray starts)."""
    with torch.device("meta"):
        model = build_model(config)
        views = torch.empty(batch_size, 1 if config.aggregation == "views" else 2, size, size)  # (B, C, H, W)
    held = [4 * count_parameters(model) * 4]

    def keep(module, inputs, output):
        if isinstance(output, torch.Tensor):
            held.append(output.numel() * output.element_size())

    hooks = [m.register_forward_hook(keep) for m in model.modules() if not list(m.children())]
    try:
        model.train()(views)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(held)
