"""The files that say where it runs: they parse, their configs load, the resources they ask for fit the training
configs they launch, GPUs are requested and limited, and no dashboard or server is published beyond the cluster."""
from __future__ import annotations

import re

import pytest
import yaml

from conftest import REPO
from pgseg.config import load_config
from pipelines.runtime import check_resources


def _docs(path):
    return [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _containers(doc):
    return [c for n in _walk(doc) if isinstance(n, dict) and "containers" in n for c in n["containers"]]


@pytest.mark.parametrize("path", ["configs/paper_cc12m.yaml", "configs/official_groupvit_init.yaml",
                                  "configs/tiny_shapes.yaml"])
def test_experiment_configs_load(path):
    config = load_config(REPO / path)
    assert config.data.shards


def test_kuberay_gpu_workers_are_requested_and_limited_and_fit_the_recipe():
    for path in ("infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml"):
        for doc in _docs(path):
            for c in _containers(doc):
                requests, limits = c.get("resources", {}).get("requests", {}), c.get("resources", {}).get("limits", {})
                if "nvidia.com/gpu" in requests or "nvidia.com/gpu" in limits:
                    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], (path, c["name"])
    job = _docs("infra/kuberay/rayjob.yaml")[0]
    config_path = re.search(r"--config (\S+)", job["spec"]["entrypoint"]).group(1)
    config = load_config(REPO / config_path)
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    res = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    check_resources(config, float(res["cpu"]) * group["replicas"], float(res["nvidia.com/gpu"]) * group["replicas"])


def test_nothing_is_published_beyond_the_cluster():
    for path in ("infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml", "infra/mlflow/mlflow.yaml"):
        for doc in _docs(path):
            types = [n.get("type") or n.get("serviceType") for n in _walk(doc) if isinstance(n, dict)
                     and ("serviceType" in n or (n.get("type") and doc.get("kind") == "Service"))]
            assert all(t == "ClusterIP" for t in types), (path, types)
            assert "LoadBalancer" not in yaml.safe_dump(doc) and "NodePort" not in yaml.safe_dump(doc)
    compose = _docs("infra/mlflow/docker-compose.yaml")[0]
    for service in compose["services"].values():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", []))
    cluster = _docs("ray_cluster.yaml")[0]
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_cluster_launcher_has_a100_workers_shared_storage_and_the_tracking_uri():
    cluster = _docs("ray_cluster.yaml")[0]
    assert cluster["available_node_types"]["a100"]["node_config"]["InstanceType"].startswith("p4d")
    options = " ".join(cluster["docker"]["run_options"])
    assert "/mnt/shared" in options and "MLFLOW_TRACKING_URI" in options
    dockerfile = (REPO / "infra/Dockerfile").read_text()
    assert "pip install -e '.[platform,gpu]'" in dockerfile and "FROM ${RAY_IMAGE}" in dockerfile
