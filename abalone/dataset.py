"""The data of a run as the training code takes it, whichever `data` option gave it: the rows and
their splits, the model's inputs and targets, what the model builder is told of the table, and
how the registered model serves it. data=abalone is today's code (abalone/data.py,
abalone/serving.py); data=table is abalone/table.py and abalone/table_serving.py.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from abalone import data, serving, table, table_serving

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    path: Path
    sha256: str
    splits: data.Splits
    target: str
    spec: dict | None = None  # data=table: abalone/table.py's spec; None for data=abalone
    feature_stats: tuple | None = None  # data=abalone: the measurements' mean and variance

    @functools.cached_property
    def table(self):
        """What a model builder is given (abalone.model.TableInputs). Keras loads here, after
        the data is checked, and quietly (abalone.run.import_keras)."""
        from abalone.model import abalone_inputs, table_inputs

        return abalone_inputs(*self.feature_stats) if self.spec is None else table_inputs(self.spec)

    @property
    def task(self) -> str:
        return table_serving.REGRESSION if self.spec is None else self.spec["task"]

    @property
    def columns(self) -> list[str]:
        """The raw columns a served model takes."""
        if self.spec is None:
            return list(serving.FEATURE_COLUMNS)
        return [*self.spec["numeric"], *self.spec["categorical"]]

    def inputs(self, frame: pd.DataFrame, name: str = "") -> dict[str, np.ndarray]:
        if self.spec is None:
            return serving.model_inputs(frame)
        inputs, oov = table_serving.encode(frame, self.spec)
        unknown = {c: n for c, n in oov.items() if n}
        if unknown:
            log.info("%s rows: values the training rows never had (out-of-vocabulary slot): %s",
                     name, unknown)
        return inputs

    def targets(self, frame: pd.DataFrame) -> np.ndarray:
        """Regression: the values; classification: each row's class index (float for the
        sigmoid of two classes, integer for a softmax)."""
        if self.spec is None:
            return data.target(frame)
        y = frame[self.target]
        if self.task == table_serving.REGRESSION:
            return y.to_numpy("float32").reshape(-1, 1)
        index = {table_serving.token(c): i for i, c in enumerate(self.spec["classes"])}
        classes = y.map(table_serving.token).map(index).to_numpy()
        return classes.astype("float32" if len(index) == 2 else "int32").reshape(-1, 1)

    def save_spec(self, folder: Path) -> Path | None:
        if self.spec is None:
            return None
        path = folder / "table.json"
        path.write_text(json.dumps(self.spec, indent=1))
        return path


@functools.lru_cache(maxsize=1)
def _read_table(path: Path, mtime_ns: int, size: int, settings: str) -> tuple[pd.DataFrame, dict]:
    """A sweep's trials in one process share one read and check of the unchanged table (the
    splits copy its rows; nothing changes the frame)."""
    return table.load(path, OmegaConf.create(settings))


def load(data_cfg) -> Dataset:
    """Read, check and split the data `data_cfg` names; fail before training with where."""
    if "target" not in data_cfg:  # data=abalone
        path = data.resolve_path(data_cfg)
        splits = data.split(data.load(path), data_cfg)
        measurements = splits.train[list(serving.NUMERIC_COLUMNS)].to_numpy("float64")
        return Dataset(path, data.sha256_of(path), splits, data.TARGET,
                       feature_stats=(measurements.mean(axis=0), measurements.var(axis=0)))
    path = table.resolve(data_cfg)
    stat = path.stat()
    frame, info = _read_table(path, stat.st_mtime_ns, stat.st_size,
                              OmegaConf.to_yaml(data_cfg, resolve=True))
    splits = table.split(frame, info, data_cfg, path)
    spec = table.spec(splits.train, info, data_cfg)
    return Dataset(path, data.sha256_of(path), splits, info["target"], spec)
