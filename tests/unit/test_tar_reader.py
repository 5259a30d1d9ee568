"""The tar reader keeps every complete sample before a break and reports the break once, wherever the cut lies. The
expected samples come from the member offsets of the whole file, read back with tarfile."""
import io
import tarfile

import pytest

from pipelines.data.shard_view import first_samples
from pipelines.data.tar_reader import DAMAGED_TAR, REPEATED_KEY, tar_samples

SAMPLES = 20


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(i: int) -> list[tuple[str, bytes]]:
    return [(f"{i:05d}.jpg", bytes([i]) * (700 + 37 * i)), (f"{i:05d}.txt", f"caption {i}".encode()),
            (f"{i:05d}.json", b"{}")]


WHOLE = _tar([m for i in range(SAMPLES) for m in _members(i)])
with tarfile.open(fileobj=io.BytesIO(WHOLE)) as _t:
    INFOS = _t.getmembers()
END_OF_DATA = {}  # key -> where its last member's data ends
for _info in INFOS:
    END_OF_DATA[_info.name.split(".")[0]] = _info.offset_data + _info.size


def _read(data: bytes) -> list[dict]:
    return list(tar_samples(io.BytesIO(data), "shard.tar"))


def _complete_before(cut: int) -> list[str]:
    return [key for key, end in END_OF_DATA.items() if end <= cut]


def _check(rows: list[dict], cut: int | None) -> None:
    samples = [r for r in rows if "__error__" not in r]
    keys = [r["__key__"] for r in samples]
    assert len(keys) == len(set(keys))  # never twice
    for r in samples:
        i = int(r["__key__"])
        assert r["jpg"] == dict(_members(i))[f"{i:05d}.jpg"] and r["txt"] == f"caption {i}".encode()
    if cut is None:
        assert keys == list(END_OF_DATA) and len(rows) == SAMPLES
    else:
        assert keys == _complete_before(cut)
        assert [r["__error__"] for r in rows if "__error__" in r] == [DAMAGED_TAR]
        assert rows[-1]["__error__"] == DAMAGED_TAR and rows[-1]["__key__"] is None


def test_a_whole_tar_gives_every_sample_with_every_member_and_no_error():
    rows = _read(WHOLE)
    _check(rows, None)
    assert all(set(r) == {"__key__", "__url__", "jpg", "txt", "json"} for r in rows)


@pytest.mark.parametrize("where", ["inside_data", "at_header", "inside_header", "in_padding", "before_end_blocks",
                                   "after_first_header"])
def test_a_cut_keeps_every_complete_sample_before_it_and_counts_one_break(where):
    m = INFOS[3 * 7 + 1]  # sample 7's caption
    cut = {"inside_data": m.offset_data + m.size // 2,
           "at_header": INFOS[3 * 11].offset,
           "inside_header": INFOS[3 * 11].offset + 100,
           "in_padding": INFOS[3 * 11].offset_data + INFOS[3 * 11].size + 1,
           "before_end_blocks": END_OF_DATA[f"{SAMPLES - 1:05d}"] + (-END_OF_DATA[f"{SAMPLES - 1:05d}"]) % 512,
           "after_first_header": 512 + 10}[where]
    assert 0 < cut < len(WHOLE)
    rows = _read(WHOLE[:cut])
    _check(rows, cut)
    assert (len(rows) - 1 == SAMPLES) == (where == "before_end_blocks")  # only the missing end blocks lose nothing


def test_a_damaged_header_in_the_middle_ends_the_shard_there_and_is_counted():
    damaged = bytearray(WHOLE)
    header = INFOS[3 * 12].offset
    damaged[header + 148: header + 156] = b"99999999"  # the header checksum
    rows = _read(bytes(damaged))
    _check(rows, header)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0 a jpeg, not a tar" * 40, b"\0" * 100],
                         ids=["zero_length", "not_a_tar", "short_zeros"])
def test_an_empty_or_foreign_file_is_one_break_and_no_sample(data):
    rows = _read(data)
    assert [r.get("__error__") for r in rows] == [DAMAGED_TAR]


def test_a_key_that_comes_back_is_one_repeated_row_not_a_second_sample():
    members = _members(0) + _members(1) + [("00000.jpg", b"again"), ("00000.txt", b"again")] + _members(2)
    rows = _read(_tar(members))
    assert [(r["__key__"], r.get("__error__")) for r in rows] == [
        ("00000", None), ("00001", None), ("00000", REPEATED_KEY), ("00002", None)]
    assert rows[0]["jpg"] == dict(_members(0))["00000.jpg"]


def test_inspect_shows_the_samples_before_a_break_and_says_where_it_broke(tmp_path):
    cut = INFOS[3 * 4].offset + 100
    (tmp_path / "cut.tar").write_bytes(WHOLE[:cut])
    view = first_samples(tmp_path / "cut.tar", limit=10)
    assert [s.key for s in view.samples] == _complete_before(cut) and view.damage is not None
    assert "after 4 sample(s)" in view.damage and view.samples[0].members == {"jpg": 700, "txt": 9, "json": 2}
    (tmp_path / "whole.tar").write_bytes(WHOLE)
    view = first_samples(tmp_path / "whole.tar", limit=3)
    assert [s.caption for s in view.samples] == ["caption 0", "caption 1", "caption 2"] and view.damage is None


def test_the_ray_data_source_hands_on_every_row_in_blocks_and_the_break_last(tmp_path):
    import pandas as pd
    import pyarrow as pa

    from pipelines.data.ingest import READ_ROWS, TarShards

    many = _tar([(f"{i:05d}.{ext}", b"x") for i in range(READ_ROWS * 2 + 10) for ext in ("jpg", "txt")])
    with tarfile.open(fileobj=io.BytesIO(many)) as tar:
        cut = tar.getmembers()[2 * (READ_ROWS * 2 + 5)].offset  # at the header of sample READ_ROWS * 2 + 5
    (tmp_path / "shard.tar").write_bytes(many[:cut])
    blocks = list(TarShards([str(tmp_path / "shard.tar")])._read_stream(pa.BufferReader(many[:cut]), "shard.tar"))
    assert [len(b) for b in blocks] == [READ_ROWS, READ_ROWS, 5 + 1]
    rows = pd.concat(blocks, ignore_index=True)
    assert rows["__key__"].iloc[:-1].tolist() == [f"{i:05d}" for i in range(READ_ROWS * 2 + 5)]
    assert rows["__error__"].iloc[-1] == DAMAGED_TAR and rows["__error__"].notna().sum() == 1
