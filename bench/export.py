"""Seconds per crop of the exported model's forward on this machine's CPUs: onnxruntime (the
file `bonescan export --format onnx` writes) and TorchScript against torch eager (the
baseline, what `bonescan predict` runs), measured in the same run on the same crops.

For the demo model (ModelConfig() defaults) and a paper-size one (width 48, t = 3, as
bench/model.py chose), untrained (the forward's cost does not depend on the weights), on the
thoracic crops of synthetic patients (bonescan_model.synth + preprocess.model_input), in
batches of 1 (a service answering one scan) and 8. Both runtimes get the same threads
(torch.get_num_threads()). Each number is the fastest of REPEATS passes over the crops (others'
work on a shared machine only ever adds time). The ratio printed is torch eager / runtime:
above 1 the exported file is faster. About two minutes on a 2-core CPU.

    python bench/export.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from bonescan_model.checkpoint import save_checkpoint
from bonescan_model.export import export
from bonescan_model.network import ModelConfig, build_model, count_parameters
from bonescan_model.preprocess import crop, mirror, model_input, thoracic_crop_box
from bonescan_model.synth import synth_patient
from machine import describe  # bench/machine.py

SEED = 0
CROPS = 8
REPEATS = 3
BATCHES = (1, 8)
PAPER_WIDTH = 48  # bench/model.py: the multiple of 16 nearest the paper's 3.654M parameters at t = 1
MODELS = {"demo (ModelConfig())": ModelConfig(), f"paper (width {PAPER_WIDTH}, t=3)": ModelConfig(width=PAPER_WIDTH)}


def _crops() -> np.ndarray:
    views = []
    for index in range(CROPS):
        patient = synth_patient(SEED, index)
        box = thoracic_crop_box(patient.ant)
        views.append(model_input(crop(patient.ant, box), crop(mirror(patient.post), box)))
    return np.stack(views)  # (CROPS, 2, 256, 256) float32


def _per_crop(forward, views: np.ndarray, batch: int) -> float:
    """Fastest of REPEATS passes over all crops in batches of ``batch``, per crop."""
    chunks = [views[i:i + batch] for i in range(0, len(views), batch)]
    forward(chunks[0])  # warm-up: allocators, kernel selection
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for chunk in chunks:
            forward(chunk)
        best = min(best, time.perf_counter() - start)
    return best / len(views)


def main() -> None:
    print(describe())
    threads = torch.get_num_threads()
    print(f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, {threads} intra-op threads; "
          f"{CROPS} synthetic crops, fastest of {REPEATS} passes\n")
    views = _crops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, config in MODELS.items():
            torch.manual_seed(0)
            model = build_model(config).eval()
            save_checkpoint(tmp / "model.pt", model, config)
            export(tmp / "model.pt", "onnx", tmp / "model.onnx")
            export(tmp / "model.pt", "torchscript", tmp / "model.ts")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            session = onnxruntime.InferenceSession(str(tmp / "model.onnx"), options,
                                                   providers=["CPUExecutionProvider"])
            scripted = torch.jit.load(str(tmp / "model.ts"))

            def eager(x, model=model):
                with torch.no_grad():
                    return model(torch.from_numpy(x))

            def ts(x, scripted=scripted):
                with torch.no_grad():
                    return scripted(torch.from_numpy(x))

            def ort(x, session=session):
                return session.run(None, {"views": x})

            for batch in BATCHES:
                times = {name: _per_crop(fn, views, batch) for name, fn in
                         (("eager", eager), ("onnxruntime", ort), ("torchscript", ts))}
                rows.append((label, count_parameters(model), batch, times))

    print("seconds per crop:")
    print("| model | params (M) | batch | torch eager (baseline) | onnxruntime | TorchScript "
          "| eager / onnxruntime | eager / TorchScript |")
    print("|---" * 8 + "|")
    for label, params, batch, t in rows:
        print(f"| {label} | {params / 1e6:.2f} | {batch} | {t['eager']:.4f} | {t['onnxruntime']:.4f} "
              f"| {t['torchscript']:.4f} | {t['eager'] / t['onnxruntime']:.2f} | {t['eager'] / t['torchscript']:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
