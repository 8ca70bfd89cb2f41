"""Held-out metrics and the diagnostic plots logged with every run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window, also on machines with a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score  # noqa: E402


def regression_metrics(actual: np.ndarray, predicted: np.ndarray, prefix: str) -> dict[str, float]:
    actual, predicted = np.ravel(actual), np.ravel(predicted)
    return {
        f"{prefix}_rmse": float(np.sqrt(mean_squared_error(actual, predicted))),
        f"{prefix}_mae": float(mean_absolute_error(actual, predicted)),
        f"{prefix}_r2": float(r2_score(actual, predicted)),
    }


def save_learning_curves(history: dict[str, list[float]], out_dir: Path) -> Path:
    """Training and validation loss and RMSE per epoch, as far as training got."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return _save(learning_curves(history), out_dir / "learning_curves.png")


def learning_curves(history: dict[str, list[float]]):
    """The learning curves' figure; a curve with no finite value is left out, and a panel left
    empty says why."""
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "rmse")):
        curves = [(key, label)
                  for key, label in ((metric, "train"), (f"val_{metric}", "validation"))
                  if np.isfinite(history.get(key, [])).any()]
        for key, label in curves:
            ax.plot(epochs, history[key], label=label)
        ax.set(xlabel="epoch", ylabel=metric, title=f"Learning curve: {metric}")
        if curves:
            ax.legend()
        else:  # a run that diverged at once: say so rather than draw an empty frame
            ax.text(0.5, 0.5, f"no finite {metric} to draw:\ntraining diverged", ha="center",
                    va="center", transform=ax.transAxes)
    return fig


def save_plots(history: dict[str, list[float]], actual: np.ndarray, predicted: np.ndarray,
               out_dir: Path) -> list[Path]:
    """Learning curves, predicted vs actual and residuals on the test rows, as PNG files."""
    actual, predicted = np.ravel(actual), np.ravel(predicted)
    paths = [save_learning_curves(history, out_dir)]

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(actual, predicted, s=8, alpha=0.5)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1)
    ax.set(xlabel="actual Rings", ylabel="predicted Rings", title="Test rows: predicted vs actual")
    paths.append(_save(fig, out_dir / "predicted_vs_actual.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(predicted, actual - predicted, s=8, alpha=0.5)
    ax.axhline(0, color="black", linewidth=1)
    ax.set(xlabel="predicted Rings", ylabel="actual - predicted", title="Test rows: residuals")
    paths.append(_save(fig, out_dir / "residuals.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
