"""Batches: tokenized once, padded per batch, bucketed by length with the classes kept mixed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab import batching
from gpt2lab.dataset import prepare_data, read_split
from gpt2lab.tokenizer import EOT_TOKEN, encode

FIXTURE = Path(__file__).parent / "fixtures" / "sms_small.tsv"


def test_dataset_tokenizes_truncates_and_handles_empty_text():
    texts = ["Hello world, every effort moves you", "", "hi"]
    full = encode(texts[0])
    ds = batching.SpamDataset(texts, [0, 1, 0], max_length=3)
    assert ds[0] == (full[:3], 0)  # the FIRST max_length tokens are kept
    assert ds[1] == ([EOT_TOKEN], 1)  # an empty message is one end-of-text token
    assert ds.lengths == [3, 1, 1] and len(ds) == 3
    assert batching.SpamDataset(texts, None, None)[0] == (full, batching.NO_LABEL)
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        batching.SpamDataset(texts, [0, 1])
    with pytest.raises(ValueError, match="max_length"):
        batching.SpamDataset(texts, None, max_length=0)


def test_dataset_from_csv(tmp_path):
    prepare_data(FIXTURE, tmp_path, seed=123)
    frame = read_split(tmp_path / "train.csv")
    ds = batching.SpamDataset.from_csv(tmp_path / "train.csv", max_length=8)
    assert len(ds) == 11 and ds.labels == frame.Label.tolist()
    assert all(ids == (encode(t) or [EOT_TOKEN])[:8] for ids, t in zip(ds.ids, frame.Text))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, EOT_TOKEN - 1), min_size=1, max_size=12), min_size=1, max_size=6))
def test_collate_pads_to_the_longest_in_the_batch(seqs):
    batch = batching.collate([(s, i % 2) for i, s in enumerate(seqs)])
    longest = max(map(len, seqs))
    assert batch.ids.shape == (len(seqs), longest) and batch.ids.dtype == torch.long
    assert batch.lengths.tolist() == [len(s) for s in seqs]
    assert batch.labels.tolist() == [i % 2 for i in range(len(seqs))]
    for row, s in zip(batch.ids.tolist(), seqs):
        assert row[: len(s)] == s and row[len(s) :] == [EOT_TOKEN] * (longest - len(s))


@pytest.mark.parametrize(
    "rows, longest, width",
    [(8, 5, 6), (8, 6, 6), (16, 5, 5), (24, 3, 4), (7, 5, 5), (4, 5, 5), (4, 3, 4)],
)
def test_collate_pads_one_position_more_when_that_makes_whole_row_tiles(rows, longest, width):
    """row_multiple 16: B x T positions made a multiple of 16 by one more padding position, else left."""
    items = [([7] * (longest if i == 0 else 1), 0) for i in range(rows)]
    batch = batching.collate(items, row_multiple=batching.BF16_CPU_ROWS)
    assert batch.ids.shape == (rows, width) and batch.lengths.tolist() == [longest] + [1] * (rows - 1)
    assert (batch.ids[0, longest:] == EOT_TOKEN).all()
    assert batching.collate(items).ids.shape == (rows, longest)
    shard = batching.collate_shard(items, accum_steps=2, row_multiple=batching.BF16_CPU_ROWS)
    pieces = batching.split_batch(items, 0, 1, 2)
    assert [b.ids.shape for b in shard.micro] == [batching.collate(p, batching.BF16_CPU_ROWS).ids.shape for p in pieces]


def test_collate_rejects_empty_input():
    with pytest.raises(ValueError, match="empty batch"):
        batching.collate([])
    with pytest.raises(ValueError, match="example 1 .* no tokens"):
        batching.collate([([1], 0), ([], 1)])


class Lengths(torch.utils.data.Dataset):
    """Items with known lengths (``ids`` encode the index) without running the tokenizer."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return [i] * self.lengths[i], i % 2


def order(loader) -> list[int]:
    return [int(ids[0]) for batch in loader for ids in batch.ids]


@pytest.mark.parametrize("bucket", [False, True])
def test_loader_is_seeded_and_covers_every_example_once(bucket):
    ds = Lengths([(i * 7) % 23 + 1 for i in range(101)])
    a = order(batching.make_loader(ds, 8, shuffle=True, seed=1, bucket=bucket))
    assert sorted(a) == list(range(101))
    assert a == order(batching.make_loader(ds, 8, shuffle=True, seed=1, bucket=bucket))
    assert a != order(batching.make_loader(ds, 8, shuffle=True, seed=2, bucket=bucket))
    loader = batching.make_loader(ds, 8, shuffle=True, seed=1, bucket=bucket)
    assert order(loader) != order(loader)  # a new order every epoch
    dropped = batching.make_loader(ds, 8, shuffle=True, seed=1, bucket=bucket, drop_last=True)
    assert len(dropped) == 12 and all(len(b.labels) == 8 for b in dropped)
    if not bucket:
        assert order(batching.make_loader(ds, 8, shuffle=False, seed=1)) == list(range(101))


def test_bucketing_cuts_padding():
    torch.manual_seed(0)
    lengths = torch.randint(1, 200, (800,)).tolist()
    ds = Lengths(lengths)

    def padded(loader) -> int:
        return sum(b.ids.numel() - int(b.lengths.sum()) for b in loader)

    plain = padded(batching.make_loader(ds, 8, shuffle=True, seed=0))
    bucketed = padded(batching.make_loader(ds, 8, shuffle=True, seed=0, bucket=True))
    assert bucketed < plain / 10
    # Without shuffling the batches are in length order: no padding beyond ties.
    sorted_batches = list(batching.make_loader(ds, 8, shuffle=False, seed=0, bucket=True))
    assert [int(b.lengths.max()) for b in sorted_batches] == sorted(int(b.lengths.max()) for b in sorted_batches)


class Labelled(Lengths):
    """Items with known lengths and labels, exposed as attributes as :class:`batching.SpamDataset` does."""

    def __init__(self, lengths: list[int], labels: list[int]):
        super().__init__(lengths)
        self.labels = labels

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return [i] * self.lengths[i], self.labels[i]


def separated(n: int, seed: int = 0) -> Labelled:
    """``n`` items, half of each class, where every class-1 item is longer than every class-0 item."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.randperm(n, generator=g) % 2).tolist()
    short, long = torch.randint(5, 40, (n,), generator=g).tolist(), torch.randint(40, 80, (n,), generator=g).tolist()
    return Labelled([long[i] if y else short[i] for i, y in enumerate(labels)], labels)


def efficiency(loader) -> float:
    """Real tokens / padded tokens over an epoch."""
    batches = list(loader)
    return sum(int(b.lengths.sum()) for b in batches) / sum(b.ids.numel() for b in batches)


def length_only(ds, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Bucketing by length alone: the sampler without labels."""
    sampler = batching.LengthBucketSampler(ds.lengths, batch_size, shuffle=True, seed=seed)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=batching.collate)


def test_bucketing_mixes_classes_whose_lengths_differ():
    ds = separated(1000)
    for seed in range(3):
        batches = list(batching.make_loader(ds, 8, shuffle=True, seed=seed, bucket=True))
        assert sorted(int(i) for b in batches for i in b.ids[:, 0]) == list(range(1000))
        # Half of each batch, within one item per pool (a pool's share of a class varies a little).
        assert all(3 <= int(b.labels.sum()) <= 5 for b in batches)
    # By length alone nearly every batch holds one class only.
    single = [len(set(b.labels.tolist())) == 1 for b in length_only(ds, 8, seed=0)]
    assert sum(single) > 0.9 * len(single)


def test_class_aware_bucketing_keeps_the_padding_savings():
    # Labels independent of length: about the padding of bucketing by length alone.
    torch.manual_seed(0)
    ds = Labelled(torch.randint(1, 200, (800,)).tolist(), (torch.arange(800) % 2).tolist())
    plain = efficiency(batching.make_loader(ds, 8, shuffle=True, seed=0))
    by_length = efficiency(length_only(ds, 8, seed=0))
    by_class = efficiency(batching.make_loader(ds, 8, shuffle=True, seed=0, bucket=True))
    assert plain < 0.7 and by_length > 0.95 and by_class > 0.9 * by_length
    # Every class-1 item longer: a batch holding 4 of them is at least as wide as the longest, so
    # no mixed batching pads less than 8 * (each 4th of the sorted class-1 lengths); close to that.
    ds = separated(1000)
    padded = sum(b.ids.numel() for b in batching.make_loader(ds, 8, shuffle=True, seed=0, bucket=True))
    long = sorted(n for n, y in zip(ds.lengths, ds.labels) if y)
    assert padded <= 1.05 * 8 * sum(long[3::4])
    assert sum(ds.lengths) / padded > efficiency(batching.make_loader(ds, 8, shuffle=True, seed=0)) + 0.05


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    batch_size=st.integers(1, 9),
    pool_batches=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
)
def test_bucket_sampler_properties(counts, batch_size, pool_batches, seed, shuffle, drop_last):
    labels = [y for y, count in enumerate(counts) for _ in range(count)]
    lengths = [1 + 10 * y + i % 7 for i, y in enumerate(labels)]  # the class decides the length
    n = len(labels)

    def sampler() -> batching.LengthBucketSampler:
        return batching.LengthBucketSampler(
            lengths, batch_size, shuffle=shuffle, seed=seed, labels=labels, drop_last=drop_last,
            pool_batches=pool_batches,
        )  # fmt: skip

    s = sampler()
    epoch = list(s)
    flat = [i for b in epoch for i in b]
    assert len(epoch) == len(s) and len(flat) == len(set(flat))
    if drop_last:
        assert len(flat) == n - n % batch_size and all(len(b) == batch_size for b in epoch)
    else:
        assert sorted(flat) == list(range(n)) and sum(len(b) < batch_size for b in epoch) == (n % batch_size > 0)
    assert epoch == list(sampler())  # same seed, same batches
    if len(counts) == 2 and not shuffle:  # one pool: each batch holds each class within one item of its share
        for b in epoch:
            assert all(abs(sum(labels[i] == y for i in b) - len(b) * count / n) < 1 for y, count in enumerate(counts))


def test_bucketing_without_labels_sorts_by_length_alone():
    lengths = [(i * 7) % 23 + 1 for i in range(50)]
    unlabelled = batching.LengthBucketSampler(lengths, 4, shuffle=False, seed=0)
    assert [lengths[i] for b in unlabelled for i in b] == sorted(lengths)
    same_label = batching.LengthBucketSampler(lengths, 4, shuffle=True, seed=3, labels=[batching.NO_LABEL] * 50)
    assert list(same_label) == list(batching.LengthBucketSampler(lengths, 4, shuffle=True, seed=3))
    long = [int(length > 12) for length in lengths]
    labelled = batching.LengthBucketSampler(lengths, 4, shuffle=False, seed=0, labels=long)
    assert [lengths[i] for b in labelled for i in b] != sorted(lengths)
    with pytest.raises(ValueError, match="50 lengths but 2 labels"):
        batching.LengthBucketSampler(lengths, 4, shuffle=False, seed=0, labels=[0, 1])


def test_loader_batches_real_tokens(tmp_path):
    prepare_data(FIXTURE, tmp_path, seed=123, balance=False)
    ds = batching.SpamDataset.from_csv(tmp_path / "train.csv", max_length=16)
    for batch in batching.make_loader(ds, 4, shuffle=True, seed=0, bucket=True):
        assert batch.ids.shape[1] == int(batch.lengths.max()) <= 16
        assert isinstance(batch, batching.Batch) and batch.to("cpu").ids is not None
