"""What the Ray test modules train on: a tiny training config and a small ingested cohort."""

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


def ingested_cohort(root: Path, patients: int, seed: int) -> Path:
    """A synthetic cohort written under ``root`` and ingested into ``root/shards`` (needs Ray)."""
    write_cohort(root / "cohort", patients, seed=seed)
    assert ingest(str(root / "cohort" / "dicom"), str(root / "shards"), str(root / "cohort" / "labels")) == 0
    return root / "shards"
