"""The Abalone data: where the file comes from, what a valid row is, and how rows are split.

Source, in order: `data.path`, `$ABALONE_DATA`, `$SM_CHANNEL_TRAINING/abalone.data` (the DLC and
SageMaker training-job convention), a cache of the UCI file downloaded on first use and verified
by sha256. Every row is checked before anything trains; an error names the file,
line and column. The test rows are the AWS sample's holdout (scikit-learn
`train_test_split(test_size=0.2, random_state=42)` over the file's row order) so results compare
with it; validation rows come out of the rest with `data.split_seed`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from abalone.config import AbaloneError
from abalone.serving import FEATURE_COLUMNS, NUMERIC_COLUMNS, SEX_VALUES

TARGET = "Rings"
COLUMNS = (*FEATURE_COLUMNS, TARGET)
DATA_ENV = "ABALONE_DATA"


class DataError(AbaloneError, ValueError):
    """The data file is missing, unreachable or has a bad row; the message says where."""


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_path(data_cfg) -> Path:
    """The local file to read: data.path, else $ABALONE_DATA, else abalone.data in the SageMaker
    training channel ($SM_CHANNEL_TRAINING, when it has one), else the verified UCI cache."""
    for source, value in (("data.path", data_cfg.path), (DATA_ENV, os.environ.get(DATA_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise DataError(f"{source} points at {path}, which is not a file")
            return path
    channel = os.environ.get("SM_CHANNEL_TRAINING")
    if channel and (Path(channel) / "abalone.data").is_file():
        return Path(channel) / "abalone.data"
    return _cached_download(data_cfg.url, data_cfg.sha256, Path(data_cfg.cache_dir).expanduser())


def _cached_download(url: str, sha256: str, cache_dir: Path) -> Path:
    target = cache_dir / "abalone.data"
    if target.is_file() and sha256_of(target) == sha256:
        return target
    hint = (f"Download it yourself and point at the local copy with data.path=/path/to/abalone.data "
            f"or {DATA_ENV}=/path/to/abalone.data.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download next to the target and rename only once the checksum matches, so an interrupted
    # or corrupted download never becomes the cache.
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=".abalone-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            out.write(response.read())
        got = sha256_of(tmp)
        if got != sha256:
            raise DataError(f"the file downloaded from {url} has sha256 {got}, expected {sha256}. "
                            + hint)
        tmp.replace(target)
    except OSError as err:  # URLError, timeouts and refused connections are OSErrors
        raise DataError(f"could not download the Abalone data from {url}: {err}. " + hint) from err
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load(path: Path) -> pd.DataFrame:
    """Read and validate the UCI file; raise DataError at the first bad field. A sweep's trials
    share one read of the unchanged file (don't modify the frame: split copies its rows)."""
    stat = path.stat()
    return _read(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _read(path: Path, mtime_ns: int, size: int) -> pd.DataFrame:
    rows: list[list] = []
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        try:
            lines = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{path}: cannot be read as CSV text: {err}") from err
    while lines and not any(field.strip() for field in lines[-1]):
        lines.pop()  # trailing blank lines
    if lines and [c.strip().lower() for c in lines[0]] == [c.lower() for c in COLUMNS]:
        lines[0] = None  # an optional header row naming the columns
    for line_no, fields in enumerate(lines, start=1):
        if fields is not None:
            rows.append(_parse_row(path, line_no, fields))
    if not rows:
        raise DataError(f"{path}: no data rows")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame[list(NUMERIC_COLUMNS)] = frame[list(NUMERIC_COLUMNS)].astype("float64")
    frame[TARGET] = frame[TARGET].astype("int64")
    return frame


def _parse_row(path: Path, line_no: int, fields: list[str]) -> list:
    where = f"{path}, line {line_no}"
    if len(fields) != len(COLUMNS):
        raise DataError(f"{where}: expected {len(COLUMNS)} comma-separated fields "
                        f"({', '.join(COLUMNS)}), found {len(fields)}")
    sex = fields[0].strip()
    if sex not in SEX_VALUES:
        raise DataError(f"{where}, column 1 (Sex): {sex!r} is not one of M, F, I")
    values: list = [sex]
    for col, (name, raw) in enumerate(zip(NUMERIC_COLUMNS, fields[1:8]), start=2):
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{where}, column {col} ({name}): {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{where}, column {col} ({name}): {raw!r} is not a finite number")
        values.append(value)
    raw = fields[8].strip()
    if not raw.isdigit() or int(raw) < 1:
        raise DataError(f"{where}, column 9 ({TARGET}): {raw!r} is not a positive integer")
    values.append(int(raw))
    return values


def split(frame: pd.DataFrame, data_cfg) -> Splits:
    # Keras imports scikit-learn anyway (its sklearn wrappers), so this import costs nothing extra.
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(frame, test_size=data_cfg.test_fraction,
                                  random_state=data_cfg.holdout_seed)
    train, val = train_test_split(rest, test_size=data_cfg.val_fraction,
                                  random_state=data_cfg.split_seed)
    return Splits(train=train, val=val, test=test)


def fit_arguments(train: tuple[dict, np.ndarray], val: tuple[dict, np.ndarray],
                  batch_size: int, seed: int, backend: str) -> dict:
    """The data arguments of `model.fit`. Under TensorFlow: cached tf.data pipelines (given
    NumPy arrays, Keras rebuilds its data adapter every epoch, about half an epoch's time here);
    under other backends the arrays, which their trainers iterate directly. Validation rows go
    in one batch."""
    val_rows = len(val[1])
    if backend != "tensorflow":
        return {"x": train[0], "y": train[1], "batch_size": batch_size, "shuffle": True,
                "validation_data": val, "validation_batch_size": val_rows}
    import tensorflow as tf

    rows = tf.data.Dataset.from_tensor_slices(train).cache()
    rows = rows.shuffle(len(train[1]), seed=seed, reshuffle_each_iteration=True)
    return {"x": rows.batch(batch_size).prefetch(tf.data.AUTOTUNE),
            "shuffle": False,  # the pipeline shuffles; Keras warns if told to as well
            "validation_data": tf.data.Dataset.from_tensor_slices(val).batch(val_rows).cache()}


def target(frame: pd.DataFrame) -> np.ndarray:
    return frame[TARGET].to_numpy("float32").reshape(-1, 1)
