"""A tiny saved spam classifier for the inference, CLI, evaluate-stage and serving tests."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2lab.classifier import build_classifier, save_classifier
from gpt2lab.config import ModelParams, WeightsParams
from gpt2lab.lora import LoRAConfig
from gpt2lab.weights import fetch_weights

TINY_PARAMS = ModelParams(n_layer=2, n_head=4, n_embd=32, n_ctx=64)
LORA = LoRAConfig(rank=4, alpha=8.0)
# Real-looking messages, with the awkward cases: empty, emoji, other scripts, longer than the context.
MESSAGES = [
    "You won $1000! Claim now.",
    "see you at lunch?",
    "",
    "URGENT! Your mobile No. 07808726822 was awarded a £2,000 Bonus Caller Prize. Call 09066368327",
    "😀😂 party tonight? 🎉",
    "Привет, как дела? 你好 مرحبا",
    "FREE entry into our weekly competition, text WIN to 80086 now " * 20,
]


def make_classifier(folder: Path, seed: int = 1) -> tuple[Path, Path]:
    """(classifier folder, base folder): a random tiny GPT-2 base and a LoRA classifier saved on it.

    The adapters and the head get random values (as if trained), so both labels occur.
    """
    base = fetch_weights(TINY_PARAMS, WeightsParams(source="random"), seed, folder / "base")
    torch.manual_seed(seed)
    model = build_classifier(base, "lora", LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 0.3)
    return save_classifier(model, folder / "classifier", mode="lora", base_dir=base, lora=LORA), base
