"""What the test modules train on and predict with: a tiny training config, a small ingested
cohort, and a tiny checkpoint whose answer is known."""

from __future__ import annotations

from pathlib import Path

from bonescan_model.synth import write_cohort
from bonescan_platform.ingest import ingest

# Width 4, one recurrence step: a few seconds an epoch on 2 CPU cores; nothing learns, but
# every part of the model, the loss and the platform runs.
TINY_MODEL = {"width": 4, "recurrence": 1, "dilations": [1, 2]}


def tiny_config(**overrides) -> dict:
    """A training config (the YAML mapping) around TINY_MODEL; ``overrides`` replace keys."""
    return {"model": dict(TINY_MODEL), "batch_size": 4, "lr": 0.002, **overrides}


def constant_run(folder: Path, logit: float = 10.0) -> Path:
    """A run folder whose tiny model outputs ``logit`` at every pixel: the final 1x1
    convolution's weights zero, its bias ``logit`` (+10: every crop pixel a lesion, so the
    whole-body mask is exactly the crop box; -10: none)."""
    import torch

    from bonescan_model.checkpoint import save_checkpoint
    from bonescan_model.network import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(width=4, recurrence=1, dilations=(1, 2))
    model = build_model(config)
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.fill_(logit)
    save_checkpoint(folder / "model.pt", model, config)
    return folder


def ingested_cohort(root: Path, patients: int, seed: int) -> Path:
    """A synthetic cohort written under ``root`` and ingested into ``root/shards`` (needs Ray)."""
    write_cohort(root / "cohort", patients, seed=seed)
    assert ingest(str(root / "cohort" / "dicom"), str(root / "shards"), str(root / "cohort" / "labels")) == 0
    return root / "shards"
