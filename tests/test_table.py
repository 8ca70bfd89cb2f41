"""data=table without Keras: real tables scikit-learn ships (diabetes, breast cancer, wine) written
to CSV and Parquet, read, checked (errors name file, line and column, or column and row), split
(stratified when classifying) and encoded for the model and the served model."""

from __future__ import annotations

import hashlib
import re
import http.server
import threading
from functools import partial

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from sklearn import datasets

from abalone import dataset, source
from abalone.config import TableDataConfig
from abalone.serving import encode, flag_name, input_name
from abalone.table import DataError

ABALONE_COLUMNS = ["Sex", "Length", "Diameter", "Height", "Whole_weight", "Shucked_weight",
                   "Viscera_weight", "Shell_weight", "Rings"]


def frames() -> dict[str, pd.DataFrame]:
    """The three tables, target column `target`; the cancer labels as their names."""
    cancer = datasets.load_breast_cancer(as_frame=True)
    frame = cancer.frame.copy()
    frame["target"] = frame["target"].map(dict(enumerate(cancer.target_names)))
    return {"diabetes": datasets.load_diabetes(as_frame=True, scaled=False).frame,
            "cancer": frame, "wine": datasets.load_wine(as_frame=True).frame}


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tables")
    paths = {}
    for name, frame in frames().items():
        frame.to_csv(root / f"{name}.csv", index=False)
        frame.to_parquet(root / f"{name}.parquet")
        paths[name] = root
    return root


@pytest.fixture(autouse=True)
def fresh_sources(monkeypatch):
    """Each test asks its servers afresh (a process asks a server once)."""
    monkeypatch.setattr(source, "_FETCHED", {})


def config(path, **keys):
    return OmegaConf.merge(OmegaConf.structured(TableDataConfig),
                           {"path": str(path), "target": "target", **keys})


@pytest.mark.parametrize("name, task, classes, words", [
    ("diabetes", "regression", None, "distinct whole numbers (> 20)"),
    ("cancer", "classification", ["benign", "malignant"], "non-numeric"),
    ("wine", "classification", [0, 1, 2], "3 distinct whole numbers"),
])
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_real_tables_load_with_the_task_inferred_and_why(tables, name, task, classes, words,
                                                         suffix, caplog):
    caplog.set_level("INFO", logger="abalone")
    ds = dataset.load(config(tables / f"{name}.{suffix}"))
    assert ds.task == task and ds.spec["classes"] == classes
    assert words in caplog.text and f"data.task: {task}" in caplog.text
    rows = len(frames()[name])
    assert len(ds.splits.train) + len(ds.splits.val) + len(ds.splits.test) == rows
    assert len(ds.splits.test) == pytest.approx(0.2 * rows, abs=1)
    assert ds.spec["numeric"] == [c for c in frames()[name].columns if c != "target"]
    # Statistics of the training rows only.
    train = ds.splits.train[ds.spec["numeric"]].to_numpy("float64")
    np.testing.assert_allclose(ds.spec["mean"], train.mean(axis=0))
    y = ds.targets(ds.splits.test)
    assert y.shape == (len(ds.splits.test), 1)
    if classes:
        assert set(np.ravel(y)) == set(range(len(classes)))


def test_classification_splits_are_stratified(tables):
    ds = dataset.load(config(tables / "wine.csv"))
    whole = frames()["wine"]["target"].value_counts(normalize=True).sort_index()
    for part in (ds.splits.train, ds.splits.val, ds.splits.test):
        share = part["target"].value_counts(normalize=True).sort_index()
        np.testing.assert_allclose(share, whole, atol=0.04)


def test_the_task_may_be_set(tables):
    ds = dataset.load(config(tables / "wine.csv", task="regression"))
    assert ds.task == "regression" and ds.spec["classes"] is None


def test_abalone_file_through_data_table_gives_the_abalone_splits(data_file):
    from test_data import abalone_cfg

    cfg = config(data_file, format="csv", header=False, columns=ABALONE_COLUMNS, target="Rings")
    ds, ours = dataset.load(cfg), dataset.load(abalone_cfg(f"data.path={data_file}"))
    assert ds.task == "regression" and ds.spec["categorical"] == ["Sex"]
    assert ds.spec["vocabulary"]["Sex"] == ["F", "I", "M"]
    for part in ("train", "val", "test"):
        ours_rows = getattr(ours.splits, part)
        np.testing.assert_array_equal(getattr(ds.splits, part)["Rings"].to_numpy(),
                                      ours_rows["Rings"].to_numpy())
        # CSV rows are indexed by their line in the file, in both.
        assert (getattr(ds.splits, part).index.to_numpy() == ours_rows.index.to_numpy()).all()


def write_csv(tmp_path, text: str):
    path = tmp_path / "t.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, keys, words", [
    ("a,b,y\n1,2,3\n", {"target": "z"}, "data.target='z' is not a column"),
    ("a,b,y\n1,2,3\n", {"target": "y", "features": ["a", "c"]}, "['c'], which are not columns"),
    ("a,b,y\n1,2,x\n3,4,x\n", {"target": "y"}, "the target has one class, 'x', in all 2 rows"),
    ("a,b,y\n1,2,3.5\n1,2,oops\n", {"target": "y", "task": "regression"},
     "line 3, column 3 (y): 'oops' is not a number"),
    ("a,b,y\n1,2,3.5\n1,,4.5\n", {"target": "y"},
     "line 3, column 2 (b): a missing value (1 in the column; data.missing=refuse"),
    ("a,b,y\n1,2,3.5\n1,2,\n", {"target": "y", "missing": "impute"},
     "line 3, column 3 (y): a missing value (1 in the column; the target is never imputed"),
    ("a,c,y\n1,p,1.5\n2,q,2.5\n3,r,3.5\n", {"target": "y", "max_categories": 2},
     "line 4, column 2 (c): more than data.max_categories=2 distinct values (3)"),
    ("a,b,y\n1,2,1.5\n1,inf,2.5\n", {"target": "y"},
     "line 3, column 2 (b): inf is not a finite number"),
])
def test_bad_tables_fail_naming_file_line_and_column(tmp_path, text, keys, words):
    path = write_csv(tmp_path, text)
    with pytest.raises(DataError) as info:
        dataset.load(config(path, **keys))
    assert str(path) in str(info.value) and words in str(info.value)


def test_bad_parquet_names_column_and_row(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1.0, None, 3.0], "y": [1.5, 2.5, 3.5]}).to_parquet(path)
    with pytest.raises(DataError, match=r"t.parquet, column a, row 1: a missing value"):
        dataset.load(config(path, target="y"))


def test_a_split_that_cannot_be_made_is_an_error(tmp_path):
    rows = "".join(f"{i},{'b' if i == 9 else 'a'}\n" for i in range(10))
    with pytest.raises(DataError, match=r"the rarest class, 'b', has 1 rows"):
        dataset.load(config(write_csv(tmp_path, "x,y\n" + rows), target="y"))
    with pytest.raises(DataError, match=r"cannot make the val split with data.val_fraction"):
        dataset.load(config(write_csv(tmp_path, "x,y\n1,1.5\n2,2.5\n"), target="y"))


def test_unknown_suffix_asks_for_the_format(tmp_path):
    path = tmp_path / "t.data"
    path.write_text("a,y\n1,2\n")
    with pytest.raises(DataError, match="set data.format=csv or data.format=parquet"):
        dataset.load(config(path, target="y"))


def mixed_table(tmp_path, missing: bool):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"size": rng.normal(10, 2, 60), "colour": rng.choice(["red", "blue"], 60),
                          "y": rng.normal(0, 1, 60)})
    if missing:
        frame.loc[[3, 20, 40], "size"] = np.nan
        frame.loc[[5, 30], "colour"] = None
    path = tmp_path / "mixed.csv"
    frame.to_csv(path, index=False)
    return path


def test_impute_fills_with_training_statistics_and_flags(tmp_path):
    ds = dataset.load(config(mixed_table(tmp_path, True), target="y", missing="impute"))
    spec = ds.spec
    train = ds.splits.train
    assert spec["fill"]["size"] == pytest.approx(train["size"].mean())
    assert spec["fill"]["colour"] == train["colour"].mode().iloc[0]
    rows = pd.DataFrame({"size": [None, 12.0], "colour": [None, "green"]})
    inputs, oov = encode(rows, spec)
    flags = {flag_name(c) for c in spec["flagged"]}
    assert {flag_name("size")} <= flags
    assert inputs[input_name("size")].ravel()[0] == pytest.approx(spec["fill"]["size"])
    assert inputs[flag_name("size")].ravel().tolist() == [1.0, 0.0]
    fill_index = spec["vocabulary"]["colour"].index(spec["fill"]["colour"]) + 1
    assert inputs[input_name("colour")].ravel().tolist() == [fill_index, 0]  # green: unknown
    assert oov == {"colour": 1}


def test_refused_rows_are_named_by_row_and_column(tmp_path):
    spec = dataset.load(config(mixed_table(tmp_path, False), target="y")).spec
    rows = pd.DataFrame({"size": [1.0, "big", None], "colour": ["red", None, "blue"]})
    with pytest.raises(MlflowException) as info:
        encode(rows, spec)
    message = info.value.message
    assert "2 of 3 rows" in message
    assert "row 1, column size: 'big' (allowed: a finite number)" in message
    assert "row 1, column colour: null/NaN" in message
    assert "row 2, column size: null/NaN" in message
    with pytest.raises(MlflowException, match=r"missing the columns \['colour'\]"):
        encode(rows[["size"]], spec)


def test_https_table_is_downloaded_once_and_checked(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    text = "a,y\n1,1.5\n2,2.5\n3,3.5\n4,4.5\n5,5.5\n6,6.5\n7,7.5\n8,8.5\n9,9.5\n10,1.5\n"
    (root / "t.csv").write_text(text)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/t.csv"
    try:
        digest = hashlib.sha256(text.encode()).hexdigest()
        cfg = config(url, target="y", sha256=digest, cache_dir=str(tmp_path / "cache"))
        ds = dataset.load(cfg)
        assert ds.sha256 == digest and ds.path.parent == tmp_path / "cache"
        with pytest.raises(DataError, match=f"downloaded from {url} has sha256 .*, expected 00"):
            source.locate(config(url, target="y", sha256="00" * 32,
                                 cache_dir=str(tmp_path / "cache")))
        (root / "t.csv").unlink()  # the cached copy is used from now on
        assert dataset.load(cfg).path == ds.path
    finally:
        server.shutdown()


def test_a_remote_table_that_changed_is_downloaded_again_and_recorded_without_its_password(
        tmp_path, caplog):
    # No data.sha256: every run asks the server (If-Modified-Since); a changed file is fetched
    # again, an unchanged one is not; offline, the cached copy is used with its age said.
    import os

    root = tmp_path / "www"
    root.mkdir()
    table = root / "t.csv"
    rows = "".join(f"{i},{i % 7 + 0.5}\n" for i in range(20))
    table.write_text("a,y\n" + rows)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://reader:hunter2@127.0.0.1:{server.server_address[1]}/t.csv"
    cfg = config(url, target="y", cache_dir=str(tmp_path / "cache"))
    try:
        first = source.locate(cfg)
        assert first.tags["dataset.check"] == "downloaded"
        assert first.source == url.replace("hunter2", "***")
        assert "hunter2" not in repr(first.tags) and "hunter2" not in first.source
        source._FETCHED.clear()  # as a later run, in another process, would
        assert source.locate(cfg).tags["dataset.check"] == "unchanged (HTTP 304 Not Modified)"

        table.write_text("a,y\n" + rows + "20,9.5\n")
        later = table.stat().st_mtime + 10  # Last-Modified counts whole seconds
        os.utime(table, (later, later))
        source._FETCHED.clear()
        changed = source.locate(cfg)
        assert changed.tags["dataset.check"] == "downloaded: it changed"
        assert changed.sha256 != first.sha256 and len(dataset.load(cfg).splits.train) > 0
        assert changed.sha256 == hashlib.sha256(table.read_bytes()).hexdigest()
    finally:
        server.shutdown()
        server.server_close()
    source._FETCHED.clear()
    offline = source.locate(cfg)
    assert offline.sha256 == changed.sha256
    assert "is unreachable" in offline.tags["dataset.check"]
    assert "using the copy downloaded" in offline.tags["dataset.check"]
    assert "hunter2" not in caplog.text


def test_relative_path_is_found_in_the_training_channel(tmp_path, monkeypatch):
    (tmp_path / "t.csv").write_text("a,y\n1,2\n")
    monkeypatch.setenv("SM_CHANNEL_TRAINING", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert source.locate(config("t.csv", target="y")).path == tmp_path / "t.csv"


def test_s3_table_is_revalidated_by_its_etag(tmp_path, monkeypatch):
    import boto3
    from moto import mock_aws

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="tables")
        s3.put_object(Bucket="tables", Key="dir/t.csv", Body=b"a,y\n1,2\n")
        cfg = config("s3://tables/dir/t.csv", target="y", cache_dir=str(tmp_path))
        first = source.locate(cfg)
        assert first.path.parent == tmp_path and first.path.name.endswith("-t.csv")
        assert first.path.read_bytes() == b"a,y\n1,2\n"
        assert first.tags["dataset.check"] == "downloaded" and first.tags["dataset.etag"]
        monkeypatch.setattr(source, "_FETCHED", {})  # as the next run, in a process of its own
        assert source.locate(cfg).tags["dataset.check"] == "unchanged (S3 ETag)"
        s3.put_object(Bucket="tables", Key="dir/t.csv", Body=b"a,y\n1,3\n")
        monkeypatch.setattr(source, "_FETCHED", {})
        changed = source.locate(cfg)
        assert changed.path == first.path and changed.path.read_bytes() == b"a,y\n1,3\n"
        assert changed.sha256 != first.sha256
        assert changed.tags["dataset.check"] == "downloaded: it changed"
        s3.delete_object(Bucket="tables", Key="dir/t.csv")
        monkeypatch.setattr(source, "_FETCHED", {})
        with pytest.raises(DataError, match=r"could not download s3://tables/dir/t.csv: .*404"):
            source.locate(cfg)  # gone from the bucket: not silently the old copy
        with pytest.raises(DataError, match=r"could not download s3://tables/gone.csv"):
            source.locate(config("s3://tables/gone.csv", target="y", cache_dir=str(tmp_path)))


def test_a_table_without_rows_or_too_small_for_its_splits_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"t.csv"):
        dataset.load(config(write_csv(tmp_path, "a,b,y\n"), target="y"))
    rows = "".join(f"{i},{i + 0.5}\n" for i in range(5))
    with pytest.raises(DataError, match=r"cannot make the test split with data.test_fraction=0.99"):
        dataset.load(config(write_csv(tmp_path, "x,y\n" + rows), target="y", test_fraction=0.99))


def test_whole_numbers_keep_their_type_and_are_checked_by_encode(tmp_path):
    """A whole-number column stays int64 in the splits (the rows a served model is shown), is
    declared Any in the signature (MLflow's long refuses a null, its double refuses int64), and
    encode takes ints, floats and text numbers, refusing a null (data.missing=refuse) or text
    by row and column."""
    from abalone.tracking.registry import input_schema

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"year": rng.integers(2007, 2011, 40), "code": rng.integers(1, 4, 40),
                          "size": rng.normal(size=40), "y": rng.normal(size=40)})
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    ds = dataset.load(config(path, target="y", categorical=["code"]))
    assert str(ds.splits.test["year"].dtype) == "int64"
    types = {c.name: c.to_dict()["type"] for c in input_schema(ds.splits.test[ds.columns]).inputs}
    assert types == {"year": "any", "code": "any", "size": "double"}
    rows = pd.DataFrame({"year": [2008, 2009.0, "2010"], "code": [2, 2.0, "2"],
                         "size": [0.1, 0.2, 0.3]}, dtype=object)
    inputs, _ = encode(rows, ds.spec)
    assert inputs[input_name("year")].ravel().tolist() == [2008, 2009, 2010]
    assert len(set(inputs[input_name("code")].ravel().tolist())) == 1  # one category: 2
    rows.loc[1, "year"], rows.loc[2, "year"] = None, "MMX"
    with pytest.raises(MlflowException) as info:
        encode(rows, ds.spec)
    assert "row 1, column year: null/NaN (allowed: a finite number)" in info.value.message
    assert "row 2, column year: 'MMX' (allowed: a finite number)" in info.value.message


def typo_table(n: int = 300) -> pd.DataFrame:
    """A numeric column `b` with one typo far down, more distinct values than max_categories."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": (rng.normal(size=n) * 50 + 170).round(1),
                          "y": rng.normal(size=n)}).astype({"b": object})
    frame.loc[250, "b"] = "abc"
    return frame


@pytest.mark.parametrize("suffix, where", [("csv", "line 252, column 2 (b)"),
                                           ("parquet", "column b, row 250")])
def test_a_typo_in_a_numeric_column_is_refused_not_taken_as_a_category(tmp_path, suffix, where,
                                                                       caplog):
    frame = typo_table()
    path = tmp_path / f"t.{suffix}"
    if suffix == "csv":
        frame.to_csv(path, index=False)
    else:  # a text column, as a file written from a spreadsheet's export would have it
        frame.astype({"b": str}).to_parquet(path)
    with pytest.raises(DataError) as info:
        dataset.load(config(path, target="y"))
    message = str(info.value)
    assert where in message and "'abc' is not a number, yet the column is numeric: 299 of its " \
        "300 values are numbers. 1 value is not a number (this is the first)" in message, message
    assert "data.categorical" in message
    # Saying it is a category is how a user keeps it, and the load says why it is one.
    caplog.set_level("INFO", logger="abalone")
    ds = dataset.load(config(path, target="y", categorical=["b"], max_categories=1000))
    assert ds.spec["categorical"] == ["b"]
    assert "data: categorical: b (listed in data.categorical)" in caplog.text


def test_a_typo_in_a_numeric_target_is_refused(tmp_path):
    frame = typo_table().rename(columns={"b": "target", "y": "b"})
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 252, column 2 \(target\): 'abc' is not a number"):
        dataset.load(config(path, target="target"))


@pytest.mark.parametrize("values, kind", [([[1, 2], [3], [4, 5]], "list<element: int64>"),
                                          ([{"x": 1}, {"x": 2}, {"x": 3}], "struct<x: int64>")])
def test_a_parquet_column_of_several_values_per_row_is_refused_naming_it(tmp_path, values, kind):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1.0, 2.0, 3.0], "tags": values, "y": [1.5, 2.5, 3.5]}).to_parquet(path)
    with pytest.raises(DataError, match=f"column tags: its Parquet type is {re.escape(kind)}, "
                                        "which holds several values per row"):
        dataset.load(config(path, target="y"))
