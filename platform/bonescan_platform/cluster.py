"""Connect to the Ray cluster a job runs on, or start a local one for the job's lifetime."""

from __future__ import annotations

import contextlib
import os

import ray

# Modest on purpose: a 2-core, small-memory machine must keep room for the training processes.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None):
    """Use the running cluster (RAY_ADDRESS, or one started with `ray start`); else start a
    local Ray for the duration of the block, dashboard on (Tune's trial cleanup and the job
    server need it), and shut it down afterwards. An already-initialized Ray is reused as is."""
    if ray.is_initialized():
        yield
        return
    # A stale /tmp/ray/ray_current_cluster makes address="auto" look for a dead cluster, so
    # only an explicit address or a live cluster file means "connect".
    address = os.environ.get("RAY_ADDRESS")
    if address is None and _local_cluster_is_running():
        address = "auto"
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=True,
            log_to_driver=True,
        )
    try:
        yield
    finally:
        ray.shutdown()


def _local_cluster_is_running() -> bool:
    """A live GCS process on this machine (found from the process table, not from the
    possibly stale /tmp/ray/ray_current_cluster file)."""
    from ray._private.services import find_gcs_addresses

    return bool(find_gcs_addresses())
