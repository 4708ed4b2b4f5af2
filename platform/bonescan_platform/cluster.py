"""Connect to the Ray cluster a job runs on, or start a local one for the job's lifetime.

A command's local Ray is its own: it listens on 127.0.0.1 only (nothing of it can be reached
from another machine), and another command never joins it. Only ``RAY_ADDRESS`` or a
cluster started with ``ray start`` is joined.
"""

from __future__ import annotations

import contextlib
import math
import os

import ray

# Modest on purpose: a 2-core, small-memory machine must keep room for the training processes.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
# How long a run waits for its workers to be placed before it fails, saying what it asked for
# and what the cluster has; long enough for an autoscaled GPU node to boot and install.
PLACEMENT_WAIT_S = 900.0
PLACEMENT_WAIT_ENV = "BONESCAN_PLACEMENT_WAIT_S"
# Ray Train's own wait for one placement attempt (Train V2: ray.train.v2._internal.constants).
START_TIMEOUT_ENV, START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0
# Ray takes the node's address from the host's interfaces unless this is "0" (how it keeps a
# laptop's Ray on loopback); read by ray._private.services.get_node_ip_address.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_started_here = False  # True while this process runs a Ray it started itself (ray_session)
_loopback = False  # True while this process runs a Ray it started on 127.0.0.1 (start_local)


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None):
    """Use the running cluster (RAY_ADDRESS, or one started with `ray start`); else start a
    local Ray for the duration of the block, dashboard on (Tune's trial cleanup and the job
    server need it), and shut it down afterwards. An already-initialized Ray is reused as is."""
    global _started_here, _loopback
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS") or _started_cluster()
    if address:
        if _is_loopback(address):
            # A cluster on 127.0.0.1 is reached on loopback only: this driver takes 127.0.0.1
            # as its node address too, or Ray rewrites the address to the host's own
            # (ray._private.services.resolve_ip_for_localhost) and never connects.
            with _on_loopback():
                ray.init(address=address, log_to_driver=True)
            _loopback = True
        else:
            ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
            _stopped_local()
        return
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    start_local(num_cpus or os.cpu_count())
    _started_here = True
    try:
        yield
    finally:
        _started_here = False
        ray.shutdown()
        _stopped_local()


def start_local(num_cpus: int, object_store_memory: int = LOCAL_OBJECT_STORE_BYTES) -> None:
    """ray.init of a private local Ray, every process of it on 127.0.0.1: GCS, raylet, object
    manager, dashboard and its agents, metrics export, runtime-env agent, workers. The test
    session's shared Ray starts here too."""
    global _loopback
    with _on_loopback():
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 log_to_driver=True)
    _loopback = True


def _is_loopback(address: str) -> bool:
    """Whether a GCS address ("host:port", or a ray:// / http:// URL) names this machine's
    loopback interface."""
    import ipaddress

    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stopped_local() -> None:
    global _loopback
    _loopback = False


def on_loopback_ray() -> bool:
    """Whether this process runs on a local Ray of start_local's: its driver, or one of its
    workers (which inherit the setting its raylet started with), e.g. a Tune trial."""
    return _loopback or os.environ.get(_LOOPBACK_ENV) == "0"


@contextlib.contextmanager
def _on_loopback():
    """Within the block a Ray started here takes 127.0.0.1 as its node address, and so binds
    its servers there instead of the host's address (its processes inherit the setting when
    they start; this one knows its node from then on). Joining a cluster needs the host's
    address: the setting is undone after the block."""
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV] = "0"  # for Ray's own processes, which read it when they start
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which read it when ray was imported
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = before_env


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


# ---------------------------------------------------------------- placing a run's workers
def placement_retries() -> int:
    """Ray Train's ``controller_failure_limit`` for a bounded wait: Train V2 waits
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for the workers' placement group, then tries again,
    by default for ever. This many retries stop it after about BONESCAN_PLACEMENT_WAIT_S."""
    attempt = float(os.environ.get(START_TIMEOUT_ENV, START_TIMEOUT_S))
    return max(0, math.ceil(placement_wait_s() / attempt) - 1)


def describe_resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())
                     if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store")))


def placement_wait_s() -> float:
    return float(os.environ.get(PLACEMENT_WAIT_ENV, PLACEMENT_WAIT_S))


def wait_for_room(what: str, workers: int, per_worker: dict[str, float], data_cpus: float = 1.0) -> None:
    """Return once the cluster can hold a run's workers and the CPUs its data reading takes,
    or fail naming what was asked and what the cluster has: at once on the Ray this process
    started (it cannot grow), else after BONESCAN_PLACEMENT_WAIT_S. Without this a run on a
    busy cluster waits for ever: Ray Data's tasks and Train's workers both queue for CPUs
    another job holds ("Cluster resources are not enough ... may hang forever").

    The wait is a placement group of exactly that, removed once it is placed: pending, it
    also asks an autoscaler for nodes."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from bonescan_model.errors import InputError

    asked = f"asks for {workers} worker(s) with {describe_resources(per_worker)} each and CPU {data_cpus:g} to read the data"
    total = ray.cluster_resources()
    needed = {k: v * workers for k, v in per_worker.items()}
    needed["CPU"] = needed.get("CPU", 0) + data_cpus
    if _started_here and any(v > total.get(k, 0) + 1e-9 for k, v in needed.items()):
        raise InputError(what, f"{asked}; this machine's Ray has "
                               f"{describe_resources({k: total.get(k, 0) for k in needed})} in all (fewer --workers, or no --gpus)")
    group = placement_group([dict(per_worker)] * workers + [{"CPU": data_cpus}], strategy="PACK")
    try:
        placed = group.wait(timeout_seconds=placement_wait_s())
    finally:
        remove_placement_group(group)
    if not placed:
        free = ray.available_resources()
        raise InputError(what, f"{asked}; the cluster could not make room within {placement_wait_s():g} s "
                               f"({PLACEMENT_WAIT_ENV}): it has {describe_resources({k: total.get(k, 0) for k in needed})} "
                               f"in all, {describe_resources({k: free.get(k, 0) for k in needed})} free now")


def placement_failure(what: str, workers: int, per_worker: dict[str, float], error: Exception):
    """The one-line InputError for a fit() that failed because its workers could not be
    placed in time (or at all), naming what was asked and what the cluster has; None for
    any other failure."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import (
        InsufficientClusterResourcesError,
        WorkerGroupStartupTimeoutError,
    )

    from bonescan_model.errors import InputError

    cause = getattr(error, "controller_failure", None) if isinstance(error, ControllerError) else None
    if not isinstance(cause, (WorkerGroupStartupTimeoutError, InsufficientClusterResourcesError)):
        return None
    when = "can never place them" if isinstance(cause, InsufficientClusterResourcesError) \
        else f"could not place them within {placement_wait_s():g} s ({PLACEMENT_WAIT_ENV})"
    keys = {k: 0 for k in per_worker}
    total = {**keys, **{k: v for k, v in ray.cluster_resources().items() if k in per_worker}}
    free = {**keys, **{k: v for k, v in ray.available_resources().items() if k in per_worker}}
    return InputError(what, f"asks for {workers} worker(s) with {describe_resources(per_worker)} each; the cluster "
                            f"{when}: it has {describe_resources(total)} in all, {describe_resources(free)} free now")
