"""Data-parallel training with real ``torch.distributed.run`` processes (gloo on the CPU).

The train stage runs as its own process in a folder laid out like the repository. Two processes
with gradient accumulation must take the optimizer steps of one process (the per-step loss within
1e-5, relative, in fp32; the adapters within float tolerance); a two-process run killed mid-epoch
must resume to exactly the result of an uninterrupted one (dropout on: every rank's random stream
is restored); a rank that dies must end the stage with one line within seconds; and two launcher
agents rendezvousing on 127.0.0.1 (two "nodes") must train as one run. The pure parts (how a batch
is split, the launcher's report) are tested directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from gpt2lab import stage
from gpt2lab.batching import NO_LABEL, collate_shard, split_batch
from gpt2lab.dataset import parse_collection, split, write_split
from gpt2lab.distributed import World, failure_line, needs_launch
from gpt2lab.errors import Gpt2labError
from gpt2lab.lora import ADAPTER_FILE
from gpt2lab.params import ModelParams, WeightsParams
from gpt2lab.resume import CHECKPOINT_FILE, CHECKPOINTS_DIR
from gpt2lab.weights import fetch_weights
from tests.helpers import free_port, one_error_line

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "sms_small.tsv"
SEED = 11
PARAMS = {
    "seed": SEED,
    "model": {"name": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_ctx": 64},
    "weights": {"source": "random"},
    "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
    "train": {"epochs": 2, "batch_size": 8, "lr": 5e-4, "eval_freq": 5, "eval_iter": 2, "precision": "fp32",
              "max_length": 48, "num_threads": 1, "checkpoint_every": 5},
}  # fmt: skip
TIMEOUT_S = 180
STEPS = "metrics/train_steps.tsv"
SAME = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


# --- the pure parts ---------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "world_size", "accum"), [(8, 2, 1), (8, 2, 2), (7, 2, 2), (3, 2, 2), (5, 3, 1)])
def test_the_ranks_micro_batches_hold_the_global_batch_once(n, world_size, accum):
    items = list(range(n))
    shares = [split_batch(items, r, world_size, accum) for r in range(world_size)]
    pieces = [shares[r][m] for m in range(accum) for r in range(world_size)]  # micro-step m, rank r
    assert [i for piece in pieces for i in piece] == items  # consecutive pieces, each item once
    sizes = [len(p) for p in pieces]
    assert max(sizes) - min(sizes) <= 1


def test_an_empty_piece_becomes_one_unlabelled_message():
    items = [([1, 2, 3], 1), ([4], 0), ([5, 6], 1)]
    shard = collate_shard(items, rank=0, world_size=2, accum_steps=2)  # 4 pieces for 3 messages: [], [0], [1], [2]
    assert shard.count == 3
    assert [b.labels.tolist() for b in shard.micro] == [[NO_LABEL], [0]]  # pieces 0 (empty) and 2
    assert collate_shard(items).micro[0].labels.tolist() == [1, 0, 1]  # one process: the global batch


def test_world_and_launch_decision_follow_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert World.from_env() == World() and World().is_main and not World().distributed
    assert needs_launch(2) and not needs_launch(1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert World.from_env() == World(rank=3, local_rank=1, world_size=4, local_world_size=2)
    assert not needs_launch(2)  # already one of the processes: never launch again


def test_a_rank_hands_its_error_line_to_the_launcher(tmp_path, monkeypatch, capsys):
    """The error file a rank writes is read by torch's own ProcessFailure, and the rank prints nothing."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv(stage.ERROR_FILE_ENV, str(error_file))
    monkeypatch.setenv(stage.LAUNCHED_ENV, "1")

    def fail() -> None:
        raise Gpt2labError("train.batch_size: too small")

    assert stage.run(fail) == 1
    assert capsys.readouterr().err == ""
    failure = ProcessFailure(local_rank=0, pid=123, exitcode=1, error_file=str(error_file))
    killed = ProcessFailure(local_rank=1, pid=124, exitcode=-9, error_file=str(tmp_path / "none.json"))
    line = failure_line({0: failure, 1: killed}, 2)
    assert "rank 0 failed: train.batch_size: too small; rank 1 was killed by SIGKILL" in line and "\n" not in line
    stopped = ProcessFailure(local_rank=0, pid=125, exitcode=-15, error_file=str(tmp_path / "none.json"))
    line = failure_line({0: stopped, 1: killed}, 2)
    assert "(2 processes): rank 1 was killed by SIGKILL; the launcher stopped rank 0. Run the stage again" in line
    monkeypatch.delenv(stage.LAUNCHED_ENV)
    assert stage.run(fail) == 1 and capsys.readouterr().err == "error: train.batch_size: too small\n"


# --- real processes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A repository-shaped folder: the stage script, a tiny random base, prepared splits (2 x 45 steps)."""
    root = tmp_path_factory.mktemp("repo")
    (root / "stages").mkdir()
    shutil.copy(REPO / "stages" / "train.py", root / "stages" / "train.py")
    fetch_weights(ModelParams(**PARAMS["model"]), WeightsParams(source="random"), SEED, root / "models" / "base")
    df = pd.concat([parse_collection(FIXTURE)] * 16, ignore_index=True)
    for name, part in split(df, SEED, train_frac=0.7, validation_frac=0.1).items():
        write_split(part, root / "data" / "prepared" / f"{name}.csv")
    return root


def _repo(template: Path, dest: Path, **train) -> Path:
    shutil.copytree(template, dest)
    params = json.loads(json.dumps(PARAMS))
    params["train"].update(train)
    if "lora_dropout" in params["train"]:
        params["lora"]["dropout"] = params["train"].pop("lora_dropout")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "TORCHELASTIC_"))}
    env.pop("OMP_NUM_THREADS", None)
    return {**env, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any still running when it ends are killed, with their ranks."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            for child in _children(proc.pid):
                _kill(child)
            proc.kill()
            proc.wait()


def _start(root: Path, log: str, started: list, cmd: list[str] | None = None) -> subprocess.Popen:
    out = open(root / log, "wb")  # noqa: SIM115 - closed by the OS when the test's process ends
    cmd = cmd or [sys.executable, "stages/train.py"]
    proc = subprocess.Popen(cmd, cwd=root, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    started.append(proc)
    return proc


def _run(root: Path, started: list, log: str = "train.log") -> str:
    proc = _start(root, log, started)
    rc = proc.wait(TIMEOUT_S)
    text = (root / log).read_text(errors="replace")
    assert rc == 0, text[-4000:]
    return text


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _checkpoint_step(root: Path) -> int | None:
    for path in (root / CHECKPOINTS_DIR).glob(f"*/{CHECKPOINT_FILE}"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["step"]
        except (FileNotFoundError, RuntimeError, EOFError):
            return None
    return None


def _wait_for_checkpoint(proc: subprocess.Popen, root: Path, min_step: int) -> int:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"train ended (rc {proc.returncode}) before it could be interrupted"
        step = _checkpoint_step(root)
        if step is not None and step >= min_step:
            return step
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared in time")


def _wait_for_ranks(proc: subprocess.Popen, n: int) -> list[int]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"train ended (rc {proc.returncode}) before its ranks were seen"
        if len(ranks := _children(proc.pid)) >= n:
            assert len(ranks) == n, ranks
            return ranks
        time.sleep(0.01)
    raise AssertionError(f"{n} ranks did not start in time")


def _result(root: Path) -> dict:
    return {
        "steps": pd.read_csv(root / STEPS, sep="\t"),
        "metrics": {**json.loads((root / "metrics/train_details.json").read_text()),
                    **json.loads((root / "metrics/train.json").read_text())},  # fmt: skip
        "adapter": load_file(str(root / "models/classifier" / ADAPTER_FILE)),
        "head": load_file(str(root / "models/classifier/head.safetensors")),
    }


@pytest.fixture(scope="module")
def one_process(template, tmp_path_factory) -> dict:
    """The reference: the stage in one process, dropout off."""
    root = _repo(template, tmp_path_factory.mktemp("one") / "repo")
    procs: list = []
    _run(root, procs)
    return _result(root)


def _assert_same_steps(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert list(a["steps"].step) == list(b["steps"].step) and list(a["steps"].lr) == list(b["steps"].lr)
    rel = ((a["steps"].loss - b["steps"].loss).abs() / b["steps"].loss.abs()).max()
    assert rel <= rtol, f"per-step loss differs by {rel:.2e} (relative)"
    for name in ("adapter", "head"):
        for key, tensor in b[name].items():
            torch.testing.assert_close(a[name][key], tensor, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
    for key in SAME:
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-4), key


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one(template, tmp_path, started, one_process):
    """nproc_per_node 2 with 2 micro-batches each: every batch of 8 in 4 pieces, the same steps."""
    root = _repo(template, tmp_path / "repo", nproc_per_node=2, grad_accum_steps=2)
    t0 = time.monotonic()
    log = _run(root, started)
    seconds = time.monotonic() - t0
    assert "on cpu x2" in log, log[-3000:]
    result = _result(root)
    assert result["metrics"]["processes"] == 2 and result["metrics"]["grad_accum_steps"] == 2
    _assert_same_steps(result, one_process)
    assert not (root / CHECKPOINTS_DIR).exists() or not any((root / CHECKPOINTS_DIR).rglob("*.pt"))
    print(f"2-process stage run: {seconds:.1f} s")


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_result(template, tmp_path, started):
    """SIGKILL of the stage (the launcher) mid-epoch: its ranks go too; a rerun resumes where the last
    checkpoint was and ends exactly as an uninterrupted run, dropout masks included."""
    train = {"nproc_per_node": 2, "lora_dropout": 0.1}
    full = _repo(template, tmp_path / "full", **train)
    _run(full, started)
    reference = _result(full)
    steps_per_epoch = reference["metrics"]["steps"] // PARAMS["train"]["epochs"]

    root = _repo(template, tmp_path / "killed", **train)
    proc = _start(root, "kill.log", started)
    ranks = _wait_for_ranks(proc, 2)  # before the checkpoint: the kill follows it at once
    _wait_for_checkpoint(proc, root, min_step=5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in ranks), "a rank outlived its killed launcher"
    killed_at = _checkpoint_step(root)
    assert killed_at is not None and 5 <= killed_at < steps_per_epoch, killed_at
    assert not (root / "models/classifier").exists()

    log = _run(root, started, "resume.log")
    assert f"at step {killed_at} (epoch 1)" in log, log[-3000:]
    resumed = _result(root)
    assert resumed["steps"].equals(reference["steps"])
    for name in ("adapter", "head"):
        assert all(torch.equal(resumed[name][k], reference[name][k]) for k in reference[name]), name
    assert {k: resumed["metrics"][k] for k in SAME} == {k: reference["metrics"][k] for k in SAME}


@pytest.mark.slow
def test_a_dead_rank_ends_the_stage_with_one_line(template, tmp_path, started):
    root = _repo(template, tmp_path / "repo", nproc_per_node=2, epochs=20)
    proc = _start(root, "train.log", started)
    _wait_for_checkpoint(proc, root, min_step=5)
    (rank1,) = [pid for pid in _children(proc.pid) if _rank_of(pid) == 1]
    t0 = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    rc = proc.wait(60)
    seconds = time.monotonic() - t0
    log = (root / "train.log").read_text(errors="replace")
    assert rc == 1, log[-3000:]
    line = one_error_line(log)
    assert line.startswith("error: distributed training failed") and "rank 1 was killed by SIGKILL" in line, line
    assert "resumes from its last checkpoint" in line
    assert seconds < 30, f"the stage took {seconds:.1f} s to stop after a rank died"
    assert _checkpoint_step(root) is not None  # the last checkpoint stays, to resume from
    print(f"a dead rank stopped the stage in {seconds:.1f} s")


@pytest.mark.slow
def test_two_launcher_agents_rendezvous_like_two_nodes(template, tmp_path, started, one_process):
    """`torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT` on each "node"
    (here both on 127.0.0.1, sharing one repository): one run of two ranks, the steps of one process."""
    root = _repo(template, tmp_path / "repo")
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", "gpt2lab-test", "--local-addr", "127.0.0.1", "--max-restarts", "0",
               "stages/train.py"]  # fmt: skip
        procs.append(_start(root, f"node{node}.log", started, cmd))
    for node, proc in enumerate(procs):
        rc = proc.wait(TIMEOUT_S)
        assert rc == 0, (root / f"node{node}.log").read_text(errors="replace")[-4000:]
    logs = [(root / f"node{n}.log").read_text(errors="replace") for n in (0, 1)]
    assert sum("on cpu x2" in log for log in logs) == 1, logs  # rank 0, on one of the nodes, wrote the outputs
    result = _result(root)
    assert result["metrics"]["processes"] == 2
    _assert_same_steps(result, one_process)
