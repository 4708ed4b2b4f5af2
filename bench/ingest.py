"""Ingest throughput: the Ray Data pipeline against a plain single-process loop.

Both do the same work on the same 200 synthetic scans (read DICOM, de-identify, crop, apply
the readers' rule, write Parquet shards): the baseline calls the very task function Ray Data
runs, one shard after another, in this process. Ray's start-up is excluded (a cluster is
running before a real ingest starts); the driver's header pass is included in both.

    python bench/ingest.py [--patients 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=200)
    args = parser.parse_args()

    import ray

    from bonescan_model.io.deid import load_or_create_secret
    from bonescan_model.synth import write_cohort
    from bonescan_platform import ingest as job
    from machine import describe  # bench/machine.py

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["BONESCAN_SECRET_FILE"] = str(tmp / "secret")
        secret = load_or_create_secret(tmp / "secret")
        t = time.perf_counter()
        write_cohort(tmp / "cohort", args.patients, seed=0)
        print(f"synthesized {args.patients} patients in {time.perf_counter() - t:.1f} s")
        dicom, labels = tmp / "cohort" / "dicom", tmp / "cohort" / "labels"

        t = time.perf_counter()
        plan = job.plan_ingest(dicom, labels, secret)
        (tmp / "loop").mkdir()
        for task in plan.tasks:
            job.write_shard_task(task, tmp / "loop", secret)
        loop_s = time.perf_counter() - t

        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=512 * 1024**2,
                 include_dashboard=False, log_to_driver=False)
        try:
            t = time.perf_counter()
            assert job.ingest(str(dicom), str(tmp / "ray"), str(labels)) == 0
            ray_s = time.perf_counter() - t
        finally:
            ray.shutdown()

    n = args.patients
    print(f"\n{describe()}\n{n} scans, {len(plan.tasks)} shards")
    print(f"{'pipeline':<34} {'seconds':>8} {'scans/s':>8}")
    print(f"{'baseline: single-process loop':<34} {loop_s:>8.1f} {n / loop_s:>8.1f}")
    print(f"{'bonescan ingest (Ray Data)':<34} {ray_s:>8.1f} {n / ray_s:>8.1f}")
    print(f"ratio (Ray Data / loop): {loop_s / ray_s:.2f}x")


if __name__ == "__main__":
    main()
