"""A run's table (data=table, and data=abalone, its preset): a CSV or Parquet file read and
checked before anything trains.

Every check names where the problem is: the file, line and column for CSV (line as in a text
editor, the header counted), the column and row (from 0) for Parquet. The frame keeps that place
as its index, so a later check (a class too rare to split) can name it too. Columns keep the
types the file gives them (the registered model takes the same rows); numeric columns read as
text are the exception, converted once checked.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from abalone.config import AbaloneError
from abalone.serving import (CLASSIFICATION, REGRESSION, allowed_number, allowed_values, plain,
                             token, within)

log = logging.getLogger(__name__)
# An integer target with at most this many distinct values is taken for class labels.
MAX_INFERRED_CLASSES = 20
SUFFIXES = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet",
            ".pq": "parquet"}


class DataError(AbaloneError, ValueError):
    """The data is missing, unreachable or has a bad value; the message says where."""


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


# -- reading ----------------------------------------------------------------------------------

def file_format(path: Path, cfg) -> str:
    fmt = cfg.format or SUFFIXES.get(path.suffix.lower())
    if fmt not in ("csv", "parquet"):
        raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        "set data.format=csv or data.format=parquet")
    return fmt


def read(path: Path, cfg) -> tuple[pd.DataFrame, callable]:
    """The table as a frame indexed by its place in the file, and `where(row, column)`, the
    words that name a place in error messages."""
    names = list(cfg.columns) if cfg.columns else None
    if file_format(path, cfg) == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors have no common base
            raise DataError(f"{path}: cannot be read as Parquet: {err}") from err
        if names:
            frame.columns = names
        frame.index = pd.RangeIndex(len(frame), name="row")
        return frame, lambda row, col: f"{path}, column {col}, row {row}"
    header = check_fields(path, cfg.sep, names) or bool(cfg.header)
    try:
        frame = pd.read_csv(path, sep=cfg.sep, header=0 if header else None, names=names,
                            skip_blank_lines=False, skipinitialspace=True)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot be read as CSV text (data.sep={cfg.sep!r}): {err}"
                        ) from err
    frame.columns = [str(c).strip() for c in frame.columns]
    frame.index = pd.Index(np.arange(len(frame)) + 1 + int(header), name="line")
    frame = frame[~frame.isna().all(axis=1)]  # blank lines
    numbers = {c: i for i, c in enumerate(frame.columns, start=1)}
    return frame, lambda row, col: f"{path}, line {row}, column {numbers[col]} ({col})"


def check_fields(path: Path, sep: str, names: list[str] | None) -> bool:
    """Refuse a CSV line with more or fewer fields than the columns (pandas would fill a short
    one with missing values), naming it; return whether its first line names the columns
    `names` (a header-less file's, data.columns), which is then read as a header."""
    if len(sep) != 1:  # a regular expression: pandas's own checks only
        return False
    expected = len(names) if names else None
    described = f"({', '.join(map(str, names))})" if names else ""
    named = False
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=sep, skipinitialspace=True)
            for fields in reader:
                if not any(x.strip() for x in fields):
                    continue
                if expected is None:
                    expected, described = len(fields), f"as line {reader.line_num} has"
                if reader.line_num == 1 and names:
                    named = [x.strip().lower() for x in fields] == [str(n).lower() for n in names]
                if len(fields) != expected:
                    kind = "comma" if sep == "," else "tab" if sep == "\t" else repr(sep)
                    raise DataError(f"{path}, line {reader.line_num}: expected {expected} "
                                    f"{kind}-separated fields {described}, found {len(fields)}")
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot be read as CSV text: {err}") from err
    return named


def refuse_nested(path: Path, columns: list[str], names: list[str] | None) -> None:
    """Parquet list, struct, map and union columns: a model takes one value per row and cell."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    for i, arrow_field in enumerate(schema):
        name = names[i] if names and i < len(names) else arrow_field.name
        if name in columns and pa.types.is_nested(arrow_field.type):
            raise DataError(f"{path}, column {name}: its Parquet type is {arrow_field.type}, "
                            "which holds several values per row; a column must hold one number, "
                            "text or true/false per row: leave it out of data.features, or "
                            "flatten it into columns of their own")


# -- checking ---------------------------------------------------------------------------------

def load(path: Path, cfg) -> tuple[pd.DataFrame, dict]:
    """Read and check the table; return it (features and target only) and what the checks
    found: the task, the numeric and categorical columns (and why each is categorical), the
    classes."""
    frame, where = read(path, cfg)
    if frame.empty:
        raise DataError(f"{path}: no data rows")
    features = named_columns(frame, path, cfg)
    if file_format(path, cfg) == "parquet":
        refuse_nested(path, [*features, cfg.target], list(cfg.columns or []) or None)
    frame = frame[[*features, cfg.target]].copy()
    why = {c: categorical_why(frame[c], c, cfg, where) for c in [*features, cfg.target]}
    categorical = [c for c in features if why[c]]
    numeric = [c for c in features if not why[c]]
    check_missing(frame, features, cfg, where)
    bounds = {c: dict(cfg.bounds[c]) for c in (cfg.bounds or {})}
    for c in numeric:
        frame[c] = check_numbers(frame[c], where, c, bounds.get(c))
    for c in categorical:
        check_categories(frame[c], where, c, cfg, why[c])
    if categorical:
        log.info("data: categorical: %s", "; ".join(f"{c} ({why[c]})" for c in categorical))
    task, reason = infer_task(frame[cfg.target], cfg.task)
    log.info("data.task: %s (%s)", task, reason)  # on the terminal: abalone logs at INFO
    y, classes = frame[cfg.target], None
    if task == REGRESSION:
        frame[cfg.target] = check_numbers(y, where, cfg.target, bounds.get(cfg.target),
                                          "the target of a regression")
    else:
        classes = sorted(y.unique().tolist(), key=token)
        if len(classes) < 2:
            raise DataError(f"{where(y.index[0], cfg.target)}: the target has one class, "
                            f"{classes[0]!r}, in all {len(y)} rows; nothing to classify")
    return frame, {"target": cfg.target, "task": task, "features": features, "numeric": numeric,
                   "categorical": categorical, "declared": [c for c in categorical
                                                            if c in (cfg.categories or {})],
                   "bounds": {c: b for c, b in bounds.items() if c in numeric},
                   "classes": classes}


def named_columns(frame: pd.DataFrame, path: Path, cfg) -> list[str]:
    """The features; DataError if a setting names a column the table lacks."""
    columns = list(frame.columns)
    if cfg.target not in columns:
        raise DataError(f"{path}: data.target={cfg.target!r} is not a column; columns: {columns}")
    features = list(cfg.features) if cfg.features else [c for c in columns if c != cfg.target]
    for key, names in (("data.features", features), ("data.categorical", cfg.categorical or []),
                       ("data.categories", cfg.categories or {}), ("data.bounds", cfg.bounds or {})):
        unknown = [c for c in names if c not in columns]
        if unknown:
            raise DataError(f"{path}: {key} names {unknown}, which are not columns; "
                            f"columns: {columns}")
    if cfg.target in features:
        raise DataError(f"{path}: data.features names [{cfg.target!r}], which is the target")
    listed = set(cfg.categorical or []) | set(cfg.categories or {})
    misplaced = [c for c in cfg.bounds or {} if c in listed]
    if misplaced:
        raise DataError(f"{path}: data.bounds names {misplaced}, which are categorical")
    return features


def categorical_why(values: pd.Series, column: str, cfg, where) -> str | None:
    """Why the column holds categories (None: numbers). A column of text most of whose values
    are numbers is refused: a typo is not a category."""
    if column in (cfg.categories or {}):
        return "its values are declared in data.categories"
    if cfg.categorical is not None and column != cfg.target:
        return "listed in data.categorical" if column in cfg.categorical else None
    if column in (cfg.bounds or {}):
        return None
    if pd.api.types.is_bool_dtype(values):
        return "it holds true/false values"
    if pd.api.types.is_numeric_dtype(values):
        return None
    given = values.dropna()
    numbers = pd.to_numeric(given.astype(object), errors="coerce").notna()
    if numbers.all():
        example = plain(given.iloc[0]) if len(given) else "none"
        return f"the file stores it as text (e.g. {example}), though its values read as numbers"
    if 2 * numbers.sum() >= len(given):
        refuse_text(given, numbers, where, column, f"{numbers.sum()} of its {len(given)} values "
                    "are numbers")
    text = given[~numbers]
    return f"{len(text)} of its {len(given)} values are text, e.g. {plain(text.iloc[0])}"


def refuse_text(given: pd.Series, numbers: pd.Series, where, column: str, why: str,
                hint: str = "list the column in data.categorical if it holds categories") -> None:
    text = given[~numbers]
    raise DataError(f"{where(text.index[0], column)}: {plain(text.iloc[0])} is not a number, "
                    f"yet the column is numeric: {why}. {len(text)} value"
                    f"{'s are' if len(text) != 1 else ' is'} not a number (this is the first); "
                    f"correct {'them' if len(text) != 1 else 'it'}, or {hint}")


def check_numbers(values: pd.Series, where, column: str, bounds: dict | None,
                  role: str = "") -> pd.Series:
    """The numeric column, checked: every value a number within its bounds (data.bounds), a
    missing one aside (check_missing has decided). Text is converted to float64."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        given = values.dropna()
        numbers = pd.to_numeric(given.astype(object), errors="coerce").notna()
        if not numbers.all():
            if role:
                refuse_text(given, numbers, where, column, f"it is {role}",
                            "set data.task=classification if it holds labels")
            refuse_text(given, numbers, where, column, "it is not listed in data.categorical")
        values = pd.to_numeric(values.astype(object), errors="coerce").astype("float64")
    floats = values.astype("float64").to_numpy()
    bad = ~within(floats, bounds) & ~np.isnan(floats)
    if bad.any():
        row = values.index[np.argmax(bad)]
        rule = f" (data.bounds.{column})" if bounds else ""
        raise DataError(f"{where(row, column)}: {plain(values[row])} is not "
                        f"{allowed_number(bounds)}{rule}; {int(bad.sum())} such value"
                        f"{'s' * (int(bad.sum()) != 1)} in the column")
    return values


def check_categories(values: pd.Series, where, column: str, cfg, why: str) -> None:
    """Declared values only (data.categories); else at most data.max_categories of them."""
    tokens = values.dropna().map(token)
    declared = (cfg.categories or {}).get(column)
    if declared is not None:
        allowed = [token(v) for v in declared]
        bad = ~tokens.isin(allowed)
        if bad.any():
            raise DataError(f"{where(tokens.index[np.argmax(bad)], column)}: "
                            f"{plain(values[tokens.index[np.argmax(bad)]])} is not "
                            f"{allowed_values(allowed)} (data.categories.{column}); "
                            f"{int(bad.sum())} such value{'s' * (int(bad.sum()) != 1)}")
        return
    distinct = tokens.unique()
    if len(distinct) > cfg.max_categories:
        first = tokens.index[~tokens.duplicated()][cfg.max_categories]
        raise DataError(f"{where(first, column)}: more than data.max_categories="
                        f"{cfg.max_categories} distinct values ({len(distinct)}); here is distinct "
                        f"value number {cfg.max_categories + 1}, {plain(values[first])}. The column "
                        f"was taken as categorical because {why}: raise the limit, or leave the "
                        "column out of data.features")


def check_missing(frame: pd.DataFrame, features: list[str], cfg, where) -> None:
    refused = [cfg.target] + (features if missing_policy(cfg) == "refuse" else [])
    for c in refused:
        missing = frame[c].isna()
        if missing.any():
            how = ("the target is never imputed" if c == cfg.target else
                   "data.missing=refuse; data.missing=impute fills it in and flags it")
            raise DataError(f"{where(missing.idxmax(), c)}: a missing value "
                            f"({int(missing.sum())} in the column; {how})")


def missing_policy(cfg) -> str:
    return getattr(cfg.missing, "value", str(cfg.missing))  # the enum, or a plain config's str


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
