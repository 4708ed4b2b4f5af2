"""`bonescan export`: a trained checkpoint as one file that a service loads without this code,
ONNX (onnxruntime, from any language) or TorchScript (libtorch, ``torch.jit.load``).

The file says how to call it: the same keys (CONTRACT_KEYS) sit in an ONNX file's
``metadata_props`` and, one extra file per key, in a TorchScript archive's ``_extra_files``:

    input_name, input_shape     "views", "B,2,256,256" (float32; B is a free axis)
    input                       what the views are: preprocess.model_input, spelled out
    normalization_percentile    the percentile each image is divided by (preprocess)
    output_name, output_shape   "logits", "B,1,256,256" (float32)
    output                      how a lesion pixel follows from a logit
    threshold                   the run's sigmoid threshold (its training config's)
    model_config                the ModelConfig as JSON; epoch: the kept checkpoint's epoch
    exported_by                 "bonescan <version>"

Preprocessing stays outside the file, because the service decides how to read its DICOM; the
contract names the normalization so that it can do it the same way. Every export is checked
before it is written: the file's output on a probe batch must equal torch's within TOLERANCE.

Needs torch only for TorchScript; ONNX needs the export extra (onnx, onnxscript for torch's
exporter, onnxruntime for the check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bonescan_model import checkpoint
from bonescan_model.preprocess import CROP_SIZE
from bonescan_model.errors import InputError
from bonescan_model.network import ModelConfig
from bonescan_model.preprocess import NORMALIZATION_PERCENTILE

FORMATS = ("onnx", "torchscript")
INSTALL_HINT = "pip install -e '.[export]'"
INPUT_NAME, OUTPUT_NAME = "views", "logits"
TOLERANCE = 1e-4
CONTRACT_KEYS = ("input_name", "input_shape", "input", "normalization_percentile", "output_name",
                 "output_shape", "output", "threshold", "model_config", "epoch", "exported_by")
# Two crops: a batch of one would let torch.export specialize the batch axis to 1.
PROBE_BATCH = 2


def contract(config: ModelConfig, meta: dict) -> dict[str, str]:
    """The metadata every exported file carries (strings: ONNX metadata_props holds only those)."""
    threshold = checkpoint.run_threshold(meta)
    return {
        "input_name": INPUT_NAME,
        "input_shape": f"B,2,{CROP_SIZE},{CROP_SIZE}",
        "input": ("float32 per-image normalized counts of the thoracic crop: channel 0 the anterior view, "
                  "channel 1 the posterior view mirrored left-right into anterior orientation (a one-view "
                  "scan repeats its view); each image divided by the normalization_percentile percentile of "
                  "its non-zero pixels (1 if it has none) and clipped to [0, 2]"),
        "normalization_percentile": str(NORMALIZATION_PERCENTILE),
        "output_name": OUTPUT_NAME,
        "output_shape": f"B,1,{CROP_SIZE},{CROP_SIZE}",
        "output": "float32 lesion logits; a pixel is a lesion where sigmoid(logit) > threshold",
        "threshold": repr(float(threshold)),
        "model_config": json.dumps(_plain(config), sort_keys=True),
        "epoch": str(meta.get("epoch", "")),
        "exported_by": f"bonescan {_version()}",
    }


def export(checkpoint_path: str | os.PathLike, fmt: str, out: str | os.PathLike) -> dict[str, str]:
    """Write the checkpoint (a model.pt or a run folder) as ``fmt`` to ``out``; -> its contract.

    Raises InputError for a path that is not a checkpoint, an ``out`` that is a folder, an
    unknown format, or a missing export extra (naming INSTALL_HINT)."""
    if fmt not in FORMATS:
        raise InputError(out, f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    out = Path(out)
    if out.is_dir():
        raise InputError(out, "is a folder; --out names the file to write")
    if fmt == "onnx":
        _require_onnx()
    model, config, meta = checkpoint.load_checkpoint(checkpoint_path)
    terms = contract(config, meta)
    probe = _probe()
    with torch.no_grad():
        expected = model(probe).numpy()
    data = _to_onnx(model, probe, terms) if fmt == "onnx" else _to_torchscript(model, probe, terms)
    got = _run_onnx(data, probe) if fmt == "onnx" else _run_torchscript(data, probe)
    error = float(np.abs(got - expected).max())
    if not error <= TOLERANCE:  # also catches NaN
        raise RuntimeError(f"the {fmt} export differs from torch by {error:.2e} (> {TOLERANCE}); nothing written")
    _write(out, data)
    return terms


def read_contract(path: str | os.PathLike) -> dict[str, str]:
    """The contract an exported file carries: ONNX by its suffix .onnx, TorchScript otherwise."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    files = {key: "" for key in CONTRACT_KEYS}
    with _quiet_exporters():
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return {key: value.decode() for key, value in files.items()}


# ---------------------------------------------------------------- formats
def _to_onnx(model: nn.Module, probe: torch.Tensor, terms: dict[str, str]) -> bytes:
    import onnx

    with _quiet_exporters():
        program = torch.onnx.export(
            model, (probe,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            external_data=False,  # one self-contained file: the weights inside (far below ONNX's 2 GB)
            verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, terms)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _to_torchscript(model: nn.Module, probe: torch.Tensor, terms: dict[str, str]) -> bytes:
    # Traced, not scripted: the models keep their ModelConfig as an attribute, which TorchScript's
    # compiler cannot type. Shapes are recorded as tensor ops, so the batch axis stays free; the
    # crop size is the contract's anyway.
    buffer = io.BytesIO()
    with _quiet_exporters():
        torch.jit.save(torch.jit.trace(model, probe), buffer, _extra_files=terms)
    return buffer.getvalue()


def _run_onnx(data: bytes, views: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: views.numpy()})[0]


def _run_torchscript(data: bytes, views: torch.Tensor) -> np.ndarray:
    with _quiet_exporters():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        return module(views).numpy()


# ---------------------------------------------------------------- helpers
def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise InputError("bonescan export", f"--format onnx needs {', '.join(missing)} (the export extra): "
                                            f"{INSTALL_HINT}")


def _probe() -> torch.Tensor:
    """A fixed batch in the input's range: normalized counts lie in [0, 2]."""
    generator = torch.Generator().manual_seed(0)
    return 2 * torch.rand((PROBE_BATCH, 2, CROP_SIZE, CROP_SIZE), generator=generator)


@contextlib.contextmanager
def _quiet_exporters():
    """torch.jit warns that it is deprecated (TorchScript is still what libtorch loads), and that the models' input-shape check is
    fixed at trace time (it is: the contract fixes the shape); torch.onnx logs each
    torchvision operator it skips. None of it is for the person exporting a bonescan model."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _write(out: Path, data: bytes) -> None:
    """Atomically: a reader never finds half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)


def _plain(config: ModelConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _version() -> str:
    try:
        return importlib.metadata.version("bonescan")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
