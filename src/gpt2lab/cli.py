"""The ``gpt2lab`` command: subcommands over the library, user errors as one line.

Only argparse and the torch-free base layer are imported at start, so ``gpt2lab --help``
answers at once; each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from gpt2lab import __version__
from gpt2lab.errors import Gpt2labError
from gpt2lab.params import DEVICE_PATTERN, DEVICES, MAX_SEED, PRECISIONS, GenerateParams
from gpt2lab.server import MAX_REQUEST_BYTES
from gpt2lab.stage import VERBOSE_ENV, quiet_libraries, run

Command = Callable[[argparse.Namespace], int | None]
DEVICE_HELP = f"{DEVICES}; auto = CUDA when present (default: %(default)s)"


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (beside the ``error: ...`` lines of :func:`gpt2lab.stage.run`)."""
    print(f"warning: {message}", file=sys.stderr)


def _convert(args: argparse.Namespace) -> None:
    from gpt2lab.convert import convert_checkpoint

    out = convert_checkpoint(args.input, args.output_dir)
    print(f"wrote {out}/model.safetensors and {out}/config.json")


def _generate(args: argparse.Namespace) -> None:
    import tempfile
    import time

    import torch

    from gpt2lab.checkpoint import is_pretrained
    from gpt2lab.devices import resolve_device, resolve_precision
    from gpt2lab.generate import check_sampling
    from gpt2lab.kernels import check_compilable
    from gpt2lab.textgen import load_generator, stream_text

    check_sampling(args.temperature, args.top_k or None, args.top_p)  # before the slow part: loading the model
    if args.max_new_tokens < 0:
        raise Gpt2labError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 0")
    if args.prompt_lookup < 0:
        raise Gpt2labError(f"--prompt-lookup {args.prompt_lookup}: expected an integer >= 0 (0 = off)")
    if not 0 <= args.seed <= MAX_SEED:  # torch would fail with a traceback past 2**64
        raise Gpt2labError(f"--seed {args.seed}: expected an integer from 0 to {MAX_SEED}")
    if args.threads is not None:
        if args.threads < 1:
            raise Gpt2labError(f"--threads {args.threads}: expected a positive number of threads")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, key="--device")
    precision = resolve_precision(args.precision, device, key="--precision")
    with tempfile.TemporaryDirectory() as tmp:
        # An MLflow classifier model: generate with the GPT-2 it was trained on (its base).
        path = _mlflow_model(args.model, tmp)[1] if _is_mlflow_uri(args.model) else args.model
        model = load_generator(path, precision, device)
        if args.compile:
            check_compilable(model)  # before any text
        if not is_pretrained(path):
            warn(f"{args.model} holds random weights (a smoke run): the text is noise")
    generator = torch.Generator().manual_seed(args.seed)  # draws on the CPU: the same text on any device
    print(args.prompt, end="", flush=True)
    t0, n = time.perf_counter(), 0
    for n, piece in enumerate(stream_text(model, args.prompt, args.max_new_tokens, stop_at_eos=not args.ignore_eos,
                                          temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                                          generator=generator, prompt_lookup=args.prompt_lookup,
                                          compile=args.compile),
                                 start=1):  # fmt: skip
        print(piece, end="", flush=True)
    print()
    seconds = time.perf_counter() - t0
    print(f"{n} tokens in {seconds:.2f} s ({n / seconds if seconds else 0.0:.1f} tokens/s)", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from gpt2lab.server import serve

    if args.max_request_mb <= 0 or args.timeout <= 0:
        raise Gpt2labError("--max-request-mb and --timeout must be positive")
    if args.device is not None and not DEVICE_PATTERN.fullmatch(args.device):
        raise Gpt2labError(f"--device: invalid value {args.device!r}; allowed: {DEVICES}")
    # Only what is given overrides the model's own settings (by default: fp32, a GPU when there is one).
    config = {k: v for k, v in (("precision", args.precision), ("device", args.device)) if v is not None}
    serve(args.model, args.host, args.port, max_request_bytes=int(args.max_request_mb * 2**20), timeout_s=args.timeout,
          model_config=config or None)  # fmt: skip


def _smoke(args: argparse.Namespace) -> int:
    from gpt2lab.smoke import run_smoke

    extra = (["-n", args.name] if args.name else []) + args.dvc_args
    return run_smoke(".", extra, args.set_param)


def _read_messages(path: str) -> list[str]:
    """One message per line of ``path`` (``-``: standard input), UTF-8; blank lines are skipped."""
    from pathlib import Path

    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        text = data.decode("utf-8")
    except OSError as err:
        raise Gpt2labError(f"--file {path}: cannot read it ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise Gpt2labError(f"--file {path}, line {line}: not UTF-8 text; save the file as UTF-8") from err
    # split("\n"), not splitlines(): a message may hold other Unicode line separators.
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def _classify(args: argparse.Namespace) -> None:
    import tempfile

    texts = list(args.messages) + (_read_messages(args.file) if args.file else [])
    if not texts:
        raise Gpt2labError("nothing to classify: give messages as arguments, or --file FILE with one per line")
    with tempfile.TemporaryDirectory() as tmp:
        model, base = _mlflow_model(args.model, tmp) if _is_mlflow_uri(args.model) else (args.model, args.base)
        _classify_with(args, texts, model, base)


def _classify_with(args: argparse.Namespace, texts: list[str], model: str, base: str | None) -> None:
    import json
    from pathlib import Path

    from gpt2lab.classifier_io import META_FILE, BaseCheckpointMissingError, read_classifier_meta
    from gpt2lab.devices import resolve_device, resolve_precision
    from gpt2lab.inference import Classifier

    if not (Path(model) / META_FILE).is_file():
        raise Gpt2labError(f"no trained classifier at {model}; {_where_models_are()}")
    device = resolve_device(args.device, key="--device")
    precision = resolve_precision(args.precision, device, key="--precision")
    try:
        clf = Classifier.load(model, base, batch_size=args.batch_size, precision=precision,
                              threshold=args.threshold, device=str(device))  # fmt: skip
    except BaseCheckpointMissingError as err:  # its own wording names the Python argument base_dir=
        raise Gpt2labError(err.message("--base DIR")) from err
    if not read_classifier_meta(model)["base"].get("pretrained", False):
        warn("this classifier was trained on random base weights (a smoke run): its answers check the pipeline, "
             "not spam")  # fmt: skip
    results = clf.classify(texts)
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'label':<5}  {'P(spam)':>7}  message")
    for text, result in zip(texts, results):
        preview = " ".join(text.split())
        preview = preview if len(preview) <= 60 else preview[:57] + "..."
        print(f"{result['label']:<5}  {result['spam_probability']:>7.4f}  {preview}")


def _where_models_are() -> str:
    """The hint for a missing classifier folder: the latest logged model if there is one (a smoke run
    keeps its outputs in its DVC experiment, not in the workspace), else how to train one."""
    latest = _latest_model_uri()
    if latest:
        return f"use the latest logged one: gpt2lab classify --model {latest} ..., or run `make repro`"
    return "run `make repro` (or `make smoke`, then use the --model runs:/... it prints), or pass --model"


def _latest_model_uri() -> str | None:
    """``runs:/<id>/model`` of the newest finished run of the project's MLflow experiment, if any."""
    from gpt2lab.tracking import TrackingError, project_store

    try:
        uri, tracking = project_store()
    except TrackingError:  # no project here, or no store yet
        return None
    try:
        import mlflow

        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(tracking.experiment)
        runs = [] if experiment is None else client.search_runs(
            [experiment.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
            max_results=1)  # fmt: skip
    except Exception:  # a hint only: an unreadable store gives none
        return None
    return f"runs:/{runs[0].info.run_id}/model" if runs else None


def _is_mlflow_uri(source: str) -> bool:
    return source.startswith(("runs:/", "models:/")) or "://" in source


def _mlflow_model(source: str, dst: str) -> tuple[str, str]:
    """(classifier folder, base folder) of an MLflow model URI, downloaded into ``dst``.

    The store is the pipeline's, found from any directory: ``MLFLOW_TRACKING_URI``, else the
    repository's ``tracking.uri``, else the SQLite store at its root.
    """
    from gpt2lab.serving import download_model
    from gpt2lab.tracking import project_store

    uri, _ = project_store()
    classifier, base = download_model(source, dst, tracking_uri=uri)
    return str(classifier), str(base)


def _promote(args: argparse.Namespace) -> None:
    from gpt2lab.registry import promote, serve_command
    from gpt2lab.tracking import project_store

    uri, tracking = project_store()
    version = promote(uri, args.name or tracking.registered_model, args.version, args.alias)
    alias_uri = f"models:/{version.name}@{args.alias}"
    facts = ", ".join(f"{k} {version.tags[k]}" for k in ("dvc.exp_name", "test.f1", "test.accuracy")
                      if k in version.tags)  # fmt: skip
    print(f"{alias_uri} -> version {version.version} (run {version.run_id}{', ' + facts if facts else ''})")
    print(f"serve it: {serve_command(uri, alias_uri)}")


def _export(args: argparse.Namespace) -> None:
    import tempfile

    from gpt2lab.export import export_hf, export_peft

    with tempfile.TemporaryDirectory() as tmp:
        source, base = args.source, args.base
        if _is_mlflow_uri(source):
            source, base = _mlflow_model(source, tmp)
        if args.format == "peft":
            out = export_peft(source, args.output_dir, base_model=args.base_model)
            print(f"wrote {out}/adapter_config.json and {out}/adapter_model.safetensors (PEFT LoRA, SEQ_CLS)")
        else:
            out = export_hf(source, args.output_dir, base_dir=base)
            print(f"wrote {out}/config.json, {out}/model.safetensors and tokenizer files (transformers)")


def _import(args: argparse.Namespace) -> None:
    from gpt2lab.export import import_peft

    out = import_peft(args.adapter_dir, args.base, args.output_dir)
    print(f"wrote {out}/ (a lora classifier on {args.base}); try: gpt2lab classify --model {out} \"hello\"")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2lab",
        description="GPT-2 from scratch: convert weights, generate text, classify spam, run the pipeline offline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", help="convert an OpenAI TF or Hugging Face checkpoint to gpt2lab's safetensors")
    p.add_argument("input", help="OpenAI checkpoint folder (with hparams.json) or Hugging Face .safetensors file/folder")
    p.add_argument("output_dir", help="folder to write model.safetensors and config.json into")
    p.set_defaults(func=_convert)

    d = GenerateParams()  # the defaults of params.yaml's generate section
    p = sub.add_parser("generate", help="continue a prompt with GPT-2, streaming the text")
    p.add_argument("prompt", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--model", default="models/base",
                   help="converted checkpoint folder, or an MLflow classifier model (runs:/<run id>/model): "
                        "its base (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keep the k likeliest; 0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling, 0 < p <= 1 (default: off)")
    p.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="weights in this type; fp16: CUDA only; int8: int8 weights, CPU only, fastest on x86; "
                        "auto: bf16 where the hardware has it (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default=d.device, metavar="DEVICE", help=DEVICE_HELP)
    p.add_argument("--prompt-lookup", type=int, default=d.prompt_lookup, metavar="N",
                   help="guess up to N tokens per forward pass from earlier text; same output, "
                        "faster on repetitive text (default: %(default)s = off)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="decode with torch.compile (needs a C++ compiler; ~25 s to compile the first time, cached "
                        "after): for long outputs on a CPU without AVX-512, where the default fused step does not "
                        "run (with AVX-512 the default is faster)")  # fmt: skip
    p.add_argument("--ignore-eos", action="store_true", help="keep going after <|endoftext|>")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("smoke", help="run the whole pipeline offline as a DVC experiment (params-smoke.yaml)")
    p.add_argument("-n", "--name", help="the experiment's name (default: DVC picks one)")
    p.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a param over the profile's, e.g. -S lora.rank=4 (repeatable)")  # fmt: skip
    p.add_argument("dvc_args", nargs="*", help="after --: more `dvc exp run` arguments")
    p.set_defaults(func=_smoke)

    p = sub.add_parser("classify", help="classify messages as spam or ham with the trained classifier")
    p.add_argument("messages", nargs="*", help="messages to classify (quote each one)")
    p.add_argument("--file", help="also classify each non-blank line of this UTF-8 file ('-': standard input)")
    p.add_argument("--json", action="store_true", help='print [{"label": ..., "spam_probability": ...}, ...] in input order')
    p.add_argument("--model", default="models/classifier",
                   help="trained classifier folder, or an MLflow model: runs:/<run id>/model, "
                        "models:/gpt2lab-spam@champion (default: %(default)s)")  # fmt: skip
    p.add_argument("--base", default=None, metavar="DIR",
                   help="its base checkpoint folder (default: the one it was trained on)")  # fmt: skip
    p.add_argument("--threshold", type=float, default=0.5, help="spam when probability >= it (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: ~2x fp32 on AVX-512 bf16 CPUs; fp16: CUDA only; int8: int8 weights, CPU only; "
                        "auto: bf16 where the hardware has it (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=32, help="messages per forward pass (default: %(default)s)")
    p.set_defaults(func=_classify)

    p = sub.add_parser("serve", help="serve a logged classifier over HTTP (MLflow's scoring API, with request limits)")
    p.add_argument("model", help="MLflow model URI: runs:/<run id>/model, models:/<name>@<alias>, or a model folder")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    p.add_argument("--port", type=int, default=5001, help="default: %(default)s")
    p.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_BYTES / 2**20,
                   help="larger requests are answered 413 unread (default: %(default)s)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds of work per request; then 504 and the work stops (default: %(default)s)")  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="over the settings logged with the model (default: the logged one, fp32)")  # fmt: skip
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help=f"{DEVICES} (default: the logged one: auto = CUDA when present)")  # fmt: skip
    p.set_defaults(func=_serve)

    p = sub.add_parser("promote", help="point a registered model's alias (champion) at a version, and print it")
    p.add_argument("version", help="the version number (printed by the track stage; see the MLflow UI's Models tab)")
    p.add_argument("--alias", default="champion", help="default: %(default)s (serve it as models:/NAME@ALIAS)")
    p.add_argument("--name", default=None, help="registered model (default: tracking.registered_model)")
    p.set_defaults(func=_promote)

    source_help = "classifier folder, or an MLflow model URI such as runs:/<run id>/model"
    p = sub.add_parser("export", help="write a classifier (or base checkpoint) for transformers or PEFT, exactly")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    f = formats.add_parser("peft", help="a PEFT LoRA adapter for GPT2ForSequenceClassification (lora classifiers)")
    f.add_argument("source", help=source_help)
    f.add_argument("output_dir", help="folder to write adapter_config.json and adapter_model.safetensors into")
    f.add_argument("--base-model", default=None, metavar="NAME",
                   help="base_model_name_or_path to record (default: openai-community/<size> for a pretrained "
                        "GPT-2 base, else none)")  # fmt: skip
    f.set_defaults(func=_export, base=None)
    f = formats.add_parser("hf", help="a merged transformers model: GPT2ForSequenceClassification, or "
                                      "GPT2LMHeadModel for a base checkpoint")  # fmt: skip
    f.add_argument("source", help=f"{source_help}; or a base checkpoint folder (models/base)")
    f.add_argument("output_dir", help="folder to write config.json, model.safetensors and tokenizer files into")
    f.add_argument("--base", default=None, metavar="DIR",
                   help="the classifier's base checkpoint folder (default: the one it was trained on)")  # fmt: skip
    f.set_defaults(func=_export, base_model=None)

    p = sub.add_parser("import", help="turn a PEFT adapter into a gpt2lab classifier folder, exactly")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    f = formats.add_parser("peft", help="a PEFT LoRA adapter trained on GPT2ForSequenceClassification")
    f.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    f.add_argument("output_dir", help="classifier folder to write (classifier.json, adapter, head)")
    f.add_argument("--base", required=True, metavar="DIR",
                   help="gpt2lab base checkpoint of the GPT-2 the adapter was trained on (gpt2lab convert)")  # fmt: skip
    f.set_defaults(func=_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `gpt2lab`
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the stages `gpt2lab smoke` runs log their detail too
    quiet_libraries()
    return run(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
