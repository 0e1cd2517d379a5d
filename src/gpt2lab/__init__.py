"""gpt2lab: GPT-2 from scratch in PyTorch, real weights, LoRA fine-tuning, DVC + MLflow."""

from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.weights import load_model

__all__ = ["GPT2", "GPT2Config", "Classifier", "classify_review", "load_model"]
__version__ = "0.1.0"

_LAZY = {"Classifier": "gpt2lab.classifier", "classify_review": "gpt2lab.classifier"}


def __getattr__(name: str) -> object:
    # Imported on first use: `import gpt2lab` (and every DVC stage) stays off the classifier's
    # modules, so a change there does not invalidate stages that never use it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
