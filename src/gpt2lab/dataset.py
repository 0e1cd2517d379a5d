"""SMS Spam Collection: parse, balance, split (pandas; no torch). The download is in :mod:`gpt2lab.fetch`.

The pipeline follows the reference recipe so its numbers stay comparable: all 5,574 rows are
parsed with ``QUOTE_NONE`` (the file has unbalanced ``"`` that default CSV quoting would merge
across lines), ham is down-sampled to the spam count with ``DataFrame.sample(random_state=seed)``,
and the balanced frame is shuffled once and cut 70/10/20 with ``int()`` boundaries.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import write_atomic

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"  # counts per step and split, beside the splits
LABELS = {"ham": 0, "spam": 1}
CLASS_NAMES = tuple(LABELS)  # by label id
SPLITS = ("train", "validation", "test")
COLUMNS = ["Label", "Text"]


class DataFormatError(Gpt2labError, ValueError):
    """The data file is malformed; the message names the file and line."""


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


def balance_classes(df: pd.DataFrame, seed: int) -> pd.DataFrame:
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


def prepare_data(
    raw_path: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    balance: bool = True,
    dedupe: bool = False,
    train_frac: float = 0.7,
    validation_frac: float = 0.1,
) -> dict[str, Any]:
    """Parse, optionally dedupe and balance, split; write ``out_dir/{train,validation,test}.csv``.

    Returns the statistics: row and class counts at each step and per split, and the number of
    exact-duplicate texts shared between splits (``shared_texts``; non-zero unless ``dedupe``).
    """
    df = parse_collection(raw_path)
    metrics: dict[str, Any] = {"parsed": _counts(df), "duplicate_rows": int(df.Text.duplicated().sum())}
    if dedupe:
        df = df.drop_duplicates(subset="Text", keep="first")
    metrics["after_dedupe"] = _counts(df)
    if balance:
        df = balance_classes(df, seed)
    metrics["after_balance"] = _counts(df)
    splits = split(df, seed, train_frac, validation_frac)
    for name, part in splits.items():
        write_split(part, Path(out_dir) / f"{name}.csv")
        metrics[name] = _counts(part)
    metrics["shared_texts"] = shared_texts(splits)
    log.info("prepared splits %s", {name: len(part) for name, part in splits.items()})
    return metrics
