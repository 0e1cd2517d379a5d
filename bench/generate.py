"""Greedy decoding speed: gpt2lab's cached ``generate`` against transformers' ``generate`` and
the inference engines a user might pick instead (CTranslate2, ONNX Runtime).

All run GPT-2 124M with the same random weights (no download), batch 1, a prompt of
``--prompt-tokens`` random ids and exactly ``--new-tokens`` new tokens (no EOS stop):
gpt2lab and transformers in fp32 and bf16 (weights cast, not autocast), gpt2lab in int8
(``--precision int8``: int8 weights per output channel, see ``gpt2lab.quantize``), and, when
installed (``pip install -e .[bench]``), CTranslate2 at ``float32`` and ``int8`` and ONNX Runtime
in fp32 and dynamic int8 on the same weights converted here (``bench/peers.py``; each engine in
a process of its own, so that its threads cannot slow the others). Tokens/s = new tokens / wall
time of the whole call (prefill included); the tables show the median over
``--repeats`` runs, every variant running once per repeat in turn so that background load hits
all alike. Quality: the greedy tokens each variant shares with gpt2lab fp32's before the first
difference. Timings are printed, never asserted.

Three decodings are timed: plain (one forward pass per token), compiled (gpt2lab's
``generate(..., compile=True)``: the same steps through ``torch.compile``, fp32 and bf16; the
first call, which compiles, is untimed and printed) and prompt lookup with up to ``--lookup``
guessed tokens per pass, in both libraries (transformers' ``prompt_lookup_num_tokens``). Plain decoding of batch 1 reads every weight once per
token, so its speed is bounded by memory bandwidth; prompt lookup checks several tokens
per read, and gains only where the text repeats itself. Two kinds of random weights show
both ends (``--texts``): ``loop`` (GPT-2's own init; its greedy output is a loop of a few
tokens, prompt lookup's best case) and ``varied`` (a wider init; its greedy output rarely
repeats, so guesses fail: the worst case). Pretrained GPT-2 lies in between; the table
counts the distinct tokens of each output and gpt2lab's forward passes per run.

    python bench/generate.py --new-tokens 200 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import peers
import torch
from machine import compiler_note, fastest_way, sustained_read_seconds, timed, vectors

from gpt2lab.convert import HF_IGNORED, HF_TABLE, convert
from gpt2lab.devices import DTYPES
from gpt2lab.generate import generate
from gpt2lab.kernels import FusedDecodeStep, few_row_kernels
from gpt2lab.model import GPT2, PRESETS
from gpt2lab.quantize import quantize_int8

# Each timed run is preceded by a short untimed one of the same variant. On the machines this was
# written on, memory left untouched for a few seconds is slow to read again (the first pass over
# GPT-2 124M's fp32 weights after 5 s idle: 530 ms, then 120 ms, then 38 ms), and every variant
# sits idle while the others run; warmed, each is timed in its steady state, as in continuous use.
WARM_TOKENS = 8


def build_models(seed: int, text: str) -> tuple[GPT2, torch.nn.Module]:
    """transformers' GPT2LMHeadModel with random weights, and ours with the same weights.

    ``text="loop"``: GPT-2's own init, whose greedy output falls into a short loop at once.
    ``"varied"``: a wider init (embeddings N(0, 0.3) and N(0, 1), matrices N(0, 9 / fan_in)),
    whose greedy output rarely repeats: prompt lookup's worst case.
    """
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    cfg = PRESETS["gpt2"]
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(HFConfig(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    if text == "varied":
        with torch.no_grad():
            for name, p in hf.transformer.named_parameters():
                if p.dim() == 2:  # Conv1D weights are (in, out); lm_head is tied to wte
                    p.normal_(0.0, {"wte.weight": 0.3, "wpe.weight": 1.0}.get(name, 3 * p.shape[0] ** -0.5))
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = GPT2(cfg)
    ours.load_state_dict(convert(state, HF_TABLE, cfg, ignored=HF_IGNORED), strict=False)
    return ours.eval(), hf


def same_prefix(out: list[int], reference: list[int]) -> int:
    """How many tokens ``out`` shares with ``reference`` before the first difference (then they part ways)."""
    return next((i for i, (a, b) in enumerate(zip(out, reference)) if a != b), min(len(out), len(reference)))


@torch.inference_mode()
def next_tokens(model: GPT2, ids: torch.Tensor, first: int) -> torch.Tensor:
    """The greedy next token after each position ``first``.. of ``ids`` (1, T), decoded as generation
    does: the first ``first + 1`` tokens as a prefill, then one cached step per token."""
    T = ids.shape[1]
    model.setup_cache(1, T)
    try:
        with few_row_kernels(model):
            out = [model(ids[:, : first + 1], start=0, last_only=True)[0, -1].argmax()]
            out += [model(ids[:, t : t + 1], start=t, last_only=True)[0, -1].argmax() for t in range(first + 1, T)]
    finally:
        model.clear_cache()
    return torch.stack(out)


def top1_agreement(model: GPT2, reference: GPT2, ids: torch.Tensor, first: int) -> float:
    """Share of positions ``first``.. of ``ids`` (1, T) where ``model`` and ``reference`` pick the same next token.

    Teacher-forced on one text (fp32's greedy output), so a near-tie that flips does not derail
    the positions after it, as it does in free-running greedy decoding.
    """
    return float((next_tokens(model, ids, first) == next_tokens(reference, ids, first)).float().mean())


def engines(ours: GPT2, hf: torch.nn.Module, folder: Path, threads: int) -> dict[tuple[str, str], peers.Isolated]:
    """CTranslate2 and ONNX Runtime decoders on ``hf``/``ours``' weights, {(engine, precision): its process},
    each with a ``generate(prompt, n)`` method (see ``peers.Isolated``).

    An engine that is not installed is left out (its note printed).
    """
    runs: dict[tuple[str, str], peers.Isolated] = {}
    if note := peers.skip_note("CTranslate2"):
        print(note)
    else:
        ct2 = peers.ct2_convert(peers.save_hf_folder(hf, folder / "hf"), folder / "ct2")
        for precision, compute_type in (("fp32", "float32"), ("int8", "int8")):
            runs["CTranslate2", precision] = peers.Isolated(peers.CT2Generator, ct2, compute_type, threads)
    if note := peers.skip_note("ONNX Runtime"):
        print(note)
    else:
        fp32 = peers.ort_export_decoder(ours, folder)
        int8 = peers.quantize_int8(fp32, folder / "decoder-int8.onnx")
        for precision, path in (("fp32", fp32), ("int8", int8)):
            runs["ONNX Runtime", precision] = peers.Isolated(peers.ORTGenerator, path, threads, ours.config)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library, decoding and precision")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--precisions", nargs="+", choices=list(DTYPES), default=[p for p in DTYPES if p != "fp16"],
                        help="default: all but fp16, which runs only on CUDA")
    parser.add_argument("--lookup", type=int, default=10, help="prompt lookup: guessed tokens per pass; 0 = skip")
    parser.add_argument("--texts", nargs="+", choices=["loop", "varied"], default=["loop", "varied"],
                        help="random weights whose greedy output loops (GPT-2's init) or rarely repeats")
    parser.add_argument("--no-engines", action="store_true", help="skip CTranslate2 and ONNX Runtime")
    parser.add_argument("--no-compile", action="store_true", help="skip gpt2lab's compiled decoding")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    n = args.new_tokens
    vocab_size = PRESETS["gpt2"].vocab_size
    prompt = torch.randint(0, vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    cpu = platform.processor() or platform.machine()
    print(f"GPT-2 124M, batch 1, {args.prompt_tokens}-token prompt, {n} new tokens, greedy; "
          f"torch {torch.__version__}, {threads} threads, {cpu}")  # fmt: skip
    # decoding -> gpt2lab's generate() arguments; transformers runs the plain and prompt-lookup ones
    decodings: dict[str, dict] = {"plain": {}}
    if not args.no_compile and compiler_note() is None:
        decodings["compiled"] = {"compile": True}
    if args.lookup:
        decodings[f"prompt lookup {args.lookup}"] = {"prompt_lookup": args.lookup}

    rows, engine_rows, floors, agreement = [], [], {}, {}
    for text in args.texts:
        fp32, hf_fp32 = build_models(args.seed, text)
        ours: dict[str, GPT2] = {}
        hfs: dict[str, torch.nn.Module] = {}
        for precision in args.precisions:
            if precision == "int8":
                ours[precision] = copy.deepcopy(fp32)
                quantize_int8(ours[precision], "decode")
            else:
                ours[precision] = copy.deepcopy(fp32).to(DTYPES[precision])
                hfs[precision] = copy.deepcopy(hf_fp32).to(DTYPES[precision])

        def run_ours(precision: str, decoding: str, k: int = n) -> list[int]:
            return generate(ours[precision], prompt, k, **decodings[decoding])[0]

        def count_passes(precision: str, decoding: str) -> tuple[int, float | None]:
            """gpt2lab's forward passes for n tokens (fused steps and the layers' passes), and the share of
            lm_head's rows its fused steps read whole (its int8 screen ruled the others out; None: no step
            screened), counted in a run of their own (untimed; greedy: the timed runs' tokens). A forward hook
            would count the layers' passes only, and keep generation off the fused step."""
            calls: list[Any] = []  # each pass's FusedDecodeStep or model

            def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
                return lambda self, *args, **kwargs: (calls.append(self), fn(self, *args, **kwargs))[1]

            with (mock.patch.object(FusedDecodeStep, "__call__", counted(FusedDecodeStep.__call__)),
                  mock.patch.object(GPT2, "forward", counted(GPT2.forward))):  # fmt: skip
                run_ours(precision, decoding)
            steps = {id(c): c for c in calls if isinstance(c, FusedDecodeStep) and c.screened}.values()
            rows_read = sum(s.rows_read for s in steps) / sum(s.screened for s in steps) if steps else None
            passes = len(calls) if "prompt_lookup" in decodings[decoding] else n  # (compiled steps: not calls)
            return passes, rows_read and rows_read / vocab_size

        def run_hf(precision: str, decoding: str, k: int = n) -> list[int]:
            lookup = decodings[decoding].get("prompt_lookup")
            extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
            with torch.inference_mode():
                out = hfs[precision].generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                              max_new_tokens=k, min_new_tokens=k, pad_token_id=50256, **extra)  # fmt: skip
            return out[0, prompt.shape[1] :].tolist()

        # each variant: k -> (seconds, k new tokens)
        variants: dict[tuple[str, str, str], Callable[[int], tuple[float, list[int]]]] = {}
        for precision in args.precisions:
            for decoding, kwargs in decodings.items():
                if kwargs.get("compile") and precision == "int8":
                    continue  # int8's packed kernels are not compiled (gpt2lab.kernels.check_compilable)
                variants["gpt2lab", precision, decoding] = lambda k, p=precision, d=decoding: timed(
                    lambda: run_ours(p, d, k))  # fmt: skip
                if precision in hfs and not kwargs.get("compile"):
                    variants["transformers", precision, decoding] = lambda k, p=precision, d=decoding: timed(
                        lambda: run_hf(p, d, k))  # fmt: skip
        workers: dict[tuple[str, str], peers.Isolated] = {}
        with tempfile.TemporaryDirectory() as tmp:
            if not args.no_engines:
                workers = engines(fp32, hf_fp32, Path(tmp), threads)
                for (engine, precision), worker in workers.items():
                    variants[engine, precision, "plain"] = lambda k, w=worker: w.timed("generate", prompt[0].tolist(), k)
            for key, fn in variants.items():  # warm-up: first-call allocations, kernel selection, compiling
                seconds, _ = fn(WARM_TOKENS)
                if key[2] == "compiled":
                    print(f"gpt2lab {key[1]} compiled: first call {seconds:.1f} s (compiling, or loading the compiled)")
            inputs = {p: vectors(m) for p, m in ours.items()}
            times: dict[tuple[str, str, str], list[float]] = {key: [] for key in variants}
            # gpt2lab's plain and compiled runs: (floor, sustained floor) read just before each (see below)
            before: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
            tokens: dict[tuple[str, str, str], list[int]] = {}
            ours_passes: dict[tuple[str, str], tuple[int, float | None]] = {}  # and the share of lm_head read
            for _ in range(args.repeats):
                for key, fn in variants.items():
                    fn(WARM_TOKENS)  # untimed: see WARM_TOKENS
                    if key[0] == "gpt2lab" and key[2] in ("plain", "compiled"):
                        # Read just before the run (a shared machine's pace moves by a third within the minutes
                        # a repeat takes). The floor: the fastest of 4 reads, each way of reading warmed as the
                        # decoders are (WARM_TOKENS reads: memory idle for a while takes 2-3 passes to read at
                        # full speed again, and int8's packed and plain matrices are two copies), what no decoder
                        # can beat. Sustained: that way n times in a row, the floor under decoding n tokens.
                        model, xs = ours[key[1]], inputs[key[1]]
                        seconds, way = fastest_way(model, xs, reads=4, warm=WARM_TOKENS)
                        before.setdefault(key, []).append((seconds, sustained_read_seconds(way, xs, n)))
                    seconds, tokens[key] = fn(n)
                    times[key].append(seconds)
            for key in variants:
                if key[0] == "gpt2lab":  # plain and compiled: the prefill, then n - 1 steps
                    ours_passes[key[1:]] = count_passes(*key[1:])
            for worker in workers.values():
                worker.close()
        for key, reads in before.items():
            # medians of the floors read before the runs and of each run's share of them
            floors[(text, *key[1:])] = [(statistics.median(r[i] for r in reads),
                                         statistics.median(r[i] * n / t for r, t in zip(reads, times[key])))
                                        for i in (0, 1)]  # fmt: skip
        tps = {key: n / statistics.median(t) for key, t in times.items()}
        reference = tokens.get(("gpt2lab", "fp32", "plain"))
        for precision in args.precisions:
            hf_plain = tps.get(("transformers", precision, "plain"))
            for decoding in decodings:
                if ("gpt2lab", precision, decoding) not in tps:
                    continue
                ours_tps, hf_tps = tps["gpt2lab", precision, decoding], tps.get(("transformers", precision, decoding))
                out = tokens["gpt2lab", precision, decoding]
                hf_out = tokens.get(("transformers", precision, "plain"))
                same = f"{same_prefix(out, hf_out)}/{n}" if hf_out else "-"
                rows.append((text, precision, decoding, ours_tps, hf_tps, hf_plain, *ours_passes[precision, decoding],
                             same, len(set(out))))  # fmt: skip
        if reference is not None:
            ids = torch.cat([prompt, torch.tensor([reference])], dim=1)[:, :-1]  # the text fp32 predicted
            for precision, model in ours.items():
                agreement[text, precision] = top1_agreement(model, ours["fp32"], ids, prompt.shape[1] - 1)
        int8_tps = tps.get(("gpt2lab", "int8", "plain"))
        for (name, precision, decoding), rate in tps.items():
            if decoding in ("plain", "compiled"):
                agree = f"{same_prefix(tokens[name, precision, decoding], reference)}/{n}" if reference else "-"
                vs = f"{rate / int8_tps:.2f}x" if int8_tps else "-"
                engine = f"{name} (compiled)" if decoding == "compiled" else name
                engine_rows.append((text, engine, precision, rate, vs, agree))
        del ours, hfs, fp32, hf_fp32

    print("\n| text | precision | decoding | gpt2lab tok/s | transformers tok/s | ratio | vs transformers plain "
          "| gpt2lab passes | same greedy tokens | distinct tokens |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for text, precision, decoding, ours_tps, hf_tps, hf_plain, n_passes, _, same, distinct in rows:
        hf = f"{hf_tps:.1f} | {ours_tps / hf_tps:.2f}x | {ours_tps / hf_plain:.2f}x" if hf_tps else "- | - | -"
        print(f"| {text} | {precision} | {decoding} | {ours_tps:.1f} | {hf} | {n_passes} | {same} | {distinct} |")
    print("\nPlain decoding, every engine (same greedy tokens: before the first difference from gpt2lab fp32's):\n")
    print("| text | engine | precision | tok/s | vs gpt2lab int8 | same greedy tokens as gpt2lab fp32 |")
    print("|---|---|---|---:|---:|---:|")
    for text, name, precision, rate, vs, agree in engine_rows:
        print(f"| {text} | {name} | {precision} | {rate:.1f} | {vs} | {agree} |")
    if agreement:
        print("\nTop-1 agreement with gpt2lab fp32, teacher-forced on fp32's greedy text (every position counts):\n")
        print("| text | precision | same next token |\n|---|---|---:|")
        for (text, precision), share in agreement.items():
            print(f"| {text} | {precision} | {share:.1%} |")
    if floors:
        print("\nThe floor: reading every weight once (a matrix-vector product each, by torch.mv (int8: fbgemm's "
              "linear_dynamic), in bf16 gpt2lab's matrix-vector kernel, or the products of gpt2lab's fused decoding "
              "step alone, all in one call: whichever reads fastest; the fastest of 4 reads, each way warmed by "
              f"{WARM_TOKENS} reads first, just before each of gpt2lab's timed runs): no plain decoder of batch 1 "
              "that reads every weight passes 1 / floor (memory bandwidth). Sustained: the fastest way then read "
              f"{n} times in a row (a read's mean), the floor under decoding {n} tokens as the decoders run (the "
              "fastest single read is a burst that a shared machine's memory need not sustain). Medians over the "
              "runs, of the floors and of each run's share of the floors read before it. Prompt lookup reads the "
              "weights once per guess set. gpt2lab's fused steps read lm_head whole (fp32, bf16) only for the "
              "rows its int8 screen cannot rule out of greedy decoding's pick (lm_head read: the share of its "
              "rows, each token; 31% of 124M's matrices are lm_head), and 1 byte a weight for the screen: so "
              "they can pass 1 / floor.\n")  # fmt: skip
        print("| text | precision | decoding | gpt2lab tok/s | lm_head read | floor ms | share of the floor "
              "| sustained ms | share of sustained |")  # fmt: skip
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        ours_rows = {(r[0], r[1], r[2]): r for r in rows}
        for (text, precision, decoding), ((floor, share), (sustained, of_sustained)) in floors.items():
            row = ours_rows[text, precision, decoding]
            read = "100%" if row[7] is None else f"{row[7]:.3%}"
            print(f"| {text} | {precision} | {decoding} | {row[3]:.1f} | {read} | {floor * 1e3:.1f} "
                  f"| {share:.0%} | {sustained * 1e3:.1f} | {of_sustained:.0%} |")


if __name__ == "__main__":
    main()
