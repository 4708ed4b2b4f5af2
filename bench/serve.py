"""Latency and throughput of `bonescan serve` against `bonescan predict` in one process.

A synthetic cohort (``--scans`` patients, written as a clinic has them: multi-frame and
two-file layouts, some JPEG 2000) is segmented

- by the service: `bonescan serve` started as a user starts it (its own local Ray, loopback,
  ``--replicas``), then 1, 4 and 16 concurrent clients (threads, one HTTP session each) each
  posting scan after scan (``application/dicom`` for one file, multipart for two) until
  ``--requests`` answers per level; every answer must be a 200 whose lesions agree with the
  in-process prediction of that scan (an error or a wrong answer is counted, never retried);
- by the baselines, in this process after the service is down, on the same scans:
  ``predict_batch`` (what `bonescan predict FILE` does per scan, its PNG/JSON outputs written)
  and the same pipeline without the files (read, crop, network, contours: the service's work
  without HTTP). Scans/s is 1 / the mean seconds per scan, warm, one scan at a time.

Prints per level: p50 / p99 latency, scans/s, errors, and the ratio of the service's scans/s
to each baseline's. The model is the demo size (configs/demo.yaml), untrained unless
``--checkpoint`` names one: time does not depend on the weights, but an untrained model marks
nearly every crop pixel a lesion, so its contours are one box -- pass a trained run for
contour costs as in use. About two minutes on a 2-core CPU.

    python bench/serve.py [--scans 24] [--requests 200] [--replicas 1] [--checkpoint RUN]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bonescan_model.checkpoint import load_model, model_file, save_checkpoint  # noqa: E402
from bonescan_model.io.dicom import group_series, read_scan  # noqa: E402
from bonescan_model.network import ModelConfig, build_model  # noqa: E402
from bonescan_model.inference import predict_scans, scan_crop_box  # noqa: E402
from bonescan_model.synth import write_cohort  # noqa: E402
from bonescan_platform.predict import predict_batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16)
SECRET = b"bench" * 8


def _checkpoint(args, root: Path) -> Path:
    if args.checkpoint:
        return model_file(args.checkpoint)
    torch.manual_seed(0)
    model_cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["model"].items()})
    path = root / "run" / "model.pt"
    save_checkpoint(path, build_model(model_cfg), model_cfg)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(session: requests.Session, url: str, files: list[Path]) -> requests.Response:
    if len(files) == 1:
        return session.post(f"{url}/segment", data=files[0].read_bytes(),
                            headers={"Content-Type": "application/dicom"}, timeout=300)
    return session.post(f"{url}/segment", files=[(f"v{i}", (f.name, f.read_bytes())) for i, f in enumerate(files)],
                        timeout=300)


def _level(url: str, scans: list[list[Path]], expected: list[int], clients: int, total: int) -> dict:
    """``clients`` threads post scans in turn until ``total`` answers: latencies, errors."""
    latencies, errors, lock, counter = [], [], threading.Lock(), iter(range(total))

    def client(_):
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                k = i % len(scans)
                start = time.perf_counter()
                try:
                    reply = _request(session, url, scans[k])
                    ok = reply.status_code == 200 and reply.json()["lesion_count"] == expected[k]
                    why = "" if ok else f"{reply.status_code} {reply.text[:200]}"
                except requests.RequestException as err:
                    ok, why = False, str(err)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if not ok:
                        errors.append(why)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": total, "errors": len(errors), "first_error": errors[:1],
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "scans_per_s": total / wall}


def _baselines(checkpoint: Path, scans: list[list[Path]], out: Path) -> dict:
    """Warm seconds per scan in this process: predict_batch (outputs written), and read+crop+
    network+contours without files."""
    trained = load_model(checkpoint)
    torch.set_num_threads(1)  # as a replica runs (serve.py: one CPU per replica)
    tasks = [{"files": [str(f) for f in files], "out_dir": str(out), "name": f"scan{i}"} for i, files in enumerate(scans)]
    predict_batch(trained.model, tasks[:1], SECRET, trained.threshold)  # warm-up
    start = time.perf_counter()
    for task in tasks:
        predict_batch(trained.model, [task], SECRET, trained.threshold)
    with_files = (time.perf_counter() - start) / len(tasks)
    start = time.perf_counter()
    for files in scans:
        scan = read_scan(files, SECRET)
        predict_scans(trained.model, [scan], boxes=[scan_crop_box(scan)], threshold=trained.threshold)
    without = (time.perf_counter() - start) / len(scans)
    return {"predict_scans_per_s": 1 / with_files, "pipeline_scans_per_s": 1 / without}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=24)
    parser.add_argument("--requests", type=int, default=200, help="answers per concurrency level")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--checkpoint", help="a trained run (default: an untrained demo-size model)")
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory(prefix="bonescan-bench-serve-") as tmp:
        root = Path(tmp)
        checkpoint = _checkpoint(args, root)
        write_cohort(root / "cohort", args.scans, seed=0)
        groups, _ = group_series(sorted((root / "cohort" / "dicom").rglob("*.dcm")), SECRET)
        scans = [list(g.files) for g in groups]
        trained = load_model(checkpoint)
        expected = [p.lesions for p in (predict_scans(trained.model, [s], boxes=[scan_crop_box(s)],
                                                      threshold=trained.threshold)[0]
                                        for s in (read_scan(f, SECRET) for f in scans))]
        port, ready = _free_port(), root / "ready.json"
        proc = subprocess.Popen([sys.executable, "-m", "bonescan_platform.cli", "serve", "--checkpoint", str(checkpoint),
                                 "--port", str(port), "--replicas", str(args.replicas), "--ready-file", str(ready)],
                                stdout=open(root / "serve.log", "w"), stderr=subprocess.STDOUT,
                                env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        try:
            while not ready.is_file():
                if proc.poll() is not None:
                    print((root / "serve.log").read_text()[-3000:])
                    return 1
                time.sleep(0.5)
            url = json.loads(ready.read_text())["url"]
            _level(url, scans, expected, 1, min(8, args.requests))  # warm-up: the replica's first batches
            levels = [_level(url, scans, expected, c, args.requests) for c in LEVELS]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        base = _baselines(checkpoint, scans, root / "predict-out")
    print(f"{len(scans)} synthetic scans ({sum(len(s) == 2 for s in scans)} as two files), model {checkpoint.parent.name}, "
          f"{args.replicas} replica(s), loopback; baselines in one process, one thread: "
          f"bonescan predict (outputs written) {base['predict_scans_per_s']:.2f} scans/s, "
          f"the same pipeline without files {base['pipeline_scans_per_s']:.2f} scans/s")
    print("clients | requests | errors | p50 ms | p99 ms | scans/s | ratio to predict | ratio to the pipeline")
    for r in levels:
        print(f"{r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['scans_per_s']:.2f} | {r['scans_per_s'] / base['predict_scans_per_s']:.2f}x | "
              f"{r['scans_per_s'] / base['pipeline_scans_per_s']:.2f}x" + (f" | {r['first_error']}" if r["errors"] else ""))
    return 0 if all(r["errors"] == 0 for r in levels) else 1


if __name__ == "__main__":
    raise SystemExit(main())
