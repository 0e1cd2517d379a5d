"""Figures: written reproducibly (same data, same bytes), atomically, one file per name."""

from __future__ import annotations

import os

import pandas as pd

from gpt2lab.plots import save_eval_plots, save_train_plots

CURVE = pd.DataFrame({"step": [1, 20, 40], "epoch": [1, 1, 1], "examples_seen": [8, 160, 320],
                      "train_loss": [0.9, 0.6, 0.4], "val_loss": [1.0, 0.7, 0.5],
                      "train_acc": [0.5, 0.7, 0.8], "val_acc": [0.4, 0.6, 0.75]})  # fmt: skip


def test_training_curves_are_reproducible_png_and_pdf(tmp_path):
    first = save_train_plots(CURVE, tmp_path / "a")
    second = save_train_plots(CURVE, tmp_path / "b")
    assert [p.name for p in first] == ["loss-plot.pdf", "loss.png", "accuracy-plot.pdf", "accuracy.png"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name  # no timestamps, no version stamps
    assert first[1].read_bytes()[:4] == b"\x89PNG" and first[0].read_bytes()[:4] == b"%PDF"
    assert sorted(os.listdir(tmp_path / "a")) == sorted(p.name for p in first)  # no temporary files left


def test_evaluation_figures_are_reproducible(tmp_path):
    y, p = [0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.9, 0.8]
    first = save_eval_plots(y, p, tmp_path / "a")
    second = save_eval_plots(y, p, tmp_path / "b")
    assert [x.name for x in first] == ["confusion_matrix.png", "roc.png", "precision_recall.png"]
    assert [x.read_bytes() for x in first] == [x.read_bytes() for x in second]
