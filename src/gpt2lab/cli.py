"""The ``gpt2lab`` command: subcommands over the library, user errors as one line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from gpt2lab.errors import Gpt2labError

Command = Callable[[argparse.Namespace], int | None]


def _convert(args: argparse.Namespace) -> None:
    from gpt2lab.weights import convert_checkpoint

    out = convert_checkpoint(args.input, args.output_dir)
    print(f"wrote {out}/model.safetensors and {out}/config.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2lab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an OpenAI TF or Hugging Face checkpoint to gpt2lab's safetensors")
    p.add_argument("input", help="OpenAI checkpoint folder (with hparams.json) or Hugging Face .safetensors file/folder")
    p.add_argument("output_dir", help="folder to write model.safetensors and config.json into")
    p.set_defaults(func=_convert)
    return parser


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


def run_stage(func: Callable[[], int | None]) -> None:
    """Entry point of a DVC stage script: INFO logging, user errors as one line, exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(func))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
