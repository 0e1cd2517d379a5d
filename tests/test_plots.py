"""Figures: written reproducibly (same data, same bytes), atomically, one file per name."""

from __future__ import annotations

import os
import struct

import pandas as pd

from gpt2lab import plots
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


def _captured(monkeypatch) -> list:
    """The figures the plot functions save: (title, x label, y label, tick labels) per axes."""
    seen = []
    real = plots.save_figure

    def capture(fig, *paths):
        for ax in fig.axes:
            ticks = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
            seen.append((ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ticks))
        return real(fig, *paths)

    monkeypatch.setattr(plots, "save_figure", capture)
    return seen


def test_figures_are_titled_name_spam_and_ham_and_mark_random_weights(tmp_path, monkeypatch):
    seen = _captured(monkeypatch)
    save_eval_plots([0, 0, 1, 1], [0.2, 0.7, 0.4, 0.9], tmp_path / "e", pretrained=False)
    save_train_plots(CURVE, tmp_path / "t", pretrained=False)
    titles = [title for title, *_ in seen if title]
    assert len(titles) == 5 and all(t.endswith(plots.RANDOM_NOTE) for t in titles)
    (confusion, roc, pr) = seen[:3]
    assert {"ham", "spam"} <= set(confusion[3])
    assert "spam" in roc[0] and "spam" in roc[2] and "Positive label" not in roc[1] + roc[2]
    assert "spam" in pr[1] and "spam" in pr[2]
    seen.clear()
    save_eval_plots([0, 1], [0.2, 0.9], tmp_path / "p")  # a pretrained base: no mark
    assert not any(title.endswith(plots.RANDOM_NOTE) for title, *_ in seen)


def test_figures_are_150_dpi(tmp_path):
    (png,) = [p for p in save_train_plots(CURVE, tmp_path) if p.name == "loss.png"]
    width, height = struct.unpack(">II", png.read_bytes()[16:24])  # the PNG IHDR chunk
    assert (width, height) == (5 * plots.DPI, 3 * plots.DPI) and plots.DPI >= 150
