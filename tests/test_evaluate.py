"""Evaluation metrics equal an independent computation on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2lab.evaluate import classification_metrics, confusion_table, pr_table, roc_table, save_figures


def _by_hand(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # AUC as the probability that a random spam scores above a random ham (ties count half).
    pos, neg = p[y == 1], p[y == 0]
    auc = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (len(pos) * len(neg))
    return {"accuracy": (tp + tn) / len(y), "precision": precision, "recall": recall, "f1": f1, "roc_auc": auc,
            "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp}}  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_metrics_equal_hand_computation(seed, threshold):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.6 + rng.normal(0.2, 0.25, 300), 0, 1).round(2)  # rounding makes ties
    ours = classification_metrics(y, p, threshold)
    ref = _by_hand(y, p, threshold)
    assert ours["n"] == 300
    assert ours["confusion_matrix"] == ref["confusion_matrix"]
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_single_class_split_has_no_auc_and_no_crash():
    m = classification_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert m["roc_auc"] is None and m["precision"] == 0.0 and m["confusion_matrix"]["fp"] == 1


def test_plot_tables(tmp_path):
    y = [0, 0, 1, 1]
    p = [0.1, 0.6, 0.4, 0.9]
    roc = roc_table(y, p)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and roc["tpr"].iloc[-1] == 1.0
    assert list(pr_table(y, p).columns) == ["recall", "precision"]
    conf = confusion_table(y, p)
    assert conf.values.tolist() == [["ham", "ham"], ["ham", "spam"], ["spam", "ham"], ["spam", "spam"]]
    paths = save_figures(y, p, tmp_path)
    assert [x.name for x in paths] == ["confusion_matrix.png", "roc.png", "precision_recall.png"]
    assert all(x.read_bytes()[:4] == b"\x89PNG" for x in paths)
