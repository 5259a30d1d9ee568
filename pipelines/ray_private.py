"""Every use of Ray's private API outside the rendezvous (``pipelines/rendezvous.py``), in one place, checked with
Ray 2.60. Each has no public equivalent; ``tests/unit/test_ray_private.py`` fails loudly when Ray moves one.

Imported after :func:`pipelines.runtime.use_loopback` has run (it imports Ray).
"""
from __future__ import annotations

import logging
import tarfile
from typing import Iterator

import pandas as pd
from ray._private import ray_constants
from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource
from ray.train.v2._internal.execution import context as train_context

log = logging.getLogger(__name__)

DAMAGED_TAR = "damaged_tar"


class HardenedWebDataset(WebDatasetDatasource):
    """Ray's webdataset reader (``ray.data.read_webdataset`` has no error hook); a tar that breaks mid-way yields
    what it read, then one row whose ``__error__`` says so."""

    def _read_stream(self, stream, path: str) -> Iterator[pd.DataFrame]:
        try:
            yield from super()._read_stream(stream, path)
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            log.warning("ingest: %s is damaged (%s): the rest of it is skipped", path, exc)
            yield pd.DataFrame([{"__key__": None, "__url__": path, "__error__": DAMAGED_TAR}])


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
