"""`ray job submit` as the README documents it: a training job sent to a Ray head's job server
with the repository as working_dir and the README's runtime environment runs the shipped code,
succeeds, and its logs carry its metrics."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_config(epochs=1, batch_size=2)

# A head of its own, in its own process: the session's shared Ray stays untouched, and closing
# this process's stdin shuts down exactly this cluster.
HEAD = textwrap.dedent("""
    import sys
    from ray.cluster_utils import Cluster

    dashboard, agent = map(int, sys.argv[1:3])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 200 * 1024**2, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard, "dashboard_agent_listen_port": agent})
    print("READY", flush=True)
    sys.stdin.read()
    cluster.shutdown()
""")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Head:
    """The job server's address, once the head process says it is up (it boots while the
    shards are being written)."""

    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.port, self._ready = process, port, False

    @property
    def address(self) -> str:
        if not self._ready:
            line = self.process.stdout.readline()
            assert line.strip() == "READY", f"the Ray head did not start: {line!r}"
            self._ready = True
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def head():
    dashboard, agent = _free_ports(2)
    process = subprocess.Popen([sys.executable, "-c", HEAD, str(dashboard), str(agent)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    yield Head(process, dashboard)
    process.stdin.close()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def shards(cohort):
    return cohort(6, 5)


def _readme_runtime_env() -> dict:
    """The runtime environment the README's `ray job submit` lines pass, with its paths made
    absolute (the README runs from the repository root)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):]
    (env,) = set(re.findall(r"--runtime-env-json '([^']+)'", section))
    runtime_env = json.loads(env)
    runtime_env["py_modules"] = [str(REPO / path) for path in runtime_env["py_modules"]]
    return {"working_dir": str(REPO), **runtime_env}


def test_the_uploaded_working_dir_is_small_and_leaves_ignored_files_out(tmp_path):
    # Ray's own packaging, as `--working-dir .` runs it: .gitignore is honoured, .git left out.
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=[".git"])
    names = ZipFile(package).namelist()
    assert "platform/bonescan_platform/train.py" in names and "configs/paper.yaml" in names
    assert not [n for n in names if n.startswith((".git/", "tests/_output/")) or "__pycache__" in n]
    assert package.stat().st_size < 5 * 1024**2


def test_training_job_submitted_to_the_job_server_succeeds_and_logs_its_metrics(head, shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config, run = tmp_path / "config.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(TINY))
    probe = "import bonescan_model, bonescan_platform; print('CODE', bonescan_model.__file__, bonescan_platform.__file__)"
    bonescan = Path(sys.executable).parent / "bonescan"  # the console script the README runs
    entrypoint = (f"{shlex.quote(sys.executable)} -c {shlex.quote(probe)} && {shlex.quote(str(bonescan))} train "
                  f"--data {shards} --config {config} --out {run}")

    client = JobSubmissionClient(head.address)
    job = client.submit_job(entrypoint=entrypoint, runtime_env=_readme_runtime_env())
    deadline = time.time() + 400
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    # The job ran the uploaded code, not the copy installed on this machine.
    (code,) = [line.split()[1:] for line in logs.splitlines() if line.startswith("CODE ")]
    assert all(not Path(path).is_relative_to(REPO) for path in code), code
    # Its logs carry the run's metrics, the same the run folder on (shared) storage holds.
    with open(run / "history.csv") as f:
        (row,) = list(csv.DictReader(f))
    (reported,) = re.findall(r"trained 1 epochs \(\d+ optimizer steps\): validation DSC (\d\.\d{3})", logs)
    assert reported == f"{float(row['val_dsc']):.3f}"
    assert (run / "model.pt").is_file()
