"""Classification metrics and their plot data; spam (label 1) is the positive class.

The functions here are pure: predictions in, dicts and tables out. The ``evaluate`` stage
feeds them the classifier's probabilities on each split and writes the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm

LABELS = ("ham", "spam")


def classification_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1, ROC-AUC and the confusion matrix of one split.

    Args:
        labels: true labels (N,), 0 = ham, 1 = spam.
        probs: predicted spam probabilities (N,).
        threshold: a message is called spam when its probability is >= threshold.
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y)) == 2
    return {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        # ROC-AUC is undefined on a single class; None says so rather than a made-up number.
        "roc_auc": float(skm.roc_auc_score(y, p)) if both_classes else None,
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def roc_table(labels: Sequence[int], probs: Sequence[float]) -> pd.DataFrame:
    """ROC curve points: columns ``fpr, tpr, threshold``."""
    fpr, tpr, thr = skm.roc_curve(np.asarray(labels), np.asarray(probs))
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})


def pr_table(labels: Sequence[int], probs: Sequence[float]) -> pd.DataFrame:
    """Precision-recall curve points: columns ``recall, precision``."""
    precision, recall, _ = skm.precision_recall_curve(np.asarray(labels), np.asarray(probs))
    return pd.DataFrame({"recall": recall, "precision": precision})


def confusion_table(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5) -> pd.DataFrame:
    """One row per message, ``actual, predicted`` as names: DVC's confusion-matrix plot input."""
    pred = (np.asarray(probs) >= threshold).astype(int)
    return pd.DataFrame({"actual": [LABELS[i] for i in labels], "predicted": [LABELS[i] for i in pred]})


def save_figures(labels: Sequence[int], probs: Sequence[float], out_dir: str | Path, threshold: float = 0.5) -> list[Path]:
    """Confusion matrix, ROC and precision-recall as PNGs (they render offline, unlike vega HTML)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y, p = np.asarray(labels), np.asarray(probs)
    paths = []

    fig, ax = plt.subplots(figsize=(4, 4))
    skm.ConfusionMatrixDisplay.from_predictions(
        y, (p >= threshold).astype(int), labels=[0, 1], display_labels=LABELS, ax=ax, colorbar=False
    )
    ax.set_title("Confusion matrix (test)")
    paths.append(_save(fig, out_dir / "confusion_matrix.png"))

    fig, ax = plt.subplots(figsize=(4, 4))
    skm.RocCurveDisplay.from_predictions(y, p, ax=ax, name="gpt2lab")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_title("ROC (test)")
    paths.append(_save(fig, out_dir / "roc.png"))

    fig, ax = plt.subplots(figsize=(4, 4))
    skm.PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name="gpt2lab")
    ax.set_title("Precision-recall (test)")
    paths.append(_save(fig, out_dir / "precision_recall.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100, metadata={"Software": None})  # no version stamp: same data, same bytes
    plt.close(fig)
    tmp.replace(path)
    return path
