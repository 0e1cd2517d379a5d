"""Fine-tuning loop of the spam classifier: seeded, resumable, bf16 autocast on CPU.

:func:`train_classifier` loads the base checkpoint and the prepared splits, trains in the
mode ``train.mode`` and saves only what was trained (see :mod:`gpt2lab.classifier`). It
returns a dict with the final ``metrics`` and the ``history`` of per-step losses and of
the periodic train/validation estimates; it prints nothing (a tqdm bar when ``progress``).
:func:`write_outputs` turns that dict into the metrics JSON, the curve TSV and the plots.
Its resumable checkpoint outlives it: the caller removes it with :func:`remove_checkpoint`
once everything that uses the run is done (the train stage: after logging to MLflow), so a
kill in between resumes at the last step instead of training again from step 0.

Why it is fast on a CPU: batches are padded per batch (and bucketed by length), the
50257-wide LM head is never computed, frozen weights are cast to bf16 once instead of on
every autocast call, autograd never builds a graph through frozen parts with no trainable
parameter below them, bf16 attention trains with the math kernel (faster backward than
CPU flash attention on short messages), and AdamW runs fused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from gpt2lab.classifier import SpamClassifier, autocast, build_classifier, save_classifier
from gpt2lab.config import LoRAParams, TrainParams
from gpt2lab.data import Batch, SpamDataset, collate, make_loader
from gpt2lab.download import sha256_file, write_atomic
from gpt2lab.errors import Gpt2labError
from gpt2lab.lora import LoRAConfig, LoRALinear
from gpt2lab.weights import read_config

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 32  # final full-split evaluation: no gradients, so larger batches are free
CHECKPOINT_FILE = "checkpoint.pt"
CURVE_COLUMNS = ["step", "epoch", "examples_seen", "train_loss", "val_loss", "train_acc", "val_acc"]
# Settings that do not change the result: a checkpoint written under other values still resumes.
NOT_FINGERPRINTED = ("resume", "checkpoint_every", "num_threads")

Callback = Callable[[str, dict[str, Any]], None]


class TrainError(Gpt2labError, RuntimeError):
    """Training cannot start or went wrong (missing data, diverged loss, ...)."""


# --- small pure helpers -------------------------------------------------------------------
def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based).

    Linear warm-up from ~0 over ``warmup_steps``, then ``constant``, ``linear`` decay to 0 or
    ``cosine`` decay to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise TrainError(f"train.schedule: unknown schedule {schedule!r}; allowed: constant | linear | cosine")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, biases and layer norms do not."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def cast_frozen_linears(model: SpamClassifier, dtype: torch.dtype) -> int:
    """Store frozen linear weights of the transformer blocks in ``dtype`` (bf16 for autocast).

    Autocast casts fp32 weights to bf16 on every call and only caches the cast of trainable
    leaves; a frozen weight stored in bf16 gives the same result without that copy. Returns
    the number of tensors cast. Embeddings and layer norms stay fp32 (the residual stream
    stays fp32 under autocast), and ``lm_head`` is skipped because it is tied to ``wte``.
    """
    count = 0
    for module in model.body.h.modules():
        if isinstance(module, (nn.Linear, LoRALinear)):
            for name in ("weight", "bias"):
                p = getattr(module, name)
                if p is not None and not p.requires_grad and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    count += 1
    return count


def fixed_batches(dataset: SpamDataset, n: int | None, batch_size: int, seed: int) -> list[Batch]:
    """A fixed, seeded subset of ``n`` examples (all when None), sorted by length and batched.

    Estimates during training reuse the same examples, so their curve is comparable from point
    to point; sorting by length keeps the padding small and does not change an average.
    """
    order = np.random.default_rng(seed).permutation(len(dataset))
    chosen = order if n is None else order[:n]
    chosen = sorted(chosen.tolist(), key=lambda i: (len(dataset.ids[i]), i))
    return [collate([dataset[i] for i in chosen[s : s + batch_size]]) for s in range(0, len(chosen), batch_size)]


@torch.no_grad()
def evaluate_batches(model: SpamClassifier, batches: Sequence[Batch], precision: str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches`` (per example, not per batch)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in batches:
        with autocast(precision):
            logits = model(batch.ids, batch.lengths)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == batch.labels).sum())
        n += len(batch.labels)
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


def train_step(
    model: SpamClassifier,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    *,
    precision: str,
    grad_clip: float | None,
) -> float:
    """One optimizer step on ``batch``; returns its loss. The bench times exactly this."""
    # In bf16, PyTorch's CPU flash-attention backward is slow on short sequences (forward +
    # backward ~3x the math kernel's at 24-48 tokens); in fp32 flash is slightly faster.
    # Evaluation keeps flash either way (its forward is the faster one).
    kernel = sdpa_kernel(SDPBackend.MATH) if precision == "bf16" else contextlib.nullcontext()
    with autocast(precision), kernel:
        logits = model(batch.ids, batch.lengths)  # (B, 2)
    loss = F.cross_entropy(logits.float(), batch.labels)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _fingerprint(lora: LoRAParams, train: TrainParams, seed: int, base_sha256: str, data_files: list[Path]) -> str:
    """Hash of everything that determines the result: a checkpoint resumes only into the same run."""
    train_dict = {k: v for k, v in dataclasses.asdict(train).items() if k not in NOT_FINGERPRINTED}
    spec = {
        "lora": dataclasses.asdict(lora) if train.mode == "lora" else None,
        "train": train_dict,
        "seed": seed,
        "base": base_sha256,
        "data": [sha256_file(f) for f in data_files],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()


# --- checkpoints --------------------------------------------------------------------------
def _checkpoint_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _checkpoint_tmp(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this run (same fingerprint), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: start over, do not crash
        log.warning("ignoring unreadable checkpoint %s (%s); training from the start", path, err)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is from other params, base or data; training from the start", path)
        return None
    return state


def remove_checkpoint(checkpoint_dir: str | Path) -> None:
    """Delete the resumable checkpoint in ``checkpoint_dir`` (and the folder, when left empty).

    Call it only once the run's results are safe everywhere they go: until then a re-run
    resumes from the checkpoint (the last one is taken at the final step) instead of step 0.
    """
    folder = Path(checkpoint_dir)
    path = folder / CHECKPOINT_FILE
    path.unlink(missing_ok=True)
    _checkpoint_tmp(path).unlink(missing_ok=True)  # left by a kill while a checkpoint was written
    with contextlib.suppress(OSError):  # absent, or holds other files: leave it
        folder.rmdir()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- the loop -----------------------------------------------------------------------------
def train_classifier(
    base_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    lora: LoRAParams,
    train: TrainParams,
    seed: int,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> dict[str, Any]:
    """Fine-tune the classifier on ``data_dir/{train,validation}.csv`` and save it to ``out_dir``.

    Args:
        base_dir: canonical base checkpoint folder (``models/base``).
        data_dir: folder with the prepared ``train.csv`` and ``validation.csv``.
        out_dir: where the trained parts and ``classifier.json`` go (replaced atomically).
        lora, train, seed: the ``lora`` and ``train`` sections of params.yaml and the seed.
        checkpoint_dir: where resumable checkpoints go (every ``train.checkpoint_every`` steps,
            0 = each epoch, and always at the final step); None disables them. A run resumes
            from one when ``train.resume`` and the params, base and data are the same. The
            checkpoint is kept after training: call :func:`remove_checkpoint` once the results
            are safe (saved, logged), so a kill before that resumes at the final step.
        progress: show a tqdm bar with the live loss.
        callback: ``callback(kind, record)`` after each optimizer step (``"step"``) and each
            train/validation estimate (``"eval"``), e.g. to log to a tracker while training.

    Returns:
        ``{"metrics": {...}, "history": {"steps": [...], "eval": [...]}, "out_dir": str}``.
    """
    t_start = time.perf_counter()
    data_dir, base_dir = Path(data_dir), Path(base_dir)
    threads = train.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    files = [data_dir / "train.csv", data_dir / "validation.csv"]
    for f in files:
        if not f.is_file():
            raise TrainError(f"{f}: missing; run the prepare_data stage first (dvc repro prepare_data)")
    base_meta = read_config(base_dir)
    if not base_meta.get("pretrained", False):
        log.warning("training on RANDOM base weights (%s): accuracy is a smoke check only", base_dir)

    seed_everything(seed)
    lora_cfg = LoRAConfig.from_params(lora) if train.mode == "lora" else None
    model = build_classifier(base_dir, train.mode, lora_cfg, max_length=train.max_length)
    trainable = model.num_parameters(trainable_only=True)
    total = model.num_parameters()
    if train.precision == "bf16":
        cast_frozen_linears(model, torch.bfloat16)
    log.info("mode %s: %d trainable of %d parameters (%.2f%%)", train.mode, trainable, total, 100 * trainable / total)

    train_ds = SpamDataset.from_csv(files[0], model.max_length)
    val_ds = SpamDataset.from_csv(files[1], model.max_length)
    n_est = train.eval_iter * train.batch_size
    est_train = fixed_batches(train_ds, n_est, train.batch_size, seed)
    est_val = fixed_batches(val_ds, n_est, train.batch_size, seed)
    # One loader per epoch, seeded by the epoch: a resumed run sees the same batches.
    loader_for = lambda epoch: make_loader(  # noqa: E731
        train_ds, train.batch_size, shuffle=True, seed=seed + epoch, bucket=train.bucket
    )
    steps_per_epoch = len(loader_for(0))
    total_steps = train.epochs * steps_per_epoch

    optimizer = make_optimizer(model, train.lr, train.weight_decay)
    factor = lambda step: lr_factor(  # noqa: E731
        step, warmup_steps=train.warmup_steps, total_steps=total_steps, schedule=train.schedule
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    params = [p for p in model.parameters() if p.requires_grad]

    history: dict[str, list[dict[str, Any]]] = {"steps": [], "eval": []}
    step, start_epoch, skip, examples_seen, train_time = 0, 0, 0, 0, 0.0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    fingerprint = _fingerprint(lora, train, seed, base_meta["sha256"], files) if ckpt_path else ""
    if ckpt_path is not None and train.resume and (state := load_checkpoint(ckpt_path, fingerprint)):
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])  # dropout; batches come from per-epoch seeded loaders
        step, start_epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
        examples_seen, train_time, history = state["examples_seen"], state["train_time"], state["history"]
        if start_epoch < train.epochs:
            log.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, start_epoch + 1)
        else:  # stopped after training, e.g. while its results were logged: evaluate and save again
            log.info("resumed from %s at step %d: training had finished; evaluating and saving", ckpt_path, step)

    def estimate(epoch: int) -> None:
        train_loss, train_acc = evaluate_batches(model, est_train, train.precision)
        val_loss, val_acc = evaluate_batches(model, est_val, train.precision)
        row = {"step": step, "epoch": epoch + 1, "examples_seen": examples_seen, "train_loss": train_loss,
               "val_loss": val_loss, "train_acc": train_acc, "val_acc": val_acc}  # fmt: skip
        history["eval"].append(row)
        if callback:
            callback("eval", row)

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        if ckpt_path is None:
            return
        if batch_in_epoch == steps_per_epoch:  # a finished epoch resumes at the next one's start
            epoch, batch_in_epoch = epoch + 1, 0
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_checkpoint(ckpt_path, {
            "fingerprint": fingerprint, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "examples_seen": examples_seen, "train_time": train_time, "history": history,
            "trainable": trained, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        })  # fmt: skip

    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc=f"train ({train.mode})", unit="step")
    smooth: float | None = None
    try:
        for epoch in range(start_epoch, train.epochs):
            for i, batch in enumerate(loader_for(epoch)):
                if epoch == start_epoch and i < skip:
                    continue
                t0 = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                value = train_step(
                    model, batch, optimizer, params, precision=train.precision, grad_clip=train.grad_clip
                )
                scheduler.step()
                train_time += time.perf_counter() - t0
                step += 1
                examples_seen += len(batch.labels)
                if not math.isfinite(value):
                    raise TrainError(f"loss became {value} at step {step}; lower train.lr or use precision fp32")
                record = {"step": step, "epoch": epoch + 1, "loss": value, "lr": lr}
                history["steps"].append(record)
                if callback:
                    callback("step", record)
                if (step - 1) % train.eval_freq == 0 or step == total_steps:
                    estimate(epoch)
                smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
                last = history["eval"][-1] if history["eval"] else None
                bar.set_postfix(loss=f"{smooth:.3f}", val_loss=f"{last['val_loss']:.3f}" if last else "-")
                bar.update(1)
                every = train.checkpoint_every
                # The final step always: a kill after training (saving, logging) then costs no steps.
                if step == total_steps or (every and step % every == 0) or (not every and i + 1 == steps_per_epoch):
                    checkpoint(epoch, i + 1)
    finally:
        bar.close()

    final = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        loss_value, acc = evaluate_batches(model, fixed_batches(ds, None, EVAL_BATCH_SIZE, seed), train.precision)
        final[f"{split}_loss"], final[f"{split}_accuracy"] = loss_value, acc
    save_classifier(model, out_dir, mode=train.mode, base_dir=base_dir, lora=lora_cfg,
                    extra={"train": {"epochs": train.epochs, "seed": seed, "precision": train.precision}})  # fmt: skip
    metrics = {
        **final,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "examples_per_s": examples_seen / train_time if train_time else 0.0,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "epochs": train.epochs,
        "steps": step,
        "examples_seen": examples_seen,
        "mode": train.mode,
        "precision": train.precision,
        "threads": threads,
        "base_pretrained": bool(base_meta.get("pretrained", False)),
    }
    log.info("trained in %.0f s: val accuracy %.4f", metrics["wall_time_s"], metrics["val_accuracy"])
    return {"metrics": metrics, "history": history, "out_dir": str(out_dir)}


# --- outputs ------------------------------------------------------------------------------
def curve_table(history: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """The train/validation estimates as a table with :data:`CURVE_COLUMNS`."""
    return pd.DataFrame(history["eval"], columns=CURVE_COLUMNS)


def write_outputs(
    result: dict[str, Any], metrics_file: str | Path, curve_file: str | Path, plots_dir: str | Path
) -> list[Path]:
    """Write the metrics JSON, the curve TSV and the plots (PDF as in the reference, PNG for ``dvc plots``)."""
    metrics_file, curve_file = Path(metrics_file), Path(curve_file)
    written = [write_atomic(metrics_file, json.dumps(result["metrics"], indent=2, sort_keys=True) + "\n")]
    table = curve_table(result["history"])
    tsv = table.to_csv(sep="\t", index=False, lineterminator="\n", float_format="%.6g")
    written.append(write_atomic(curve_file, tsv))
    written += save_plots(table, plots_dir)
    return written


def save_plots(table: pd.DataFrame, plots_dir: str | Path) -> list[Path]:
    """``loss-plot.pdf`` / ``accuracy-plot.pdf`` (the reference's names) and ``loss.png`` / ``accuracy.png``.

    Like the reference, each plot has a second x-axis with the number of examples seen.
    """
    from gpt2lab.plots import save_figure, subplots

    plots_dir = Path(plots_dir)
    written = []
    per_step = table.examples_seen.iloc[-1] / table.step.iloc[-1] if len(table) and table.step.iloc[-1] else 0
    for column, name in (("loss", "loss"), ("acc", "accuracy")):
        fig, ax = subplots(figsize=(5, 3))
        ax.plot(table.step, table[f"train_{column}"], label=f"Training {name}")
        ax.plot(table.step, table[f"val_{column}"], linestyle="-.", label=f"Validation {name}")
        ax.set_xlabel("Step")
        ax.set_ylabel(name.capitalize())
        ax.legend()
        if per_step:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda e: e / per_step))
            top.set_xlabel("Examples seen")
        # The reference's PDF names, plus PNGs that `dvc plots show` renders offline.
        written += save_figure(fig, plots_dir / f"{name}-plot.pdf", plots_dir / f"{name}.png")
    return written
