"""Greedy decoding speed: gpt2lab's cached ``generate`` against transformers' ``generate``.

Both run GPT-2 124M with the same random weights (no download), batch 1, a prompt of
``--prompt-tokens`` random ids and exactly ``--new-tokens`` new tokens (no EOS stop), in
fp32 and in bf16 (weights cast, not autocast). Tokens/s = new tokens / wall time of the
whole call (prefill included); the table shows the median over ``--repeats`` runs, the two
libraries alternating so that background load hits both alike. Timings are printed, never
asserted.

    python bench/generate.py --new-tokens 200 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gpt2lab.generate import DTYPES, generate
from gpt2lab.model import GPT2, PRESETS
from gpt2lab.weights import HF_IGNORED, HF_TABLE, convert


def build_models(seed: int) -> tuple[GPT2, torch.nn.Module]:
    """transformers' GPT2LMHeadModel with random weights, and ours with the same weights."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    cfg = PRESETS["gpt2"]
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(HFConfig(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = GPT2(cfg)
    ours.load_state_dict(convert(state, HF_TABLE, cfg, ignored=HF_IGNORED), strict=False)
    return ours.eval(), hf


def timed(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library and precision")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--precisions", nargs="+", choices=list(DTYPES), default=list(DTYPES))
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

    rows = []
    for precision in args.precisions:
        dtype = DTYPES[precision]
        ours, hf = (model.to(dtype) for model in build_models(args.seed))

        def run_ours(k: int = n) -> list[int]:
            return generate(ours, prompt, k)[0]

        def run_hf(k: int = n) -> list[int]:
            with torch.inference_mode():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=k,
                                  min_new_tokens=k, pad_token_id=50256)  # fmt: skip
            return out[0, prompt.shape[1] :].tolist()

        run_ours(8), run_hf(8)  # warm-up: first-call allocations and kernel selection
        times: dict[str, list[float]] = {"gpt2lab": [], "transformers": []}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for name, fn in (("gpt2lab", run_ours), ("transformers", run_hf)):
                seconds, tokens[name] = timed(fn)
                times[name].append(seconds)
        ours_tps = n / statistics.median(times["gpt2lab"])
        hf_tps = n / statistics.median(times["transformers"])
        # Length of the common prefix: after the first difference the two continuations part ways.
        same = next((i for i, (a, b) in enumerate(zip(tokens["gpt2lab"], tokens["transformers"])) if a != b), n)
        rows.append((precision, ours_tps, hf_tps, ours_tps / hf_tps, f"{same}/{n}"))
        del ours, hf

    print("\n| precision | gpt2lab tok/s | transformers tok/s | ratio | same greedy tokens |")
    print("|---|---:|---:|---:|---:|")
    for precision, ours_tps, hf_tps, ratio, same in rows:
        print(f"| {precision} | {ours_tps:.1f} | {hf_tps:.1f} | {ratio:.2f}x | {same} |")


if __name__ == "__main__":
    main()
