"""Where a run's files live on a cluster: ``train.storage_path`` must be a place every node sees (a URI such as
``s3://`` or ``gs://``, or a folder the user declares shared with ``train.shared_storage``) once the cluster has
more than one node, since Ray Train writes checkpoints from every worker's node and reads them back on any; files
the workers write themselves (the best model by the dev set) go to the same storage."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from pgseg.config import ConfigError
from pipelines.storage import filesystem, is_uri


def cluster_nodes() -> int:
    """The attached cluster's live nodes that can run work."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0)


def check_storage(storage_path: str, shared: bool, nodes: int) -> None:
    """A ConfigError naming ``train.storage_path`` when a multi-node cluster would write to a node's own disk."""
    if nodes > 1 and not is_uri(storage_path) and not shared:
        raise ConfigError(f"train.storage_path: {storage_path} is a folder on this machine, but the cluster has {nodes} "
                          f"nodes: the workers on the others would write checkpoints where no one else reads them. "
                          f"Give a URI every node reaches (s3://bucket/runs, gs://...) or, for a folder every node "
                          f"mounts (NFS, a shared volume), set train.shared_storage=true")


def put_file(local: str | Path, target: str) -> None:
    """Copy ``local`` to ``target`` (a path or a URI), whole or not at all (a reader never sees half a file)."""
    if not is_uri(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        partial = f"{target}.partial"
        shutil.copyfile(local, partial)
        os.replace(partial, target)
        return
    fs, path = filesystem(target)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local), path, destination_filesystem=fs)  # object stores publish an object when it is closed


def upload_mode(setting: str, storage_path: str):
    """Ray Train's checkpoint upload mode for ``train.checkpoint_upload`` (auto: asynchronous to object storage,
    where an upload takes long, synchronous to a folder, where it is a local copy)."""
    from ray.train import CheckpointUploadMode

    if setting == "auto":
        setting = "async" if is_uri(storage_path) else "sync"
    return CheckpointUploadMode.ASYNC if setting == "async" else CheckpointUploadMode.SYNC
