"""Every use of Ray's private API outside the rendezvous (``pipelines/rendezvous.py``), in one place, checked with
Ray 2.60. Each has no public equivalent; ``tests/unit/test_ray_private.py`` fails loudly when Ray moves one.

Imported after :func:`pipelines.runtime.use_loopback` has run (it imports Ray).
"""
from __future__ import annotations

import logging

from ray._private import ray_constants
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
