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

    if ray.is_initialized():  # a test that needs its own cluster shut the shared one down
        ray.shutdown()
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2,
             include_dashboard=True, log_to_driver=True)
    # Ray's State API (Train's placement-group cleaner asks it) cannot choose among several Ray
    # instances on one machine: name ours, as bonescan_platform.cluster does for its own.
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


@pytest.fixture(scope="session")
def deid_secret(tmp_path_factory):
    """A site secret of the test session's own, never the user's ~/.bonescan one."""
    path = tmp_path_factory.mktemp("secret") / "deid_secret"
    os.environ["BONESCAN_SECRET_FILE"] = str(path)
    return path
