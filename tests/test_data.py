"""Data: validation errors name file/line/column, the holdout is the sample's, downloads verify."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.model_selection import train_test_split

from abalone import data
from abalone.config import DataConfig

GOOD = "M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15\nF,0.53,0.42,0.135,0.677,0.2565,0.1415,0.21,9\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "abalone.data"
    path.write_text(text)
    return path


@pytest.mark.parametrize("bad_line, column, words", [
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15", None, "expected 9 comma-separated fields"),
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15,1", None, "found 10"),
    ("X,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15", "column 1 (Sex)", "'X' is not one of"),
    ("M,abc,0.365,0.095,0.514,0.2245,0.101,0.15,15", "column 2 (Length)", "'abc' is not a number"),
    ("M,0.455,0.365,,0.514,0.2245,0.101,0.15,15", "column 4 (Height)", "'' is not a number"),
    ("M,0.455,0.365,0.095,nan,0.2245,0.101,0.15,15", "column 5 (Whole_weight)", "not a finite"),
    ("M,0.455,0.365,0.095,0.514,inf,0.101,0.15,15", "column 6 (Shucked_weight)", "not a finite"),
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,7.5", "column 9 (Rings)", "not a positive int"),
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,0", "column 9 (Rings)", "not a positive int"),
    ("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,-3", "column 9 (Rings)", "not a positive int"),
])
def test_bad_row_names_file_line_and_column(tmp_path, bad_line, column, words):
    path = write(tmp_path, GOOD + bad_line + "\n" + GOOD)
    with pytest.raises(data.DataError) as info:
        data.load(path)
    message = str(info.value)
    assert f"{path}, line 3" in message
    assert words in message
    if column:
        assert column in message


def test_empty_file_and_binary_file_are_errors(tmp_path):
    with pytest.raises(data.DataError, match="no data rows"):
        data.load(write(tmp_path, "\n\n"))
    binary = tmp_path / "binary.data"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(data.DataError, match="cannot be read as CSV text"):
        data.load(binary)


def test_header_row_and_trailing_blank_lines_are_accepted(tmp_path):
    frame = data.load(write(tmp_path, ",".join(data.COLUMNS) + "\n" + GOOD + "\n\n"))
    assert len(frame) == 2
    assert list(frame.columns) == list(data.COLUMNS)
    assert frame["Rings"].tolist() == [15, 9]


def test_real_file_loads_with_sample_holdout(data_file):
    frame = data.load(data_file)
    assert len(frame) == 4177
    assert data.sha256_of(data_file) == DataConfig.sha256
    splits = data.split(frame, OmegaConf.structured(DataConfig))
    # The sample splits its feature matrix; the holdout depends only on row count and seed.
    _, expected_test = train_test_split(np.arange(len(frame)), test_size=0.2, random_state=42)
    assert splits.test.index.tolist() == expected_test.tolist()
    assert len(splits.train) + len(splits.val) == len(frame) - len(expected_test)
    assert not set(splits.val.index) & set(splits.train.index)
    assert not set(splits.test.index) & (set(splits.train.index) | set(splits.val.index))


def test_split_seed_moves_validation_rows_but_not_the_holdout(data_file):
    frame = data.load(data_file)
    a = data.split(frame, OmegaConf.structured(DataConfig(split_seed=0)))
    b = data.split(frame, OmegaConf.structured(DataConfig(split_seed=1)))
    assert a.test.index.tolist() == b.test.index.tolist()
    assert a.val.index.tolist() != b.val.index.tolist()


def test_path_sources_in_order(tmp_path, monkeypatch):
    from_cfg, from_env = write(tmp_path, GOOD), tmp_path / "env.data"
    from_env.write_text(GOOD)
    monkeypatch.setenv(data.DATA_ENV, str(from_env))
    assert data.resolve_path(OmegaConf.structured(DataConfig(path=str(from_cfg)))) == from_cfg
    assert data.resolve_path(OmegaConf.structured(DataConfig())) == from_env
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "missing.data"))
    with pytest.raises(data.DataError, match="ABALONE_DATA points at .*missing.data"):
        data.resolve_path(OmegaConf.structured(DataConfig()))


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
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    root, url = file_server
    (root / "abalone.data").write_text(GOOD)
    digest = hashlib.sha256(GOOD.encode()).hexdigest()
    cfg = OmegaConf.structured(DataConfig(url=f"{url}/abalone.data", sha256=digest,
                                          cache_dir=str(tmp_path / "cache")))
    path = data.resolve_path(cfg)
    assert path == tmp_path / "cache" / "abalone.data"
    assert path.read_text() == GOOD
    (root / "abalone.data").unlink()  # a second call uses the verified cache, no download
    assert data.resolve_path(cfg) == path


def test_download_with_wrong_checksum_is_an_error_and_not_cached(tmp_path, monkeypatch,
                                                                 file_server):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    root, url = file_server
    (root / "abalone.data").write_text(GOOD + "tampered\n")
    cache = tmp_path / "cache"
    cfg = OmegaConf.structured(DataConfig(url=f"{url}/abalone.data", cache_dir=str(cache)))
    with pytest.raises(data.DataError, match=r"sha256 .* expected de37cd.*data\.path=.*ABALONE_DATA"):
        data.resolve_path(cfg)
    assert list(cache.iterdir()) == []


def test_failed_download_says_how_to_use_a_local_copy(tmp_path, monkeypatch, file_server):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    _, url = file_server
    cfg = OmegaConf.structured(DataConfig(url=f"{url}/nothing-here", cache_dir=str(tmp_path)))
    with pytest.raises(data.DataError, match=r"could not download .*404.*data\.path="):
        data.resolve_path(cfg)
