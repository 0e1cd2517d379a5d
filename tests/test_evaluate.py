"""Metrics equal a hand computation; the evaluate stage writes metrics, predictions and plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from gpt2lab.dataset import parse_collection, read_split, write_split
from gpt2lab.evaluate import (
    EvalError,
    classification_metrics,
    confusion_table,
    evaluate_classifier,
    pr_table,
    roc_table,
    write_outputs,
)
from gpt2lab.devices import describe, resolve_device, resolve_precision
from gpt2lab.inference import Classifier
from gpt2lab.plots import save_eval_plots
from tests.helpers import MESSAGES, make_classifier


def clf_device():
    """Where ``device: auto`` (the eval section's default) runs here."""
    return resolve_device("auto")


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
    paths = save_eval_plots(y, p, tmp_path)
    assert [x.name for x in paths] == ["confusion_matrix.png", "roc.png", "precision_recall.png"]
    assert all(x.read_bytes()[:4] == b"\x89PNG" for x in paths)


REPO = Path(__file__).resolve().parents[1]


FIXTURE = REPO / "tests" / "fixtures" / "sms_small.tsv"


SPLITS = ("train", "validation", "test")


def make_splits(folder: Path) -> dict[str, pd.DataFrame]:
    """Three splits from the fixture collection plus the awkward messages, each with both classes."""
    df = parse_collection(FIXTURE)
    extra = pd.DataFrame({"Label": [1, 0, 0, 1, 0, 0, 1], "Text": MESSAGES})
    parts = {"train": df.iloc[:20], "validation": pd.concat([df.iloc[20:26], extra.iloc[:3]]),
             "test": pd.concat([df.iloc[26:], extra])}  # fmt: skip
    for name, part in parts.items():
        assert part.Label.nunique() == 2, name
        write_split(part.reset_index(drop=True), folder / f"{name}.csv")
    return {name: read_split(folder / f"{name}.csv") for name in parts}


def check_against_independent(metrics: dict, predictions: pd.DataFrame, threshold: float) -> None:
    """Every split's numbers equal a by-hand count and scikit-learn called directly on the predictions."""
    for split in SPLITS:
        part = predictions[predictions.split == split]
        y, p = part.label.to_numpy(), part.probability.to_numpy()
        ours, ref = metrics[split], _by_hand(y, p, threshold)
        assert ours["n"] == len(y)
        assert ours["confusion_matrix"] == ref["confusion_matrix"]
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-12), (split, key)
        pred = (p >= threshold).astype(int)
        assert ours["f1"] == pytest.approx(skm.f1_score(y, pred), abs=1e-12)
        assert ours["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder as the pipeline leaves it before `evaluate`: params, classifier, prepared data."""
    root = tmp_path_factory.mktemp("project")
    clf_dir, _ = make_classifier(root / "models")
    shutil.move(clf_dir, root / "models" / "classifier")
    make_splits(root / "data" / "prepared")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def test_metrics_and_predictions(project, tmp_path):
    splits = {s: read_split(project / "data" / "prepared" / f"{s}.csv") for s in SPLITS}
    threshold = 0.4
    result = evaluate_classifier(project / "models" / "classifier", project / "data" / "prepared",
                                 batch_size=4, precision="fp32", threshold=threshold)  # fmt: skip
    metrics, predictions = result["metrics"], result["predictions"]
    assert list(metrics) == [*SPLITS, "base_pretrained", "threshold", "precision", "device"]
    assert metrics["precision"] == "fp32" and metrics["device"] == describe(clf_device())
    assert metrics["base_pretrained"] is False and metrics["threshold"] == threshold
    # The predictions are the classifier's, row by row, with the split's own labels.
    clf = Classifier.load(project / "models" / "classifier")
    for split, df in splits.items():
        part = predictions[predictions.split == split]
        assert part.row.tolist() == list(range(len(df))) and part.label.tolist() == df.Label.tolist()
        np.testing.assert_allclose(part.probability, clf.predict_proba(df.Text.tolist()), rtol=1e-5, atol=1e-7)
    check_against_independent(metrics, predictions, threshold)
    cm = metrics["test"]["confusion_matrix"]
    assert min(cm.values()) >= 0 and sum(cm.values()) == len(splits["test"])

    files = write_outputs(result, tmp_path / "eval.json", tmp_path / "predictions.csv", tmp_path / "plots",
                          tmp_path / "details.json")  # fmt: skip
    headline = json.loads((tmp_path / "eval.json").read_text())
    details = json.loads((tmp_path / "details.json").read_text())
    # The DVC metric: the held-out split's scores, F1 first (what `dvc exp show` keeps in view); no counts.
    assert list(headline) == ["test"] and list(headline["test"]) == ["f1", "accuracy", "precision", "recall", "roc_auc"]
    assert all(headline["test"][k] == details["test"][k] for k in headline["test"])
    assert details == json.loads(json.dumps(metrics))  # every number of every split
    reread = pd.read_csv(tmp_path / "predictions.csv")
    assert reread.probability.tolist() == predictions.probability.tolist()  # full precision, exact
    check_against_independent(details, reread, threshold)
    names = sorted(f.relative_to(tmp_path).as_posix() for f in files)
    assert names == sorted(["eval.json", "details.json", "predictions.csv", "plots/confusion.csv", "plots/roc.csv",
                            "plots/pr.csv", "plots/confusion_matrix.png", "plots/roc.png",
                            "plots/precision_recall.png"])  # fmt: skip


def test_int8_evaluation_is_close_to_fp32(project):
    args = (project / "models" / "classifier", project / "data" / "prepared")
    fp32 = evaluate_classifier(*args, batch_size=8, precision="fp32", splits=("test",))
    int8 = evaluate_classifier(*args, batch_size=8, precision="int8", splits=("test",))
    assert int8["metrics"]["precision"] == "int8"
    np.testing.assert_allclose(int8["predictions"].probability, fp32["predictions"].probability, atol=0.05)


def test_missing_split_says_which_stage_to_run(project, tmp_path):
    for split in ("train", "validation"):
        shutil.copy(project / "data" / "prepared" / f"{split}.csv", tmp_path)
    with pytest.raises(EvalError, match=r"test\.csv: missing; run the prepare_data stage"):
        evaluate_classifier(project / "models" / "classifier", tmp_path)


@pytest.mark.slow
def test_stage_script_end_to_end(project):
    """`python stages/evaluate.py` in a project folder writes every file, consistent with each other."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, str(REPO / "stages" / "evaluate.py")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("evaluate: test F1 ") and done.stdout.count("\n") == 1  # one result line
    metrics = json.loads((project / "metrics" / "eval_details.json").read_text())
    predictions = pd.read_csv(project / "metrics" / "predictions.csv")
    # params.yaml's eval section: precision auto, as the hardware runs it
    assert metrics["precision"] == resolve_precision("auto", clf_device()) and metrics["threshold"] == 0.5
    check_against_independent(metrics, predictions, 0.5)

    plots = project / "metrics" / "plots"
    test = predictions[predictions.split == "test"]
    y, p = test.label.to_numpy(), test.probability.to_numpy()
    confusion = pd.read_csv(plots / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == len(test)
    counts = confusion.value_counts()
    cm = metrics["test"]["confusion_matrix"]
    assert (counts.get(("spam", "spam"), 0), counts.get(("ham", "spam"), 0)) == (cm["tp"], cm["fp"])
    assert (counts.get(("ham", "ham"), 0), counts.get(("spam", "ham"), 0)) == (cm["tn"], cm["fn"])
    roc = pd.read_csv(plots / "roc.csv")
    fpr, tpr, _ = skm.roc_curve(y, p)
    np.testing.assert_allclose(roc.fpr, fpr)
    np.testing.assert_allclose(roc.tpr, tpr)
    assert np.trapezoid(roc.tpr, roc.fpr) == pytest.approx(metrics["test"]["roc_auc"], abs=1e-12)
    pr = pd.read_csv(plots / "pr.csv")
    assert list(pr.columns) == ["recall", "precision"] and pr.recall.iloc[-1] == 0.0
    for png in ("confusion_matrix.png", "roc.png", "precision_recall.png"):
        assert (plots / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
