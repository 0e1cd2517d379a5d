"""SMS Spam Collection: download (mirrors + sha256), parse, balance, split; Dataset and collate.

The pipeline follows the reference recipe so its numbers stay comparable: all 5,574 rows are
parsed with ``QUOTE_NONE`` (the file has unbalanced ``"`` that default CSV quoting would merge
across lines), ham is down-sampled to the spam count with ``DataFrame.sample(random_state=seed)``,
and the balanced frame is shuffled once and cut 70/10/20 with ``int()`` boundaries.

Batches are padded only to the longest sequence in the batch (dynamic padding) with the GPT-2
end-of-text token, and carry each sequence's true length so a classifier can read the last real
token.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gpt2lab.config import DataParams
from gpt2lab.download import fetch, fetch_first, sha256_file, write_atomic
from gpt2lab.errors import Gpt2labError
from gpt2lab.tokenizer import EOT_TOKEN, encode

log = logging.getLogger(__name__)

RAW_FILE = "SMSSpamCollection.tsv"
RAW_MEMBER = "SMSSpamCollection"  # the entry inside the UCI zip archives
SOURCE_RECORD = "source.json"
LABELS = {"ham": 0, "spam": 1}
SPLITS = ("train", "validation", "test")
COLUMNS = ["Label", "Text"]
NO_LABEL = -100  # label of unlabelled examples: PyTorch's cross-entropy ignore_index
BUCKET_POOL_BATCHES = 100  # length bucketing sorts within pools of this many batches


class DataFormatError(Gpt2labError, ValueError):
    """The data file is malformed; the message names the file and line."""


# --------------------------------------------------------------------------- download


def download_dataset(params: DataParams, raw_dir: str | Path) -> dict[str, Any]:
    """Fetch the collection into ``raw_dir/SMSSpamCollection.tsv`` from the first verifying source.

    ``params.sources`` are tried in order (zip archives are extracted safely, then the TSV's
    sha256 is checked). Also writes ``raw_dir/source.json`` recording which source served it.
    Returns that record. Raises :class:`gpt2lab.download.DownloadError` listing every failure.
    """
    raw_dir = Path(raw_dir)
    path, source = fetch_first(
        params.sources,
        raw_dir / RAW_FILE,
        sha256=params.sha256,
        timeout_s=params.timeout_s,
        retries=params.retries,
        fetcher=functools.partial(fetch, member=RAW_MEMBER),
    )
    record = {"file": RAW_FILE, "source": source, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_atomic(raw_dir / SOURCE_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


# --------------------------------------------------------------------------- parse, balance, split


def parse_collection(path: str | Path) -> pd.DataFrame:
    """All rows of the tab-separated ``label<TAB>text`` file as ``Label`` (ham 0, spam 1), ``Text``.

    Quotes are ordinary characters (``QUOTE_NONE``). Any line without exactly two fields, with
    an unknown label, or with bytes that are not UTF-8 raises :class:`DataFormatError` naming
    its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file; run the download_data stage first (dvc repro download_data)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataFormatError(f"{path}, line {line}: not valid UTF-8 ({err.reason}); re-download the file") from err
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = []
    for fields in reader:
        where = f"{path}, line {reader.line_num}"
        if not fields:
            raise DataFormatError(f"{where}: empty line; every line must be <label><TAB><text>")
        if len(fields) != 2:
            raise DataFormatError(
                f"{where}: expected 2 tab-separated fields (label, text), found {len(fields)}: {fields!r:.80}"
            )
        label, message = fields
        if label not in LABELS:
            raise DataFormatError(f"{where}: unknown label {label!r}; expected one of {', '.join(LABELS)}")
        rows.append((LABELS[label], message))
    if not rows:
        raise DataFormatError(f"{path}: no rows; re-download the file")
    return pd.DataFrame(rows, columns=COLUMNS)


def balance(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Down-sample the larger class (ham in this data set) to the size of the smaller, seeded.

    Rows keep their original index; the sampled class comes first, as in the reference recipe.
    """
    ham, spam = df[df.Label == 0], df[df.Label == 1]
    if len(ham) >= len(spam):
        return pd.concat([ham.sample(n=len(spam), random_state=seed), spam])
    return pd.concat([ham, spam.sample(n=len(ham), random_state=seed)])


def split(df: pd.DataFrame, seed: int, train_frac: float, validation_frac: float) -> dict[str, pd.DataFrame]:
    """Shuffle ``df`` once (seeded) and cut it into train / validation / test (the remainder)."""
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    parts = (df[:train_end], df[train_end:validation_end], df[validation_end:])
    return {name: part.reset_index(drop=True) for name, part in zip(SPLITS, parts)}


def _counts(df: pd.DataFrame) -> dict[str, int]:
    return {"rows": len(df), "ham": int((df.Label == 0).sum()), "spam": int((df.Label == 1).sum())}


def shared_texts(splits: dict[str, pd.DataFrame]) -> dict[str, int]:
    """Number of distinct texts present in both splits, for each pair of splits (leakage check)."""
    texts = {name: set(df.Text) for name, df in splits.items()}
    names = list(splits)
    return {f"{a}_{b}": len(texts[a] & texts[b]) for i, a in enumerate(names) for b in names[i + 1 :]}


def write_split(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``Label,Text`` CSV atomically, byte-for-byte reproducible (``\\n`` line ends, UTF-8)."""
    return write_atomic(path, df[COLUMNS].to_csv(index=False, lineterminator="\n"))


def read_split(path: str | Path) -> pd.DataFrame:
    """Read a split written by :func:`write_split`: ``Label`` int (0 ham, 1 spam), ``Text`` str.

    Texts are kept verbatim: no NaN conversion (``"NA"`` or an empty message stay strings).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"Label": "int64", "Text": str}, keep_default_na=False, na_filter=False)
    except ValueError as err:  # pandas' ParserError is a ValueError too
        raise DataFormatError(f"{path}: not a Label,Text split CSV ({err}); re-run the prepare_data stage") from err
    if list(df.columns) != COLUMNS:
        raise DataFormatError(f"{path}: expected columns {','.join(COLUMNS)}, found {','.join(df.columns)}")
    bad = ~df.Label.isin(list(LABELS.values()))
    if bad.any():
        row = int(bad.idxmax())
        raise DataFormatError(f"{path}, data row {row + 1}: label {df.Label[row]} is not 0 (ham) or 1 (spam)")
    return df


def prepare_data(raw_path: str | Path, out_dir: str | Path, params: DataParams, seed: int) -> dict[str, Any]:
    """Parse, optionally dedupe and balance, split; write ``out_dir/{train,validation,test}.csv``.

    Returns the metrics: row and class counts at each step and per split, and the number of
    exact-duplicate texts shared between splits (``shared_texts``; non-zero unless ``dedupe``).
    """
    df = parse_collection(raw_path)
    metrics: dict[str, Any] = {"parsed": _counts(df), "duplicate_rows": int(df.Text.duplicated().sum())}
    if params.dedupe:
        df = df.drop_duplicates(subset="Text", keep="first")
    metrics["after_dedupe"] = _counts(df)
    if params.balance:
        df = balance(df, seed)
    metrics["after_balance"] = _counts(df)
    splits = split(df, seed, params.train_frac, params.validation_frac)
    for name, part in splits.items():
        write_split(part, Path(out_dir) / f"{name}.csv")
        metrics[name] = _counts(part)
    metrics["shared_texts"] = shared_texts(splits)
    log.info("prepared splits %s", {name: len(part) for name, part in splits.items()})
    return metrics


# --------------------------------------------------------------------------- Dataset and batching


class SpamDataset(Dataset):
    """Tokenized messages with labels; item ``i`` is ``(token ids, label)``.

    Texts are tokenized once, here. A message longer than ``max_length`` tokens keeps its
    FIRST ``max_length`` tokens (the end is cut). An empty message becomes ``[EOT_TOKEN]`` so
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
        ids = [encode(text) or [EOT_TOKEN] for text in self.texts]
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

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in self))


def collate(batch: Sequence[tuple[Sequence[int], int]]) -> Batch:
    """Stack ``(ids, label)`` items, padding to the longest sequence in this batch (not a global maximum)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([len(ids) for ids, _ in batch], dtype=torch.long)  # (B,)
    if int(lengths.min()) < 1:
        raise ValueError(f"example {int(lengths.argmin())} of the batch has no tokens; every example needs >= 1")
    ids = torch.full((len(batch), int(lengths.max())), EOT_TOKEN, dtype=torch.long)  # (B, T)
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
) -> DataLoader:
    """A seeded DataLoader yielding :class:`Batch` (ids (B, T), lengths (B,), labels (B,)).

    ``bucket`` groups similar lengths into batches, each label in about its share of the data,
    then shuffles the batches (see :class:`LengthBucketSampler`); otherwise items are batched
    in (shuffled) index order. The same seed gives the same sequence of epochs.
    """
    if bucket:
        lengths, labels = _lengths_and_labels(dataset)
        sampler = LengthBucketSampler(
            lengths, batch_size, shuffle=shuffle, seed=seed, labels=labels, drop_last=drop_last
        )
        # A generator of its own: without one, each new iterator draws its base seed from the
        # global RNG, shifting the dropout stream of a run resumed mid-epoch.
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
