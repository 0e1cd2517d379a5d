"""Training throughput of the spam classifier: gpt2lab against transformers + peft.

GPT-2 124M (random weights: speed does not depend on their values), LoRA rank 16 on every
attention and MLP projection plus a 2-class head, batch size 8, AdamW, gradient clipping,
on the balanced training split. All run in this process, at each precision asked for, and take
turns step by step (a machine whose speed drifts during the run slows every row alike).

- gpt2lab: the training step of ``gpt2lab.train`` (per-batch padding, optionally bucketed
  by length; no LM head; frozen weights stored in bf16 under autocast).
- gpt2lab compiled: the same, bucketed, with ``train.compile`` (``torch.compile``, one graph for
  every batch length); its first step, which compiles, is untimed and printed.
- transformers + peft: ``GPT2ForSequenceClassification`` + ``get_peft_model``, batches padded
  as usually written (``--hf-padding max_length``: every message padded to the longest in the
  training split with an attention mask, as the reference recipe does; ``longest``: per batch).

Prints a table of examples/s, with the token positions each framework runs per step of
``--batch-size`` messages and the share of them that is padding (a step's cost grows with its
positions), and the machine's load as a yardstick (``machine.Yardstick``); it asserts nothing
about timings.

    python bench/train.py                                        # both precisions
    python bench/train.py --precision bf16 --steps 20 --hf-steps 5  # a quick look
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from machine import Yardstick, compiler_note

from gpt2lab.batching import SpamDataset, make_loader
from gpt2lab.classifier import SpamClassifier, cast_frozen_linears, configure
from gpt2lab.devices import autocast
from gpt2lab.kernels import inductor_options
from gpt2lab.lora import LoRAConfig
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.tokenizer import EOT_TOKEN
from gpt2lab.train import make_optimizer, row_multiple_for, train_step

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
EPOCHS = 5


class Work(NamedTuple):
    """What timed steps computed: messages, token positions run (padding included) and real tokens."""

    examples: int
    positions: int
    tokens: int

    def __add__(self, other: tuple) -> Work:
        return Work(*(a + b for a, b in zip(self, other)))

    @classmethod
    def of(cls, ids: torch.Tensor, lengths: torch.Tensor) -> Work:
        """The work of one batch: ``ids`` (B, T) padded, ``lengths`` (B,)."""
        return cls(len(ids), ids.numel(), int(lengths.sum()))


class Row(NamedTuple):
    """One framework's training step (``step()`` -> the work it did), how many steps to time, trainable params."""

    step: Callable[[], Work]
    steps: int
    trainable: int


def time_interleaved(rows: list[Row], warmup: int) -> list[tuple[float, Work]]:
    """Each row's ``warmup`` untimed steps, then its timed steps, the rows taking turns step by step
    (a machine whose speed drifts during the run slows every row alike), a row of fewer steps spreading
    them evenly over the turns; (seconds, work) per row."""
    for row in rows:
        for _ in range(warmup):
            row.step()
    seconds, work = [0.0] * len(rows), [Work(0, 0, 0)] * len(rows)
    turns = max(row.steps for row in rows)
    for i in range(turns):
        for r, row in enumerate(rows):
            if (i + 1) * row.steps // turns > i * row.steps // turns:  # row.steps of the turns, evenly
                t0 = time.perf_counter()
                done = row.step()
                seconds[r] += time.perf_counter() - t0
                work[r] += done
    return list(zip(seconds, work))


def cycle(loader) -> Iterator:
    while True:
        yield from loader


def gpt2lab_row(
    dataset: SpamDataset, args: argparse.Namespace, precision: str, bucket: bool, compile: bool = False
) -> Row:
    torch.manual_seed(0)
    model = SpamClassifier(GPT2(GPT2Config.preset("gpt2")))
    trainable = configure(model, "lora", LoRAConfig(args.rank, float(args.rank), 0.0, TARGETS))
    if precision == "bf16":
        cast_frozen_linears(model, torch.bfloat16)
    model.train()
    if compile:
        model.compile(dynamic=True, options=inductor_options())  # as train.compile does
    optimizer = make_optimizer(model, 5e-5, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = make_loader(dataset, args.batch_size, shuffle=True, seed=0, bucket=bucket,
                         row_multiple=row_multiple_for(precision, torch.device("cpu")))  # as train does
    batches = cycle(loader)

    def step() -> Work:
        batch = next(batches)
        train_step(model, batch, optimizer, params, precision=precision, grad_clip=1.0)
        return Work.of(batch.ids, batch.lengths)

    if compile:
        t0 = time.perf_counter()
        step()
        print(f"(gpt2lab {precision} compiled: first step {time.perf_counter() - t0:.0f} s, compiling; untimed)")
    # Default: one whole epoch, so bucketed batches of every length are timed in proportion.
    return Row(step, args.steps or len(loader), trainable)


def hf_row(dataset: SpamDataset, args: argparse.Namespace, precision: str) -> Row:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = HFConfig(num_labels=2, pad_token_id=EOT_TOKEN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2ForSequenceClassification(cfg)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
        target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
    )  # fmt: skip
    model = get_peft_model(model, lora)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)
    # What a tokenizer call with padding gives: ids padded with the pad token, plus a mask.
    width = max(dataset.lengths)
    g = torch.Generator().manual_seed(0)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            order = torch.randperm(len(dataset), generator=g).tolist()
            for s in range(0, len(order), args.batch_size):
                items = [dataset[i] for i in order[s : s + args.batch_size]]
                t = width if args.hf_padding == "max_length" else max(len(ids) for ids, _ in items)
                ids = torch.full((len(items), t), EOT_TOKEN)
                mask = torch.zeros((len(items), t), dtype=torch.long)
                for r, (seq, _) in enumerate(items):
                    ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
                yield ids, mask, torch.tensor([label for _, label in items])

    it = batches()

    def step() -> Work:
        ids, mask, labels = next(it)
        with autocast(precision):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return Work.of(ids, mask.sum(1))

    return Row(step, args.hf_steps, trainable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/prepared/train.csv", help="the balanced training split (prepare_data)")
    parser.add_argument("--precision", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=0, help="timed gpt2lab steps per row (default: one epoch)")
    parser.add_argument("--hf-steps", type=int, default=20, help="timed transformers+peft steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--hf-padding", choices=["max_length", "longest"], default="max_length")
    parser.add_argument("--skip-hf", action="store_true", help="only time gpt2lab")
    parser.add_argument("--no-compile", action="store_true", help="skip gpt2lab's compiled training (train.compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.isfile(args.data):
        raise SystemExit(f"{args.data}: missing; run `dvc repro prepare_data` first (or pass --data)")
    dataset = SpamDataset.from_csv(args.data, 1024)
    n = len(dataset)
    print(f"{n} training messages, mean {sum(dataset.lengths) / n:.1f} tokens, longest {max(dataset.lengths)}; "
          f"batch {args.batch_size}, LoRA rank {args.rank}, {args.threads} threads")  # fmt: skip
    header = (
        f"{'framework':<18} {'precision':<9} {'padding':<20} {'trainable':>10} {'positions/step':>14} "
        f"{'of them padding':>15} {'examples/s':>10} {'5 epochs':>9} {'vs hf':>6}"
    )
    compiled = not args.no_compile and compiler_note() is None
    yardstick = Yardstick()
    start_ms = yardstick.read_ms()
    print(header + "\n" + "-" * len(header))
    for precision in args.precision:
        rows = []
        if not args.skip_hf:
            rows.append(("transformers+peft", f"{args.hf_padding} + mask", hf_row(dataset, args, precision)))
        rows.append(("gpt2lab", "per batch", gpt2lab_row(dataset, args, precision, bucket=False)))
        rows.append(("gpt2lab", "per batch, bucketed", gpt2lab_row(dataset, args, precision, bucket=True)))
        if compiled:
            rows.append(("gpt2lab compiled", "per batch, bucketed",
                         gpt2lab_row(dataset, args, precision, bucket=True, compile=True)))  # fmt: skip
        timed = time_interleaved([row for *_, row in rows], args.warmup)
        hf_rate = timed[0][1].examples / timed[0][0] if not args.skip_hf else None
        for (name, padding, row), (seconds, work) in zip(rows, timed):
            rate = work.examples / seconds
            epochs_min = EPOCHS * n / rate / 60
            vs = f"{rate / hf_rate:.1f}x" if hf_rate else "-"
            per_step = work.positions * args.batch_size / work.examples
            wasted = 1 - work.tokens / work.positions
            print(
                f"{name:<18} {precision:<9} {padding:<20} {row.trainable:>10,} {per_step:>14.0f} {wasted:>15.0%} "
                f"{rate:>10.1f} {epochs_min:>7.1f} m {vs:>6}"
            )
    print(yardstick.line(start_ms, yardstick.read_ms()))


if __name__ == "__main__":
    main()
