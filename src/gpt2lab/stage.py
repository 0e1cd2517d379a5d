"""Running an entry point (a DVC stage script or a CLI command): failures as one line, exit codes.

A :class:`~gpt2lab.errors.Gpt2labError` is a problem the user can fix; it is printed as one
``error: ...`` line on stderr (no traceback) and the process exits 1. So is a failure of the
machine rather than the code: a full disk, a read-only or forbidden path, wherever in a stage it
happens (every output is written atomically, so nothing half-written is left). Ctrl-C exits
130; a reader that goes away (``gpt2lab classify ... | head -1``) ends the output quietly (141).

Under ``torchrun`` (one process of a distributed run) the line also goes to torchrun's error file,
so the launcher's report of the failure carries it; a process started by the stage's own
launcher (:data:`LAUNCHED_ENV` set, see :mod:`gpt2lab.distributed`) prints nothing itself: the
launcher prints the line once for all of them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from gpt2lab.errors import Gpt2labError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
VERBOSE_ENV = "GPT2LAB_VERBOSE"  # 1: stages log INFO detail too
LAUNCHED_ENV = "GPT2LAB_LAUNCHED"  # set for the processes gpt2lab's own launcher starts
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where torchrun reads a failed process's message
# What a full disk looks like when a library reports it in its own words (safetensors, torch).
DISK_FULL_SIGNS = ("No space left on device", "StorageFull", "file write failed", "unexpected pos")
ADVICE = {
    errno.ENOSPC: "free some space and run it again",
    errno.EDQUOT: "free some space (disk quota) and run it again",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EROFS: "the file system is read-only; write elsewhere",
}


def describe(err: BaseException) -> str | None:
    """One line for a failure of the machine (disk, permissions), or None for anything else."""
    if isinstance(err, OSError) and err.errno in ADVICE:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror or err}{where}: {ADVICE[err.errno]}"
    text = str(err)
    if any(sign in text for sign in DISK_FULL_SIGNS):
        first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
        return f"the disk is full or a write failed ({type(err).__name__}: {first}): {ADVICE[errno.ENOSPC]}"
    return None


def _report(line: str) -> None:
    """Print ``line`` on stderr; under torchrun also hand it to the launcher (see the module docstring)."""
    error_file = os.environ.get(ERROR_FILE_ENV)
    if error_file and line.startswith("error: "):
        with contextlib.suppress(OSError):
            with open(error_file, "w", encoding="utf-8") as f:  # torchrun's format: a message and a time
                json.dump({"message": line.removeprefix("error: "), "timestamp": int(time.time())}, f)
    if not os.environ.get(LAUNCHED_ENV):
        print(line, file=sys.stderr)


def run(func: Callable[[], int | None]) -> int:
    """Run ``func``; a :class:`Gpt2labError` or a machine failure becomes ``error: <one line>`` and exit 1."""
    try:
        return func() or 0
    except Gpt2labError as err:
        _report(f"error: {err}")
        return 1
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    except BrokenPipeError:
        # The reader left; stdout must not be flushed again at exit (that would print a traceback).
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:
        line = describe(err)
        if line is None:
            raise
        _report(f"error: {line}")
        return 1


def verbose() -> bool:
    """Whether :data:`VERBOSE_ENV` asks for detail (``gpt2lab -v smoke`` sets it for the stages)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def run_stage(main: Callable[[], int | None]) -> NoReturn:
    """Entry point of a DVC stage script: user errors as one line, exit code.

    Quiet by default: warnings only (the stage prints its own result line); INFO logging when
    :data:`VERBOSE_ENV` is set.
    """
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING, format=LOG_FORMAT)
    quiet_libraries()
    sys.exit(run(main))


def quiet_libraries() -> None:
    """Leave out the libraries' chatter, in stages and commands alike: urllib3's multi-line retry
    warnings (a source that fails is reported once, by gpt2lab), MLflow's artifact progress bars
    (a download of small files) and, unless :data:`VERBOSE_ENV` asks for detail, MLflow's INFO
    lines (database migrations, input-example checks). The environment can still turn each on."""
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not verbose():
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
