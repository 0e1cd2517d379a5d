"""gpt2lab: GPT-2 from scratch in PyTorch, real weights, LoRA fine-tuning, DVC + MLflow.

``import gpt2lab`` loads nothing else (no torch): the names below are imported on first use.
The package's layers and which module may import which: ``src/gpt2lab/README.md``.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "GPT2": "gpt2lab.model",
    "GPT2Config": "gpt2lab.presets",
    "load_model": "gpt2lab.checkpoint",
    "Classifier": "gpt2lab.inference",
    "classify_review": "gpt2lab.inference",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
