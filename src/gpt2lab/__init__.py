"""gpt2lab: GPT-2 from scratch in PyTorch, real weights, LoRA fine-tuning, DVC + MLflow."""

from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.weights import load_model

__all__ = ["GPT2", "GPT2Config", "load_model"]
__version__ = "0.1.0"
