"""The GPU check, in one run of a few minutes on one CUDA device: gpt2lab against transformers +
peft on the same GPU, GPT-2 124M with random weights (speed and parity do not depend on their
values). Four parts, each printed as a table; it asserts nothing:

1. Parity: logits of the same weights and tokens on the CPU and on the GPU, fp32 (TF32 off),
   gpt2lab and transformers' ``GPT2LMHeadModel``; the target is max |dlogit| <= 1e-4.
2. Fine-tuning: the train stage's own function (``gpt2lab.train.train_classifier``), LoRA rank 16
   on every projection, 5 epochs of the prepared training split (batch 8), ``precision: auto``
   (bf16 on GPUs that have it); against ``GPT2ForSequenceClassification`` + ``get_peft_model``
   with the same rank, batch, optimizer and precision, batches padded as the reference recipe
   does (to the longest message of the split, with an attention mask; ``--hf-padding longest``:
   per batch). transformers runs until its 5 epochs or ``--hf-seconds``, whichever comes first,
   and its 5-epoch time is then projected from its examples/s. The anchor: 0.75 min on an A100.
3. Classification: messages/s over the test split (``Classifier.predict_proba``) against
   transformers (batches in order, padded per batch, attention mask), and max |dp| between them.
4. Generation: greedy decoding, batch 1, new tokens/s (gpt2lab's preallocated KV cache against
   ``GPT2LMHeadModel.generate``), and how many tokens the two share.

Sized to finish in under 8 minutes on one GPU. Without CUDA it prints one line and exits 0.
``--smoke`` runs every part on a tiny model and a few steps, on ``--device`` (the CPU allowed):
it checks the script, not the GPU.

    python bench/gpu.py                                  # on a CUDA machine, after dvc repro prepare_data
    python bench/gpu.py --smoke --device cpu             # the code paths, anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2lab.batching import SpamDataset
from gpt2lab.checkpoint import load_model, random_checkpoint
from gpt2lab.convert import TRANSPOSED
from gpt2lab.dataset import read_split
from gpt2lab.devices import autocast, describe, resolve_device, resolve_precision
from gpt2lab.generate import generate
from gpt2lab.inference import Classifier
from gpt2lab.lora import is_lora_param
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.params import LoRAParams, TrainParams, load_params
from gpt2lab.tokenizer import EOT_TOKEN, encode
from gpt2lab.train import train_classifier

ANCHOR_MIN = 0.75  # rasbt's LoRA r16 on 124M, 5 epochs, one A100
EPOCHS, BATCH, RANK, LR = 5, 8, 16, 5e-5
TINY = GPT2Config(vocab_size=50257, n_ctx=256, n_embd=64, n_layer=2, n_head=4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_config(cfg: GPT2Config, **extra):
    from transformers import GPT2Config as HFConfig

    return HFConfig(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra)  # fmt: skip


def hf_state(body: torch.nn.Module) -> dict[str, torch.Tensor]:
    """gpt2lab's GPT-2 weights (LoRA merged or absent) in transformers' layout (``transformer.*``)."""
    state = {k: v for k, v in body.state_dict().items() if k != "lm_head.weight" and not is_lora_param(k)}
    return {f"transformer.{k}": (v.t() if TRANSPOSED.fullmatch(k) else v).contiguous() for k, v in state.items()}


def hf_lm(model: GPT2) -> torch.nn.Module:
    """``GPT2LMHeadModel`` holding the weights of ``model``."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_config(model.config)).eval()
    missing, unexpected = hf.load_state_dict(hf_state(model.cpu()), strict=False)
    if unexpected or [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias", "lm_head.weight"))]:
        raise SystemExit(f"weight mapping is off: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    return hf


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# --- 1. parity -------------------------------------------------------------------------------
@torch.inference_mode()
def parity(base: Path, device: torch.device, tokens: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
    ours_cpu = load_model(base)
    ids = torch.randint(0, ours_cpu.config.vocab_size, (4, tokens), generator=torch.Generator().manual_seed(0))
    reference = ours_cpu(ids).float()
    ours_gpu = load_model(base, device=device)
    hf_gpu = hf_lm(load_model(base)).to(device)
    rows = []
    for name, fn in (("gpt2lab", lambda: ours_gpu(ids.to(device))),
                     ("transformers", lambda: hf_gpu(input_ids=ids.to(device)).logits)):  # fmt: skip
        diff = (fn().float().cpu() - reference).abs().max().item()
        rows.append([name, str(device), f"{diff:.2e}", "ok" if diff <= 1e-4 else "ABOVE 1e-4"])
    table(f"1. logits parity, fp32, against gpt2lab on the CPU ({tuple(ids.shape)} tokens)",
          ["model", "device", "max abs dlogit", "<= 1e-4"], rows)  # fmt: skip


# --- 2. fine-tuning --------------------------------------------------------------------------
def train_ours(base: Path, data: Path, out: Path, device: str, epochs: int, max_length: int | None) -> dict:
    params = load_params()
    lora = dataclasses.replace(params.lora, rank=RANK, alpha=float(RANK), dropout=0.0)
    train = TrainParams(epochs=epochs, batch_size=BATCH, lr=LR, precision="auto", device=device, max_length=max_length)
    seed = 0
    return train_classifier(base, data, out, lora, train, seed)["metrics"]


def train_hf(
    base: Path, data: Path, lora: LoRAParams, device: torch.device, precision: str, args: argparse.Namespace
) -> tuple[float, int, int]:
    """(seconds, examples, trainable parameters) of transformers + peft for 5 epochs or ``--hf-seconds``."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import GPT2ForSequenceClassification

    cfg = load_model(base).config
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(hf_config(cfg, num_labels=2, pad_token_id=EOT_TOKEN))
    model.load_state_dict(hf_state(load_model(base)), strict=False)
    peft_cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                          target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)  # fmt: skip
    model = get_peft_model(model, peft_cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1, fused=device.type == "cuda")
    dataset = SpamDataset.from_csv(data / "train.csv", cfg.n_ctx)
    width = max(dataset.lengths)
    g = torch.Generator().manual_seed(0)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for _ in range(args.epochs):
            order = torch.randperm(len(dataset), generator=g).tolist()
            for s in range(0, len(order), BATCH):
                items = [dataset[i] for i in order[s : s + BATCH]]
                t = width if args.hf_padding == "max_length" else max(len(x) for x, _ in items)
                ids = torch.full((len(items), t), EOT_TOKEN)
                mask = torch.zeros((len(items), t), dtype=torch.long)
                for r, (seq, _) in enumerate(items):
                    ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
                yield ids, mask, torch.tensor([label for _, label in items])

    examples, steps = 0, 0
    sync(device)
    t0 = time.perf_counter()
    for ids, mask, labels in batches():
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        with autocast(precision, device):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as gpt2lab's step: the loss is read every step
        examples, steps = examples + len(labels), steps + 1
        if args.smoke and steps >= 3 or time.perf_counter() - t0 > args.hf_seconds:
            break
    sync(device)
    return time.perf_counter() - t0, examples, sum(p.numel() for p in params)


def fine_tuning(base: Path, data: Path, tmp: Path, device: torch.device, args: argparse.Namespace) -> Path:
    n = len(SpamDataset.from_csv(data / "train.csv", 1024))
    m = train_ours(base, data, tmp / "classifier", args.device, args.epochs, 32 if args.smoke else None)
    rate = m["examples_per_s"]
    lora = LoRAParams(rank=RANK, alpha=float(RANK))
    seconds, examples, hf_trainable = train_hf(base, data, lora, device, m["precision"], args)
    hf_rate = examples / seconds
    hf_5 = args.epochs * n / hf_rate
    rows = [
        ["gpt2lab", m["precision"], "bucketed, per batch", f"{m['trainable_params']:,}", f"{rate:.1f}",
         f"{m['train_time_s'] / 60:.2f} min (wall {m['wall_time_s'] / 60:.2f})", f"{rate / hf_rate:.1f}x"],
        ["transformers+peft", m["precision"], f"{args.hf_padding} + mask", f"{hf_trainable:,}", f"{hf_rate:.1f}",
         f"{hf_5 / 60:.2f} min" + (" (projected)" if examples < args.epochs * n else ""), "1.0x"],
    ]  # fmt: skip
    table(f"2. LoRA r{RANK} fine-tuning, {args.epochs} epochs x {n} messages, batch {BATCH}, {describe(device)}",
          ["framework", "precision", "padding", "trainable", "examples/s", f"{args.epochs} epochs", "vs hf"], rows)  # fmt: skip
    print(f"anchor: {ANCHOR_MIN} min on one A100 (5 epochs); gpt2lab: {m['train_time_s'] / 60:.2f} min of steps, "
          f"{rate / hf_rate:.1f}x transformers+peft examples/s (target: >= 2x); val accuracy "
          f"{m['val_accuracy']:.3f} (random weights)")  # fmt: skip
    return tmp / "classifier"


# --- 3. classification -----------------------------------------------------------------------
def classification(clf_dir: Path, base: Path, data: Path, device: torch.device, args: argparse.Namespace) -> None:
    from transformers import GPT2ForSequenceClassification

    texts = read_split(data / "test.csv").Text.tolist()
    ours = Classifier.load(clf_dir, base, batch_size=args.batch_size, precision="auto", device=args.device)
    precision = ours.precision
    merged = Classifier.load(clf_dir, base, device="cpu").model  # LoRA merged into the weights for transformers
    cfg = merged.body.config
    hf = GPT2ForSequenceClassification(hf_config(cfg, num_labels=2, pad_token_id=EOT_TOKEN)).eval()
    state = hf_state(merged.body) | {"score.weight": merged.head.weight.detach().clone()}
    hf.load_state_dict(state, strict=False)
    hf.to(device)

    @torch.inference_mode()
    def hf_proba() -> np.ndarray:
        out = []
        for s in range(0, len(texts), args.batch_size):
            ids = [encode(t)[: ours.max_length] or [EOT_TOKEN] for t in texts[s : s + args.batch_size]]
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), EOT_TOKEN)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, seq in enumerate(ids):
                input_ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            with autocast(precision, device):
                logits = hf(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            out.append(torch.softmax(logits.float(), -1)[:, 1].cpu().numpy())
        return np.concatenate(out)

    runs = {"gpt2lab": lambda: ours.predict_proba(texts), "transformers": hf_proba}
    probs = {k: fn() for k, fn in runs.items()}  # warm-up
    times = {k: [timed(fn, device)[0] for _ in range(args.repeats)] for k, fn in runs.items()}
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    dp = float(np.max(np.abs(probs["gpt2lab"] - probs["transformers"])))
    rows = [[k, precision, f"{rate[k]:.0f}", f"{rate[k] / rate['transformers']:.1f}x"] for k in runs]
    table(f"3. classification, {len(texts)} test messages, batch {args.batch_size}, median of {args.repeats} "
          f"(max |dp| gpt2lab vs transformers: {dp:.1e})", ["framework", "precision", "messages/s", "vs hf"], rows)  # fmt: skip


# --- 4. generation ---------------------------------------------------------------------------
def generation(base: Path, device: torch.device, args: argparse.Namespace) -> None:
    rows = []
    prompt = encode("Every effort moves you")
    n = args.new_tokens
    hf = hf_lm(load_model(base)).to(device)
    for precision in ("fp32", resolve_precision("auto", device)):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        ours = load_model(base, dtype=dtype, device=device)
        hf_p = hf.to(dtype)

        def run_ours(ours=ours) -> list[int]:
            return generate(ours, [prompt], n, temperature=0.0)[0]

        @torch.inference_mode()
        def run_hf(hf_p=hf_p) -> list[int]:
            ids = torch.tensor([prompt], device=device)
            out = hf_p.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=EOT_TOKEN)  # fmt: skip
            return out[0, len(prompt) :].tolist()

        run_ours(), run_hf()  # warm-up
        (t_ours, toks), (t_hf, hf_toks) = timed(run_ours, device), timed(run_hf, device)
        same = next((i for i, (a, b) in enumerate(zip(toks, hf_toks, strict=False)) if a != b), n)
        rows.append(["gpt2lab", precision, f"{n / t_ours:.0f}", f"{t_hf / t_ours:.1f}x", f"{same}/{n}"])
        rows.append(["transformers", precision, f"{n / t_hf:.0f}", "1.0x", "-"])
    table(f"4. greedy generation, batch 1, {n} new tokens", ["framework", "precision", "tokens/s", "vs hf",
          "same tokens as hf"], rows)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N (cpu only with --smoke)")
    parser.add_argument("--data", default="data/prepared", help="the prepared splits (dvc repro prepare_data)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--hf-seconds", type=float, default=120.0, help="transformers+peft trains at most this long")
    parser.add_argument("--hf-padding", choices=["max_length", "longest"], default="max_length")
    parser.add_argument("--batch-size", type=int, default=64, help="classification batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps: checks the script")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA device here (PyTorch {torch.__version__}, CUDA build: {torch.version.cuda}); "
              "run it on a machine with a GPU")  # fmt: skip
        return 0
    if args.device == "cpu" and not args.smoke:
        raise SystemExit("bench/gpu.py: --device cpu only with --smoke (bench/train.py etc. time the CPU)")
    data = Path(args.data)
    if not (data / "train.csv").is_file():
        raise SystemExit(f"bench/gpu.py: {data}/train.csv missing; run `dvc repro prepare_data` first (or --data)")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gpt2lab").setLevel(logging.ERROR)  # "RANDOM weights" on every load: known, said once
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = resolve_device(args.device, key="--device")
    if args.smoke:
        args.epochs, args.repeats, args.new_tokens = 1, 1, 8
    print(f"bench/gpu.py: {describe(device)}, PyTorch {torch.__version__}, random weights"
          + (", SMOKE (tiny model)" * args.smoke))  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TINY if args.smoke else GPT2Config.preset("gpt2")
        base = random_checkpoint(cfg, 0, Path(tmp) / "base")
        parity(base, device, 8 if args.smoke else 256)
        clf_dir = fine_tuning(base, data, Path(tmp), device, args)
        classification(clf_dir, base, data, device, args)
        generation(base, device, args)
    print(f"\nbench/gpu.py: done in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
