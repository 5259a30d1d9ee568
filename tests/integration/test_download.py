"""The download stage against a real HTTP server on 127.0.0.1, with real img2dataset and real tar shards."""
import os
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest

from pipelines.data.download import DownloadSpec, build_manifest, download, read_manifest
from pipelines.data.file_server import QuietHandler, serve_directory
from pipelines.data.shapes_world import ShapesWorld, write_train_images, write_url_list

from conftest import REPO

SLOW_SECONDS = 4


class FaultyHandler(QuietHandler):
    """Serves files; ``/slow/…`` answers after longer than the client's timeout; ``/drip/…`` is a little slow."""

    def do_GET(self):
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_SECONDS)
            self.path = self.path[len("/slow"):]
        elif self.path.startswith("/drip/"):
            time.sleep(0.15)
            self.path = self.path[len("/drip"):]
        return super().do_GET()


def _tar_samples(shards: Path) -> list[tuple[str, str]]:
    """(key, caption) of every sample of every tar."""
    out = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    out.append((member.name[:-4], tar.extractfile(member).read().decode()))
    return out


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    rows = write_train_images(ShapesWorld(seed=2), root, 40)
    (root / "page.jpg").write_text("<html><body>not an image</body></html>")
    good = (root / rows[0]["path"]).read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root, rows


def test_failures_counted_exactly_in_the_manifest(www, tmp_path):
    root, rows = www
    with serve_directory(root, handler=FaultyHandler) as base:
        good = [{"url": f"{base}/{r['path']}", "caption": r["caption"], "source": "shapes", "key": str(i)}
                for i, r in enumerate(rows[:12])]
        bad = [(f"{base}/missing.jpg", "404"), (f"{base}/also-missing.jpg", "404"), (f"{base}/page.jpg", "html"),
               (f"{base}/truncated.jpg", "truncated"), (f"{base}/slow/{rows[0]['path']}", "slow")]
        urls = good + [{"url": u, "caption": c, "source": "bad", "key": c + str(i)} for i, (u, c) in enumerate(bad)]
        (tmp_path / "urls").mkdir()
        pd.DataFrame(urls).to_parquet(tmp_path / "urls" / "part-00000.parquet")
        manifest = download(tmp_path / "urls", tmp_path / "shards",
                            DownloadSpec(image_size=64, number_sample_per_shard=8, processes_count=1, thread_count=8,
                                         timeout=2))
    assert manifest["attempted"] == 17 and manifest["samples"] == 12
    assert manifest["failures"] == {"http_404": 2, "undecodable_image": 2, "timeout": 1}
    assert manifest["success_rate"] == pytest.approx(12 / 17)
    assert manifest["num_shards"] == 3 and manifest["unfinished_shards"] == []
    assert read_manifest(tmp_path / "shards") == manifest  # the file on disk says the same
    samples = _tar_samples(tmp_path / "shards")
    assert sorted(c for _, c in samples) == sorted(r["caption"] for r in rows[:12])
    assert sum(s["samples"] for s in manifest["shards"]) == len(samples)


def test_killed_run_resumes_without_redoing_finished_shards(www, tmp_path):
    root, rows = www
    spec_args = ["--image-size", "64", "--per-shard", "5", "--processes", "1", "--threads", "1", "--timeout", "5"]
    with serve_directory(root, handler=FaultyHandler) as base:
        write_url_list(rows, base + "/drip", tmp_path / "urls")  # 40 images, 0.15 s each, 8 shards
        env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "jobs.data", "download", str(tmp_path / "urls"),
                                 str(tmp_path / "shards"), *spec_args], cwd=REPO, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list((tmp_path / "shards").glob("*_stats.json"))) < 2:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*_stats.json")}
        assert 2 <= len(done_before) < 8, "the kill should land mid-way"
        tars_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")
                       if p.name.replace(".tar", "_stats.json") in done_before}
        proc = subprocess.run([sys.executable, "-m", "jobs.data", "download", str(tmp_path / "urls"),
                               str(tmp_path / "shards"), *spec_args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = read_manifest(tmp_path / "shards")
    assert manifest["num_shards"] == 8 and manifest["samples"] == 40 and manifest["unfinished_shards"] == []
    for name, mtime in done_before.items():  # finished shards were not redone
        assert (tmp_path / "shards" / name).stat().st_mtime_ns == mtime
    for name, mtime in tars_before.items():
        assert (tmp_path / "shards" / name).stat().st_mtime_ns == mtime
    samples = _tar_samples(tmp_path / "shards")
    keys = [k for k, _ in samples]
    assert len(keys) == len(set(keys)) == 40  # no duplicate keys
    assert sorted(c for _, c in samples) == sorted(r["caption"] for r in rows)


def test_a_run_that_left_a_shard_unfinished_is_finished_by_the_next(www, tmp_path):
    """The manifest of a run with an unfinished shard is in the folder when the download runs again: the missing
    shard is fetched, the finished one kept, and the manifest rebuilt."""
    root, rows = www
    spec = DownloadSpec(image_size=64, number_sample_per_shard=5, processes_count=1, thread_count=4)
    with serve_directory(root) as base:
        write_url_list(rows[:10], base, tmp_path / "urls")
        download(tmp_path / "urls", tmp_path / "shards", spec)
        for path in (tmp_path / "shards").glob("00001*"):  # shard 1 as if it had never finished
            path.unlink()
        manifest = build_manifest(tmp_path / "shards")
        manifest.update(expected_shards=2, unfinished_shards=[1])
        (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
        kept = (tmp_path / "shards" / "00000.tar").stat().st_mtime_ns
        manifest = download(tmp_path / "urls", tmp_path / "shards", spec)
    assert manifest["unfinished_shards"] == [] and manifest["num_shards"] == 2 and manifest["samples"] == 10
    assert (tmp_path / "shards" / "00000.tar").stat().st_mtime_ns == kept
    assert read_manifest(tmp_path / "shards") == manifest
    assert sorted(c for _, c in _tar_samples(tmp_path / "shards")) == sorted(r["caption"] for r in rows[:10])


def test_bad_download_inputs(tmp_path):
    with pytest.raises(ValueError, match="download.options.not_an_option"):
        DownloadSpec(options={"not_an_option": 1})
    with pytest.raises(ValueError, match="distributor"):
        DownloadSpec(distributor="spark")
    with pytest.raises(FileNotFoundError, match="no parquet parts"):
        download(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        read_manifest(tmp_path)


def test_pgseg_data_shapes_over_file_urls_and_inspect(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "jobs.cli", "data"]
    proc = subprocess.run([*cmd, "shapes", str(tmp_path / "world"), "--train", "24", "--val", "4", "--per-shard", "10",
                           "--processes", "1", "--threads", "4", "--serve", "file"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "24 training pairs in 3 shard(s)" in proc.stdout
    assert len((tmp_path / "world/val/ImageSets/Segmentation/val.txt").read_text().split()) == 4
    urls = pd.read_parquet(tmp_path / "world/urls/part-00000.parquet")
    assert urls.url.str.startswith("file://").all()
    shown = subprocess.run([*cmd, "inspect", str(tmp_path / "world/shards/00000.tar"), "--limit", "3"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and len(shown.stdout.strip().splitlines()) == 3 and "jpg" in shown.stdout
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    bad = subprocess.run([*cmd, "inspect", str(tmp_path / "junk.tar")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "not a readable tar shard" in bad.stderr


def test_manifest_logged_to_a_real_mlflow_server(www, tmp_path, mlflow_server):
    import urllib.request

    root, rows = www
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    with serve_directory(root) as base:
        write_url_list(rows[:6] + [{"path": "missing.jpg", "caption": "gone"}], base, tmp_path / "urls")
        proc = subprocess.run([sys.executable, "-m", "jobs.data", "download", str(tmp_path / "urls"),
                               str(tmp_path / "shards"), "--image-size", "64", "--processes", "1", "--threads", "4",
                               "--track", mlflow_server], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = proc.stdout.split("MLflow run ")[1].split()[0]
    # read back over HTTP, through MLflow's REST API
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as r:
        run = json.loads(r.read())["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["samples"] == 6 and metrics["attempted"] == 7 and metrics["failures.http_404"] == 1
    assert metrics["success_rate"] == pytest.approx(6 / 7)


MULTI_NODE = """
import sys
import ray
from ray.cluster_utils import Cluster
from pipelines.data.download import DownloadSpec, download
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
try:
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    try:
        download(sys.argv[1], sys.argv[2], DownloadSpec(distributor="ray"))
    except ValueError as exc:
        print("REFUSED:", exc)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_ray_distributor_refuses_node_local_output_on_a_multi_node_cluster(tmp_path):
    """Two real raylets on this machine form a 2-node cluster; a node-local output folder is refused."""
    (tmp_path / "urls").mkdir()
    pd.DataFrame({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["x"], "source": ["s"], "key": ["k"]}).to_parquet(
        tmp_path / "urls/part-00000.parquet")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "-c", MULTI_NODE, str(tmp_path / "urls"), str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "REFUSED:" in proc.stdout and "2-node cluster" in proc.stdout and "shared storage" in proc.stdout, \
        proc.stdout[-1000:] + proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing written
