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
import json
import sys

import pyarrow.fs as pafs
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks

from pipelines import storage
from pipelines.data.download import DownloadSpec, download

urls, local, bucket = sys.argv[1:4]
spec = DownloadSpec(distributor="ray", image_size=64, number_sample_per_shard=16, processes_count=1, thread_count=4)


def listing():
    fs, path = storage.filesystem(bucket)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path.rsplit("/", 1)[-1]: [i.mtime_ns, i.size] for i in found if i.type == pafs.FileType.File}


cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
out = {}
try:
    out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
    try:
        download(urls, local, spec)
    except ValueError as exc:
        out["refused"] = str(exc)
    out["first"] = download(urls, bucket, spec)
    tasks = list_tasks(cluster.address, filters=[("name", "=", "ray_download")])  # this cluster, not the latest
    out["task_nodes"] = len({t.node_id for t in tasks if t.node_id})
    out["before"] = listing()
    # cut short: shard 1 never finished (its tar half there, no stats); the same command again
    storage.remove(storage.child(bucket, "00001_stats.json"))
    storage.write_bytes(storage.child(bucket, "00001.tar"), b"half a tar")
    out["again"] = download(urls, bucket, spec)
    out["after"] = listing()
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_ray_distributor_on_two_nodes_downloads_into_a_bucket_like_the_local_path(www, s3_server, tmp_path):
    """Two real raylets on this machine form a 2-node cluster: a node-local output folder is refused; into an S3
    bucket (moto on 127.0.0.1) img2dataset's Ray distributor downloads from a loopback HTTP server with tasks on
    both nodes, and its manifest (shards, samples, failure counts) is the multiprocessing path's; cut short and run
    again, only the unfinished shard is written again."""
    root, rows = www
    bucket = s3_server.bucket("downloads")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    with serve_directory(root) as base:
        write_url_list(rows + [{"path": "missing.jpg", "caption": "gone"}, {"path": "page.jpg", "caption": "html"}],
                       base, tmp_path / "urls")
        proc = subprocess.run([sys.executable, "-c", MULTI_NODE, str(tmp_path / "urls"), str(tmp_path / "out"),
                               f"{bucket}/shards"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert "RESULT " in proc.stdout, proc.stdout[-1000:] + proc.stderr[-3000:]
        local = download(tmp_path / "urls", tmp_path / "local", DownloadSpec(image_size=64, number_sample_per_shard=16,
                                                                            processes_count=1, thread_count=4))
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["nodes"] == 2
    assert "2-node cluster" in out["refused"] and "shared storage" in out["refused"]
    assert not (tmp_path / "out").exists()  # nothing written where it was refused
    first = out["first"]
    assert first == local  # the same shards, samples and failure counts as the multiprocessing path
    assert (first["samples"], first["attempted"], first["num_shards"]) == (40, 42, 3)
    assert first["failures"] == {"http_404": 1, "undecodable_image": 1}
    assert out["task_nodes"] == 2  # the shards' tasks ran on both nodes
    assert out["again"] == first
    before, after = out["before"], out["after"]
    assert {"manifest.json", "00000.tar", "00001.tar", "00002.tar"} <= set(before)
    untouched = [name for name in before if name.startswith(("00000", "00002"))]
    assert len(untouched) == 6 and [n for n in untouched if after[n] != before[n]] == [], (before, after)
    assert "00001_stats.json" in after and after["00001.tar"][1] == before["00001.tar"][1]  # whole again
