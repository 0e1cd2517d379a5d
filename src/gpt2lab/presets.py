"""GPT-2's architecture sizes and names, in one place (no torch: params validation reads them).

``GPT2Config`` holds the hyper-parameters under the names of OpenAI's ``hparams.json``;
:data:`PRESETS` the four published sizes; :data:`OPENAI_SIZES` and :data:`HF_REPOS` the names
the two publishers give them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GPT2Config:
    """Architecture hyper-parameters (names as in OpenAI's ``hparams.json``)."""

    vocab_size: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """One of ``gpt2`` (124M), ``gpt2-medium`` (355M), ``gpt2-large`` (774M), ``gpt2-xl`` (1558M)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}
MODEL_NAMES = tuple(PRESETS)

# Model name -> OpenAI's folder name and the Hugging Face repository.
OPENAI_SIZES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
HF_REPOS = {name: f"openai-community/{name}" for name in PRESETS}
