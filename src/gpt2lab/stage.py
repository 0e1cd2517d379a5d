"""Running an entry point (a DVC stage script or a CLI command): user errors as one line, exit codes.

A :class:`~gpt2lab.errors.Gpt2labError` is a problem the user can fix; it is printed as one
``error: ...`` line on stderr (no traceback) and the process exits 1. Ctrl-C exits 130.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from gpt2lab.errors import Gpt2labError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def run(func: Callable[[], int | None]) -> int:
    """Run ``func``; a :class:`Gpt2labError` becomes ``error: <message>`` on stderr and exit 1."""
    try:
        return func() or 0
    except Gpt2labError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_stage(main: Callable[[], int | None]) -> NoReturn:
    """Entry point of a DVC stage script: INFO logging, user errors as one line, exit code."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sys.exit(run(main))
