"""Batches for the classifier: a tokenized Dataset, dynamic padding, length bucketing.

Batches are padded only to the longest sequence in the batch (dynamic padding) with the GPT-2
end-of-text token, and carry each sequence's true length so a classifier can read the last real
token. :class:`LengthBucketSampler` groups similar lengths with the classes kept mixed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gpt2lab.dataset import read_split
from gpt2lab.tokenizer import EOT_TOKEN, encode, text_bound

log = logging.getLogger(__name__)

NO_LABEL = -100  # label of unlabelled examples: PyTorch's cross-entropy ignore_index
BUCKET_POOL_BATCHES = 100  # length bucketing sorts within pools of this many batches
# Batch positions a multiple of this for bf16 on a CPU (collate's row_multiple): a 124M layer's matmuls,
# forward and backward, on 16 x k rows ~10% faster than on 16 x k - 8 (fp32: no gain); LoRA training 1.04x.
BF16_CPU_ROWS = 16
T = TypeVar("T")


class SpamDataset(Dataset):
    """Tokenized messages with labels; item ``i`` is ``(token ids, label)``.

    Texts are tokenized once, here. A message longer than ``max_length`` tokens keeps its
    FIRST ``max_length`` tokens (the end is cut); only its first characters that can hold them
    (:func:`gpt2lab.tokenizer.text_bound`) are tokenized at all. An empty message becomes ``[EOT_TOKEN]`` so
    every example has at least one token. ``labels=None`` (texts to classify) gives every
    item the label :data:`NO_LABEL`.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int] | None = None, max_length: int | None = None):
        if labels is not None and len(labels) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(labels)} labels; pass one label per text")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens or None, got {max_length}")
        self.texts = list(texts)
        self.labels = [int(x) for x in labels] if labels is not None else [NO_LABEL] * len(self.texts)
        bound = text_bound(max_length) if max_length is not None else None  # 100 MB of text: tokenize 130 KB
        ids = [encode(text[:bound]) or [EOT_TOKEN] for text in self.texts]
        truncated = sum(max_length is not None and len(x) > max_length for x in ids)
        if truncated:
            log.info("truncated %d of %d texts to their first %d tokens", truncated, len(ids), max_length)
        self.ids = [x[:max_length] for x in ids]
        self.max_length = max_length

    @classmethod
    def from_csv(cls, path: str | Path, max_length: int | None = None) -> SpamDataset:
        """The dataset of a split CSV (see :func:`read_split`)."""
        df = read_split(path)
        return cls(df.Text.tolist(), df.Label.tolist(), max_length)

    @property
    def lengths(self) -> list[int]:
        """Token count of each example (after truncation)."""
        return [len(x) for x in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.ids[index], self.labels[index]


class Batch(NamedTuple):
    """A padded batch: ``ids`` (B, T) right-padded with ``EOT_TOKEN``, ``lengths`` (B,), ``labels`` (B,)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


class Shard(NamedTuple):
    """One process's share of a global batch: its ``micro`` batches, run one after the other
    (gradient accumulation), and ``count``, the number of messages in the whole global batch
    (all processes, all micro-batches): the loss of a step is the mean over those.

    A micro-batch with no message of the global batch left for it holds one message labelled
    :data:`NO_LABEL`: its loss and gradient are zero, yet the process still takes part in the
    gradient exchange of the step.
    """

    micro: list[Batch]
    count: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Shard:
        return Shard([b.to(device, non_blocking) for b in self.micro], self.count)


def split_batch(items: Sequence[T], rank: int, world_size: int, accum_steps: int) -> list[list[T]]:
    """The ``accum_steps`` micro-batches of process ``rank`` (of ``world_size``) out of one global batch.

    ``items`` is cut into ``world_size * accum_steps`` consecutive pieces whose sizes differ by
    at most one; micro-batch ``m`` of rank ``r`` is piece ``m * world_size + r``. Every item is in
    exactly one piece, so the processes together see the global batch of a single-process run;
    consecutive pieces of a length-bucketed batch have similar lengths, so the processes of one
    micro-step get about the same work. Pieces may be empty when ``items`` is short.
    """
    parts = world_size * accum_steps
    bounds = [len(items) * k // parts for k in range(parts + 1)]
    pieces = [list(items[bounds[k] : bounds[k + 1]]) for k in range(parts)]
    return [pieces[m * world_size + rank] for m in range(accum_steps)]


def collate_shard(
    batch: Sequence[tuple[Sequence[int], int]],
    *,
    rank: int = 0,
    world_size: int = 1,
    accum_steps: int = 1,
    row_multiple: int = 1,
) -> Shard:
    """``collate`` for one process's share of a global batch (see :func:`split_batch` and :class:`Shard`)."""
    micro = []
    for piece in split_batch(batch, rank, world_size, accum_steps):
        micro.append(collate(piece or [(batch[0][0], NO_LABEL)], row_multiple))
    return Shard(micro, len(batch))


def collate(batch: Sequence[tuple[Sequence[int], int]], row_multiple: int = 1) -> Batch:
    """Stack ``(ids, label)`` items, padding to the longest sequence in this batch (not a global maximum).

    ``row_multiple``: one position more when that makes the batch's B x T positions (the rows of
    every projection's matmul) a multiple of it. bf16 matmuls on a CPU with AMX run 16-row tiles:
    at batch 8, 16 x k rows are ~10% faster than 8 fewer (see :data:`BF16_CPU_ROWS`).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([len(ids) for ids, _ in batch], dtype=torch.long)  # (B,)
    if int(lengths.min()) < 1:
        raise ValueError(f"example {int(lengths.argmin())} of the batch has no tokens; every example needs >= 1")
    B, T = len(batch), int(lengths.max())
    if (B * T) % row_multiple and (B * (T + 1)) % row_multiple == 0:
        T += 1
    ids = torch.full((B, T), EOT_TOKEN, dtype=torch.long)  # (B, T)
    for row, (seq, _) in enumerate(batch):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)  # (B,)
    return Batch(ids, lengths, labels)


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of indices with similar lengths, each class mixed in at about its share.

    With ``shuffle``: each epoch permutes the indices (seeded) and cuts them into pools of
    ``pool_batches`` batches. In each pool every class is sorted by length, the classes are
    interleaved by length rank (see :meth:`_stratify`), and the result is cut into batches whose
    order is then shuffled. A batch thus holds each class in about its share of the pool (for
    two classes: within one item of it), each at the same length quantile of its class. Sorting
    by length alone would put a class that is longer on the whole (spam) into batches of its
    own. Successive epochs differ, yet the sequence repeats for the same seed. Without
    ``shuffle`` the whole data set is one pool (batches then do not follow index order).
    ``labels=None`` (or one label for all) is plain length bucketing, with the least padding.
    Only one batch (the last pool's last) can be short; ``drop_last`` drops it.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        labels: Sequence[int] | None = None,
        drop_last: bool = False,
        pool_batches: int = BUCKET_POOL_BATCHES,
    ):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size} and {pool_batches}")
        if labels is not None and len(labels) != len(lengths):
            raise ValueError(f"got {len(lengths)} lengths but {len(labels)} labels; pass one label per item")
        self.lengths = list(lengths)
        self.labels = list(labels) if labels is not None else [0] * len(self.lengths)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.pool = batch_size * pool_batches if shuffle else max(len(self.lengths), 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n, b = len(self.lengths), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _stratify(self, pool: Sequence[int]) -> list[int]:
        """``pool`` sorted by length within each class, the classes interleaved by length rank.

        Item ``r`` (0-based) of the ``m`` items of a class is placed at ``(r + 1/2) / m`` of the
        merged order (ties: lower label first), so any run of consecutive items holds each class
        in about its share of the pool, every class at the same length quantile. With one class
        this is a stable sort by length.
        """
        classes: dict[int, list[int]] = {}
        for i in pool:
            classes.setdefault(self.labels[i], []).append(i)
        keyed = []
        for label, members in classes.items():
            # sorted() is stable: equal lengths keep the random order drawn in __iter__.
            members = sorted(members, key=self.lengths.__getitem__)
            keyed += [((rank + 0.5) / len(members), label, i) for rank, i in enumerate(members)]
        return [i for *_, i in sorted(keyed)]

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        order = torch.randperm(n, generator=self.generator).tolist() if self.shuffle else list(range(n))
        batches = []
        for start in range(0, n, self.pool):
            pool = self._stratify(order[start : start + self.pool])
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        # Pools are whole multiples of batch_size, so only the very last batch can be short.
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        return iter(batches)


def _lengths_and_labels(dataset: Dataset) -> tuple[list[int], list[int]]:
    """Token count and label of every item: the dataset's ``lengths`` and ``labels`` when it has them."""
    lengths, labels = getattr(dataset, "lengths", None), getattr(dataset, "labels", None)
    if lengths is None or labels is None:
        items = [dataset[i] for i in range(len(dataset))]
        lengths = [len(ids) for ids, _ in items] if lengths is None else lengths
        labels = [label for _, label in items] if labels is None else labels
    return list(lengths), list(labels)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    bucket: bool = False,
    drop_last: bool = False,
    shard: tuple[int, int, int] | None = None,
    pin_memory: bool = False,
    row_multiple: int = 1,
) -> DataLoader:
    """A seeded DataLoader yielding :class:`Batch` (ids (B, T), lengths (B,), labels (B,)).

    ``bucket`` groups similar lengths into batches, each label in about its share of the data,
    then shuffles the batches (see :class:`LengthBucketSampler`); otherwise items are batched
    in (shuffled) index order. The same seed gives the same sequence of epochs.

    ``shard=(rank, world_size, accum_steps)`` yields instead, for each global batch of
    ``batch_size`` (the same global batches for any shard), the :class:`Shard` of process
    ``rank``. ``pin_memory`` puts batches in page-locked memory, for non-blocking copies to a GPU.
    ``row_multiple``: see :func:`collate`.
    """
    collate_fn = functools.partial(collate, row_multiple=row_multiple)
    if shard is not None:
        rank, world_size, accum_steps = shard
        collate_fn = functools.partial(collate_shard, rank=rank, world_size=world_size, accum_steps=accum_steps,
                                       row_multiple=row_multiple)  # fmt: skip
    if bucket:
        lengths, labels = _lengths_and_labels(dataset)
        sampler = LengthBucketSampler(
            lengths, batch_size, shuffle=shuffle, seed=seed, labels=labels, drop_last=drop_last
        )
        # A generator of its own: without one, each new iterator draws its base seed from the
        # global RNG, shifting the dropout stream of a run resumed mid-epoch.
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, generator=generator,
                          pin_memory=pin_memory)  # fmt: skip
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
    )
