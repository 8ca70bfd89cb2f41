"""data=abalone, the preset of data=table (conf/data/abalone.yaml): a bad row is named by file,
line and column, the holdout is the AWS sample's, the file comes from data.path, $ABALONE_DATA,
the training channel or the verified download, in that order."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from sklearn.model_selection import train_test_split

from abalone import dataset, source
from abalone.table import DataError
from conftest import REPO

GOOD = "M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15\nF,0.53,0.42,0.135,0.677,0.2565,0.1415,0.21,9\n"
UCI_SHA256 = "de37cdcdcaaa50c309d514f248f7c2302a5f1f88c168905eba23fe2fbc78449f"
COLUMNS = ["Sex", "Length", "Diameter", "Height", "Whole_weight", "Shucked_weight",
           "Viscera_weight", "Shell_weight", "Rings"]


def abalone_cfg(*overrides: str):
    """conf/data/abalone.yaml as a run composes it (its $ABALONE_DATA read now)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides)).data


@pytest.fixture(autouse=True)
def fresh_sources(monkeypatch):
    """Each test asks its servers afresh (a process asks a server once)."""
    monkeypatch.setattr(source, "_FETCHED", {})
    monkeypatch.delenv("SM_CHANNEL_TRAINING", raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "abalone.data"
    path.write_text(text)
    return path


def load(path: Path) -> dataset.Dataset:
    return dataset.load(abalone_cfg(f"data.path={path}", "data.test_fraction=0.2"))


@pytest.mark.parametrize("bad_line, column, words", [
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15", None, "expected 9 comma-separated fields"),
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15,1", None, "found 10"),
    ("X,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15", "column 1 (Sex)", "'X' is not one of"),
    ("M,abc,0.365,0.095,0.514,0.2245,0.101,0.15,15", "column 2 (Length)", "'abc' is not a number"),
    ("M,0.455,0.365,,0.514,0.2245,0.101,0.15,15", "column 4 (Height)", "a missing value"),
    ("M,0.455,0.365,0.095,nan,0.2245,0.101,0.15,15", "column 5 (Whole_weight)", "a missing value"),
    ("M,0.455,0.365,0.095,0.514,inf,0.101,0.15,15", "column 6 (Shucked_weight)", "not a finite"),
    ("M,0.455,0.365,0.095,0.514,0.2245,-0.1,0.15,15", "column 7 (Viscera_weight)",
     "-0.1 is not a finite number >= 0 (data.bounds.Viscera_weight)"),
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,7.5", "column 9 (Rings)",
     "7.5 is not a whole number >= 1"),
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,0", "column 9 (Rings)", "not a whole number >= 1"),
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,-3", "column 9 (Rings)",
     "not a whole number >= 1"),
])
def test_bad_row_names_file_line_and_column(tmp_path, bad_line, column, words):
    path = write(tmp_path, GOOD + bad_line + "\n" + GOOD)
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert f"{path}, line 3" in message
    assert words in message
    if column:
        assert column in message


def test_empty_file_and_binary_file_are_errors(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        load(write(tmp_path, "\n\n"))
    binary = tmp_path / "binary.data"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="cannot be read as CSV text"):
        load(binary)


def test_header_row_and_trailing_blank_lines_are_accepted(tmp_path):
    rows = "".join([GOOD] * 5)  # 10 rows: enough for the splits
    ds = load(write(tmp_path, ",".join(COLUMNS) + "\n" + rows + "\n\n"))
    frame = ds.splits.train
    assert len(ds.splits.train) + len(ds.splits.val) + len(ds.splits.test) == 10
    assert list(frame.columns) == COLUMNS
    assert sorted(set(frame["Rings"])) <= [9, 15] and frame.index.min() >= 2  # line 1: header


def test_real_file_loads_with_sample_holdout(data_file):
    ds = load(data_file)
    splits = ds.splits
    assert len(splits.train) + len(splits.val) + len(splits.test) == 4177
    assert ds.sha256 == UCI_SHA256
    # The sample splits its feature matrix; the holdout depends only on row count and seed.
    _, expected_test = train_test_split(np.arange(4177), test_size=0.2, random_state=42)
    # Rows are indexed by their line in the file (line 1 is row 0).
    assert splits.test.index.tolist() == (expected_test + 1).tolist()
    assert len(splits.train) + len(splits.val) == 4177 - len(expected_test)
    assert not set(splits.val.index) & set(splits.train.index)
    assert not set(splits.test.index) & (set(splits.train.index) | set(splits.val.index))
    # Today's types: Sex text, the measurements float64, Rings int64.
    assert str(splits.test["Length"].dtype) == "float64"
    assert str(splits.test["Rings"].dtype) == "int64"
    assert ds.spec["vocabulary"]["Sex"] == ["M", "F", "I"] and ds.spec["declared"] == ["Sex"]
    assert ds.model_name == "abalone-tensorflow-model"


def test_split_seed_moves_validation_rows_but_not_the_holdout(data_file):
    a = dataset.load(abalone_cfg(f"data.path={data_file}", "data.split_seed=0")).splits
    b = dataset.load(abalone_cfg(f"data.path={data_file}", "data.split_seed=1")).splits
    assert a.test.index.tolist() == b.test.index.tolist()
    assert a.val.index.tolist() != b.val.index.tolist()


def test_path_sources_in_order(tmp_path, monkeypatch):
    from_cfg, from_env = write(tmp_path, GOOD), tmp_path / "env.data"
    from_env.write_text(GOOD)
    channel = tmp_path / "channel"
    channel.mkdir()
    (channel / "abalone.data").write_text(GOOD)
    monkeypatch.setenv("SM_CHANNEL_TRAINING", str(channel))
    monkeypatch.setenv("ABALONE_DATA", str(from_env))
    assert source.locate(abalone_cfg(f"data.path={from_cfg}")).path == from_cfg
    assert source.locate(abalone_cfg()).path == from_env
    monkeypatch.delenv("ABALONE_DATA")
    assert source.locate(abalone_cfg()).path == channel / "abalone.data"
    monkeypatch.setenv("ABALONE_DATA", str(tmp_path / "missing.data"))
    with pytest.raises(DataError, match=r"data.path \(\$ABALONE_DATA\) points at .*missing.data"):
        source.locate(abalone_cfg())


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_is_verified_and_cached(tmp_path, monkeypatch, file_server):
    monkeypatch.delenv("ABALONE_DATA", raising=False)
    root, url = file_server
    (root / "abalone.data").write_text(GOOD)
    digest = hashlib.sha256(GOOD.encode()).hexdigest()
    cfg = abalone_cfg(f"data.url={url}/abalone.data", f"data.sha256={digest}",
                      f"data.cache_dir={tmp_path / 'cache'}")
    located = source.locate(cfg)
    assert located.path.parent == tmp_path / "cache" and located.path.name.endswith("abalone.data")
    assert located.path.read_text() == GOOD and located.sha256 == digest
    assert located.tags["dataset.source"] == f"{url}/abalone.data"
    (root / "abalone.data").unlink()  # a copy matching data.sha256 is used without asking
    monkeypatch.setattr(source, "_FETCHED", {})
    again = source.locate(cfg)
    assert again.path == located.path
    assert again.tags["dataset.check"] == "cached copy matches data.sha256; the server was not asked"


def test_download_with_wrong_checksum_is_an_error_and_not_cached(tmp_path, monkeypatch,
                                                                 file_server):
    monkeypatch.delenv("ABALONE_DATA", raising=False)
    root, url = file_server
    (root / "abalone.data").write_text(GOOD + "tampered\n")
    cache = tmp_path / "cache"
    cfg = abalone_cfg(f"data.url={url}/abalone.data", f"data.cache_dir={cache}")
    with pytest.raises(DataError, match=r"sha256 .* expected de37cd.*data\.path=.*ABALONE_DATA"
                       ) as info:
        source.locate(cfg)
    # The URL is named, not the cache's file.
    assert f"downloaded from {url}/abalone.data" in str(info.value)
    assert str(cache) not in str(info.value)
    assert list(cache.iterdir()) == []


def test_failed_download_says_how_to_use_a_local_copy(tmp_path, monkeypatch, file_server):
    monkeypatch.delenv("ABALONE_DATA", raising=False)
    _, url = file_server
    cfg = abalone_cfg(f"data.url={url}/nothing-here", f"data.cache_dir={tmp_path}")
    with pytest.raises(DataError, match=r"could not download .*404.*data\.path="):
        source.locate(cfg)
