"""Checkpoints that rebuild their own model: the ModelConfig travels with the weights.

Saved with plain containers only, so ``torch.load(weights_only=True)`` reads them and a
checkpoint from an untrusted place cannot run code. ``meta`` carries epoch, metrics and the
resolved training config; never anything about a patient.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from bonescan_model.errors import InputError, describe, first_line, quoted
from bonescan_model.network import ModelConfig, build_model

FILENAME = "model.pt"
# What a checkpoint without a training config (saved outside `bonescan train`) is scored with.
DEFAULT_THRESHOLD = 0.5


# ---------------------------------------------------------------- files: the one torch.save / torch.load
def write_file(path: str | os.PathLike, blob: dict) -> Path:
    """``blob`` (tensors and plain containers) to ``path``, atomically: a reader never sees half
    a file. Every bonescan file torch writes goes through here: checkpoints, trainers' state
    beside them (optimizer, epoch, history), GAN checkpoints."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise InputError(path, f"cannot be written ({getattr(err, 'strerror', None) or first_line(err)})") from None
    return path


def read_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", kind: str = "checkpoint") -> dict:
    """What ``write_file`` wrote, with ``weights_only=True`` (a file from an untrusted place cannot
    run code). Anything else is an InputError naming the file (a bonescan ``kind``); torch's
    advice to load it unsafely is never relayed."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise InputError(path, f"not a bonescan {kind}: it holds Python objects{what} beyond "
                                   "tensors and plain containers, which bonescan does not load") from None
        raise InputError(path, f"not a bonescan {kind} ({describe(err)})") from None
    if not isinstance(blob, dict):
        raise InputError(path, f"not a bonescan {kind}: it holds a {type(blob).__name__}, not a mapping")
    return blob


# ---------------------------------------------------------------- segmentation checkpoints
def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: ModelConfig, **meta) -> Path:
    # DDP wraps the model: save the inner module's keys so any process can load them.
    module = getattr(model, "module", model)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return write_file(path, {"model_config": dataclasses.asdict(config), "state_dict": state, "meta": meta})


def model_file(path: str | os.PathLike) -> Path:
    """A checkpoint file, a folder holding ``model.pt`` (a run folder keeps its best there)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise InputError(path, "no checkpoint here (expected a model.pt or a run folder holding one)")
    return path


@dataclass(frozen=True)
class Trained:
    """A checkpoint loaded for use: the model (eval mode), its config, the sigmoid threshold it
    was trained and validated with, and the rest of its meta."""

    model: nn.Module
    config: ModelConfig
    threshold: float
    meta: dict


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Trained:
    """A checkpoint with everything needed to use it: predictions threshold at its own value."""
    model, config, meta = load_checkpoint(path, map_location)
    return Trained(model=model, config=config, threshold=run_threshold(meta), meta=meta)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, ModelConfig, dict]:
    """-> (model in eval mode, its config, meta). Anything but a checkpoint that rebuilds
    its model is an InputError naming the file."""
    path = model_file(path)
    blob = read_file(path, map_location)
    if not {"model_config", "state_dict"} <= set(blob):
        raise InputError(path, "not a bonescan checkpoint: no model_config and state_dict in it")
    try:
        config = ModelConfig.from_dict(blob["model_config"])
    except Exception as err:  # noqa: BLE001
        raise InputError(path, f"not a bonescan checkpoint: its model_config is invalid ({first_line(err)})") from None
    model = build_model(config)
    try:
        model.load_state_dict(blob["state_dict"])
    except Exception as err:  # noqa: BLE001 - RuntimeError: keys or shapes differ
        raise InputError(path, "its weights do not fit its model_config (missing, unexpected or "
                               f"differently shaped tensors: {first_line(err)[:300]})") from None
    meta = blob.get("meta", {})
    if not isinstance(meta, dict):
        raise InputError(path, f"not a bonescan checkpoint: its meta is {type(meta).__name__}, not a mapping")
    if not isinstance(meta.get("train_config", {}), dict):
        raise InputError(path, "not a bonescan checkpoint: its meta's train_config is not a mapping")
    try:
        run_threshold(meta)
    except ValueError as err:
        raise InputError(path, f"not a usable checkpoint: {err}") from None
    return model.eval(), config, meta


def run_threshold(meta: dict) -> float:
    """The sigmoid threshold of a lesion pixel that the checkpoint's run trained and validated
    with. The config's rule holds here too: a threshold outside (0, 1) would make every pixel,
    or none, a lesion, so it is a ValueError, not a model."""
    value = meta.get("threshold", meta.get("train_config", {}).get("threshold", DEFAULT_THRESHOLD))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"its threshold {quoted(value)} is not a probability between 0 and 1 (exclusive)")
    return float(value)
