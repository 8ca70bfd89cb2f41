"""Typed schemas behind the YAML in conf/, and the range checks the types cannot express.

The schemas are registered with Hydra's ConfigStore as `config_schema`, which conf/config.yaml
lists first in its defaults, so a misspelt key or a value of the wrong type fails at compose time
with the key's full name. Range checks (a negative learning rate, a dropout of 1.5) run in
`check_ranges` before any data is read or any run is started.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

class AbaloneError(Exception):
    """An expected failure (bad setting, bad data, unreachable server) with a message for users."""


class ConfigError(AbaloneError, ValueError):
    """A setting is out of range; the message names the key."""


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    exponential = "exponential"


class FitPath(str, Enum):
    shared = "shared"
    keras = "keras"


class Keep(str, Enum):
    best = "best"  # the epoch with the best validation value (a sweep's metric, else val_loss)
    last = "last"


class OptimizerName(str, Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


@dataclass
class ModelConfig:
    """An MLP: `depth` hidden layers, the first `units` wide, each next one `taper` times as wide."""

    _target_: str = "abalone.model.build_regressor"
    units: int = 64
    depth: int = 3
    taper: float = 0.5
    activation: str = "relu"
    dropout: float = 0.2
    batch_norm: bool = True


@dataclass
class OptimizerConfig:
    _target_: str = "abalone.model.build_optimizer"
    name: OptimizerName = OptimizerName.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    schedule: Schedule = Schedule.constant
    decay_rate: float = 0.95  # exponential schedule: factor per epoch
    final_lr_fraction: float = 0.0  # cosine schedule: lr at the end, as a fraction of lr


class Task(str, Enum):
    regression = "regression"
    classification = "classification"


class Missing(str, Enum):
    refuse = "refuse"  # a missing value is an error naming its row and column
    impute = "impute"  # the training rows' mean (numeric) or most frequent value, plus a flag


@dataclass
class Bounds:
    """A numeric column's allowed values (data.bounds.COLUMN), checked in the file and when
    served: a value outside them is refused, naming it."""

    min: Optional[float] = None
    max: Optional[float] = None
    integer: bool = False  # whole numbers only


@dataclass
class TableDataConfig:
    """data=table, and data=abalone (its preset): a CSV or Parquet table (abalone/table.py reads
    and checks it, abalone/source.py finds or downloads it)."""

    # A local file, s3://bucket/key or https://...; relative: also tried in the SageMaker
    # training channel ($SM_CHANNEL_TRAINING). null: data.url's file (in the channel, else
    # downloaded).
    path: Optional[str] = MISSING
    url: Optional[str] = None  # where the file is downloaded from when data.path is null
    format: Optional[str] = None  # csv or parquet; null: from the file's suffix
    header: bool = True  # CSV: the first line names the columns
    sep: str = ","  # CSV
    columns: Optional[List[str]] = None  # names for a header-less CSV's columns
    target: str = MISSING
    features: Optional[List[str]] = None  # null: every other column
    categorical: Optional[List[str]] = None  # null: text and true/false columns
    categories: Dict[str, List[Any]] = field(default_factory=dict)  # a column's only values
    bounds: Dict[str, Bounds] = field(default_factory=dict)  # a numeric column's allowed range
    task: Optional[Task] = None  # null: inferred from the target, with the reason printed
    missing: Missing = Missing.refuse
    max_categories: int = 100  # a categorical column with more distinct values is an error
    # Pins the file data.url names (else data.path's): checked on every run; always recorded.
    sha256: Optional[str] = None
    cache_dir: str = "~/.cache/abalone/tables"  # where remote files are kept
    # The registered model's name when tracking.registered_model is null; null: the file's stem
    # and the target (penguins-species).
    model_name: Optional[str] = None
    test_fraction: float = 0.2
    holdout_seed: int = 42
    val_fraction: float = 0.2  # of the rows left after the holdout
    split_seed: int = 0


@dataclass
class TrainerConfig:
    epochs: int = 100
    batch_size: int = 32
    # Early stopping after this many epochs without a better value of what `keep` watches; 0: off.
    patience: int = 10
    # The epoch whose weights are kept, evaluated, logged and registered: best, by val_loss (in a
    # sweep by its first metric, in its direction), or last.
    keep: Keep = Keep.best
    seed: int = 42
    verbose: int = 1  # 0: summary only, 1: one line per epoch
    steps_per_execution: int = 0  # training steps per call into the compiled function; 0: an epoch
    # shared: MLP regressors train on a compiled program kept for later runs of the process
    # (abalone/mlp_program.py); keras: model.fit, a fresh trace per run
    fit_path: FitPath = FitPath.shared


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = "sqlite:///mlflow.db"
    # SageMaker managed MLflow (tracking=sagemaker): the server's ARN, or its name and region.
    arn: Optional[str] = None
    server_name: Optional[str] = None
    region: Optional[str] = None
    experiment: str = "abalone-tensorflow-experiment"
    # null: the data's model name (data.model_name, else the file's stem and the target)
    registered_model: Optional[str] = None
    register: bool = True
    run_name: Optional[str] = None
    # Seconds to wait for the tracking server before giving up (MLflow's own default is minutes).
    connect_timeout: float = 10.0
    # Once connected, seconds an outage of the server (restart, maintenance, throttling) may last
    # before the run fails and a sweep stops; requests wait, training goes on. 0: no waiting.
    outage_grace: float = 600.0


@dataclass
class OutputConfig:
    # s3://bucket/prefix: each run's output folder (model, config, plots) is uploaded to
    # s3://bucket/prefix/<MLflow run id>/ after training.
    s3_uri: Optional[str] = None


@dataclass
class SageMakerWorkersConfig:
    """workers=sagemaker: `count` SageMaker training jobs of our image, each host a worker
    (conf/workers/sagemaker.yaml; the request is built and checked in abalone/workers/sagemaker.py)."""

    _target_: str = "abalone.workers.SageMakerWorkers"
    count: int = 2  # training jobs
    image_uri: str = MISSING  # our image in ECR (scripts/push_image.sh prints it)
    role_arn: str = MISSING  # the jobs' execution role (iam/sagemaker-worker-policy.json)
    output_s3_uri: str = MISSING  # s3://bucket/prefix: each job's /opt/ml/model goes there
    data_s3_uri: Optional[str] = None  # s3://... holding abalone.data: the `training` channel
    region: Optional[str] = None  # null: the AWS settings' region
    instance_type: str = "ml.m5.large"
    instance_count: int = 1  # hosts per job; each is a worker with a rank of its own
    volume_size_gb: int = 30
    max_runtime_seconds: int = 86400  # each job's time budget (StoppingCondition)
    spot: bool = False  # managed spot training
    max_wait_seconds: Optional[int] = None  # spot only: runtime plus waiting; null: 2x runtime
    subnets: List[str] = field(default_factory=list)  # VpcConfig, to reach the database
    security_group_ids: List[str] = field(default_factory=list)
    job_name_prefix: str = "abalone"  # jobs: PREFIX-STUDY-TIME-N (the IAM policy names abalone-*)
    tags: Dict[str, str] = field(default_factory=dict)  # besides abalone:study
    environment: Dict[str, str] = field(default_factory=dict)  # more variables; never secrets


@dataclass
class LocalWorkersConfig:
    """Trials in `hydra.sweeper.n_jobs` processes on this machine, the command's own one of them."""

    _target_: str = "abalone.workers.LocalWorkers"


@dataclass
class ContainerWorkersConfig:
    """`count` containers of our image on this machine (scripts/run_training.sh starts each)."""

    _target_: str = "abalone.workers.ContainerWorkers"
    count: int = 2
    engine: Optional[str] = None  # docker or podman; null: docker if installed, else podman
    image: str = "abalone-dlc:latest"
    build: bool = True  # build `image` from the Dockerfile first; false: use it as it is
    base_image: Optional[str] = None  # null: the Dockerfile's (ARG BASE_IMAGE)
    # Holds abalone.data, mounted as the training channel; null: the project's ./data (fetched
    # and checked by sha256 when absent, as run_training.sh does).
    data_dir: Optional[str] = None
    # Each worker's outputs (its container's /opt/ml/model) and log, in a folder of its own.
    output_dir: str = "${hydra:sweep.dir}/workers"
    stop_timeout: int = 60  # seconds a stopped container has to fail its trial and exit


@dataclass
class Config:
    # The built-in options (conf/model/) take ModelConfig's typed schema (`mlp_schema` in their
    # defaults); an option of a user's own names its builder and keys (docs/your-data.md).
    model: Any = MISSING
    optimizer: OptimizerConfig = MISSING
    # data=abalone and data=table: a table (TableDataConfig), each option naming the schema.
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Where a sweep's trials run (conf/workers/); each option's schema is `<option>_schema`.
    workers: Any = MISSING


ConfigStore.instance().store(name="config_schema", node=Config)
# Outside the groups, so --help lists only the options; an option includes one with
# `- /NAME@_here_` in its defaults.
ConfigStore.instance().store(name="model_mlp_schema", node=ModelConfig)
ConfigStore.instance().store(name="data_table_schema", node=TableDataConfig)
ConfigStore.instance().store(group="workers", name="local_schema", node=LocalWorkersConfig)
ConfigStore.instance().store(group="workers", name="container_schema",
                             node=ContainerWorkersConfig)
ConfigStore.instance().store(group="workers", name="sagemaker_schema", node=SageMakerWorkersConfig)


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """The one form of a settings check: fail naming the key, its rule and the value given."""
    if not ok:
        raise ConfigError(f"config key {key} must be {rule}, got {value!r}")


def check_ranges(cfg: Any) -> None:
    """Raise ConfigError naming the first key whose value is out of its range."""
    m, o, d, t, tr = cfg.model, cfg.optimizer, cfg.data, cfg.trainer, cfg.tracking
    if OmegaConf.get_type(m) is ModelConfig:  # a user's own builder checks its own keys
        require(m.units >= 1, "model.units", ">= 1", m.units)
        require(m.depth >= 1, "model.depth", ">= 1", m.depth)
        require(m.taper > 0, "model.taper", "> 0", m.taper)
        require(0 <= m.dropout < 1, "model.dropout", "in [0, 1)", m.dropout)
    else:
        require(bool(m.get("_target_")), "model._target_", "the builder's dotted name", None)
    require(d.max_categories >= 2, "data.max_categories", ">= 2", d.max_categories)
    for column, values in d.categories.items():
        require(len(values) > 0 and len({str(v) for v in values}) == len(values),
                f"data.categories.{column}", "a list of distinct values", list(values))
    for column, b in d.bounds.items():
        require(b.min is None or b.max is None or b.min <= b.max, f"data.bounds.{column}.min",
                f"<= data.bounds.{column}.max", b.min)
    require(o.lr > 0, "optimizer.lr", "> 0", o.lr)
    require(o.weight_decay >= 0, "optimizer.weight_decay", ">= 0", o.weight_decay)
    require(0 <= o.momentum < 1, "optimizer.momentum", "in [0, 1)", o.momentum)
    require(0 < o.decay_rate <= 1, "optimizer.decay_rate", "in (0, 1]", o.decay_rate)
    require(0 <= o.final_lr_fraction <= 1, "optimizer.final_lr_fraction", "in [0, 1]",
             o.final_lr_fraction)
    require(0 < d.test_fraction < 1, "data.test_fraction", "in (0, 1)", d.test_fraction)
    require(0 < d.val_fraction < 1, "data.val_fraction", "in (0, 1)", d.val_fraction)
    require(t.epochs >= 1, "trainer.epochs", ">= 1", t.epochs)
    require(t.batch_size >= 1, "trainer.batch_size", ">= 1", t.batch_size)
    require(t.patience >= 0, "trainer.patience", ">= 0", t.patience)
    require(t.verbose in (0, 1), "trainer.verbose", "0 or 1", t.verbose)
    require(t.steps_per_execution >= 0, "trainer.steps_per_execution", ">= 0",
             t.steps_per_execution)
    require(tr.connect_timeout > 0, "tracking.connect_timeout", "> 0", tr.connect_timeout)
    require(tr.outage_grace >= 0, "tracking.outage_grace", ">= 0", tr.outage_grace)
    require(bool(tr.uri or tr.arn or tr.server_name) or not tr.enabled, "tracking.uri",
             "set (or tracking.arn, or tracking.server_name for SageMaker)", tr.uri)
    require(not cfg.output.s3_uri or cfg.output.s3_uri.startswith("s3://"), "output.s3_uri",
             "an s3://bucket/prefix URI", cfg.output.s3_uri)
    require(bool(tr.experiment), "tracking.experiment", "a non-empty name", tr.experiment)


def check_option(group: str, choice: str | None, options: list[str]) -> None:
    """Refuse an option of an optional config group (`sweep=nosuch`) that does not exist,
    which Hydra would skip without a word."""
    if choice is not None and choice not in options:
        raise ConfigError(f"{group}={choice}: there is no {group} named {choice!r}; there are: "
                          f"{', '.join(sorted(options)) or 'none'}")
