"""Fine-tuning loop of the spam classifier: seeded, resumable, on CPU or GPU, in one process or several.

:func:`train_classifier` runs the three parts: :func:`setup` (load the base checkpoint and the
prepared splits, build the model for ``train.mode``, resume from a checkpoint when one belongs
to this run), :func:`run_epoch` (the optimizer steps of one epoch, estimates and checkpoints
along the way) and :func:`finish` (final train/validation scores, save only what was trained;
see :mod:`gpt2lab.classifier_io`). It returns the final ``metrics`` and the ``history`` of
per-step losses and of the periodic train/validation estimates; it prints nothing (a tqdm bar
when ``progress``). :func:`write_outputs` turns that into the metrics JSON, the curve TSVs and
the plots. The resumable checkpoint outlives the run (see :mod:`gpt2lab.resume`).

Devices and processes (``train.device``, ``train.grad_accum_steps``, ``train.nproc_per_node``):
every optimizer step takes one global batch of ``train.batch_size`` messages, the same batches
in the same order however it is computed. Each process (rank) of a data-parallel run takes its
share of every global batch, in ``grad_accum_steps`` micro-batches (see
:func:`gpt2lab.batching.split_batch`); each micro-batch's loss is its summed cross-entropy
scaled so that DistributedDataParallel's gradient average is the gradient of the global batch's
mean loss. So the steps equal a single process's up to float rounding. Only rank 0 writes the
classifier and checkpoints (a checkpoint holds every rank's random state, so a resumed run draws
the same dropout masks); :func:`train_classifier` returns None on the other ranks.

Why it is fast: batches are padded per batch (and bucketed by length), the 50257-wide LM head
is never computed, autograd never builds a graph through frozen parts with no trainable
parameter below them, and AdamW runs fused. On a CPU also: frozen weights are cast to bf16 once
instead of on every autocast call, and bf16 attention trains with the math kernel (faster
backward than CPU flash attention on short messages). On a GPU: batches are copied from pinned
memory without blocking, and PyTorch picks its fused attention kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gpt2lab.batching import BF16_CPU_ROWS, Batch, Shard, SpamDataset, collate, make_loader
from gpt2lab.checkpoint import read_config
from gpt2lab.classifier import SpamClassifier, build_classifier, cast_frozen_linears
from gpt2lab.classifier_io import save_classifier
from gpt2lab.devices import autocast, describe, grad_scaler, is_out_of_memory, resolve_device, resolve_precision
from gpt2lab.distributed import ONE_PROCESS, World, all_gather, all_reduce_sum, broadcast, gather, is_peer_lost
from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import write_atomic
from gpt2lab.kernels import check_compilable, inductor_options
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


def fixed_batches(
    dataset: SpamDataset, n: int | None, batch_size: int, seed: int, row_multiple: int = 1
) -> list[Batch]:
    """A fixed, seeded subset of ``n`` examples (all when None), sorted by length and batched.

    Estimates during training reuse the same examples, so their curve is comparable from point
    to point; sorting by length keeps the padding small and does not change an average.
    ``row_multiple``: see :func:`gpt2lab.batching.collate`.
    """
    order = np.random.default_rng(seed).permutation(len(dataset))
    chosen = order if n is None else order[:n]
    chosen = sorted(chosen.tolist(), key=lambda i: (len(dataset.ids[i]), i))
    return [collate([dataset[i] for i in chosen[s : s + batch_size]], row_multiple)
            for s in range(0, len(chosen), batch_size)]  # fmt: skip


def row_multiple_for(precision: str, device: torch.device) -> int:
    """The multiple of a batch's positions its matmuls run fastest on, here (see :func:`collate`):
    :data:`BF16_CPU_ROWS` for bf16 on a CPU with AMX (measured there), else 1."""
    amx = device.type == "cpu" and torch.cpu._is_amx_tile_supported()
    return BF16_CPU_ROWS if precision == "bf16" and amx else 1


@torch.no_grad()
def evaluate_batches(model: SpamClassifier, batches: Sequence[Batch], precision: str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches`` (per example, not per batch), on its device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, n = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(batch.ids, batch.lengths)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == batch.labels).sum())
        n += len(batch.labels)
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


def train_step(
    model: nn.Module,
    batch: Batch | Shard,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    *,
    precision: str,
    grad_clip: float | None,
    world: World = ONE_PROCESS,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One optimizer step on a global batch; returns the batch's mean loss. The bench times exactly this.

    ``batch`` is the whole global batch (one process) or this rank's :class:`Shard` of it, whose
    micro-batches run one after the other, gradients accumulating. ``model`` is the classifier,
    or its DistributedDataParallel wrapper when ``world`` has several ranks: their gradients are
    then averaged once, after the last micro-batch. ``scaler``: fp16 gradient scaling.
    """
    shard = batch if isinstance(batch, Shard) else Shard([batch], len(batch.labels))
    device = shard.micro[0].ids.device
    # In bf16, PyTorch's CPU flash-attention backward is slow on short sequences (forward +
    # backward ~3x the math kernel's at 24-48 tokens); in fp32 flash is slightly faster.
    # Evaluation keeps flash either way (its forward is the faster one). GPUs: PyTorch's choice.
    cpu_bf16 = precision == "bf16" and device.type == "cpu"
    # DDP averages gradients over ranks; scaled by world_size / count, the average is the
    # gradient of the mean loss over the whole global batch.
    scale = world.world_size / shard.count
    total = torch.zeros((), device=device)  # summed cross-entropy of this rank's messages
    for i, micro in enumerate(shard.micro):
        last = i == len(shard.micro) - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with no_sync:
            with autocast(precision, device), sdpa_kernel(SDPBackend.MATH) if cpu_bf16 else contextlib.nullcontext():
                logits = model(micro.ids, micro.lengths)  # (B, 2)
            loss_sum = F.cross_entropy(logits.float(), micro.labels, reduction="sum")
            loss = loss_sum * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss_sum.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(total, world).item() / shard.count


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random stream (dropout), drawn after the model is built."""
    return (seed + 1_000_003 * rank) % 2**63


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's random state: the CPU generator's and, on a GPU, the device's."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


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
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"  # train.precision as run on the device (never auto)
    world: World = ONE_PROCESS
    ddp: DistributedDataParallel | None = None  # the model wrapped, when there are several ranks
    scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA
    progress: Progress = field(default_factory=Progress)
    callback: Callback | None = None
    started: float = field(default_factory=time.perf_counter)
    checkpoint_step: int | None = None  # the step of the last checkpoint written or resumed from

    @property
    def total_steps(self) -> int:
        return self.train.epochs * self.steps_per_epoch

    def loader(self, epoch: int) -> DataLoader:
        """This rank's shares of the global batches of ``epoch``, seeded by the epoch: a resumed run sees the same ones."""
        t, w = self.train, self.world
        return make_loader(self.train_ds, t.batch_size, shuffle=True, seed=self.seed + epoch, bucket=t.bucket,
                           shard=(w.rank, w.world_size, t.grad_accum_steps), pin_memory=self.device.type == "cuda",
                           row_multiple=row_multiple_for(self.precision, self.device))  # fmt: skip

    def state(self) -> dict[str, Any] | None:
        """The checkpoint's content on rank 0 (see :meth:`restore`); None on the other ranks.

        Every rank must call it (it gathers their random states).
        """
        rngs = gather(rng_state(self.device), self.world)
        if not self.world.is_main:
            return None
        p = self.progress
        epoch, batch = (p.epoch + 1, 0) if p.batch_in_epoch == self.steps_per_epoch else (p.epoch, p.batch_in_epoch)
        return {
            "step": p.step, "epoch": epoch, "batch_in_epoch": batch, "examples_seen": p.examples_seen,
            "train_time": p.train_time, "history": p.history,
            "trainable": {n: q.detach().clone() for n, q in self.model.named_parameters() if q.requires_grad},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rngs[0]["cpu"], "rng_ranks": rngs,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                named[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # Dropout's random streams (batches come from per-epoch seeded loaders): each rank's own.
        # With another number of ranks than when it was written, ranks other than 0 start afresh.
        ranks = state.get("rng_ranks") or [{"cpu": state["rng"], "cuda": None}]
        if len(ranks) == self.world.world_size or self.world.is_main:
            set_rng_state(ranks[self.world.rank], self.device)
        else:
            torch.manual_seed(rank_seed(self.seed, self.world.rank) + state["step"])
        self.progress = Progress(state["step"], state["epoch"], state["batch_in_epoch"], state["examples_seen"],
                                 state["train_time"], state["history"])  # fmt: skip
        self.checkpoint_step = state["step"]

    def estimate(self) -> None:
        """Train and validation loss and accuracy on the fixed subsets, into the history."""
        p = self.progress
        row: dict[str, Any] = {"step": p.step, "epoch": p.epoch + 1, "examples_seen": p.examples_seen}
        for split, batches in self.estimate_batches.items():
            row[f"{split}_loss"], row[f"{split}_acc"] = evaluate_batches(self.model, batches, self.precision)
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
    world: World = ONE_PROCESS,
) -> Run:
    """Load base and data, build the model for ``train.mode`` on ``train.device``, and resume when a
    checkpoint belongs here. ``world``: this process's place among the ranks (see :mod:`gpt2lab.distributed`)."""
    started = time.perf_counter()
    data_dir, base_dir = Path(data_dir), Path(base_dir)
    device = resolve_device(train.device, key="train.device", local_rank=world.local_rank)
    precision = resolve_precision(train.precision, device, key="train.precision")
    pieces = world.world_size * train.grad_accum_steps
    if train.batch_size < pieces:  # params checked nproc_per_node; torchrun by hand can start more
        raise TrainError(f"train.batch_size: {train.batch_size} is below {world.world_size} processes x "
                         f"train.grad_accum_steps {train.grad_accum_steps}; each piece needs a message")  # fmt: skip
    threads = train.num_threads or max(1, len(os.sched_getaffinity(0)) // world.local_world_size)
    torch.set_num_threads(threads)
    files = [data_dir / "train.csv", data_dir / "validation.csv"]
    for f in files:
        if not f.is_file():
            raise TrainError(f"{f}: missing; run the prepare_data stage first (dvc repro prepare_data)")
    base_meta = read_config(base_dir)
    if not base_meta.get("pretrained", False) and world.is_main:
        log.info("training on RANDOM base weights (%s): accuracy is a smoke check only", base_dir)
    key = fingerprint(lora, dataclasses.replace(train, precision=precision), seed, base_meta["sha256"], files)
    if world.distributed and len(set(all_gather(key, world))) > 1:
        raise TrainError("the ranks see different params, base weights or data (their run fingerprints differ): "
                         "every node needs the same params.yaml, models/base and data/prepared")  # fmt: skip

    seed_everything(seed)
    lora_cfg = LoRAConfig.from_params(lora) if train.mode == "lora" else None
    model = build_classifier(base_dir, train.mode, lora_cfg, max_length=train.max_length,
                             head_bias=train.head_bias)  # fmt: skip
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    if precision == "bf16" and device.type == "cpu":  # see cast_frozen_linears: CPU autocast's cost
        cast_frozen_linears(model, torch.bfloat16)
    model.to(device)
    if train.compile:
        if world.distributed:  # torchrun started by hand: nproc_per_node is not read there
            raise TrainError(f"train.compile: compiled training runs in one process, not {world.world_size}; "
                             "set it false under torchrun")  # fmt: skip
        check_compilable(model)
        # One graph for every batch shape (bucketed batches vary in length), and one for evaluation.
        model.compile(dynamic=True, options=inductor_options())
        log.info("train.compile: the first step and the first estimate compile the model (~0.5-2 min, then cached)")
    if world.rank > 0:  # rank 0 keeps the one-process stream; the others draw dropout masks of their own
        torch.manual_seed(rank_seed(seed, world.rank))
    log.info("mode %s: %d trainable of %d parameters (%.2f%%); %s, %s%s", train.mode, trainable, total,
             100 * trainable / total, describe(device), precision,
             f", {world.world_size} processes" if world.distributed else "")  # fmt: skip

    train_ds = SpamDataset.from_csv(files[0], model.max_length)
    val_ds = SpamDataset.from_csv(files[1], model.max_length)
    n_est = train.eval_iter * train.batch_size
    rows = row_multiple_for(precision, device)
    estimates = {name: [b.to(device) for b in fixed_batches(ds, n_est, train.batch_size, seed, rows)]
                 for name, ds in (("train", train_ds), ("val", val_ds))}  # fmt: skip
    steps_per_epoch = len(make_loader(train_ds, train.batch_size, shuffle=True, seed=seed, bucket=train.bucket))
    total_steps = train.epochs * steps_per_epoch
    optimizer = make_optimizer(model, train.lr, train.weight_decay)
    factor = lambda step: lr_factor(  # noqa: E731
        step, warmup_steps=train.warmup_steps, total_steps=total_steps, schedule=train.schedule
    )
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(
            Path(checkpoint_dir) / key[:16] / CHECKPOINT_FILE, key, train.checkpoint_every, steps_per_epoch, total_steps
        )
    run = Run(
        train=train, seed=seed, base_dir=base_dir, base_meta=base_meta, lora=lora_cfg, model=model,
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
        params=[p for p in model.parameters() if p.requires_grad], train_ds=train_ds, val_ds=val_ds,
        estimate_batches=estimates, steps_per_epoch=steps_per_epoch, checkpointer=checkpointer,
        threads=threads, device=device, precision=precision, world=world, scaler=grad_scaler(precision, device),
        callback=callback, started=started,
    )  # fmt: skip
    if checkpointer is not None and train.resume:
        # Rank 0 reads it and hands it to the others: every rank resumes at the same step.
        state = broadcast(checkpointer.load() if world.is_main else None, world)
        if state:
            run.restore(state)
            if run.progress.epoch < train.epochs:
                log.warning("resumed from %s at step %d (epoch %d)", checkpointer.path, run.progress.step,
                         run.progress.epoch + 1)  # fmt: skip
            else:  # stopped after training, e.g. while its results were logged: evaluate and save again
                log.warning("resumed from %s at step %d: training had finished; evaluating and saving",
                         checkpointer.path, run.progress.step)  # fmt: skip
    if world.distributed:
        # LoRA on lm_head (a "*" target) is never reached by the classifier: DDP must not wait for it.
        unused = any(n.startswith("body.lm_head.") for n, p in model.named_parameters() if p.requires_grad)
        run.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=unused)  # fmt: skip
    return run


def run_epoch(run: Run, bar: tqdm | None = None) -> None:
    """The optimizer steps of epoch ``run.progress.epoch`` (from its ``batch_in_epoch``-th batch on)."""
    p, t = run.progress, run.train
    skip = p.batch_in_epoch
    run.model.train()
    stepper = run.ddp if run.ddp is not None else run.model
    for i, shard in enumerate(run.loader(p.epoch)):
        if i < skip:
            continue
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        with step_failures(run, shard, p.step + 1):
            value = train_step(stepper, shard.to(run.device, non_blocking=True), run.optimizer, run.params,
                               precision=run.precision, grad_clip=t.grad_clip, world=run.world, scaler=run.scaler)  # fmt: skip
        run.scheduler.step()
        p.train_time += time.perf_counter() - t0
        p.step += 1
        p.batch_in_epoch = i + 1
        p.examples_seen += shard.count
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
            with step_failures(run, shard, p.step):
                state = run.state()  # every rank: it gathers their random states
            if state is not None:
                run.checkpointer.save(state)
            run.checkpoint_step = p.step
    p.epoch, p.batch_in_epoch = p.epoch + 1, 0


@contextlib.contextmanager
def step_failures(run: Run, shard: Shard, step: int) -> Iterator[None]:
    """Step ``step``'s work (the step, or the checkpoint after it, whose random states come from every
    rank): running out of memory or losing another rank becomes a one-line :class:`TrainError`."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if (error := step_failure(err, run, shard, step)) is None:
            raise
        raise error from err


def step_failure(err: BaseException, run: Run, shard: Shard, step: int) -> TrainError | None:
    """A one-line :class:`TrainError` for a step that ran out of memory or lost another rank; None otherwise."""
    t = run.train
    resume = (f"the checkpoint of step {run.checkpoint_step} is intact: the next run resumes there"
              if run.checkpoint_step is not None else "no checkpoint yet: the next run starts over")  # fmt: skip
    if is_out_of_memory(err):
        longest = max(int(b.lengths.max()) for b in shard.micro)
        per_piece = max(len(b.labels) for b in shard.micro)
        return TrainError(
            f"out of memory on {describe(run.device)} at step {step} ({per_piece} message{'s' * (per_piece > 1)} "
            f"of up to {longest} tokens at once): lower train.batch_size ({t.batch_size}) or train.max_length ({t.max_length}), or "
            f"raise train.grad_accum_steps ({t.grad_accum_steps}); {resume}"
        )
    if run.world.distributed and is_peer_lost(err):
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return TrainError(f"lost another process at step {step} ({first}); {resume}")
    return None


def finish(run: Run, out_dir: str | Path) -> dict[str, Any]:
    """Score the whole train and validation splits, save the classifier; the run's result."""
    final = {}
    for split, ds in (("train", run.train_ds), ("val", run.val_ds)):
        batches = fixed_batches(ds, None, EVAL_BATCH_SIZE, run.seed)
        final[f"{split}_loss"], final[f"{split}_accuracy"] = evaluate_batches(run.model, batches, run.precision)
    t, p = run.train, run.progress
    save_classifier(run.model.cpu(), out_dir, mode=t.mode, base_dir=run.base_dir, lora=run.lora,
                    extra={"train": {"epochs": t.epochs, "seed": run.seed, "precision": run.precision}})  # fmt: skip
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
        "precision": run.precision,
        "device": describe(run.device),
        "processes": run.world.world_size,
        "grad_accum_steps": t.grad_accum_steps,
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
    world: World = ONE_PROCESS,
) -> dict[str, Any] | None:
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
        world: this process's rank among several (inside :func:`gpt2lab.distributed.process_group`);
            one process by default. ``train.nproc_per_node`` itself is the train stage's: it
            starts the ranks (see :func:`gpt2lab.distributed.launch`).

    Returns:
        ``{"metrics": {...}, "history": {"steps": [...], "eval": [...]}, "out_dir": str,
        "checkpoint_dir": str | None}`` on rank 0; None on the other ranks, which write nothing.
    """
    run = setup(base_dir, data_dir, lora, train, seed, checkpoint_dir=checkpoint_dir, callback=callback, world=world)
    bar = tqdm(total=run.total_steps, initial=run.progress.step, disable=None if progress and world.is_main else True,
               desc=f"train ({train.mode})", unit="step")  # fmt: skip
    with bar:
        while run.progress.epoch < train.epochs:
            run_epoch(run, bar)
    return finish(run, out_dir) if world.is_main else None


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
