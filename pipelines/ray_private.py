"""Every use of Ray's private API outside the rendezvous (``pipelines/rendezvous.py``), in one place, checked with
Ray 2.60. Each has no public equivalent; ``tests/unit/test_ray_private.py`` fails loudly when Ray moves one.

Imported after :func:`pipelines.runtime.use_loopback` has run (it imports Ray).
"""
from __future__ import annotations

import logging

from ray._private import ray_constants, services
from ray._raylet import GcsClient
from ray.train.v2._internal.execution import context as train_context


def loopback_driver() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into ``ray_constants.ENABLE_RAY_CLUSTER`` when it is imported;
    when something imported Ray before ``use_loopback`` ran, the processes this driver starts would bind the
    machine's address. They get the variable from the environment; the driver's copy is set here."""
    ray_constants.ENABLE_RAY_CLUSTER = False


def quiet_train_reports() -> None:
    """No log line per report and checkpoint from a Ray Train worker: Ray Train names that logger by its file path,
    out of reach of its ``LoggingConfig``."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def dashboard_url(address: str, timeout: float = 5.0) -> str | None:
    """``http://host:port`` of the dashboard (the state API) of the cluster whose GCS is at ``address`` (``host:port``,
    or "auto" for RAY_ADDRESS or the machine's latest cluster), as its GCS records it; None for a Ray Client address
    (``ray://``), a cluster without a dashboard, or a GCS that does not answer (logged). The public resolver
    (``ray.dashboard.utils``) retries for 40 s when there is no dashboard."""
    if "://" in address:
        return None
    gcs = services.get_ray_address_from_environment(address, None) if address == "auto" else address
    try:
        value = GcsClient(address=gcs).internal_kv_get(ray_constants.DASHBOARD_ADDRESS.encode(),
                                                       ray_constants.KV_NAMESPACE_DASHBOARD, timeout=timeout)
    except Exception as exc:  # (Ray's RpcError and friends) the run goes on; Ray Train asks the machine's latest
        logging.getLogger(__name__).warning("could not read the dashboard address of the cluster at %s: %s", gcs, exc)
        return None
    return f"http://{value.decode()}" if value else None
