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
    address = os.environ.get("RAY_ADDRESS") or _started_cluster()
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


def _started_cluster() -> str | None:
    """The GCS address of a cluster started with `ray start` on this machine, if it is alive.

    `ray start` (and nothing else) writes /tmp/ray/ray_current_cluster; another command's
    private Ray (a `ray.init` of its own) is never joined: it would be shut down under us when
    that command ends, and its resources were sized for it alone. The file outlives its
    cluster, so the address counts only while a live GCS process serves it."""
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    return address if address and address in find_gcs_addresses() else None
