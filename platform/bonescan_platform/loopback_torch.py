"""DDP's rendezvous on 127.0.0.1, for runs on a command's own local Ray.

Ray Train starts torch.distributed on every run, one worker or many; rank 0 then serves a
TCPStore, which torch binds to every interface (it has no bind address), and gloo listens on
the interface it resolves the host name to. On a private local Ray nothing else listens
beyond loopback (cluster.start_local), so here rank 0's store is served from a socket bound
to 127.0.0.1 before Ray's own setup looks for it (TCPStore's multi-tenant servers are shared
by port within a process), and gloo is pointed at the loopback interface.
"""

from __future__ import annotations

import datetime
import os
import socket

import psutil
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

_STORES: list = []  # the loopback store of this worker process, kept alive for the run


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def serve_store_on_loopback() -> tuple[str, int]:
    """On rank 0: a TCPStore server on 127.0.0.1 at a free port -> (address, port), in place
    of ray.train's get_address_and_port; torch's rendezvous on that port then uses it."""
    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    _STORES.append(dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, multi_tenant=True,
                                 master_listen_fd=listener.detach(), timeout=datetime.timedelta(minutes=30)))
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
    return "127.0.0.1", port


def _gloo_on_loopback() -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        import ray.train.torch.config as torch_config

        worker_group.execute(_gloo_on_loopback)
        # Ray's on_start asks rank 0 for (address, port) through this module name; the
        # controller process runs one run's backend, so the swap is the run's alone.
        ray_own = torch_config.get_address_and_port
        torch_config.get_address_and_port = serve_store_on_loopback
        try:
            super().on_start(worker_group, backend_config)
        finally:
            torch_config.get_address_and_port = ray_own


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous and gloo listen on 127.0.0.1 only (one machine)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
