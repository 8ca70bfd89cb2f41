"""A run's folder of files (config.yaml, plots, model.keras), written before they are uploaded
and logged, so a run's outputs are the same on disk, in S3 and in MLflow."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from abalone import evaluate
from abalone.redact import redact_tree


def save_config(cfg: DictConfig, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(redact_tree(OmegaConf.to_container(
        cfg, resolve=True, enum_to_str=True))))
    return config_path


def save_files(cfg: DictConfig, model, history: dict, actual, predicted, output_dir: Path,
               with_model: bool, task: str = "regression",
               classes: list | None = None) -> tuple[Path, list[Path], Path | None]:
    """(config.yaml, the plots, model.keras): without `with_model` (a trial that is not the best
    so far) only config.yaml, since plots and model would cost most of a short trial's time and
    never be used."""
    config_path = save_config(cfg, output_dir)
    if not with_model:
        return config_path, [], None
    plots = evaluate.save_plots(history, actual, predicted, output_dir / "plots", task, classes)
    keras_path = output_dir / "model.keras"
    model.save(keras_path)
    return config_path, plots, keras_path
