"""The figures: training curves and the test split's confusion matrix, ROC and precision-recall.

Written reproducibly: headless, atomic, no timestamps or version stamps, 150 dpi; PNGs render
offline (unlike ``dvc plots show``'s Vega HTML). Every figure has a title, names the classes
ham and spam, and says so when the base model had random weights (a smoke run).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from gpt2lab.dataset import CLASS_NAMES

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

# Metadata that would otherwise vary between runs: the same data then gives the same bytes.
DPI = 150
RANDOM_NOTE = " - random base weights"  # appended to the titles of a smoke run's figures
_STABLE_METADATA = {
    ".png": {"Software": None},
    ".pdf": {"CreationDate": None, "Creator": None, "Producer": None},
}


def subplots(**kwargs: Any):
    """``plt.subplots`` on the headless backend."""
    return plt.subplots(**kwargs)


def save_figure(fig, *paths: str | Path) -> list[Path]:
    """Save ``fig`` to each path (format from the suffix) through a temp file, then close it."""
    fig.tight_layout()
    written = []
    try:
        for path in map(Path, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
            try:
                fig.savefig(tmp, dpi=DPI, metadata=_STABLE_METADATA.get(path.suffix))
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            written.append(path)
    finally:
        plt.close(fig)
    return written


def _title(text: str, pretrained: bool) -> str:
    return text if pretrained else text + RANDOM_NOTE


def save_train_plots(table: pd.DataFrame, plots_dir: str | Path, *, pretrained: bool = True) -> list[Path]:
    """``loss-plot.pdf`` / ``accuracy-plot.pdf`` (the reference's names) and ``loss.png`` / ``accuracy.png``.

    Like the reference, each plot has a second x-axis with the number of examples seen; train
    and validation share the axes (accuracy on 0..1).
    """
    plots_dir = Path(plots_dir)
    written = []
    per_step = table.examples_seen.iloc[-1] / table.step.iloc[-1] if len(table) and table.step.iloc[-1] else 0
    for column, name in (("loss", "loss"), ("acc", "accuracy")):
        fig, ax = subplots(figsize=(5, 3))
        ax.plot(table.step, table[f"train_{column}"], label=f"Training {name}")
        ax.plot(table.step, table[f"val_{column}"], linestyle="-.", label=f"Validation {name}")
        ax.set_xlabel("Step")
        ax.set_ylabel(name.capitalize())
        if column == "acc":
            ax.set_ylim(0, 1.02)
        ax.set_title(_title(f"Spam classifier: {name}", pretrained), fontsize=10)
        ax.legend()
        if per_step:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda e: e / per_step))
            top.set_xlabel("Examples seen")
        # The reference's PDF names, plus PNGs that `dvc plots show` renders offline.
        written += save_figure(fig, plots_dir / f"{name}-plot.pdf", plots_dir / f"{name}.png")
    return written


def save_eval_plots(
    labels: Sequence[int], probs: Sequence[float], out_dir: str | Path, threshold: float = 0.5, *, pretrained: bool = True
) -> list[Path]:
    """Confusion matrix, ROC and precision-recall (spam is the positive class) as PNGs (they
    render offline, unlike vega HTML); ROC and precision-recall on the same 0..1 square."""
    out_dir = Path(out_dir)
    y, p = np.asarray(labels), np.asarray(probs)
    paths = []

    fig, ax = subplots(figsize=(4, 4))
    skm.ConfusionMatrixDisplay.from_predictions(
        y, (p >= threshold).astype(int), labels=[0, 1], display_labels=CLASS_NAMES, ax=ax, colorbar=False
    )
    ax.set_title(_title(f"Confusion matrix (test, threshold {threshold:g})", pretrained), fontsize=10)
    paths += save_figure(fig, out_dir / "confusion_matrix.png")

    fig, ax = subplots(figsize=(4, 4))
    skm.RocCurveDisplay.from_predictions(y, p, ax=ax, name="gpt2lab", pos_label=1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.set(xlabel="False positive rate (ham called spam)", ylabel="True positive rate (spam caught)",
           xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
    ax.set_title(_title("ROC, spam vs ham (test)", pretrained), fontsize=10)
    ax.legend(loc="lower right")
    paths += save_figure(fig, out_dir / "roc.png")

    fig, ax = subplots(figsize=(4, 4))
    skm.PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name="gpt2lab", pos_label=1)
    ax.set(xlabel="Recall (spam caught)", ylabel="Precision (spam calls that are spam)", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(_title("Precision-recall, spam (test)", pretrained), fontsize=10)
    paths += save_figure(fig, out_dir / "precision_recall.png")
    return paths
