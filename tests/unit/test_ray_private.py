"""The private Ray API the adapters lean on (pipelines/ray_private.py, pipelines/rendezvous.py), checked without a
cluster: when a Ray release moves or changes one of them, this fails with the name of what moved."""
import inspect
import logging

import pytest

from pipelines import ray_private


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


def test_the_dashboard_address_key_and_a_client_address_asked_of_no_cluster():
    """Where the GCS keeps the dashboard's address (read by dashboard_url; the read itself is tested on a real
    `ray start` cluster in test_train_job); a Ray Client address is not asked (it has no GCS to read here)."""
    assert ray_private.ray_constants.DASHBOARD_ADDRESS == "dashboard"
    assert ray_private.ray_constants.KV_NAMESPACE_DASHBOARD == b"dashboard"
    assert ray_private.dashboard_url("ray://127.0.0.1:1") is None
