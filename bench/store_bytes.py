"""Artifact bytes a second LoRA experiment on the same base adds to the tracking store, before and after
bases were stored once per sha256 (``log_model(share_base=False)`` embeds the base, as every logged
model did before).

The smoke profile's model (2 layers, 64 wide, rank 16) is built and logged for real, twice per way,
into a fresh SQLite store; 124M is computed from its tensor sizes (building and logging it twice
would write about 2 GB). Prints a table; asserts nothing.

    python bench/store_bytes.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch

from gpt2lab.checkpoint import random_checkpoint
from gpt2lab.classifier import build_classifier
from gpt2lab.classifier_io import save_classifier
from gpt2lab.lora import LoRAConfig
from gpt2lab.model import GPT2Config
from gpt2lab.params import LoRAParams
from gpt2lab.serving import log_model
from gpt2lab.tokenizer import _ranks_path

SMOKE = GPT2Config.preset("gpt2", n_layer=2, n_head=2, n_embd=64, n_ctx=128)
LORA = LoRAParams()  # params.yaml's rank 16, alpha 16, the four targets


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(root: Path, share_base: bool) -> tuple[int, int]:
    """(bytes after the first experiment, bytes the second one added) in a fresh store under ``root``."""
    base = random_checkpoint(SMOKE, 123, root / "base")
    lora = LoRAConfig(rank=LORA.rank, alpha=float(LORA.alpha), targets=tuple(LORA.targets))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("bytes", artifact_location=(root / "artifacts").as_uri())
    sizes = []
    for seed in (1, 2):  # two experiments: other adapters, the same base
        torch.manual_seed(seed)
        model = build_classifier(base, "lora", lora)
        clf = save_classifier(model, root / f"clf{seed}", mode="lora", base_dir=base, lora=lora)
        run_id = client.create_run(experiment).info.run_id
        log_model(clf, base, run_id=run_id, tracking_uri=uri, share_base=share_base)
        sizes.append(_bytes(root / "artifacts"))
    return sizes[0], sizes[1] - sizes[0]


def lora_params(cfg: GPT2Config, rank: int) -> int:
    """Adapter parameters on attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj of every block."""
    d = cfg.n_embd
    per_block = rank * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    return per_block * cfg.n_layer


def base_params(cfg: GPT2Config) -> int:
    d, n_layer = cfg.n_embd, cfg.n_layer
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return cfg.vocab_size * d + cfg.n_ctx * d + n_layer * block + 2 * d


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in (False, True):
            first, added = measure(Path(tmp) / str(share), share)
            rows.append(("smoke (measured)", "after: base stored once" if share else "before: base in every model",
                         first, added))  # fmt: skip
    small = rows[1][3]  # what the second smoke experiment adds besides its adapter: code, MLmodel, JSON
    smoke_adapter = 4 * lora_params(SMOKE, LORA.rank)
    gpt2 = GPT2Config.preset("gpt2")
    base_124m, adapter_124m = 4 * base_params(gpt2), 4 * lora_params(gpt2, LORA.rank)
    ranks = _ranks_path().stat().st_size if _ranks_path().is_file() else 0
    other = small - smoke_adapter
    rows.append(("124M (computed)", "before: base in every model", None, base_124m + ranks + adapter_124m + other))
    rows.append(("124M (computed)", "after: base stored once", None, adapter_124m + other))
    print("| model | logged models | first experiment (bytes) | each further experiment (bytes) |")
    print("|---|---|---:|---:|")
    for model, how, first, added in rows:
        print(f"| {model} | {how} | {'' if first is None else f'{first:,}'} | {added:,} |")
    print(f"\nsmoke adapter {smoke_adapter:,} B; 124M base weights {base_124m:,} B, adapter {adapter_124m:,} B; "
          f"BPE ranks {ranks:,} B; code, MLmodel, head and JSON per model about {other:,} B")  # fmt: skip


if __name__ == "__main__":
    main()
