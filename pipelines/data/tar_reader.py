"""Webdataset samples from a tar stream, losing nothing that was read: every sample before a break comes out, then
one row that says the tar broke, wherever the cut lies.

Python's ``tarfile`` in stream mode ends its iteration quietly when the file stops at a member header, inside one or
on a damaged one (only a cut inside a member's data raises), so a truncated shard would look whole. The reader asks
``tarfile`` (through its ``tarinfo`` class hook) why the headers ended: only the end-of-archive block is a proper end.

Samples group contiguous members by webdataset's key rule (the path up to the first dot of the file name). At a
break, the sample in progress comes out when it already holds an image and a caption (all a trainer uses); otherwise
it is part of the break. A key seen again after its run ended (not written by img2dataset) is not merged into the
earlier sample: its members become one ``repeated_key`` row.
"""
from __future__ import annotations

import logging
import re
import tarfile
from typing import IO, Any, Iterator

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("txt", "text")
DAMAGED_TAR = "damaged_tar"
REPEATED_KEY = "repeated_key"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class _Header(tarfile.TarInfo):
    """A TarInfo that notes on the TarFile why reading headers stopped."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.pgseg_end = exc  # type: ignore[attr-defined]
            raise


def has_image_and_caption(sample: dict[str, Any]) -> bool:
    return any(sample.get(k) for k in IMAGE_KEYS) and any(sample.get(k) for k in TEXT_KEYS)


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, bytes]]:
    for info in tar:
        if not info.isreg():
            continue
        match = _KEY.match(info.name)
        if match is not None:
            yield match.group(1), match.group(2), tar.extractfile(info).read()


def tar_samples(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """Samples (``__key__``, ``__url__`` and one bytes value per extension) of the tar in ``stream``; never raises on
    a damaged file: its complete samples come out, then ``{"__key__": None, "__url__": url, "__error__":
    "damaged_tar", "__reason__": ...}``."""
    current: dict[str, Any] | None = None  # the sample in progress (None in a repeated run)
    run: str | None = None  # the key of the run of members being read
    seen: set[str] = set()
    count = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Header) as tar:
            for key, ext, data in _members(tar):
                if key == run:
                    if current is not None:
                        current[ext] = data
                    continue
                if current is not None:
                    count += 1
                    yield current
                seen.add(run)
                run, current = key, {"__key__": key, "__url__": url, ext: data}
                if key in seen:  # a run that starts again: never merged, never yielded as a sample twice
                    current = None
                    yield {"__key__": key, "__url__": url, "__error__": REPEATED_KEY}
            end = getattr(tar, "pgseg_end", None)
        if end is not None and not isinstance(end, tarfile.EOFHeaderError):
            raise tarfile.ReadError(f"the archive stops without its end block ({end})")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        if current is not None and has_image_and_caption(current):
            count += 1
            yield current
            current = None
        lost = f", sample {current['__key__']} cut" if current is not None else ""
        log.warning("ingest: %s is damaged after %d samples%s (%s): the rest of it is skipped", url, count, lost, exc)
        yield {"__key__": None, "__url__": url, "__error__": DAMAGED_TAR, "__reason__": str(exc)}
        return
    if current is not None:
        yield current
