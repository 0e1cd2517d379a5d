"""Data-parallel training across processes: PyTorch's launcher, the process group, a few collectives.

:func:`launch` runs a script under ``torch.distributed.run`` exactly as
``torchrun --standalone --nproc-per-node N --max-restarts 0 SCRIPT`` would, in this process (the
launcher's agent), and turns a failure of any process into one line. Each process it starts (a
rank) enters :func:`process_group`: gloo on CPUs, NCCL on GPUs, with a timeout on every
collective, so a rank that hangs ends the run within :data:`COLLECTIVE_TIMEOUT_S` instead of
waiting forever; a rank that dies is seen by the launcher within a second, which then stops the
others. The same script also runs under a ``torchrun`` started by hand (several nodes: see the
README); :func:`launch` is then not needed.

A rank started by :func:`launch` hands a user error (a :class:`~gpt2lab.errors.Gpt2labError`)
to the launcher through torchrun's error file instead of printing it, so the stage prints it
once (see :func:`gpt2lab.stage.run`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gpt2lab.devices import check_gpu_count, resolve_device
from gpt2lab.errors import Gpt2labError
from gpt2lab.stage import LAUNCHED_ENV

log = logging.getLogger(__name__)

# Longest wait for another rank at any collective: the slowest thing between two collectives is
# rank 0 writing a checkpoint (a full fine-tune of gpt2-xl: ~18 GB) while the others wait.
COLLECTIVE_TIMEOUT_S = 1800
PARENT_POLL_S = 0.5  # how often a rank checks that its launcher is still alive (where not Linux)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What a lost peer looks like when the backend reports it as a plain RuntimeError.
PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                   "timed out", "NCCL", "gloo")  # fmt: skip


class DistributedError(Gpt2labError, RuntimeError):
    """Distributed training failed: a rank died, hung, or could not start; the message says which."""


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes of a run (one process: the defaults)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> World:
        """The ranks ``torchrun`` set in the environment (``RANK``, ``WORLD_SIZE``, ...); one process without them."""
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        return cls(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                   int(env.get("LOCAL_WORLD_SIZE", 1)))  # fmt: skip


ONE_PROCESS = World()  # a run that is not distributed


def needs_launch(nproc_per_node: int) -> bool:
    """Whether a script asked for ``nproc_per_node`` processes must start them: more than one, and
    not already running under a launcher (``torchrun`` started it, or :func:`launch` did)."""
    return nproc_per_node > 1 and "TORCHELASTIC_RUN_ID" not in os.environ and "RANK" not in os.environ


def launch(script: str, nproc_per_node: int, *, device: str, device_key: str = "train.device",
           nproc_key: str = "train.nproc_per_node", script_args: Sequence[str] = ()) -> None:  # fmt: skip
    """Run ``python script *script_args`` in ``nproc_per_node`` processes under ``torch.distributed.run``.

    Checks first that the machine has what ``device`` asks for (one GPU per process), so a wrong
    device is one line and nothing starts. Returns when every process has finished; raises
    :class:`DistributedError` (one line: which rank failed and how) when one failed, and
    ``KeyboardInterrupt`` on Ctrl-C (the launcher stops the processes first).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    check_gpu_count(device, nproc_per_node, key=device_key, processes_key=nproc_key)
    cores = len(os.sched_getaffinity(0))
    # torchrun would set 1 and warn; share the cores out instead (the ranks set their threads too).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc_per_node)))
    os.environ[LAUNCHED_ENV] = "1"  # the ranks hand their error line to us (see gpt2lab.stage)
    args = get_args_parser().parse_args([
        "--standalone", "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0",
        "--monitor-interval", "0.1", script, *script_args,
    ])  # fmt: skip
    _quiet_launcher_logs()
    log.info("running %s in %d processes (torch.distributed.run, %s)", script, nproc_per_node, device)
    try:
        torchrun(args)  # torchrun's own main minus its error printer: failures come back as exceptions
    except ChildFailedError as err:
        raise DistributedError(failure_line(err.failures, nproc_per_node)) from None
    except SignalException as err:
        if err.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise DistributedError(f"stopped by {err.sigval.name}; every rank was stopped too") from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)


def _quiet_launcher_logs() -> None:
    """Silence torchrun's agent (its banners and its own report of a failure: we report it once)."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def failure_line(failures: dict[int, Any], world_size: int) -> str:
    """One line for torchrun's failures ``{rank: ProcessFailure}``: what each failed rank said or
    which signal killed it; ranks the launcher stopped (SIGTERM) because of another are named last."""

    def what(failure: Any) -> str:
        if failure.exitcode < 0:
            return f"was killed by {failure.signal_name()}"
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        if message and not message.startswith("To enable traceback"):  # torch's text when there is no file
            return f"failed: {message}"
        return f"exited with code {failure.exitcode} (its output is above)"

    stopped = sorted(r for r, f in failures.items() if f.exitcode == -signal.SIGTERM)
    causes = {r: f for r, f in failures.items() if r not in stopped} or failures
    line = "; ".join(f"rank {rank} {what(f)}" for rank, f in sorted(causes.items()))
    if causes is not failures:
        line += f"; the launcher stopped rank {', '.join(map(str, stopped))}"
    return (
        f"distributed training failed ({world_size} processes): {line}. "
        "Run the stage again: it resumes from its last checkpoint"
    )


@contextlib.contextmanager
def process_group(
    device: str, *, key: str = "train.device", timeout_s: float = COLLECTIVE_TIMEOUT_S
) -> Iterator[World]:
    """Join the run's process group when this process is one rank of several; yield its :class:`World`.

    gloo on CPU, NCCL on CUDA (each rank on ``cuda:<local rank>``). Outside a launcher this yields
    the one-process world and does nothing else. A rank whose launcher dies exits at once (so a
    killed stage leaves no rank behind), and only rank 0 logs below errors (the ranks would repeat it).
    """
    world = World.from_env()
    if not world.distributed:
        yield world
        return
    target = resolve_device(device, key=key, local_rank=world.local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    _exit_with_parent()
    if not world.is_main:
        logging.getLogger("gpt2lab").setLevel(logging.ERROR)
    backend = "nccl" if target.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=target if target.type == "cuda" else None)  # fmt: skip
    try:
        yield world
    finally:
        dist.destroy_process_group()


def _exit_with_parent() -> None:
    """Kill this process when its parent (the launcher) dies, e.g. when the stage is SIGKILLed:
    the ranks run in a session of their own, so nothing else would stop them. On Linux the kernel
    does it at once (``PR_SET_PDEATHSIG``), so a rank takes no step after its launcher is gone;
    elsewhere a thread polls for the parent every :data:`PARENT_POLL_S`."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the launcher died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="gpt2lab-parent-watch", daemon=True).start()


def is_peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank died, hung or became unreachable."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and dist.is_initialized() and any(s in str(err) for s in PEER_LOST_SIGNS)


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place (unchanged in a one-process world)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; tensors included)."""
    if not world.distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, world: World) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
    if not world.distributed:
        return [obj]
    out: list[Any] | None = [None] * world.world_size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out
