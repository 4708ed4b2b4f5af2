"""Shared fixtures: one Ray instance for the whole session, started only if a test asks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal

import pytest

# Token auth (on by default since Ray 2.59) is for clusters; local tests run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s (its default, for runs of hours): a test's
# run of seconds waits on that poll at its start, at each report and at its end, ~3 s a run.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on this machine's 2 CPUs, dashboard on (Tune's trial cleanup needs it),
    a small object store; shut down at the end of the session. Jobs under test reuse it."""
    import ray

    from bonescan_platform.cluster import start_local

    if ray.is_initialized():  # a test that needs its own cluster shut the shared one down
        ray.shutdown()
    start_local(num_cpus=2, object_store_memory=300 * 1024**2)  # on 127.0.0.1, as a command's own
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def deid_secret(tmp_path_factory):
    """A site secret of the test session's own, never the user's ~/.bonescan one."""
    path = tmp_path_factory.mktemp("secret") / "deid_secret"
    # A fixed secret: the patient keys, and so the train/val/test draws of the tests' small
    # cohorts, are the same on every machine (a random one made a 6-patient cohort's training
    # side lesion-free, or a 10-patient test split one patient, on some machines only). This
    # one draws a test share near 30 % and a lesion-bearing validation patient in each cohort.
    path.write_bytes(hashlib.sha256(b"bonescan test secret").digest())
    os.environ["BONESCAN_SECRET_FILE"] = str(path)
    return path


@pytest.fixture(scope="session")
def cohort(tmp_path_factory, ray_local, deid_secret):
    """The session's synthesized and ingested cohorts: ``cohort(patients, seed)`` -> the shard
    folder of that cohort, made once (``tiny.ingested_cohort``) and shared by every module
    that asks for the same one. Read-only: a test that changes shards copies them first."""
    from tiny import ingested_cohort

    made: dict[tuple[int, int], object] = {}

    def shards(patients: int, seed: int):
        if (patients, seed) not in made:
            made[patients, seed] = ingested_cohort(tmp_path_factory.mktemp(f"cohort-{patients}-{seed}"), patients, seed)
        return made[patients, seed]

    return shards


def pytest_collection_modifyitems(config, items):
    """Every test that uses the shared Ray (directly or through a fixture) is a `ray` test, so
    `-m "not ray"` leaves the fast layer. Tests that start Ray another way carry the mark
    themselves; ``_no_ray_outside_the_ray_layer`` catches one that forgets."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _no_ray_outside_the_ray_layer(request):
    """Fails an unmarked test that starts Ray in this process (fully effective in the
    `-m "not ray"` layer, where no shared Ray is up before it)."""
    import sys

    def ray_up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    before = ray_up()
    yield
    if request.node.get_closest_marker("ray") is None and not before and ray_up():
        pytest.fail("this test started Ray in-process: mark it @pytest.mark.ray (or use the ray_local fixture)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], ready_url: str, log_path, name: str, timeout: float = 120, env=None):
    """A server process started for a test session (its own process group, so its workers stop
    with it), polled at ``ready_url`` until it answers, then stopped by its pid (SIGTERM, then
    SIGKILL after 30 s). A server that exits or does not answer in ``timeout`` fails the test
    with the end of its log."""
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env=None if env is None else {**os.environ, **env})
    deadline = time.time() + timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"{name} did not start: {open(log_path).read()[-2000:]}")
            time.sleep(0.3)
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts proxied to a local
    folder), started once for the tests that track to it; its URI."""
    import sys

    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1],
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    # MLflow 3's job execution (GenAI scorers, trace archival: nothing bonescan logs) starts a job
    # runner and seven Huey consumer processes that take both cores for ~10 s after the server
    # answers, and the tests running then with them.
    with running_server(command, f"{uri}/health", root / "server.log", "mlflow server",
                        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}):
        yield uri


class S3Endpoint:
    """A running S3 endpoint: its URL, the environment a client needs (the standard AWS
    variables), and a pyarrow filesystem on it."""

    def __init__(self, url: str):
        self.url = url
        self.env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                 endpoint_override=self.url, allow_bucket_creation=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint on 127.0.0.1: moto's server mode (the s3test extra), started once
    for the tests that keep data in object storage."""
    import sys

    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("s3")
    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]]
    with running_server(command, f"{url}/moto-api/", root / "server.log", "moto server", timeout=60):
        yield S3Endpoint(url)
