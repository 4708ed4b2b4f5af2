"""Ingest throughput: `bonescan ingest` (plain Ray tasks) against a single-process loop.

All do the same work on the same synthetic scans (read DICOM, de-identify, crop, apply the
readers' rule, write Parquet shards): the baseline calls the very task function the Ray tasks
run, one shard after another, in this process. Beside them, the Ray Data pipeline ingest used
before (from_items + map_batches over the same task function, batch size 1), so the choice of
plain tasks stays measured. Ray's start-up is excluded (a cluster is running before a real
ingest starts); the driver's header pass is included in all. With --nodes N the Ray runs are
repeated on a ray.cluster_utils.Cluster of N nodes sharing the machine's CPUs.

    python bench/ingest.py [--patients 200] [--nodes 2]
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
    parser.add_argument("--nodes", type=int, default=0, help="also run on a local cluster of this many nodes")
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

        cpus = os.cpu_count()
        timings = {}
        clusters = [("one node", None)] + ([(f"{args.nodes} nodes", args.nodes)] if args.nodes > 1 else [])
        for where, nodes in clusters:
            cluster = _start(cpus, nodes)
            try:
                for name, run in (("Ray tasks (bonescan ingest)", lambda out: job.ingest(str(dicom), out, str(labels))),
                                  ("Ray Data map_batches (before)", lambda out: _ray_data(job, plan, out, secret))):
                    out = str(tmp / f"{where}-{name[:8]}".replace(" ", "_"))
                    t = time.perf_counter()
                    assert run(out) == 0
                    timings[f"{name}, {where}"] = time.perf_counter() - t
            finally:
                ray.shutdown()
                if cluster is not None:
                    cluster.shutdown()

    n = args.patients
    print(f"\n{describe()}\n{n} scans, {len(plan.tasks)} shards")
    print(f"{'pipeline':<44} {'seconds':>8} {'scans/s':>8} {'ratio to loop':>14}")
    print(f"{'baseline: single-process loop':<44} {loop_s:>8.1f} {n / loop_s:>8.1f} {1.0:>13.2f}x")
    for name, seconds in timings.items():
        print(f"{name:<44} {seconds:>8.1f} {n / seconds:>8.1f} {loop_s / seconds:>13.2f}x")


def _start(cpus: int, nodes: int | None):
    """A local Ray of ``cpus`` CPUs: one node, or a Cluster of ``nodes`` nodes sharing them."""
    import ray

    if nodes is None:
        ray.init(address="local", num_cpus=cpus, object_store_memory=512 * 1024**2,
                 include_dashboard=False, log_to_driver=False)
        return None
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    for i in range(nodes):
        cluster.add_node(num_cpus=cpus // nodes + (i < cpus % nodes), object_store_memory=256 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


def _ray_data(job, plan, out: str, secret: bytes) -> int:
    """The Ray Data pipeline ingest ran before: one block per shard task, batch size 1."""
    import json

    import numpy as np
    import ray

    def write(batch, out_dir, secret):
        return {"result": np.array([json.dumps(job.write_shard_task(
            {"shard": str(n), "split": str(s), "scans": str(c)}, out_dir, secret))
            for n, s, c in zip(batch["shard"], batch["split"], batch["scans"])], dtype=object)}

    Path(out).mkdir()
    ds = ray.data.from_items(plan.tasks, override_num_blocks=len(plan.tasks)).map_batches(
        write, batch_size=1, batch_format="numpy", num_cpus=1, fn_kwargs={"out_dir": out, "secret": secret})
    ds.context.enable_progress_bars = False
    return 0 if len(list(ds.iter_rows())) == len(plan.tasks) else 1


if __name__ == "__main__":
    main()
