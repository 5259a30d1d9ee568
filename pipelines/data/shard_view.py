"""A look inside one webdataset tar shard: its first samples' captions and member sizes (``pgseg data inspect``),
read by the training reader, so a damaged shard shows what training would get from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.data.tar_reader import TEXT_KEYS, tar_samples


@dataclass
class SampleView:
    key: str
    caption: str | None = None
    members: dict[str, int] = field(default_factory=dict)  # extension -> bytes


@dataclass
class ShardView:
    samples: list[SampleView]
    damage: str | None = None  # why reading stopped early, with how many samples came before


def first_samples(path: str | Path, limit: int) -> ShardView:
    """The first ``limit`` samples of a tar shard (the rest of the file is not read) and, when the tar breaks
    before, what broke. Raises ValueError naming the file when it cannot be opened."""
    views: list[SampleView] = []
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
    with stream:
        for sample in tar_samples(stream, str(path)):
            if "__error__" in sample:
                if sample["__key__"] is None:
                    return ShardView(views, f"{path}: not a readable tar shard after {len(views)} sample(s) "
                                            f"({sample['__reason__']})")
                continue
            if len(views) == limit:
                break
            text = next((sample[k] for k in TEXT_KEYS if k in sample), None)
            views.append(SampleView(sample["__key__"], text.decode("utf-8", "replace") if text is not None else None,
                                    {k: len(v) for k, v in sample.items() if not k.startswith("__")}))
    return ShardView(views)
