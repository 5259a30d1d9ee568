"""A look inside one webdataset tar shard: its first samples' captions and member sizes (``pgseg data inspect``)."""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.data.ingest import TEXT_KEYS


@dataclass
class SampleView:
    key: str
    caption: str | None = None
    members: dict[str, int] = field(default_factory=dict)  # extension -> bytes


def first_samples(path: str | Path, limit: int) -> list[SampleView]:
    """The first ``limit`` samples of a tar shard, read member by member (the rest of the file is not read).
    Raises ValueError naming the file when it is not a readable tar."""
    samples: dict[str, SampleView] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key not in samples and len(samples) == limit:
                    break
                entry = samples.setdefault(key, SampleView(key))
                if ext in TEXT_KEYS:
                    entry.caption = tar.extractfile(member).read().decode("utf-8", "replace")
                else:
                    entry.members[ext] = member.size
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"{path}: not a readable tar shard ({exc})") from None
    return list(samples.values())
