"""Matplotlib figures written reproducibly: headless, atomic, no timestamps or version stamps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

# Metadata that would otherwise vary between runs: the same data then gives the same bytes.
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
            fig.savefig(tmp, dpi=100, metadata=_STABLE_METADATA.get(path.suffix))
            os.replace(tmp, path)
            written.append(path)
    finally:
        plt.close(fig)
    return written
