"""The project's content hashes (pipelines/digest.py): one helper per kind, the same answer wherever it is used."""
import pandas as pd

from pipelines.digest import file_digest, tree_digest, url_key, value_digest
from pipelines.data.shapes_world import write_url_list


def test_value_digest_ignores_key_order_and_sees_every_value():
    assert value_digest({"a": 1, "b": [1, 2]}) == value_digest({"b": [1, 2], "a": 1})
    assert value_digest({"a": 1, "b": [1, 2]}) != value_digest({"a": 1, "b": [2, 1]})


def test_file_and_tree_digests_follow_content_and_names(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.bin").write_bytes(b"1" * (3 << 20))  # more than one read block
    first, tree = file_digest(tmp_path / "t" / "x.bin"), tree_digest(tmp_path / "t")
    (tmp_path / "t" / "x.bin").write_bytes(b"1" * (3 << 20) + b"2")
    assert file_digest(tmp_path / "t" / "x.bin") != first and tree_digest(tmp_path / "t") != tree
    (tmp_path / "t" / "x.bin").rename(tmp_path / "t" / "y.bin")
    assert tree_digest(tmp_path / "t") not in (tree, tree_digest(tmp_path))


def test_the_shapes_world_keys_its_urls_as_the_sources_stage_does(tmp_path):
    write_url_list([{"path": "a.jpg", "caption": "a circle"}], "http://127.0.0.1:1/w", tmp_path / "urls")
    frame = pd.read_parquet(next((tmp_path / "urls").glob("*.parquet")))
    assert frame.key.tolist() == [url_key("http://127.0.0.1:1/w/a.jpg")] and len(frame.key[0]) == 16
