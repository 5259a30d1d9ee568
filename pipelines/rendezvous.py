"""torch's rendezvous kept on 127.0.0.1 when the whole Ray cluster is on loopback.

``dist.init_process_group`` on rank 0 starts a TCPStore server that listens on every interface (``*:PORT``) whatever
address the URL names. Rank 0 here first starts that server itself on a socket bound to 127.0.0.1 and keeps it;
``init_process_group`` then finds it (torch reuses a live multi-tenant store server on the same port) instead of
binding its own. The other ranks connect to 127.0.0.1:PORT as usual.

Ray adapter (checked with Ray 2.60 and torch 2.14): Ray Train's ``TorchConfig.backend_cls`` and the backend's
``on_start(worker_group, backend_config)`` hook, and its private ``_setup_torch_process_group`` and
``_set_torch_distributed_env_vars`` helpers run on each worker. ``tests/unit/test_ray_private.py`` checks their
signatures and ``tests/integration/test_loopback.py`` lists the listening sockets of a training run, so a change in
either library fails loudly.
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

from pipelines.runtime import LOOPBACK

_SERVERS: dict[int, object] = {}  # port → the live TCPStore server of this worker process (rank 0)


def _serve_store(timeout_s: float) -> int:
    """Rank 0: a TCPStore server on a socket bound to 127.0.0.1; returns its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    _SERVERS[port] = dist.TCPStore(LOOPBACK, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.detach())
    return port


def _release_stores() -> None:
    _SERVERS.clear()


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig") -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        port = worker_group.execute_single(0, _serve_store, timeout_s=backend_config.timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _setup_torch_process_group, backend=backend,
                                                   world_rank=rank, world_size=len(worker_group),
                                                   init_method=f"tcp://127.0.0.1:{port}",
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config) -> None:
        super().on_shutdown(worker_group, backend_config)
        worker_group.execute_single(0, _release_stores)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous store listens on 127.0.0.1 only (every worker on this machine's loopback)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config(loopback: bool, timeout_s: float = 1800) -> TorchConfig:
    """The TorchTrainer's config: the loopback rendezvous for a cluster on 127.0.0.0/8, else Ray's own. ``timeout_s``:
    the process group's timeout (rendezvous and every collective)."""
    return (LoopbackTorchConfig if loopback else TorchConfig)(timeout_s=timeout_s)
