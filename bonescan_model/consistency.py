"""Mean teacher (Tarvainen & Valpola 2017), the consistency method beside the paper's l_U.

The teacher is an exponential moving average of the student's weights. The student sees each
scan as the supervised-only control does, and is trained to agree with the teacher's
prediction on a perturbed view of the same scan (intensity gain and noise, a random
left-right flip undone on its output), labeled or not (``loss.consistency_loss``); the
perturbation is on the teacher's side, as in UA-MT (Yu et al. 2019), so the supervised term
sees what it sees without the teacher and the arm differs from its control by the consistency
term alone. (A first version perturbed the student's view, so its supervised term trained on
noisier scans than the control's. Both versions are measured in bench/RESULTS.md,
"Semi-supervised".)

The EMA's decay ramps up as in Tarvainen & Valpola's reference code, min(decay, 1 - 1/(t + 1))
after step t: the teacher is the plain mean of the student's weights so far until that reaches
``decay``. A fixed decay of 0.99 from the first step kept 0.99^72 = 48 % of the random
initialisation in the teacher when the consistency weight had ramped up (72 steps, 4 epochs of
the 120-patient benchmark), so its targets lagged far behind what the student had learned.

Why this method and not FixMatch-style pseudo labels or cross pseudo supervision: lesions
are a few pixels of a 256 x 256 crop, so a confidence threshold on the teacher keeps almost
only background pixels (a pseudo label of "no lesion"), and hard pseudo labels of a weak
model teach it its own misses; a soft target of an averaged model needs no threshold, and
weight-averaged consistency is the method shown to help small structures in medical images
(Perone & Cohen-Adad 2018, spinal-cord gray matter; Yu et al. 2019, UA-MT, builds on it). It costs one extra forward pass per batch.

Framework-free: the Ray adapter keeps the teacher in its checkpoint (``state_dict``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

# Intensity perturbation of a normalized view: a gain drawn per image in [1 - GAIN, 1 + GAIN]
# and Gaussian noise of NOISE_STD (bone sits near 1: a few percent, like the Poisson noise).
GAIN = 0.1
NOISE_STD = 0.05


class MeanTeacher:
    """The teacher of ``student``: a copy whose weights follow the student's by
    teacher = decay * teacher + (1 - decay) * student after each optimizer step; its buffers
    (BatchNorm statistics) are the student's. decay in [0, 1): 0 is the student itself."""

    def __init__(self, student: nn.Module, *, decay: float = 0.99):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.steps = 0  # updates so far: the decay's ramp-up
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_now(self) -> float:
        """The decay of the next update: min(decay, 1 - 1/(steps + 1)), so 0 at the first (the
        teacher becomes the student) and the running mean of the student until ``decay``."""
        return min(self.decay, 1.0 - 1.0 / (self.steps + 1))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        decay = self.decay_now()
        for mine, theirs in zip(self.model.parameters(), student.parameters(), strict=True):
            mine.mul_(decay).add_(theirs.detach(), alpha=1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), student.buffers(), strict=True):
            mine.copy_(theirs)
        self.steps += 1

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, H, W) for a perturbed view of ``image`` (B, 2, H, W): ``perturb``, and
        half the images, at random, mirrored with their logits mirrored back
        (``flipped_forward``), so the target is in the frame of ``image``. BatchNorm on the
        batch, as the student sees it (the teacher's running statistics are the student's)."""
        self.model.train()
        flip = torch.rand(image.shape[0], device=image.device) < 0.5  # (B,)
        return flipped_forward(self.model, perturb(image), flip)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        # A checkpoint from before the ramp-up has no count: its teacher is past any ramp.
        self.steps = int(state.get("steps", 10**9))
        self.model.load_state_dict(state["model"])


def perturb(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A view of (B, 2, H, W) normalized counts: each image times a random gain, plus noise;
    clipped to the normalized range [0, 2]. The same gain for both views of an image."""
    gain = 1.0 + GAIN * (2.0 * torch.rand(image.shape[0], 1, 1, 1, generator=generator, device=image.device) - 1.0)
    noise = NOISE_STD * torch.randn(image.shape, generator=generator, device=image.device)
    return (image * gain + noise).clamp(0.0, 2.0)


def flipped_forward(model: nn.Module, image: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``image`` (B, 2, H, W) with the images where ``flip`` (B,) bool
    is set shown left-right mirrored, and their logits mirrored back: (B, 1, H, W) in the
    frame of ``image``, so masks and the teacher's target need no transform."""
    where = flip.view(-1, 1, 1, 1)
    logits = model(torch.where(where, image.flip(-1), image))  # (B, 1, H, W)
    return torch.where(where, logits.flip(-1), logits)


def rampup(epoch: int, rampup_epochs: int) -> float:
    """The consistency weight's factor in epoch ``epoch`` (0-based): exp(-5 (1 - t)^2) with
    t = (epoch + 1) / rampup_epochs up to 1 (Laine & Aila 2017), so the student does not chase
    the teacher of an untrained model; 1 with no ramp-up."""
    if rampup_epochs <= 0:
        return 1.0
    t = min(1.0, (epoch + 1) / rampup_epochs)
    return math.exp(-5.0 * (1.0 - t) ** 2)
