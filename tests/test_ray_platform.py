"""Ray-level promises: `import platform` inside a Ray task whose working_dir is the
repository is the standard library's; training runs across a two-node cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


PROBE = textwrap.dedent("""
    import json, sys, ray
    # A driver of its own: working_dir is a job-level runtime_env (as in `ray job submit`).
    ray.init(address=sys.argv[1], runtime_env={"working_dir": sys.argv[2]})

    @ray.remote
    def probe():
        import os, platform
        return platform.__file__, platform.system(), os.path.isdir("platform/bonescan_platform")

    print("RESULT", json.dumps(ray.get(probe.remote())))
""")


def test_platform_is_stdlib_inside_a_ray_task_with_the_repo_as_working_dir(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    # Run from elsewhere, so the driver itself cannot pick the repository up from its cwd. The
    # shared Ray listens on 127.0.0.1 only (cluster.start_local); a second driver joins it only
    # if it takes loopback as its own node address too, or Ray rewrites "127.0.0.1" to the
    # host's address (ray._private.services.resolve_ip_for_localhost) and never connects.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-c", PROBE, address, str(REPO)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    where, system, in_repo = json.loads(lines[-1][len("RESULT "):])
    assert in_repo, "the task did not run in the uploaded working_dir"
    assert Path(where).parent == Path(sysconfig.get_paths()["stdlib"]) and system


TWO_NODES = textwrap.dedent("""
    import csv, json, os, sys
    import ray, yaml
    from ray.cluster_utils import Cluster
    from bonescan_model.synth import write_cohort
    from bonescan_platform.ingest import ingest
    from bonescan_platform.train import train

    root = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        write_cohort(f"{root}/cohort", 6, seed=21)
        assert ingest(f"{root}/cohort/dicom", f"{root}/shards", f"{root}/cohort/labels") == 0
        with open(f"{root}/config.yaml", "w") as f:
            yaml.safe_dump({"model": {"width": 4, "recurrence": 1, "dilations": [1, 2]},
                            "epochs": 1, "batch_size": 2, "semi": "mean_teacher"}, f)  # DDP with a teacher
        code = train(f"{root}/shards", f"{root}/config.yaml", f"{root}/run", workers=2)
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        with open(f"{root}/run/history.csv") as f:
            rows = list(csv.DictReader(f))
        print("RESULT", json.dumps({"code": code, "nodes": nodes, "rows": rows}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.ray
def test_two_workers_on_a_two_node_cluster_train_and_report(tmp_path, deid_secret):
    # Its own cluster in its own process: the session's shared Ray instance stays untouched.
    done = subprocess.run([sys.executable, "-c", TWO_NODES, str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["code"] == 0 and result["nodes"] == 2
    (row,) = result["rows"]
    assert row["epoch"] == "1" and int(row["train_workers"]) == 2
    # Each worker trained on its own half of the training split, the student against its teacher.
    assert 0 < int(row["train_images"]) < 6
    assert float(row["train_unsupervised"]) > 0
