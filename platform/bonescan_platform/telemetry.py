"""Training progress as Prometheus metrics, through Ray's own metrics export.

Every Train worker sets these gauges once per epoch (`record`); Ray's metrics agent on each
node serves them beside its node and GPU metrics on the node's metrics export port, with a
``ray_`` prefix (``bonescan_epoch`` is scraped as ``ray_bonescan_epoch``), and
``platform/dashboards/bonescan.json`` plots them per run. Tags: ``run`` (the run folder's
name, which for a sweep is the trial's) and ``rank`` (the Train worker's world rank).

Gauges, not counters: a resumed run restarts at its checkpoint's epoch, and a gauge set to
the epoch's value stays right where a counter would double-count the replayed epochs.
"""

from __future__ import annotations

import functools

TAG_KEYS = ("run", "rank")

# name -> description; the exported name is "ray_" + name (Ray adds the prefix).
GAUGES = {
    "bonescan_epoch": "Last finished training epoch (1-based).",
    "bonescan_train_images_per_second": "Training images per second of this worker in its last epoch.",
    "bonescan_train_data_wait_fraction": "Fraction of the last epoch's step time spent waiting for the next batch.",
    "bonescan_train_loss": "Mean training loss per image in the last epoch.",
    "bonescan_val_dsc": "Mean DSC on the validation patients after the last epoch (rank 0 only).",
}
EXPORTED = tuple(f"ray_{name}" for name in GAUGES)


@functools.cache
def _gauges() -> dict:
    # Built on first use, in the worker process that records: a gauge belongs to the process
    # that created it, and importing this module must not need a Ray connection.
    from ray.util.metrics import Gauge

    return {name: Gauge(name, description=text, tag_keys=TAG_KEYS) for name, text in GAUGES.items()}


def epoch_values(metrics: dict) -> dict[str, float]:
    """The gauge values of one epoch from train_loop's metrics dict (train_* keys from
    engine.train_epoch, val_* keys on rank 0). Keys that are absent are left out."""
    values = {"bonescan_epoch": float(metrics["epoch"]), "bonescan_train_loss": float(metrics["train_loss"])}
    seconds = metrics.get("train_seconds", 0.0)
    if seconds > 0:
        values["bonescan_train_images_per_second"] = metrics["train_images"] / seconds
        values["bonescan_train_data_wait_fraction"] = metrics["train_data_wait_seconds"] / seconds
    if "val_dsc" in metrics:
        values["bonescan_val_dsc"] = float(metrics["val_dsc"])
    return values


def record(metrics: dict, *, run: str, rank: int) -> None:
    """Set this worker's gauges from one epoch's metrics dict."""
    tags = {"run": run, "rank": str(rank)}
    gauges = _gauges()
    for name, value in epoch_values(metrics).items():
        gauges[name].set(value, tags=tags)
