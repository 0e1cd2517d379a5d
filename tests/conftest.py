"""Shared fixtures: tiny configs keep the suite fast on two CPU cores."""

from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from gpt2lab.checkpoint import random_checkpoint
from gpt2lab.model import GPT2, GPT2Config

_MLFLOW_URI_AT_START = os.environ.get("MLFLOW_TRACKING_URI")
TINY = GPT2Config(vocab_size=50257, n_ctx=64, n_embd=32, n_layer=2, n_head=4)
SPAM_WORDS = "WIN FREE cash prize claim URGENT txt now reply call £1000 winner offer".split()
HAM_WORDS = "see you at home later mum dinner ok going sorry meeting tomorrow love".split()


@pytest.fixture(autouse=True, scope="session")
def _quiet_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    torch.set_num_threads(1)  # tiny models: more threads only add synchronisation on 2 cores


@pytest.fixture(autouse=True)
def _isolate_mlflow_store():
    """MLflow keeps the tracking URI in a process global (and mirrors it into the environment);
    reset both after each test (module fixtures included) so no store leaks into the next test."""
    before = _MLFLOW_URI_AT_START
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def tiny_cfg() -> GPT2Config:
    return TINY


@pytest.fixture
def tiny_model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(TINY).eval()


@pytest.fixture
def hf_tiny(tmp_path: Path):
    """A random transformers GPT2LMHeadModel with the tiny config, saved as safetensors."""
    return make_hf_checkpoint(TINY, tmp_path / "hf")


def make_hf_checkpoint(cfg: GPT2Config, folder: Path, seed: int = 0):
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_cfg = HFConfig(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(hf_cfg).eval()
    # Non-trivial LayerNorm and bias values, so a transposition or swap cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def make_messages(n: int, rng: random.Random) -> pd.DataFrame:
    """``n`` labelled messages, alternating ham and spam, drawn from two small vocabularies."""
    rows = []
    for i in range(n):
        label = i % 2
        words = SPAM_WORDS if label else HAM_WORDS
        rows.append((label, " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))))
    rng.shuffle(rows)
    return pd.DataFrame(rows, columns=["Label", "Text"])


@pytest.fixture(scope="session")
def train_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint, prepared data folder) for short training runs: a tiny random base, 48/24 messages."""
    root = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    data = root / "prepared"
    data.mkdir()
    make_messages(48, rng).to_csv(data / "train.csv", index=False)
    make_messages(24, rng).to_csv(data / "validation.csv", index=False)
    base = random_checkpoint(TINY, 3, root / "base")
    return base, data


# --------------------------------------------------------------------------- a throwaway PostgreSQL


@pytest.fixture(scope="session")
def cpp_compiler() -> None:
    """torch.compile's CPU kernels need a C++ compiler: skipped without one, except in CI (``CI=true``)."""
    from gpt2lab.kernels import CompileUnavailable, check_compiler

    try:
        check_compiler()
    except CompileUnavailable as err:
        _skip_or_fail_in_ci(f"{err} (apt-get install g++)")


@pytest.fixture(scope="session")
def bf16_kernel() -> Callable[..., torch.Tensor]:
    """gpt2lab's bf16 matrix-vector kernel (built here if needed). Skipped on a CPU without
    AVX512-BF16 (it cannot run there); without a compiler or ninja, skipped except in CI."""
    from gpt2lab.kernels import bf16_addmv_op

    if not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16: bf16 decoding runs torch.addmv")
    return _built("bf16 kernel", bf16_addmv_op)


@pytest.fixture(scope="session")
def attention_kernel() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """gpt2lab's one-query attention kernel (built here if needed). Without a compiler or ninja,
    skipped except in CI."""
    from gpt2lab.kernels import decode_attention_op

    return _built("attention kernel", decode_attention_op)


@pytest.fixture(scope="session")
def fused_step_kernel() -> Callable[..., torch.Tensor]:
    """gpt2lab's whole-step decoding kernel (built here if needed). Skipped on a CPU without AVX-512
    (it cannot run there); without a compiler or ninja, skipped except in CI."""
    from gpt2lab.kernels import decode_token_op

    if not torch.cpu._is_avx512_supported():
        pytest.skip("this CPU has no AVX-512: decoding runs the model's layers one at a time")
    return _built("decoding kernel", decode_token_op)


def _built(name: str, load: Callable[[], Callable[..., Any] | None]) -> Callable[..., Any]:
    """The op ``load()`` builds and loads; where it cannot (no compiler or ninja), skipped except in CI."""
    op = load()
    if op is None:
        _skip_or_fail_in_ci(f"gpt2lab's {name} could not be built (a C++ compiler and ninja are needed)")
    return op


def _skip_or_fail_in_ci(why: str) -> None:
    """Skip the test for ``why`` (a missing system tool); in CI (``CI=true``) nothing may be skipped: fail it."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(why)
    pytest.skip(why)


def _initdb() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    return Path(found[-1]) if found[-1] else None


@pytest.fixture(scope="session")
def postgres() -> str:
    """A real PostgreSQL server for this session, on 127.0.0.1 and a free port, in a temporary folder:
    the SQLAlchemy URL of its empty database ``mlflow``. Skipped when PostgreSQL is not installed,
    except in CI (``CI=true``), where that fails."""
    from tests.helpers import free_port

    initdb = _initdb()
    if initdb is None:
        _skip_or_fail_in_ci("PostgreSQL is not installed (no initdb): apt-get install postgresql")
    bindir = initdb.parent
    folder = Path(tempfile.mkdtemp(prefix="gpt2lab-pg-"))  # not under pytest's 0700 root: the server user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres system user
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"

    def run(*args: object) -> None:
        subprocess.run([*as_user, *map(str, args)], check=True, capture_output=True, timeout=120)

    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    run(bindir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "60", "start",
        "-o", f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off")  # fmt: skip
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
