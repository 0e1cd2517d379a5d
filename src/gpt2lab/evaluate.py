"""Classification metrics and their plot data; spam (label 1) is the positive class.

The metric functions are pure: predictions in, dicts and tables out. The ``evaluate`` stage
calls :func:`evaluate_classifier` (the classifier's probabilities on each split, fed to them)
and :func:`write_outputs` (metrics JSON, predictions, plot data and images).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from tqdm.auto import tqdm

from gpt2lab.classifier_io import read_classifier_meta
from gpt2lab.dataset import CLASS_NAMES, SPLITS, read_split
from gpt2lab.devices import describe, resolve_device, resolve_precision
from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import write_atomic
from gpt2lab.inference import Classifier
from gpt2lab.plots import save_eval_plots

log = logging.getLogger(__name__)

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
    return pd.DataFrame({"actual": [CLASS_NAMES[i] for i in labels], "predicted": [CLASS_NAMES[i] for i in pred]})


# --- the evaluate stage -------------------------------------------------------------------
PLOT_SPLIT = "test"  # the plots show the held-out split
# The DVC metric: the held-out split's scores, F1 first (`dvc exp show` always keeps the first
# metric column in view, and its table breaks down when too many columns differ). Every split's
# scores, row counts, confusion matrices and settings go to the details file.
HEADLINE_SPLIT = "test"
HEADLINE_METRICS = ("f1", "accuracy", "precision", "recall", "roc_auc")
PLOT_FILES = {"confusion": "confusion.csv", "roc": "roc.csv", "pr": "pr.csv"}


PROGRESS_CHUNK = 256  # messages per progress-bar update (a probability does not depend on its batch)


class EvalError(Gpt2labError, RuntimeError):
    """The evaluation cannot run: an input of the stage is missing."""


def evaluate_classifier(
    classifier_dir: str | Path,
    data_dir: str | Path,
    *,
    batch_size: int = 32,
    precision: str = "auto",
    threshold: float = 0.5,
    base_dir: str | Path | None = None,
    splits: Sequence[str] = SPLITS,
    progress: bool = False,
    device: str = "auto",
) -> dict:
    """Score the trained classifier on each prepared split.

    Args:
        classifier_dir: the folder the train stage wrote (``models/classifier``).
        data_dir: the folder with ``{train,validation,test}.csv`` (``data/prepared``).
        batch_size, precision, threshold, device: params.yaml's ``eval`` section.
        base_dir: the base checkpoint; default: the one recorded at training time.
        progress: show a progress bar (messages scored) on a terminal.

    Returns:
        ``{"metrics": {split: classification_metrics(...), ..., "base_pretrained": bool,
        "threshold": float, "precision": str (as run), "device": str}, "predictions": DataFrame}``
        where the predictions have one row per message: ``split, row`` (its row in the split's
        CSV), ``label``, ``probability``.
    """
    target = resolve_device(device, key="eval.device")
    precision = resolve_precision(precision, target, key="eval.precision")
    paths = {split: Path(data_dir) / f"{split}.csv" for split in splits}
    for path in paths.values():
        if not path.is_file():
            raise EvalError(f"{path}: missing; run the prepare_data stage first (dvc repro prepare_data)")
    clf = Classifier.load(classifier_dir, base_dir, batch_size=batch_size, precision=precision, threshold=threshold,
                          device=str(target))  # fmt: skip
    meta = read_classifier_meta(classifier_dir)
    if not meta["base"].get("pretrained", False):  # say so where the numbers are read
        log.info("the classifier was trained on RANDOM base weights: its metrics are a smoke check only")
    metrics: dict = {}
    frames = []
    data = {split: read_split(path) for split, path in paths.items()}
    bar = tqdm(total=sum(map(len, data.values())), unit="msg", desc="evaluate", disable=None if progress else True)
    for split, df in data.items():
        t0 = time.perf_counter()
        texts = df.Text.tolist()
        parts = []
        for start in range(0, len(texts), PROGRESS_CHUNK):
            parts.append(clf.predict_proba(texts[start : start + PROGRESS_CHUNK]))
            bar.update(len(parts[-1]))
        probs = np.concatenate(parts) if parts else np.zeros(0)
        log.info("%s: %d messages in %.1f s", split, len(df), time.perf_counter() - t0)
        metrics[split] = classification_metrics(df.Label, probs, threshold)
        rows = {"split": split, "row": np.arange(len(df)), "label": df.Label, "probability": probs}
        frames.append(pd.DataFrame(rows))
    bar.close()
    pretrained = bool(meta["base"].get("pretrained", False))
    metrics.update(base_pretrained=pretrained, threshold=threshold, precision=precision, device=describe(target))
    return {"metrics": metrics, "predictions": pd.concat(frames, ignore_index=True)}


def headline(metrics: dict) -> dict:
    """The DVC metric of :func:`evaluate_classifier`'s metrics: ``{"test": {f1, accuracy, precision,
    recall, roc_auc}}`` (the whole metrics are the details file)."""
    return {HEADLINE_SPLIT: {k: metrics[HEADLINE_SPLIT][k] for k in HEADLINE_METRICS}}


def write_outputs(
    result: dict,
    metrics_file: str | Path,
    predictions_file: str | Path,
    plots_dir: str | Path,
    details_file: str | Path,
) -> list[Path]:
    """Write the headline metric (:func:`headline`) and every split's metrics (the details), every
    prediction (CSV), and the test split's plots: data and PNGs.

    ``plots_dir`` gets ``confusion.csv`` (``actual, predicted``), ``roc.csv`` (``fpr, tpr,
    threshold``) and ``pr.csv`` (``recall, precision``) for DVC's plot templates, plus
    ``confusion_matrix.png``, ``roc.png`` and ``precision_recall.png``, which render offline.
    Probabilities are written at full precision, so metrics recomputed from the CSV are exact.
    """
    metrics, predictions = result["metrics"], result["predictions"]
    threshold = metrics.get("threshold", 0.5)
    written = [write_atomic(metrics_file, json.dumps(headline(metrics), indent=2) + "\n"),
               write_atomic(details_file, json.dumps(metrics, indent=2) + "\n")]  # fmt: skip
    written.append(write_atomic(predictions_file, predictions.to_csv(index=False, lineterminator="\n")))
    part = predictions[predictions.split == PLOT_SPLIT]
    y, p = part.label.to_numpy(), part.probability.to_numpy()
    plots_dir = Path(plots_dir)
    tables = {"confusion": confusion_table(y, p, threshold), "roc": roc_table(y, p), "pr": pr_table(y, p)}
    for name, table in tables.items():
        written.append(write_atomic(plots_dir / PLOT_FILES[name], table.to_csv(index=False, lineterminator="\n")))
    written += save_eval_plots(y, p, plots_dir, threshold, pretrained=metrics.get("base_pretrained", True))
    return written
