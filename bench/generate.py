"""Greedy decoding speed: gpt2lab's cached ``generate`` against transformers' ``generate``.

Both run GPT-2 124M with the same random weights (no download), batch 1, a prompt of
``--prompt-tokens`` random ids and exactly ``--new-tokens`` new tokens (no EOS stop), in
fp32 and in bf16 (weights cast, not autocast). Tokens/s = new tokens / wall time of the
whole call (prefill included); the table shows the median over ``--repeats`` runs, the
variants alternating so that background load hits all alike. Timings are printed, never
asserted.

Two decodings are timed: plain (one forward pass per token) and prompt lookup with up to
``--lookup`` guessed tokens per pass, in both libraries (transformers'
``prompt_lookup_num_tokens``). Plain decoding of batch 1 reads every weight once per
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
import itertools
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gpt2lab.convert import HF_IGNORED, HF_TABLE, convert
from gpt2lab.devices import DTYPES
from gpt2lab.generate import generate
from gpt2lab.model import GPT2, PRESETS


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


@torch.inference_mode()
def weight_read_seconds(model: GPT2, repeats: int = 9) -> float:
    """Median time to read every matrix of ``model`` once, in forward order (12 blocks x 4 + lm_head).

    A matrix-vector product per matrix and nothing else: the floor under any plain decoding step
    of batch 1, whatever library runs it.
    """
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]  # lm_head (tied to wte) last
    xs = [torch.randn(w.shape[1], dtype=w.dtype) for w in mats]
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        t0 = time.perf_counter()
        for w, x in zip(mats, xs):
            torch.mv(w, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def timed(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library, decoding and precision")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--precisions", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--lookup", type=int, default=10, help="prompt lookup: guessed tokens per pass; 0 = skip")
    parser.add_argument("--texts", nargs="+", choices=["loop", "varied"], default=["loop", "varied"],
                        help="random weights whose greedy output loops (GPT-2's init) or rarely repeats")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens
    vocab_size = PRESETS["gpt2"].vocab_size
    prompt = torch.randint(0, vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    cpu = platform.processor() or platform.machine()
    print(f"GPT-2 124M, batch 1, {args.prompt_tokens}-token prompt, {n} new tokens, greedy; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")  # fmt: skip
    decodings = {"plain": 0} | ({f"prompt lookup {args.lookup}": args.lookup} if args.lookup else {})

    rows, floors = [], {}
    for text, precision in itertools.product(args.texts, args.precisions):
        dtype = DTYPES[precision]
        ours, hf = (model.to(dtype) for model in build_models(args.seed, text))
        passes: list[int] = []
        ours.register_forward_hook(lambda *_: passes.append(1))

        def run_ours(lookup: int, k: int = n) -> list[int]:
            return generate(ours, prompt, k, prompt_lookup=lookup)[0]

        def run_hf(lookup: int, k: int = n) -> list[int]:
            extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
            with torch.inference_mode():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=k,
                                  min_new_tokens=k, pad_token_id=50256, **extra)  # fmt: skip
            return out[0, prompt.shape[1] :].tolist()

        for lookup in decodings.values():  # warm-up: first-call allocations and kernel selection
            run_ours(lookup, 8), run_hf(lookup, 8)
        times: dict[tuple[str, int], list[float]] = {}
        tokens: dict[tuple[str, int], list[int]] = {}
        ours_passes: dict[int, int] = {}
        for _ in range(args.repeats):
            for lookup in decodings.values():
                for name, fn in (("gpt2lab", run_ours), ("transformers", run_hf)):
                    passes.clear()
                    seconds, tokens[name, lookup] = timed(lambda: fn(lookup))
                    times.setdefault((name, lookup), []).append(seconds)
                    if name == "gpt2lab":
                        ours_passes[lookup] = len(passes)
        if precision not in floors:  # the same for every text: only the dtype counts
            floors[precision] = weight_read_seconds(ours)
        hf_plain = n / statistics.median(times["transformers", 0])
        reference = tokens["transformers", 0]
        for decoding, lookup in decodings.items():
            ours_tps = n / statistics.median(times["gpt2lab", lookup])
            hf_tps = n / statistics.median(times["transformers", lookup])
            out = tokens["gpt2lab", lookup]
            # Length of the common prefix: after the first difference the two continuations part ways.
            same = next((i for i, (a, b) in enumerate(zip(out, reference)) if a != b), n)
            rows.append((text, precision, decoding, ours_tps, hf_tps, ours_tps / hf_tps, ours_tps / hf_plain,
                         ours_passes[lookup], f"{same}/{n}", len(set(out))))  # fmt: skip
        del ours, hf

    print("\n| text | precision | decoding | gpt2lab tok/s | transformers tok/s | ratio | vs transformers plain "
          "| gpt2lab passes | same greedy tokens | distinct tokens |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for text, precision, decoding, ours_tps, hf_tps, ratio, vs_plain, n_passes, same, distinct in rows:
        print(f"| {text} | {precision} | {decoding} | {ours_tps:.1f} | {hf_tps:.1f} | {ratio:.2f}x | {vs_plain:.2f}x "
              f"| {n_passes} | {same} | {distinct} |")  # fmt: skip
    for precision, seconds in floors.items():
        print(f"\n{precision}: reading the weights once takes {seconds * 1e3:.1f} ms, so no plain decoder of batch 1 "
              f"passes {1 / seconds:.0f} tok/s here (memory bandwidth); prompt lookup reads them once per guess set.")


if __name__ == "__main__":
    main()
