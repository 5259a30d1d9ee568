"""Shared test helpers: the released fixture folder (../shared/reference beside the repository) and configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mlflow_process import MlflowServer
from pipelines.runtime import start_ray, use_loopback
from s3_process import S3Server, reserve_endpoint

use_loopback()  # tests stay on 127.0.0.1: Ray reads these when it is imported (before any test module imports it)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("RAY_ADDRESS", None)  # the tests start their own clusters; a user's RAY_ADDRESS must not capture them
S3_ENDPOINT = reserve_endpoint()  # s3:// in every process of the session goes to the test's own server

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PGSEG_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
FIXTURE = REFERENCE / "released_fixture"


def _shared(path: Path, what: str) -> Path:
    """``path`` from the shared/ folder beside the repository (CI has it; a user's clone does not): the tests that
    need it skip with the reason when it is absent."""
    if not path.exists():
        pytest.skip(f"{what} is not at {path}: the shared/ folder is not beside this clone (set PGSEG_SHARED to it)")
    return path


# Tests that start Ray clusters of their own with `ray start` or Ray's cluster utilities: each names itself the
# machine's current cluster (/tmp/ray/ray_current_cluster), which the stray-cluster tests read, so under pytest-xdist
# they run one after another on one worker (the other tests go on beside them).
OWN_CLUSTERS = ("test_loopback.py", "test_train_job.py", "test_cluster_rehearsal.py", "test_elastic.py",
                "test_download.py::test_ray_distributor_on_two_nodes")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which turns the groups into node ids
def pytest_collection_modifyitems(config, items) -> None:
    """Every integration test is slow (real Ray clusters, MLflow servers, trainings): ``pytest -m "not slow"`` is
    the quick part, the unit tests. Under pytest-xdist (the default: two workers, as half the suite's time is waiting
    on processes; three overloaded this 2-core machine), the tests that start their own clusters share one worker,
    and so do the users of the session's trained model (one worker trains it, not each)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)
        if any(item.nodeid.split("/")[-1].startswith(name) for name in OWN_CLUSTERS):
            item.add_marker(pytest.mark.xdist_group("own_clusters"))
        elif {"tiny_run", "trained_tiny"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("tiny_run"))


@pytest.fixture(autouse=True)
def _grouping_holds(request) -> None:
    """Under pytest-xdist's loadgroup, a grouped test's node id carries its group (the scheduler keeps a group on one
    worker by it): fail rather than let tests with clusters of their own overlap unnoticed (pytest 9.2 and a
    conftest hook running after xdist's each dropped the groups silently)."""
    if request.config.getoption("dist", "no") != "loadgroup" or "PYTEST_XDIST_WORKER" not in os.environ:
        return
    for mark in request.node.iter_markers("xdist_group"):
        group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        assert request.node.nodeid.endswith(f"@{group}"), f"pytest-xdist did not group {request.node.nodeid}"


REFERENCE_FACTS = REPO / "tests" / "fixtures" / "reference"  # the small facts of shared/reference, in the repository


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The released checkpoint's key list (``official_pgseg_state_dict_keys.tsv``) and the small released fixture's
    architecture, key list and prompts (``fixture_*``), copied from shared/reference into the repository."""
    return REFERENCE_FACTS


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """``shared/reference/released_fixture``: the released code's small model and its outputs."""
    return _shared(FIXTURE / "released_layout_small.pth", "the released fixture").parent


@pytest.fixture(scope="session")
def released_model(fixture_dir):
    """The fixture's released-layout checkpoint converted into our official-mode model, in eval mode (float32)."""
    from pgseg.checkpoint import convert_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    model, _, report = convert_checkpoint(fixture_dir / "released_layout_small.pth", "pgseg-official")
    assert report.ok and len(report.loaded) == 212 and len(report.dropped) == 9
    return model.eval()


@pytest.fixture(autouse=True)
def _deterministic():
    """Each test starts from seed 0 and leaves torch's intra-op thread count as it found it (a test that pins it
    must not change the float sums of the tests after it)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixture_threads():
    """torch on the thread count the released fixture was generated with (2, its README's environment): its
    near-tie pixels (margins down to 3e-8) fall the same way only when the float sums are split the same way."""
    torch.set_num_threads(2)
    yield 2


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 for the session (2 CPUs), our own even when another one runs."""
    import logging

    import ray

    # the dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group cleaner polls
    assert start_ray(num_cpus=2, log_to_driver=False, logging_level=logging.ERROR,
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}) == "embedded"
    ray.data.DataContext.get_current().enable_progress_bars = False
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with a sqlite backend on 127.0.0.1; yields its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1, where every S3 client of the session points."""
    server = S3Server(S3_ENDPOINT).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """The shapes world made the product's way: images written, listed as file:// URLs, downloaded into webdataset
    shards by img2dataset (with a manifest); plus its VOC-format validation set."""
    from pipelines.data.download import DownloadSpec, download
    from pipelines.data.shapes_world import ShapesWorld, write_train_images, write_url_list, write_voc_val

    root = tmp_path_factory.mktemp("shapes")
    world = ShapesWorld(num_classes=4, image_size=64, seed=1)
    rows = write_train_images(world, root / "www", 512)
    write_url_list(rows, (root / "www").resolve().as_uri(), root / "urls")
    manifest = download(root / "urls", root / "shards", DownloadSpec(image_size=64, number_sample_per_shard=128,
                                                                     processes_count=1, thread_count=8))
    assert manifest["samples"] == 512, manifest
    return {"root": root, "shards": root / "shards", "val": write_voc_val(world, root / "val", 8), "world": world}


@pytest.fixture(scope="session")
def tiny_run(ray_local, shapes_data, mlflow_server, tmp_path_factory):
    """A tiny PGSeg trained for 16 steps on the shapes world by the real training pipeline, its storage given as a
    URI (file:// here; s3:// and gs:// go the same way, through pyarrow), its val set scored every 8 steps (so
    rank 0 keeps a best model there), tracked on the session's MLflow server (its kept checkpoints logged as models,
    the best registered as ``pgseg-tiny``): (the run's result, the storage folder)."""
    from pgseg.config import load_config
    from pipelines.train import fit, plan_training

    root = tmp_path_factory.mktemp("trained")
    config = load_config("tiny", [f"data.shards=[{shapes_data['shards']}]", "data.batch_size=32",
                                  "schedule.epochs=1", "train.cpus_per_worker=1", f"tracking.uri={mlflow_server}",
                                  "tracking.experiment=tiny-models", "tracking.registered_model=pgseg-tiny",
                                  f"train.storage_path={root.as_uri()}", "train.name=tiny",
                                  "train.checkpoint_every=8", f"eval.datasets=[voc:{shapes_data['val']}]",
                                  "eval.every_steps=8"])
    result = fit(plan_training(config))
    assert result.finished and result.model_file
    return result, root


@pytest.fixture(scope="session")
def trained_tiny(tiny_run) -> Path:
    """The final model file of :func:`tiny_run`."""
    return Path(tiny_run[0].model_file)
