"""The private Ray API the adapters lean on (pipelines/ray_private.py, pipelines/rendezvous.py), checked without a
cluster: when a Ray release moves or changes one of them, this fails with the name of what moved."""
import inspect
import io
import logging
import tarfile

import pandas as pd
import pyarrow as pa
import pytest

from pipelines import ray_private


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _rows(data: bytes, folder) -> pd.DataFrame:
    (folder / "shard.tar").write_bytes(data)
    source = ray_private.HardenedWebDataset([str(folder / "shard.tar")], decoder=None)
    frames = list(source._read_stream(pa.BufferReader(data), "shard.tar"))
    return pd.concat([f.to_pandas() if isinstance(f, pa.Table) else f for f in frames], ignore_index=True)


def test_the_webdataset_reader_still_reads_a_stream_and_the_hardened_one_reports_a_break(tmp_path):
    assert "_read_stream" in vars(ray_private.WebDatasetDatasource)  # the method the hardened reader wraps
    assert list(inspect.signature(ray_private.WebDatasetDatasource._read_stream).parameters) == ["self", "stream", "path"]
    whole = _tar({f"{i:03d}.{ext}": f"{i}-{ext}".encode() for i in range(3) for ext in ("jpg", "txt")})
    rows = _rows(whole, tmp_path)
    assert sorted(rows["__key__"]) == ["000", "001", "002"] and "__error__" not in rows.columns
    cut = _rows(whole[:3 * 512 + 100], tmp_path)  # inside the second member's data (512-byte header + data each)
    assert cut["__error__"].iloc[-1] == ray_private.DAMAGED_TAR and cut["__key__"].iloc[-1] is None


def test_the_driver_loopback_switch_and_the_train_context_logger_are_where_the_adapter_looks():
    assert isinstance(ray_private.ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert ray_private.train_context.logger.name == ray_private.train_context.__file__
    ray_private.quiet_train_reports()
    assert logging.getLogger(ray_private.train_context.__file__).level == logging.WARNING


def test_the_torch_backend_hooks_the_rendezvous_adapter_calls():
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

    assert list(inspect.signature(_setup_torch_process_group).parameters) == [
        "backend", "world_rank", "world_size", "init_method", "timeout_s"]
    assert callable(_set_torch_distributed_env_vars)
    assert list(inspect.signature(_TorchBackend.on_start).parameters) == ["self", "worker_group", "backend_config"]


@pytest.mark.parametrize("module", ["pipelines/ray_private.py", "pipelines/rendezvous.py"])
def test_each_adapter_names_the_ray_version_it_was_checked_with(module):
    from conftest import REPO

    assert "Ray 2.60" in (REPO / module).read_text()
