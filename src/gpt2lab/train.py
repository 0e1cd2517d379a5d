"""Fine-tuning loop of the spam classifier: seeded, resumable, bf16 autocast on CPU.

:func:`train_classifier` runs the three parts: :func:`setup` (load the base checkpoint and the
prepared splits, build the model for ``train.mode``, resume from a checkpoint when one belongs
to this run), :func:`run_epoch` (the optimizer steps of one epoch, estimates and checkpoints
along the way) and :func:`finish` (final train/validation scores, save only what was trained;
see :mod:`gpt2lab.classifier_io`). It returns the final ``metrics`` and the ``history`` of
per-step losses and of the periodic train/validation estimates; it prints nothing (a tqdm bar
when ``progress``). :func:`write_outputs` turns that into the metrics JSON, the curve TSVs and
the plots. The resumable checkpoint outlives the run (see :mod:`gpt2lab.resume`).

Why it is fast on a CPU: batches are padded per batch (and bucketed by length), the
50257-wide LM head is never computed, frozen weights are cast to bf16 once instead of on
every autocast call, autograd never builds a graph through frozen parts with no trainable
parameter below them, bf16 attention trains with the math kernel (faster backward than
CPU flash attention on short messages), and AdamW runs fused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gpt2lab.batching import Batch, SpamDataset, collate, make_loader
from gpt2lab.checkpoint import read_config
from gpt2lab.classifier import SpamClassifier, build_classifier, cast_frozen_linears
from gpt2lab.classifier_io import save_classifier
from gpt2lab.devices import autocast
from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import write_atomic
from gpt2lab.lora import LoRAConfig
from gpt2lab.params import LoRAParams, TrainParams
from gpt2lab.plots import save_train_plots
from gpt2lab.resume import CHECKPOINT_FILE, Checkpointer, fingerprint

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 32  # final full-split evaluation: no gradients, so larger batches are free
CURVE_COLUMNS = ["step", "epoch", "examples_seen", "train_loss", "val_loss", "train_acc", "val_acc"]
STEP_COLUMNS = ["step", "epoch", "loss", "lr"]

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint restores besides the tensors and the optimizer."""

    step: int = 0
    epoch: int = 0  # the epoch to run next (or being run)
    batch_in_epoch: int = 0  # batches of ``epoch`` already done
    examples_seen: int = 0
    train_time: float = 0.0  # seconds inside optimizer steps
    history: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"steps": [], "eval": []})


@dataclass
class Run:
    """Everything one training run holds between :func:`setup` and :func:`finish`."""

    train: TrainParams
    seed: int
    base_dir: Path
    base_meta: dict[str, Any]
    lora: LoRAConfig | None
    model: SpamClassifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.Tensor]  # the trainable ones
    train_ds: SpamDataset
    val_ds: SpamDataset
    estimate_batches: dict[str, list[Batch]]  # fixed subsets of train and validation
    steps_per_epoch: int
    checkpointer: Checkpointer | None
    threads: int
    progress: Progress = field(default_factory=Progress)
    callback: Callback | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def total_steps(self) -> int:
        return self.train.epochs * self.steps_per_epoch

    def loader(self, epoch: int) -> DataLoader:
        """The batches of ``epoch``, seeded by the epoch: a resumed run sees the same ones."""
        t = self.train
        return make_loader(self.train_ds, t.batch_size, shuffle=True, seed=self.seed + epoch, bucket=t.bucket)

    def state(self) -> dict[str, Any]:
        """The checkpoint's content (see :meth:`restore`)."""
        p = self.progress
        epoch, batch = (p.epoch + 1, 0) if p.batch_in_epoch == self.steps_per_epoch else (p.epoch, p.batch_in_epoch)
        return {
            "step": p.step, "epoch": epoch, "batch_in_epoch": batch, "examples_seen": p.examples_seen,
            "train_time": p.train_time, "history": p.history,
            "trainable": {n: q.detach().clone() for n, q in self.model.named_parameters() if q.requires_grad},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                named[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])  # dropout; batches come from per-epoch seeded loaders
        self.progress = Progress(state["step"], state["epoch"], state["batch_in_epoch"], state["examples_seen"],
                                 state["train_time"], state["history"])  # fmt: skip

    def estimate(self) -> None:
        """Train and validation loss and accuracy on the fixed subsets, into the history."""
        p = self.progress
        row: dict[str, Any] = {"step": p.step, "epoch": p.epoch + 1, "examples_seen": p.examples_seen}
        for split, batches in self.estimate_batches.items():
            row[f"{split}_loss"], row[f"{split}_acc"] = evaluate_batches(self.model, batches, self.train.precision)
        row = {k: row[k] for k in CURVE_COLUMNS}
        p.history["eval"].append(row)
        if self.callback:
            self.callback("eval", row)


def setup(
    base_dir: str | Path,
    data_dir: str | Path,
    lora: LoRAParams,
    train: TrainParams,
    seed: int,
    *,
    checkpoint_dir: str | Path | None = None,
    callback: Callback | None = None,
) -> Run:
    """Load base and data, build the model for ``train.mode``, and resume when a checkpoint belongs here."""
    started = time.perf_counter()
    data_dir, base_dir = Path(data_dir), Path(base_dir)
    threads = train.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    files = [data_dir / "train.csv", data_dir / "validation.csv"]
    for f in files:
        if not f.is_file():
            raise TrainError(f"{f}: missing; run the prepare_data stage first (dvc repro prepare_data)")
    base_meta = read_config(base_dir)
    if not base_meta.get("pretrained", False):
        log.info("training on RANDOM base weights (%s): accuracy is a smoke check only", base_dir)

    seed_everything(seed)
    lora_cfg = LoRAConfig.from_params(lora) if train.mode == "lora" else None
    model = build_classifier(base_dir, train.mode, lora_cfg, max_length=train.max_length,
                             head_bias=train.head_bias)  # fmt: skip
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    if train.precision == "bf16":
        cast_frozen_linears(model, torch.bfloat16)
    log.info("mode %s: %d trainable of %d parameters (%.2f%%)", train.mode, trainable, total, 100 * trainable / total)

    train_ds = SpamDataset.from_csv(files[0], model.max_length)
    val_ds = SpamDataset.from_csv(files[1], model.max_length)
    n_est = train.eval_iter * train.batch_size
    estimates = {name: fixed_batches(ds, n_est, train.batch_size, seed) for name, ds in (("train", train_ds),
                                                                                      ("val", val_ds))}  # fmt: skip
    steps_per_epoch = len(make_loader(train_ds, train.batch_size, shuffle=True, seed=seed, bucket=train.bucket))
    total_steps = train.epochs * steps_per_epoch
    optimizer = make_optimizer(model, train.lr, train.weight_decay)
    factor = lambda step: lr_factor(  # noqa: E731
        step, warmup_steps=train.warmup_steps, total_steps=total_steps, schedule=train.schedule
    )
    checkpointer = None
    if checkpoint_dir is not None:
        key = fingerprint(lora, train, seed, base_meta["sha256"], files)
        checkpointer = Checkpointer(
            Path(checkpoint_dir) / key[:16] / CHECKPOINT_FILE, key, train.checkpoint_every, steps_per_epoch, total_steps
        )
    run = Run(
        train=train, seed=seed, base_dir=base_dir, base_meta=base_meta, lora=lora_cfg, model=model,
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
        params=[p for p in model.parameters() if p.requires_grad], train_ds=train_ds, val_ds=val_ds,
        estimate_batches=estimates, steps_per_epoch=steps_per_epoch, checkpointer=checkpointer,
        threads=threads, callback=callback, started=started,
    )  # fmt: skip
    if checkpointer is not None and train.resume and (state := checkpointer.load()):
        run.restore(state)
        if run.progress.epoch < train.epochs:
            log.warning("resumed from %s at step %d (epoch %d)", checkpointer.path, run.progress.step, run.progress.epoch + 1)
        else:  # stopped after training, e.g. while its results were logged: evaluate and save again
            log.warning("resumed from %s at step %d: training had finished; evaluating and saving",
                     checkpointer.path, run.progress.step)  # fmt: skip
    return run


def run_epoch(run: Run, bar: tqdm | None = None) -> None:
    """The optimizer steps of epoch ``run.progress.epoch`` (from its ``batch_in_epoch``-th batch on)."""
    p, t = run.progress, run.train
    skip = p.batch_in_epoch
    run.model.train()
    for i, batch in enumerate(run.loader(p.epoch)):
        if i < skip:
            continue
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        value = train_step(run.model, batch, run.optimizer, run.params, precision=t.precision, grad_clip=t.grad_clip)
        run.scheduler.step()
        p.train_time += time.perf_counter() - t0
        p.step += 1
        p.batch_in_epoch = i + 1
        p.examples_seen += len(batch.labels)
        if not math.isfinite(value):
            raise TrainError(f"loss became {value} at step {p.step}; lower train.lr or use precision fp32")
        record = {"step": p.step, "epoch": p.epoch + 1, "loss": value, "lr": lr}
        p.history["steps"].append(record)
        if run.callback:
            run.callback("step", record)
        if (p.step - 1) % t.eval_freq == 0 or p.step == run.total_steps:
            run.estimate()  # leaves the model in training mode
        if bar is not None:
            last = p.history["eval"][-1] if p.history["eval"] else None
            bar.set_postfix(loss=f"{value:.3f}", val_loss=f"{last['val_loss']:.3f}" if last else "-")
            bar.update(1)
        if run.checkpointer is not None and run.checkpointer.due(p.step, p.batch_in_epoch):
            run.checkpointer.save(run.state())
    p.epoch, p.batch_in_epoch = p.epoch + 1, 0


def finish(run: Run, out_dir: str | Path) -> dict[str, Any]:
    """Score the whole train and validation splits, save the classifier; the run's result."""
    final = {}
    for split, ds in (("train", run.train_ds), ("val", run.val_ds)):
        batches = fixed_batches(ds, None, EVAL_BATCH_SIZE, run.seed)
        final[f"{split}_loss"], final[f"{split}_accuracy"] = evaluate_batches(run.model, batches, run.train.precision)
    t, p = run.train, run.progress
    save_classifier(run.model, out_dir, mode=t.mode, base_dir=run.base_dir, lora=run.lora,
                    extra={"train": {"epochs": t.epochs, "seed": run.seed, "precision": t.precision}})  # fmt: skip
    trainable, total = run.model.num_parameters(trainable_only=True), run.model.num_parameters()
    metrics = {
        **final,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "examples_per_s": p.examples_seen / p.train_time if p.train_time else 0.0,
        "train_time_s": p.train_time,
        "wall_time_s": time.perf_counter() - run.started,
        "epochs": t.epochs,
        "steps": p.step,
        "examples_seen": p.examples_seen,
        "mode": t.mode,
        "precision": t.precision,
        "threads": run.threads,
        "base_pretrained": bool(run.base_meta.get("pretrained", False)),
    }
    log.info("trained in %.0f s: val accuracy %.4f", metrics["wall_time_s"], metrics["val_accuracy"])
    folder = str(run.checkpointer.path.parent) if run.checkpointer else None
    return {"metrics": metrics, "history": p.history, "out_dir": str(out_dir), "checkpoint_dir": folder}


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
        checkpoint_dir: where resumable checkpoints go, each run's in a subfolder named by its
            fingerprint (params, base and data), so runs of different params never share one
            (every ``train.checkpoint_every`` steps, 0 = each epoch, and always at the final
            step); None disables them. A run resumes from its own when ``train.resume``. The
            checkpoint is kept after training: call :func:`gpt2lab.resume.remove_checkpoint` on
            the result's ``checkpoint_dir`` once the results are safe, so a kill before that
            resumes at the final step.
        progress: show a tqdm bar with the live loss.
        callback: ``callback(kind, record)`` after each optimizer step (``"step"``) and each
            train/validation estimate (``"eval"``), e.g. to log to a tracker while training.

    Returns:
        ``{"metrics": {...}, "history": {"steps": [...], "eval": [...]}, "out_dir": str,
        "checkpoint_dir": str | None}``.
    """
    run = setup(base_dir, data_dir, lora, train, seed, checkpoint_dir=checkpoint_dir, callback=callback)
    bar = tqdm(total=run.total_steps, initial=run.progress.step, disable=None if progress else True, desc=f"train ({train.mode})",
               unit="step")  # fmt: skip
    with bar:
        while run.progress.epoch < train.epochs:
            run_epoch(run, bar)
    return finish(run, out_dir)


# --- outputs ------------------------------------------------------------------------------
def curve_table(history: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """The train/validation estimates as a table with :data:`CURVE_COLUMNS`."""
    return pd.DataFrame(history["eval"], columns=CURVE_COLUMNS)


def _tsv(table: pd.DataFrame) -> str:
    return table.to_csv(sep="\t", index=False, lineterminator="\n", float_format="%.6g")


# The DVC metrics of training (final losses on the whole splits, size, speed); the rest of
# finish()'s metrics (accuracies, timings, settings) go to the details file.
HEADLINE_METRICS = ("train_loss", "val_loss", "trainable_params", "examples_per_s")


def write_outputs(
    result: dict[str, Any],
    metrics_file: str | Path,
    details_file: str | Path,
    curve_file: str | Path,
    plots_dir: str | Path,
    steps_file: str | Path | None = None,
) -> list[Path]:
    """Write the headline metrics (:data:`HEADLINE_METRICS`) and the other metrics (JSON), the
    curve TSV (and the per-step TSV), and the plots."""
    metrics = result["metrics"]
    details = {k: v for k, v in metrics.items() if k not in HEADLINE_METRICS}
    written = [write_atomic(metrics_file, json.dumps({k: metrics[k] for k in HEADLINE_METRICS}, indent=2) + "\n"),
               write_atomic(details_file, json.dumps(details, indent=2, sort_keys=True) + "\n")]  # fmt: skip
    table = curve_table(result["history"])
    written.append(write_atomic(curve_file, _tsv(table)))
    if steps_file is not None:
        steps = pd.DataFrame(result["history"]["steps"], columns=STEP_COLUMNS)
        written.append(write_atomic(steps_file, _tsv(steps)))
    written += save_train_plots(table, plots_dir, pretrained=metrics.get("base_pretrained", True))
    return written
