"""Shared fixtures: one Ray instance for the whole session, started only if a test asks."""

from __future__ import annotations

import os

import pytest

# Token auth (on by default since Ray 2.59) is for clusters; local tests run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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
    os.environ["BONESCAN_SECRET_FILE"] = str(path)
    return path
