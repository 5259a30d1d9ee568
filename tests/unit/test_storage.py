"""pipelines/storage.py on local folders and file:// URIs (the same calls as on s3://, which the integration tests
run against moto), the manifest lookup built on it, and the checkpoint upload mode."""
from __future__ import annotations

import json

import pytest

from pipelines import storage
from pipelines.data.download import manifest_of, read_manifest


@pytest.mark.parametrize("uri", [False, True])
def test_files_sizes_writes_and_removal_read_the_same_through_a_path_or_a_file_uri(tmp_path, uri):
    root = tmp_path.as_uri() if uri else str(tmp_path)
    storage.write_bytes(storage.child(root, "a.bin"), b"12345")
    (tmp_path / "sub").mkdir()
    storage.write_bytes(storage.child(root, "sub/b.bin"), b"12")
    assert storage.files(root) == {"a.bin": 5}
    assert storage.files(root, recursive=True) == {"a.bin": 5, "sub/b.bin": 2}
    assert storage.read_bytes(storage.child(root, "sub/b.bin")) == b"12"
    assert storage.is_file(storage.child(root, "a.bin")) and not storage.is_file(storage.child(root, "sub"))
    assert storage.holds_anything(root) and not storage.exists(storage.child(root, "none"))
    assert storage.files(storage.child(root, "none")) == {}
    storage.remove(storage.child(root, "a.bin"))
    storage.remove(storage.child(root, "a.bin"))  # gone already: nothing to do
    storage.remove(storage.child(root, "sub/b.bin"))
    assert storage.files(root, recursive=True) == {} and storage.holds_anything(root)  # the empty folder "sub"
    assert not storage.holds_anything(storage.child(root, "sub"))


def test_a_local_write_is_whole_or_not_at_all_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "m.json"
    storage.write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}" and [p.name for p in target.parent.iterdir()] == ["m.json"]


def test_writable_names_the_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"download output .*file: is a file, not a folder"):
        storage.writable(tmp_path / "file", "download output")
    assert storage.writable(tmp_path / "new", "out") == str(tmp_path / "new") and (tmp_path / "new").is_dir()


def test_a_manifest_is_found_from_its_folder_or_its_own_path_and_nowhere_else(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "manifest.json").write_text(json.dumps({"samples": 3, "shards": []}))
    (tmp_path / "bare").mkdir()
    assert manifest_of(tmp_path / "set") == str(tmp_path / "set" / "manifest.json")
    assert manifest_of(tmp_path / "set" / "manifest.json") == str(tmp_path / "set" / "manifest.json")
    assert manifest_of((tmp_path / "set").as_uri()) == (tmp_path / "set").as_uri() + "/manifest.json"
    assert manifest_of(tmp_path / "bare") is None and manifest_of(str(tmp_path / "*.tar")) is None
    assert read_manifest((tmp_path / "set").as_uri())["samples"] == 3
    (tmp_path / "bare" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid manifest"):
        read_manifest(tmp_path / "bare")


def test_checkpoint_upload_auto_is_asynchronous_to_object_storage_only():
    from ray.train import CheckpointUploadMode

    from pipelines.train.storage import upload_mode

    assert upload_mode("auto", "s3://bucket/runs") == CheckpointUploadMode.ASYNC
    assert upload_mode("auto", "/data/runs") == CheckpointUploadMode.SYNC
    assert upload_mode("sync", "s3://bucket/runs") == CheckpointUploadMode.SYNC
    assert upload_mode("async", "/data/runs") == CheckpointUploadMode.ASYNC
