"""Each source reader on small files in its real format, through the real Ray Data stage."""
import io
import json
import zipfile

import pandas as pd
import pytest

from pipelines.data.sources import RULES, SourceSpec, build_url_list, clean_yfcc_caption


def _read(out):
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))], ignore_index=True)


def _report(out):
    return json.loads((out / "sources_report.json").read_text())


def test_cc3m_cc12m_rules_dedup_and_report(ray_local, tmp_path):
    (tmp_path / "cc3m.tsv").write_text(
        "a dog on  the grass\thttp://h/1.jpg\n"   # kept (spaces collapsed)
        "\thttp://h/2.jpg\n"                       # empty caption
        "a cat\tftp://h/3.jpg\n"                   # not http(s)
        "a line without a tab\n"                   # malformed
        "same image again\thttp://h/1.jpg\n"       # duplicate url
        "last one\thttps://h/4.jpg\n")
    (tmp_path / "cc12m.tsv").write_text("url\tcaption\nhttp://h/5.jpg\ta bird\nhttp://h/1.jpg\tfrom twelve\nnot a url\tx\n")
    out = tmp_path / "urls"
    report = build_url_list([SourceSpec("cc3m", [str(tmp_path / "cc3m.tsv")]),
                             SourceSpec("cc12m", [str(tmp_path / "cc*2m.tsv")])], out, seed=1)
    rows = _read(out)
    assert list(rows.columns) == ["url", "caption", "source", "key"]
    assert sorted(rows.url) == ["http://h/1.jpg", "http://h/5.jpg", "https://h/4.jpg"]
    assert rows.url.is_unique and rows.key.is_unique and rows.key.str.len().eq(16).all()
    assert report.counts["cc3m"] == {"read": 6, "malformed": 1, "empty_caption": 1, "bad_url": 1,
                                     "short_caption": 0, "duplicate_url": 2, "written": 1}
    assert report.counts["cc12m"] == {"read": 3, "malformed": 0, "empty_caption": 0, "bad_url": 1,
                                      "short_caption": 0, "duplicate_url": 0, "written": 2}
    assert _report(out)["total"]["written"] == len(rows) == 3
    # the same inputs and seed give the same file; the output is replaced, not mixed
    again = build_url_list([SourceSpec("cc3m", [str(tmp_path / "cc3m.tsv")]),
                            SourceSpec("cc12m", [str(tmp_path / "cc12m.tsv")])], out, seed=1)
    assert again.total == report.total and _read(out).equals(rows)
    assert not list(tmp_path.glob(".urls.*"))  # no staging left behind
    # a file the user put there is neither deleted nor replaced: the command refuses (before reading anything)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes.txt.*--overwrite"):
        build_url_list([SourceSpec("cc3m", [str(tmp_path / "cc3m.tsv")])], out, seed=1)
    assert (out / "notes.txt").read_text() == "mine" and _read(out).equals(rows)
    build_url_list([SourceSpec("cc3m", [str(tmp_path / "cc3m.tsv")])], out, seed=1, overwrite=True)
    assert not (out / "notes.txt").exists() and len(_read(out)) == 2


def test_redcaps_files_and_zip(ray_local, tmp_path):
    def annotations(sub, items):
        return json.dumps({"info": {"subreddit": sub}, "annotations": items})

    (tmp_path / "earthporn_2019.json").write_text(annotations("earthporn", [
        {"image_id": "a", "url": "https://i.redd.it/a.jpg", "caption": "sunset over the lake"},
        {"image_id": "b", "url": "https://i.redd.it/b.jpg"},  # no caption key: malformed
    ]))
    (tmp_path / "broken.json").write_text("{ not json")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("annotations/cats_2020.json", annotations("cats", [
            {"url": "https://i.redd.it/c.jpg", "caption": "my cat"},
            {"url": "https://i.redd.it/a.jpg", "caption": "duplicate"}]))
    (tmp_path / "more.zip").write_bytes(buf.getvalue())
    out = tmp_path / "urls"
    report = build_url_list([SourceSpec("redcaps", [str(tmp_path / "*.json"), str(tmp_path / "more.zip")])], out)
    rows = _read(out)
    assert sorted(rows.url) == ["https://i.redd.it/a.jpg", "https://i.redd.it/c.jpg"]
    assert report.counts["redcaps"]["malformed"] == 2 and report.counts["redcaps"]["duplicate_url"] == 1
    assert report.counts["redcaps"]["read"] == 5 and set(rows.source) == {"redcaps"}


def test_yfcc14m_join_caption_cleaning_and_short_captions(ray_local, tmp_path):
    (tmp_path / "subset.tsv").write_text("line\tphotoid\thash\n1\t101\tx\n2\t102\tx\n3\t103\tx\n4\t104\tx\n")

    def meta(pid, desc, url, marker="0"):
        fields = [""] * 23
        fields[0], fields[7], fields[14], fields[22] = str(pid), desc, url, marker
        return "\t".join(fields)

    (tmp_path / "yfcc100m_dataset").write_text("\n".join([
        meta(101, "A+%3Cb%3Ered%3C%2Fb%3E+boat+%26amp%3B+sea", "http://farm1/101.jpg"),
        meta(102, "boat", "http://farm1/102.jpg"),              # one word: short caption
        meta(103, "a+video", "http://farm1/103.mp4", marker="1"),  # a video
        meta(999, "not+in+the+subset", "http://farm1/999.jpg"),  # outside the subset: not read
        meta(104, "", "http://farm1/104.jpg"),                   # empty description
    ]) + "\n")
    out = tmp_path / "urls"
    report = build_url_list([SourceSpec("yfcc14m", [str(tmp_path / "subset.tsv")],
                                        yfcc_metadata=[str(tmp_path / "yfcc100m_dataset")])], out)
    rows = _read(out)
    assert rows.caption.tolist() == ["A red boat & sea"]
    c = report.counts["yfcc14m"]
    assert (c["read"], c["short_caption"], c["malformed"], c["empty_caption"], c["written"]) == (4, 1, 1, 1, 1)
    assert clean_yfcc_caption("%3Cp%3Etwo%3C%2Fp%3E++words") == "two words"


def test_tables_with_named_columns(ray_local, tmp_path):
    pd.DataFrame({"URL": ["http://h/1.jpg", "http://h/2.jpg"], "TEXT": ["one", None]}).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("link,alt\nhttp://h/3.jpg,three\n")
    out = tmp_path / "urls"
    report = build_url_list([SourceSpec("table", [str(tmp_path / "a.parquet")], name="parq", url_column="URL",
                                        caption_column="TEXT"),
                             SourceSpec("table", [str(tmp_path / "b.csv")], name="csv", url_column="link",
                                        caption_column="alt")], out)
    assert sorted(_read(out).caption) == ["one", "three"]
    assert report.counts["parq"]["empty_caption"] == 1 and report.counts["csv"]["written"] == 1
    with pytest.raises(Exception, match="no column 'caption'"):
        build_url_list([SourceSpec("table", [str(tmp_path / "b.csv")], url_column="link")], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        SourceSpec("laion", ["x"])
    with pytest.raises(ValueError, match="yfcc_metadata"):
        SourceSpec("yfcc14m", ["x"])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_url_list([SourceSpec("cc3m", [str(tmp_path / "nothing*.tsv")])], tmp_path / "out")
    assert set(RULES) == {"malformed", "empty_caption", "bad_url", "short_caption", "duplicate_url"}
