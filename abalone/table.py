"""data=table: a CSV or Parquet table of the user's, read and checked before anything trains.

Every check names where the problem is: the file, line and column for CSV (line as in a text
editor, the header counted), the column and row (from 0) for Parquet. The frame keeps that
place as its index, so a later check (a class too rare to split) can name it too. What the model
and the served model need to know of the table (`spec`) is computed from the training rows only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from abalone.data import DataError, Splits, sha256_of
from abalone.table_serving import CLASSIFICATION, REGRESSION, plain, token

log = logging.getLogger(__name__)
# An integer target with at most this many distinct values is taken for class labels.
MAX_INFERRED_CLASSES = 20


# -- where the table comes from ---------------------------------------------------------------

def resolve(cfg) -> Path:
    """The local file of data.path: downloaded once into data.cache_dir for s3:// and https://,
    tried in the SageMaker training channel when relative; its sha256 checked when given."""
    source = str(cfg.path)
    if source.startswith(("s3://", "https://", "http://")):
        name = hashlib.sha256(source.encode()).hexdigest()[:16] + "-" + source.rsplit("/", 1)[-1]
        path = Path(cfg.cache_dir).expanduser() / name
        if not (path.is_file() and (not cfg.sha256 or sha256_of(path) == cfg.sha256)):
            _download(source, path)
    else:
        path = Path(source).expanduser()
        channel = os.environ.get("SM_CHANNEL_TRAINING")
        if not path.is_file() and not path.is_absolute() and channel:
            path = Path(channel) / path
        if not path.is_file():
            raise DataError(f"data.path points at {source}, which is not a file"
                            + (f" (nor is {path})" if str(path) != source else ""))
    if cfg.sha256 and sha256_of(path) != cfg.sha256:
        raise DataError(f"{path} has sha256 {sha256_of(path)}, but data.sha256 is {cfg.sha256}")
    return path


def _download(source: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".table-", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if source.startswith("s3://"):
            from abalone.aws import _s3_client, split_s3_uri

            bucket, key = split_s3_uri(source)
            _s3_client().download_file(bucket, key, str(tmp))
        else:
            with open(tmp, "wb") as out, urllib.request.urlopen(source, timeout=60) as response:
                out.write(response.read())
        tmp.replace(path)  # only a whole download becomes the cache
    except Exception as err:  # noqa: BLE001 - OSError, botocore's errors: all mean "not fetched"
        raise DataError(f"could not download data.path={source}: {type(err).__name__}: {err}. "
                        "Download it yourself and set data.path to the local copy.") from err
    finally:
        tmp.unlink(missing_ok=True)


# -- reading and checking ---------------------------------------------------------------------

def read(path: Path, cfg) -> tuple[pd.DataFrame, callable]:
    """The table as a frame indexed by its place in the file, and `where(row, column)`, the
    words that name a place in error messages."""
    fmt = cfg.format or {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet",
                         ".pq": "parquet"}.get(path.suffix.lower())
    if fmt not in ("csv", "parquet"):
        raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        "set data.format=csv or data.format=parquet")
    names = list(cfg.columns) if cfg.columns else None
    if fmt == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors have no common base
            raise DataError(f"{path}: cannot be read as Parquet: {err}") from err
        if names:
            frame.columns = names
        frame.index = pd.RangeIndex(len(frame), name="row")
        return frame, lambda row, col: f"{path}, column {col}, row {row}"
    try:
        frame = pd.read_csv(path, sep=cfg.sep, header=0 if cfg.header else None, names=names,
                            skip_blank_lines=False, skipinitialspace=True)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot be read as CSV (data.sep={cfg.sep!r}): {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    frame.index = pd.Index(np.arange(len(frame)) + 1 + int(cfg.header), name="line")
    frame = frame[~frame.isna().all(axis=1)]  # blank lines
    numbers = {c: i for i, c in enumerate(frame.columns, start=1)}
    return frame, lambda row, col: f"{path}, line {row}, column {numbers[col]} ({col})"


def load(path: Path, cfg) -> tuple[pd.DataFrame, dict]:
    """Read and check the table; return it (features and target only) and what the checks
    found: the task, the numeric and categorical columns and the classes."""
    frame, where = read(path, cfg)
    if frame.empty:
        raise DataError(f"{path}: no data rows")
    columns = list(frame.columns)
    if cfg.target not in columns:
        raise DataError(f"{path}: data.target={cfg.target!r} is not a column; columns: {columns}")
    features = list(cfg.features) if cfg.features else [c for c in columns if c != cfg.target]
    unknown = [c for c in [*features, *(cfg.categorical or [])] if c not in columns]
    if unknown or cfg.target in features:
        bad = unknown or [cfg.target]
        raise DataError(f"{path}: data.features/data.categorical name {bad}, which "
                        f"{'are not columns' if unknown else 'is the target'}; columns: {columns}")
    frame = frame[[*features, cfg.target]]
    categorical = (list(cfg.categorical) if cfg.categorical is not None else
                   [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])
                    or pd.api.types.is_bool_dtype(frame[c])])
    numeric = [c for c in features if c not in categorical]
    _check_missing(frame, features, cfg, where)
    for c in numeric:
        frame[c] = _numbers(frame[c], where, c, "a numeric feature (list it in "
                            "data.categorical if it holds categories)")
    for c in categorical:
        values = frame[c].dropna().map(token)
        distinct = values.unique()
        if len(distinct) > cfg.max_categories:
            first = values.index[~values.duplicated()][cfg.max_categories]
            raise DataError(f"{where(first, c)}: more than data.max_categories="
                            f"{cfg.max_categories} distinct values ({len(distinct)}); raise the "
                            "limit, or leave the column out of data.features")
    task, reason = infer_task(frame[cfg.target], cfg.task)
    log.info("data.task: %s (%s)", task, reason)  # on the terminal: abalone logs at INFO
    y = frame[cfg.target]
    classes = None
    if task == REGRESSION:
        frame[cfg.target] = _numbers(y, where, cfg.target, "the target of a regression")
    else:
        classes = sorted(y.unique().tolist(), key=token)
        if len(classes) < 2:
            raise DataError(f"{where(y.index[0], cfg.target)}: the target has one class, "
                            f"{classes[0]!r}, in all {len(y)} rows; nothing to classify")
    return frame, {"target": cfg.target, "task": task, "numeric": numeric,
                   "categorical": categorical, "classes": classes}


def infer_task(y: pd.Series, asked) -> tuple[str, str]:
    """(task, why): data.task when set, else from the target's values."""
    if asked is not None:
        return getattr(asked, "value", str(asked)), "data.task"
    distinct = y.nunique()
    if pd.api.types.is_bool_dtype(y) or not pd.api.types.is_numeric_dtype(y):
        return CLASSIFICATION, f"the target holds {distinct} distinct non-numeric values"
    if pd.api.types.is_float_dtype(y) and not np.all(np.mod(y, 1) == 0):
        return REGRESSION, "the target holds fractional numbers"
    if distinct <= MAX_INFERRED_CLASSES:
        return CLASSIFICATION, (f"the target holds {distinct} distinct whole numbers "
                                f"(<= {MAX_INFERRED_CLASSES}); set data.task=regression if they "
                                "are amounts")
    return REGRESSION, (f"the target holds {distinct} distinct whole numbers "
                        f"(> {MAX_INFERRED_CLASSES}); set data.task=classification if they are "
                        "labels")


def _check_missing(frame: pd.DataFrame, features: list[str], cfg, where) -> None:
    refused = [cfg.target] + (features if _missing(cfg) == "refuse" else [])
    for c in refused:
        missing = frame[c].isna()
        if missing.any():
            how = ("the target is never imputed" if c == cfg.target else
                   "data.missing=refuse; data.missing=impute fills it in and flags it")
            raise DataError(f"{where(missing.idxmax(), c)}: a missing value "
                            f"({int(missing.sum())} in the column; {how})")


def _missing(cfg) -> str:
    return getattr(cfg.missing, "value", str(cfg.missing))  # the enum, or a plain config's str


def _numbers(values: pd.Series, where, column: str, role: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = (numbers.isna() & values.notna()) | np.isinf(numbers)
    if bad.any():
        row = bad.idxmax()
        raise DataError(f"{where(row, column)}: {plain(values[row])} is not a finite number, and "
                        f"the column is {role}")
    return numbers


# -- splits and what the model learns of the training rows -----------------------------------

def split(frame: pd.DataFrame, info: dict, cfg, where_file: Path) -> Splits:
    """The holdout and validation rows as for data=abalone, stratified by class when
    classifying; a split left empty, or a class too rare for it, is an error."""
    from sklearn.model_selection import train_test_split

    stratify = info["task"] == CLASSIFICATION
    parts = {}
    rest = frame
    for name, fraction, seed in (("test", cfg.test_fraction, cfg.holdout_seed),
                                 ("val", cfg.val_fraction, cfg.split_seed)):
        key = "data.test_fraction" if name == "test" else "data.val_fraction"
        try:
            rest, parts[name] = train_test_split(
                rest, test_size=fraction, random_state=seed,
                stratify=rest[info["target"]].map(token) if stratify else None)
        except ValueError as err:
            counts = rest[info["target"]].map(token).value_counts()
            rare = (f"; the rarest class, {counts.index[-1]!r}, has {counts.iloc[-1]} rows"
                    if stratify else "")
            raise DataError(f"{where_file}: {len(rest)} rows cannot make the {name} split with "
                            f"{key}={fraction}{rare}: {err}") from err
    splits = Splits(train=rest, val=parts["val"], test=parts["test"])
    for name in ("train", "val", "test"):
        if len(getattr(splits, name)) == 0:
            raise DataError(f"{where_file}: the {name} split is empty ({len(frame)} rows)")
    return splits


def spec(train: pd.DataFrame, info: dict, cfg) -> dict:
    """What the model and the served model need to know of the table, from the training rows:
    the columns, normalisation statistics, vocabularies (index 0 is the out-of-vocabulary
    slot), the values that fill in a missing one, the classes."""
    impute = _missing(cfg) == "impute"
    numeric, categorical = info["numeric"], info["categorical"]
    vocab = {c: sorted(train[c].dropna().map(token).unique().tolist()) for c in categorical}
    fill = {c: float(train[c].mean()) for c in numeric}
    fill.update({c: train[c].dropna().map(token).mode().iloc[0] for c in categorical})
    values = train[numeric].fillna(pd.Series(fill)).to_numpy("float64")
    return {
        "target": info["target"], "task": info["task"],
        "classes": [c.item() if isinstance(c, np.generic) else c for c in info["classes"]]
        if info["classes"] is not None else None,
        "numeric": numeric, "categorical": categorical, "vocabulary": vocab,
        "mean": values.mean(axis=0).tolist(), "variance": values.var(axis=0).tolist(),
        "missing": "impute" if impute else "refuse",
        # Flags only for the columns the training rows miss values of.
        "flagged": [c for c in [*numeric, *categorical] if impute and train[c].isna().any()],
        "fill": fill,
    }
