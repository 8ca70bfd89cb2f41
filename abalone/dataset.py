"""The data of a run as the training code takes it: where the file came from (abalone/source.py),
its rows checked (abalone/table.py) and split, the model's inputs and targets, what the model
builder is told of the table (`spec`, from the training rows only), and the name its models
register under by default. data=abalone is a preset of data=table (conf/data/abalone.yaml).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from abalone import serving, source, table
from abalone.table import DataError, Splits

log = logging.getLogger(__name__)
__all__ = ["DataError", "Dataset", "Splits", "load"]


@dataclass
class Dataset:
    located: source.Located
    splits: Splits
    spec: dict  # what the model and the served model know of the table (`spec` below)
    model_name: str  # the registered model's name unless tracking.registered_model says

    @property
    def path(self) -> Path:
        return self.located.path

    @property
    def sha256(self) -> str:
        return self.located.sha256

    @property
    def source(self) -> str:
        """The file as a run records it: its path, or its URL without credentials."""
        return self.located.source

    @property
    def name(self) -> str:
        """The table's name in run names: its file's stem (abalone, penguins)."""
        return PurePosixPath(urlsplit(self.source).path).stem or "table"

    @property
    def target(self) -> str:
        return self.spec["target"]

    @property
    def task(self) -> str:
        return self.spec["task"]

    @property
    def classes(self) -> list | None:
        return self.spec["classes"]

    @property
    def columns(self) -> list[str]:
        """The raw columns a served model takes, in the file's order."""
        return self.spec["features"]

    @functools.cached_property
    def table(self):
        """What a model builder is given (abalone.model.TableInputs). Keras loads here, after
        the data is checked, and quietly (abalone.run.import_keras)."""
        from abalone.model import table_inputs

        return table_inputs(self.spec)

    def inputs(self, frame: pd.DataFrame, name: str = "") -> dict[str, np.ndarray]:
        inputs, oov = serving.encode(frame, self.spec)
        unknown = {c: n for c, n in oov.items() if n}
        if unknown:
            log.info("%s rows: values the training rows never had (out-of-vocabulary slot): %s",
                     name, unknown)
        return inputs

    def targets(self, frame: pd.DataFrame) -> np.ndarray:
        """Regression: the values; classification: each row's class index (float for the
        sigmoid of two classes, integer for a softmax)."""
        y = frame[self.target]
        if self.task == serving.REGRESSION:
            return y.to_numpy("float32").reshape(-1, 1)
        index = {serving.token(c): i for i, c in enumerate(self.classes)}
        classes = y.map(serving.token).map(index).to_numpy()
        return classes.astype("float32" if len(index) == 2 else "int32").reshape(-1, 1)

    def save_spec(self, folder: Path) -> Path:
        path = folder / "table.json"
        path.write_text(json.dumps(self.spec, indent=1))
        return path


@functools.lru_cache(maxsize=1)
def _read_table(path: Path, mtime_ns: int, size: int, settings: str) -> tuple[pd.DataFrame, dict]:
    """A sweep's trials in one process share one read and check of the unchanged table (the
    splits copy its rows; nothing changes the frame)."""
    return table.load(path, OmegaConf.create(settings))


def load(data_cfg) -> Dataset:
    """Find, read, check and split the data `data_cfg` names; fail before training with where."""
    located = source.locate(data_cfg)
    stat = located.path.stat()
    frame, info = _read_table(located.path, stat.st_mtime_ns, stat.st_size,
                              OmegaConf.to_yaml(data_cfg, resolve=True))
    splits = split(frame, info, data_cfg, located.source)
    return Dataset(located, splits, spec(splits.train, info, data_cfg),
                   data_cfg.get("model_name") or model_name(located.source, info["target"]))


def model_name(file: str, target: str) -> str:
    """The registered model's name for a table: its file's stem and its target, in the
    letters, digits and dashes every registry takes (penguins-species)."""
    stem = PurePosixPath(urlsplit(file).path).stem
    name = re.sub(r"[^a-z0-9]+", "-", f"{stem}-{target}".lower()).strip("-")
    return name[:63].rstrip("-") or "table-model"


def split(frame: pd.DataFrame, info: dict, cfg, where_file: str) -> Splits:
    """The holdout, then the validation rows out of the rest (scikit-learn's train_test_split
    with data.holdout_seed, data.split_seed: for the Abalone file, the AWS sample's holdout),
    stratified by class when classifying; a split left empty, or a class too rare for it, is
    an error."""
    from sklearn.model_selection import train_test_split

    stratify = info["task"] == serving.CLASSIFICATION
    parts = {}
    rest = frame
    for name, fraction, seed in (("test", cfg.test_fraction, cfg.holdout_seed),
                                 ("val", cfg.val_fraction, cfg.split_seed)):
        key = "data.test_fraction" if name == "test" else "data.val_fraction"
        try:
            rest, parts[name] = train_test_split(
                rest, test_size=fraction, random_state=seed,
                stratify=rest[info["target"]].map(serving.token) if stratify else None)
        except ValueError as err:
            counts = rest[info["target"]].map(serving.token).value_counts()
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
    the columns, normalisation statistics, vocabularies (declared values as given; learned ones
    sorted, index 0 being their out-of-vocabulary slot), bounds, the values that fill in a
    missing one, the classes."""
    impute = table.missing_policy(cfg) == "impute"
    numeric, categorical = info["numeric"], info["categorical"]
    declared = {c: [serving.token(v) for v in cfg.categories[c]] for c in info["declared"]}
    vocab = {c: declared.get(c) or sorted(train[c].dropna().map(serving.token).unique().tolist())
             for c in categorical}
    fill = {c: float(train[c].mean()) for c in numeric}
    fill.update({c: train[c].dropna().map(serving.token).mode().iloc[0] for c in categorical})
    values = train[numeric].astype("float64").fillna(pd.Series(fill)).to_numpy("float64")
    return {
        "target": info["target"], "task": info["task"],
        "classes": [c.item() if isinstance(c, np.generic) else c for c in info["classes"]]
        if info["classes"] is not None else None,
        "features": info["features"], "numeric": numeric, "categorical": categorical,
        "declared": info["declared"], "vocabulary": vocab, "bounds": info["bounds"],
        "mean": values.mean(axis=0).tolist(), "variance": values.var(axis=0).tolist(),
        "missing": "impute" if impute else "refuse",
        # Flags only for the columns the training rows miss values of.
        "flagged": [c for c in [*numeric, *categorical] if impute and train[c].isna().any()],
        "fill": fill,
    }
