"""Held-out metrics and the diagnostic plots logged with every run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window, also on machines with a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as sk  # noqa: E402

from abalone.serving import REGRESSION, probabilities  # noqa: E402

# The metric of a task that ranks its models: the champion gate, a run's return value.
PRIMARY = {"regression": "rmse", "classification": "log_loss"}


def regression_metrics(actual: np.ndarray, predicted: np.ndarray, prefix: str) -> dict[str, float]:
    actual, predicted = np.ravel(actual), np.ravel(predicted)
    return {
        f"{prefix}_rmse": float(np.sqrt(sk.mean_squared_error(actual, predicted))),
        f"{prefix}_mae": float(sk.mean_absolute_error(actual, predicted)),
        f"{prefix}_r2": float(sk.r2_score(actual, predicted)),
    }


def held_out_metrics(task: str, actual: np.ndarray, output: np.ndarray, prefix: str,
                     classes: list | None = None) -> dict[str, float]:
    """rmse, mae, r2; or log_loss, accuracy, macro f1 and (two classes) ROC auc, from the
    class indices `actual` and the model's `output`."""
    if task == REGRESSION:
        return regression_metrics(actual, output, prefix)
    actual = np.ravel(actual).astype(int)
    p = probabilities(output, {"classes": classes})
    found = {f"{prefix}_log_loss": float(sk.log_loss(actual, p, labels=range(len(classes)))),
             f"{prefix}_accuracy": float(sk.accuracy_score(actual, p.argmax(axis=1))),
             f"{prefix}_f1": float(sk.f1_score(actual, p.argmax(axis=1), average="macro"))}
    if len(classes) == 2 and len(set(actual)) == 2:
        found[f"{prefix}_auc"] = float(sk.roc_auc_score(actual, p[:, 1]))
    return found


def save_learning_curves(history: dict[str, list[float]], out_dir: Path) -> Path:
    """Training and validation loss and RMSE (accuracy for a classifier) per epoch, as far as
    training got."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return _save(learning_curves(history), out_dir / "learning_curves.png")


def learning_curves(history: dict[str, list[float]]):
    """The learning curves' figure; a curve with no finite value is left out, and a panel left
    empty says why."""
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy" if "accuracy" in history else "rmse")):
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
               out_dir: Path, task: str = REGRESSION, classes: list | None = None) -> list[Path]:
    """Learning curves and, on the test rows, predicted vs actual and residuals (regression) or
    the confusion matrix and, for two classes, the ROC curve; as PNG files."""
    paths = [save_learning_curves(history, out_dir)]
    if task != REGRESSION:
        return paths + classification_plots(actual, predicted, classes, out_dir)
    actual, predicted = np.ravel(actual), np.ravel(predicted)

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


def classification_plots(actual, output, classes: list, out_dir: Path) -> list[Path]:
    actual = np.ravel(actual).astype(int)
    p = probabilities(output, {"classes": classes})
    labels = [str(c) for c in classes]
    fig, ax = plt.subplots(figsize=(5, 5))
    sk.ConfusionMatrixDisplay.from_predictions(actual, p.argmax(axis=1),
                                               labels=range(len(classes)),
                                               display_labels=labels, ax=ax, colorbar=False)
    ax.set(title="Test rows: confusion matrix")
    paths = [_save(fig, out_dir / "confusion_matrix.png")]
    if len(classes) == 2 and len(set(actual)) == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        sk.RocCurveDisplay.from_predictions(actual, p[:, 1], name=f"positive: {labels[1]}",
                                            ax=ax)
        ax.set(title="Test rows: ROC curve")
        paths.append(_save(fig, out_dir / "roc_curve.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
