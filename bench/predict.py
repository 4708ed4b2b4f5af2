"""Seconds per whole-body scan of `bonescan predict`, warm, on this machine's CPUs, by stage.

For the demo model (ModelConfig() defaults) and a paper-size one (width 48, t = 3, as
bench/model.py chose), after one warm-up scan, on synthetic scans written as a clinic has them
(`write_cohort`: multi-frame and two-file layouts, some JPEG 2000):

    read+crop   read_scan (decode, de-identify) + thoracic crop box + model_input
    forward     the network on one crop (batch 1), and per crop in batches of 2, 4 and 8
    contours    paste back into the whole body, closed contours, lesion areas
    write       mask PNG + LabelMe JSON + overlay PNG (the overlay alone in brackets)

Baseline, measured in the same run: the whole prediction of one scan (`predict_batch` on one
task: what `bonescan predict FILE` does after loading the checkpoint). The ratio printed is
forward / whole, the share of a scan's time the network takes; the rest is overhead.

The untrained models mark nearly every pixel a lesion, which would make the contour stage a
single box; contours and writing therefore run on the scan's true lesion mask (0-9 lesions),
so that stage costs what it would with a trained model. Each number is the fastest of
REPEATS tries per scan (others' work on a shared machine only ever adds time), averaged over
the scans. About a minute and a half on a 2-core CPU.

    python bench/predict.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydicom.data import get_testdata_file

from bonescan_model import engine
from bonescan_model.io.deid import load_or_create_secret
from bonescan_model.io.dicom import group_series, read_scan, scan_name
from bonescan_model.network import ModelConfig, build_model, count_parameters
from bonescan_model.inference import (
    make_prediction,
    reference_view,
    render_overlay,
    scan_crop_box,
    scan_input,
    write_prediction,
)
from bonescan_model.preprocess import crop
from bonescan_model.synth import synth_patient, write_cohort
from bonescan_platform.predict import predict_batch
from machine import describe  # bench/machine.py

SEED = 0
SCANS = 3  # measured, after one warm-up scan
REPEATS = 2
BATCH = 8  # scans per actor call (platform predict.BATCH_SCANS)
FORWARD_BATCHES = (2, 4, 8)  # crops per forward pass, beside batch 1
# bench/model.py: width 48 is the multiple of 16 nearest the paper's 3.654M parameters at t = 1.
PAPER_WIDTH = 48
MODELS = {"demo (ModelConfig())": ModelConfig(), f"paper (width {PAPER_WIDTH}, t=3)": ModelConfig(width=PAPER_WIDTH)}


def _fastest(fn, repeats: int = REPEATS):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _stages(model, files: list[str], truth: np.ndarray, secret: bytes, out: Path) -> dict[str, float]:
    read_s, (scan, box, views) = _fastest(lambda: _read(files, secret))
    forward_s, _ = _fastest(lambda: _forward(model, torch.from_numpy(views)[None]))
    contours_s, prediction = _fastest(lambda: make_prediction(scan, box, crop(truth, box)))
    write_s, _ = _fastest(lambda: write_prediction(out, prediction, reference_view(scan)))
    overlay_s, _ = _fastest(lambda: render_overlay(out / "o.png", prediction, reference_view(scan)))
    task = {"files": files, "out_dir": str(out / "whole"), "name": scan.name}
    whole_s, _ = _fastest(lambda: predict_batch(model, [task], secret, 0.5))
    return {"read": read_s, "forward": forward_s, "contours": contours_s, "write": write_s,
            "overlay": overlay_s, "whole": whole_s}


@torch.no_grad()
def _forward(model, views):
    """The network on a batch in one pass, whatever engine.predict_masks would do on a CPU."""
    return model(views)


def _read(files, secret):
    scan = read_scan(files, secret)
    box = scan_crop_box(scan)
    return scan, box, scan_input(scan, box)


def main() -> None:
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        secret = load_or_create_secret(tmp / "secret")
        write_cohort(tmp / "cohort", SCANS + 1, seed=SEED)
        groups, _ = group_series(sorted((tmp / "cohort" / "dicom").iterdir()), secret)
        truths = {synth_patient(SEED, i).name: synth_patient(SEED, i).lesion_mask for i in range(SCANS + 1)}
        scans = [([str(f) for f in g.files], truths[scan_name(list(g.files))]) for g in groups]
        print(f"scans: {len(scans)} synthetic ({', '.join(sorted({Path(f[0]).suffix for f, _ in scans}))}), "
              f"{sum(len(f) for f, _ in scans)} files; 1 warm-up, {SCANS} measured, fastest of {REPEATS} each\n")

        rows = {}
        for label, config in MODELS.items():
            torch.manual_seed(0)
            model = build_model(config).eval()
            out = tmp / "out"
            _stages(model, *scans[0], secret, out)  # warm-up: allocator, matplotlib fonts, codecs
            per_scan = [_stages(model, files, truth, secret, out) for files, truth in scans[1:]]
            mean = {k: statistics.fmean(s[k] for s in per_scan) for k in per_scan[0]}
            views = torch.from_numpy(np.stack([_read(scans[i % len(scans)][0], secret)[2] for i in range(BATCH)]))
            for b in FORWARD_BATCHES:
                batch_s, _ = _fastest(lambda: _forward(model, views[:b]))
                mean[f"forward_{b}"] = batch_s / b
            tasks = [{"files": scans[i % len(scans)][0], "out_dir": str(out / "call"), "name": f"scan{i}"}
                     for i in range(BATCH)]
            call_s, _ = _fastest(lambda: predict_batch(model, tasks, secret, 0.5))
            mean["whole_call"] = call_s / BATCH
            # The same call with all its crops in one forward pass, as a GPU runs it.
            default = engine.CPU_FORWARD_BATCH
            engine.CPU_FORWARD_BATCH = BATCH
            call_s, _ = _fastest(lambda: predict_batch(model, tasks, secret, 0.5))
            engine.CPU_FORWARD_BATCH = default
            mean["whole_call_one_pass"] = call_s / BATCH
            rows[label] = (count_parameters(model), mean)
        # The real GE scan pydicom ships: lossy JPEG 2000, the slowest decode a clinic sends.
        ge_s, _ = _fastest(lambda: _read([get_testdata_file("JPEG2000.dcm")], secret), repeats=3)

    batches = " | ".join(f"forward (batch {b})" for b in FORWARD_BATCHES)
    print("seconds per scan:")
    print(f"| model | params (M) | read+crop | forward (batch 1) | {batches} | contours | write [overlay] "
          f"| sum of stages | whole predict (baseline) | {BATCH} scans a call, crop by crop "
          f"| {BATCH} scans a call, one forward | forward / whole |")
    print("|---" * (11 + len(FORWARD_BATCHES)) + "|")
    for label, (params, m) in rows.items():
        stages = m["read"] + m["forward"] + m["contours"] + m["write"]
        forwards = " | ".join(f"{m[f'forward_{b}']:.3f}" for b in FORWARD_BATCHES)
        print(f"| {label} | {params / 1e6:.2f} | {m['read']:.3f} | {m['forward']:.3f} | {forwards} "
              f"| {m['contours']:.3f} | {m['write']:.3f} [{m['overlay']:.3f}] | {stages:.3f} | {m['whole']:.3f} "
              f"| {m['whole_call']:.3f} | {m['whole_call_one_pass']:.3f} | {m['forward'] / m['whole']:.2f} |")
    print(f"\nread+crop of the real GE whole-body scan (JPEG 2000, pydicom's JPEG2000.dcm): {ge_s:.3f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
