"""How training batches mix the classes and how much of them is padding, per batching scheme.

On the training split, with the ``train`` settings of params.yaml (batch size, max_length,
seed), over ``train.epochs`` epochs seeded as ``gpt2lab.train`` seeds them:

- no bucketing: shuffled index order;
- by length: :class:`~gpt2lab.batching.LengthBucketSampler` without labels (spam is longer than
  ham, so many batches hold one class only);
- by length and class: the same sampler given the labels, as ``train.bucket: true`` trains.

Columns: the share of batches holding one class only, the mean distance of a batch's spam
share from the split's, and padding efficiency (real tokens / padded tokens). No training,
no timings: it runs in seconds.

    python bench/bucketing.py
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable

from torch.utils.data import DataLoader

from gpt2lab.batching import Batch, LengthBucketSampler, SpamDataset, collate, make_loader
from gpt2lab.model import GPT2Config
from gpt2lab.params import load_params


def summary(batches: Iterable[Batch], spam_share: float) -> tuple[float, float, float]:
    """(share of single-class batches, mean |batch spam share - spam_share|, real / padded tokens)."""
    single, deviation, real, padded, n = 0, 0.0, 0, 0, 0
    for batch in batches:
        share = float(batch.labels.float().mean())
        single += share in (0.0, 1.0)
        deviation += abs(share - spam_share)
        real += int(batch.lengths.sum())
        padded += batch.ids.numel()
        n += 1
    return single / n, deviation / n, real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/prepared/train.csv", help="the balanced training split (prepare_data)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params, sections=["model", "train"])
    train = params.train
    n_ctx = params.model.n_ctx or GPT2Config.preset(params.model.name).n_ctx
    max_length = min(train.max_length or n_ctx, n_ctx)  # as the classifier cuts messages
    ds = SpamDataset.from_csv(args.data, max_length)
    spam_share = sum(ds.labels) / len(ds)
    schemes = {
        "no bucketing": lambda seed: make_loader(ds, train.batch_size, shuffle=True, seed=seed),
        "by length": lambda seed: DataLoader(
            ds, batch_sampler=LengthBucketSampler(ds.lengths, train.batch_size, shuffle=True, seed=seed),
            collate_fn=collate,
        ),  # fmt: skip
        "by length and class": lambda seed: make_loader(ds, train.batch_size, shuffle=True, seed=seed, bucket=True),
    }
    print(
        f"{len(ds)} messages ({spam_share:.1%} spam), batch {train.batch_size}, max_length {max_length}, "
        f"{train.epochs} epochs (seed {params.seed})"
    )
    header = f"{'batching':<20} {'single-class':>12} {'|spam share - split|':>21} {'real/padded':>11}"
    print(header + "\n" + "-" * len(header))
    for name, loader_for in schemes.items():
        rows = [summary(loader_for(params.seed + epoch), spam_share) for epoch in range(train.epochs)]
        single, deviation, efficiency = (statistics.mean(column) for column in zip(*rows))
        print(f"{name:<20} {single:>12.1%} {deviation:>21.3f} {efficiency:>11.3f}")


if __name__ == "__main__":
    main()
