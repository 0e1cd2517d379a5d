"""Running an entry point (a DVC stage script or a CLI command): failures as one line, exit codes.

A :class:`~gpt2lab.errors.Gpt2labError` is a problem the user can fix; it is printed as one
``error: ...`` line on stderr (no traceback) and the process exits 1. So is a failure of the
machine rather than the code: a full disk, a read-only or forbidden path, wherever in a stage it
happens (every output is written atomically, so nothing half-written is left). Ctrl-C exits
130; a reader that goes away (``gpt2lab classify ... | head -1``) ends the output quietly (141).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from gpt2lab.errors import Gpt2labError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
VERBOSE_ENV = "GPT2LAB_VERBOSE"  # 1: stages log INFO detail too
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


def run(func: Callable[[], int | None]) -> int:
    """Run ``func``; a :class:`Gpt2labError` or a machine failure becomes ``error: <one line>`` and exit 1."""
    try:
        return func() or 0
    except Gpt2labError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
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
        print(f"error: {line}", file=sys.stderr)
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
