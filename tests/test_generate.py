"""Sampling and KV-cached decoding: pure sampler checks, cached == uncached, EOS, context cut, prompt lookup."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters as dynamo_counters
from torch._inductor import config as inductor_config

from gpt2lab.errors import Gpt2labError
from gpt2lab.generate import (
    GenerationError,
    generate,
    lookup_draft,
    sample,
    sampling_probs,
    stream,
)
from gpt2lab.kernels import CompileUnavailable
from gpt2lab.model import GPT2, GPT2Config
from tests.helpers import compiled_calls

VOCAB = 128


LIVELY = GPT2Config(vocab_size=VOCAB, n_ctx=64, n_embd=32, n_layer=2, n_head=4)


SHORT = GPT2Config(vocab_size=VOCAB, n_ctx=16, n_embd=32, n_layer=2, n_head=4)


def _lively(cfg: GPT2Config, seed: int = 0) -> GPT2:
    """A random model whose greedy output depends on context and position.

    With GPT-2's own init a tiny model repeats one token forever, which would hide a wrong
    position or a wrong cache entry; small token embeddings and strong blocks avoid that.
    """
    torch.manual_seed(seed)
    model = GPT2(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = {"wte.weight": 0.3, "wpe.weight": 1.0}.get(name, 3 * p.shape[1] ** -0.5)
                p.normal_(0.0, std, generator=g)
    return model


@pytest.fixture
def lm() -> GPT2:
    return _lively(LIVELY)


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()  # (1, V)


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _greedy_reference(model: GPT2, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole context every step, with the documented cut rule."""
    n_ctx, window = model.config.n_ctx, model.config.n_ctx // 2
    ctx, out = list(prompt), []
    for _ in range(n):
        if len(ctx) > n_ctx:
            ctx = ctx[-window:]
        tok = int(model(torch.tensor([ctx]))[0, -1].argmax())
        out.append(tok)
        ctx.append(tok)
    return out


# --- sample() on hand-made logits -------------------------------------------------------------
def test_temperature_zero_is_argmax_and_lowest_id_wins_a_tie():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits, temperature=0).tolist() == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_the_lowest_of_tied_ids_in_a_full_vocabulary(dtype):
    """GPT-2's 50257 logits, with the maximum at ids far apart (bf16 ties often): the first one, as argmax."""
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(1)).to(dtype)
    for row, ids in enumerate(([7, 40000], [50256, 50255], [16, 17, 31, 32, 33], [0, 50256])):
        logits[row, ids] = 10.0
    assert sample(logits, temperature=0).tolist() == [7, 50255, 16, 0]
    coarse = torch.randint(0, 3, (8, 50257), generator=torch.Generator().manual_seed(2)).to(dtype)  # ties everywhere
    assert torch.equal(sample(coarse, temperature=0), coarse.float().argmax(-1))


def test_top_k_1_equals_greedy_for_any_temperature():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    for temperature in (0.5, 1.0, 5.0):
        assert torch.equal(sample(logits, temperature, top_k=1), logits.argmax(-1))


@pytest.mark.parametrize(
    "top_p,expected",
    [
        (1.0, [0.5, 0.25, 0.15, 0.1]),
        (0.74, [0.5 / 0.75, 0.25 / 0.75, 0.0, 0.0]),
        (0.76, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0]),
        (0.45, [1.0, 0.0, 0.0, 0.0]),
        (0.01, [1.0, 0.0, 0.0, 0.0]),  # the most likely token always stays
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    probs = sampling_probs(_logits(0.5, 0.25, 0.15, 0.1), top_p=top_p)
    assert torch.allclose(probs, torch.tensor([expected]), atol=1e-6)


def test_top_p_works_on_unsorted_logits_per_row():
    logits = torch.cat([_logits(0.125, 0.25, 0.5, 0.125), _logits(0.8, 0.1, 0.06, 0.04)])
    probs = sampling_probs(logits, top_p=0.7)
    assert torch.allclose(probs, torch.tensor([[0.0, 1 / 3, 2 / 3, 0.0], [1.0, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_top_k_keeps_the_k_best_and_ties_at_the_kth():
    probs = sampling_probs(_logits(0.4, 0.1, 0.2, 0.2, 0.1), top_k=2)
    assert torch.allclose(probs, torch.tensor([[0.5, 0.0, 0.25, 0.25, 0.0]]), atol=1e-6)


def test_temperature_scales_the_logits():
    probs = sampling_probs(torch.tensor([[0.0, math.log(4.0)]]), temperature=2.0)
    assert torch.allclose(probs, torch.tensor([[1 / 3, 2 / 3]]), atol=1e-6)


def test_sample_draws_only_from_the_kept_set_with_its_frequencies():
    logits = _logits(0.5, 0.25, 0.125, 0.125).expand(4000, 4)
    tokens = sample(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 2 / 3) < 0.03


def test_same_generator_seed_same_draws():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    a = sample(logits, 1.5, top_k=50, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 1.5, top_k=50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_arguments_are_refused(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        sample(torch.zeros(1, 4), **kwargs)


# --- cached decoding ----------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 5, 17, 40])
def test_cached_greedy_equals_uncached(lm, length):
    prompt = _prompt(length, seed=length)
    assert generate(lm, [prompt], 12) == [_greedy_reference(lm, prompt, 12)]


def test_padded_batch_equals_each_prompt_alone(lm):
    prompts = [_prompt(n, seed=n) for n in (3, 11, 1, 7)]
    batch = generate(lm, prompts, 10)
    assert batch == [_greedy_reference(lm, p, 10) for p in prompts]


def test_tensor_prompts_are_accepted(lm):
    idx = torch.tensor([_prompt(6, 1), _prompt(6, 2)])
    assert generate(lm, idx, 5) == generate(lm, idx.tolist(), 5)


def test_top_k_1_sampling_equals_greedy_decoding(lm):
    prompt = _prompt(5, 3)
    sampled = generate(lm, [prompt], 10, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(1))
    assert sampled == generate(lm, [prompt], 10)


def test_same_seed_same_tokens_other_seed_other_tokens(lm):
    def run(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return generate(lm, [_prompt(4, 0), _prompt(2, 1)], 15, temperature=1.5, top_k=50, generator=g)

    assert run(123) == run(123)
    assert run(123) != run(124)


def test_eos_stops_each_row_on_its_own(lm):
    prompts = [_prompt(4, 10), _prompt(9, 11)]
    free = generate(lm, prompts, 12)
    eos = free[0][3]  # an id row 0 really produces
    stopped = generate(lm, prompts, 12, eos_id=eos)
    for row, ref in zip(stopped, free):
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)
    steps = list(stream(lm, prompts, 12, eos_id=eos))
    first_stop = free[0].index(eos)
    assert steps[first_stop][0] is None and all(step[0] is None for step in steps[first_stop:])
    assert len(steps) == (12 if eos not in free[1] else max(first_stop, free[1].index(eos)) + 1)


def test_past_the_context_length_keeps_the_last_half_and_goes_on(caplog):
    model = _lively(SHORT)
    prompt = _prompt(6, 5)
    with caplog.at_level(logging.WARNING, logger="gpt2lab.generate"):
        out = generate(model, [prompt], 40)
    assert out == [_greedy_reference(model, prompt, 40)]  # three cuts at n_ctx = 16
    assert sum("context longer" in r.getMessage() for r in caplog.records) == 1
    long_prompt = _prompt(23, 6)
    assert generate(model, [long_prompt], 12) == [_greedy_reference(model, long_prompt, 12)]


def test_padded_batch_past_the_context_length(caplog):
    model = _lively(SHORT)
    long, short = _prompt(10, 1), _prompt(3, 2)
    out = generate(model, [long, short], 30)
    # The longest row is never padded, so it is cut exactly as when alone.
    assert out[0] == _greedy_reference(model, long, 30)
    assert len(out[1]) == 30


def test_mode_is_restored_and_cache_freed(lm):
    lm.train()
    generate(lm, [[1, 2, 3]], 3)
    assert lm.training
    assert all(block.attn.kv_cache is None for block in lm.h)


def test_bf16_model_generates(tiny_model):
    prompt = _prompt(8, 0)
    out = generate(tiny_model.to(torch.bfloat16), [prompt], 6)
    assert len(out[0]) == 6


@pytest.mark.parametrize(
    "prompts,n,message",
    [([[]], 3, "prompt 0 is empty"), ([[1], [VOCAB]], 3, f"token id {VOCAB}"), ([], 3, "no prompts"),
     ([[1]], -1, "max_new_tokens")],
)  # fmt: skip
def test_bad_generate_arguments_fail_at_the_call(lm, prompts, n, message):
    with pytest.raises(GenerationError, match=message):
        stream(lm, prompts, n)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"max_new_tokens": 2.5}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
     ({"top_k": 2.0}, "top_k"), ({"temperature": "0.7"}, "temperature"), ({"top_p": "0.9"}, "top_p"),
     ({"prompt_lookup": -1}, "prompt_lookup"), ({"prompt_lookup": 1.5}, "prompt_lookup")],
)  # fmt: skip
def test_wrongly_typed_arguments_are_refused_by_name(lm, kwargs, message):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(GenerationError, match=message):
        stream(lm, [[1, 2]], **args)


def test_zero_new_tokens(lm):
    assert generate(lm, [[1, 2]], 0) == [[]]


# --- prompt lookup ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "history,n,expected",
    [
        ([1, 2, 3, 4], 3, []),  # no token repeats
        ([5, 1, 2, 3, 9, 1, 2, 3], 2, [9, 1]),  # the 3-gram 1 2 3 came before, followed by 9 1
        ([1, 2, 7, 1, 2, 8, 2], 2, [8, 2]),  # 1-gram 2: the latest earlier occurrence wins
        ([4, 6, 1, 2, 3, 5, 2, 3], 3, [5, 2, 3]),  # the 2-gram match beats the later 1-gram ones
        ([7, 7], 5, [7, 7, 7, 7, 7]),  # a loop is copied on into its own guesses
        ([1, 2, 3, 1, 2, 3, 1], 7, [2, 3, 1, 2, 3, 1, 2]),
        ([1, 1, 1], 0, []),
        ([3], 4, []),
    ],
)
def test_lookup_draft_copies_what_followed_the_last_ngram(history, n, expected):
    assert lookup_draft(history, n) == expected


def _loop_prompt() -> list[int]:
    return _prompt(6, 3) * 3  # a repeated phrase: the lookup has something to guess


def _count_passes(model: GPT2) -> list[int]:
    passes: list[int] = []
    model.register_forward_hook(lambda mod, args, out: passes.append(out.shape[1]))
    return passes


@pytest.mark.parametrize("prompt_lookup", [1, 3, 8])
@pytest.mark.parametrize("prompt", [_prompt(5, 2), _loop_prompt(), [7] * 9])
def test_prompt_lookup_greedy_equals_plain_and_uncached(lm, prompt, prompt_lookup):
    assert generate(lm, [prompt], 30, prompt_lookup=prompt_lookup) == [_greedy_reference(lm, prompt, 30)]


def test_prompt_lookup_saves_forward_passes_on_repetitive_text():
    model = GPT2(LIVELY).eval()  # GPT-2's own init: a tiny model falls into a loop at once
    prompt = _loop_prompt()
    plain = generate(model, [prompt], 40)
    passes = _count_passes(model)
    assert generate(model, [prompt], 40, prompt_lookup=6) == plain
    assert len(passes) < 15  # instead of 40: one prefill, then several tokens per pass
    assert max(passes) > 1


def test_prompt_lookup_sampling_draws_like_plain_decoding(lm):
    """One generator draw per new token, in order: the same seed gives the same text."""

    def run(prompt_lookup: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(5)
        return generate(lm, [_loop_prompt()], 40, temperature=0.6, top_k=20, generator=g, prompt_lookup=prompt_lookup)

    assert run(4) == run(0)


def test_prompt_lookup_stops_at_eos_and_at_max_new_tokens(lm):
    prompt = _loop_prompt()
    (free,) = generate(lm, [prompt], 25)
    for n in (1, 2, 7, 25):
        assert generate(lm, [prompt], n, prompt_lookup=5) == [free[:n]]
    eos = free[6]
    assert free.index(eos) > 0
    assert generate(lm, [prompt], 25, eos_id=eos, prompt_lookup=5) == [free[: free.index(eos)]]


def test_prompt_lookup_past_the_context_length(caplog):
    model = _lively(SHORT)
    prompt = _prompt(4, 8) * 3  # 12 of 16 positions: guesses run into the cut
    with caplog.at_level(logging.WARNING, logger="gpt2lab.generate"):
        out = generate(model, [prompt], 40, prompt_lookup=6)
    assert out == [_greedy_reference(model, prompt, 40)]
    assert sum("context longer" in r.getMessage() for r in caplog.records) == 1


def test_prompt_lookup_with_a_batch_decodes_plainly(lm, caplog):
    prompts = [_loop_prompt(), _prompt(3, 1)]
    with caplog.at_level(logging.INFO, logger="gpt2lab.generate"):
        out = generate(lm, prompts, 10, prompt_lookup=4)
    assert out == generate(lm, prompts, 10)
    assert any("one prompt at a time" in r.getMessage() for r in caplog.records)


SOME = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- generate inputs --------------------------------------------------------------------------------
GEN_VOCAB = 96


GEN_CFG = GPT2Config(vocab_size=GEN_VOCAB, n_ctx=32, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def gen_lm() -> GPT2:
    """A tiny model with lively random weights (GPT-2's init repeats one token, hiding mistakes)."""
    torch.manual_seed(0)
    model = GPT2(GEN_CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, {"wte.weight": 0.3, "wpe.weight": 1.0}.get(name, 3 * p.shape[1] ** -0.5))
    return model


PROMPTS = st.lists(st.lists(st.integers(0, GEN_VOCAB - 1), min_size=1, max_size=45), min_size=1, max_size=3)


SAMPLING = st.fixed_dictionaries({
    "temperature": st.one_of(st.just(0.0), st.floats(1e-3, 50.0)),
    "top_k": st.one_of(st.none(), st.integers(1, GEN_VOCAB + 10)),
    "top_p": st.one_of(st.none(), st.floats(1e-6, 1.0, exclude_min=False)),
})  # fmt: skip


@SOME
@given(prompts=PROMPTS, n=st.integers(0, 40), sampling=SAMPLING, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_generate_valid_arguments_never_fail(gen_lm, prompts, n, sampling, seed, data):
    """Right count of in-vocabulary tokens; with an EOS each row is the free run cut at its first EOS."""

    def run(eos_id: int | None) -> list[list[int]]:
        return generate(gen_lm, prompts, n, eos_id=eos_id, generator=torch.Generator().manual_seed(seed), **sampling)

    free = run(None)
    assert len(free) == len(prompts) and all(len(row) == n for row in free)
    assert all(0 <= t < GEN_VOCAB for row in free for t in row)
    assert run(None) == free  # seeded: the same tokens again
    produced = sorted({t for row in free for t in row})
    eos = data.draw(st.sampled_from(produced) if produced else st.integers(0, GEN_VOCAB - 1), label="eos_id")
    for row, ref in zip(run(eos), free):
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)


@pytest.fixture(scope="module")
def lm64(gen_lm) -> GPT2:
    """``lm`` in float64: one- and several-token passes then round alike, so draws can be compared exactly."""
    model = GPT2(GEN_CFG).double().eval()
    model.load_state_dict(gen_lm.state_dict())
    return model


LOOPY_PROMPT = st.tuples(st.lists(st.integers(0, GEN_VOCAB - 1), min_size=1, max_size=8), st.integers(1, 5)).map(
    lambda t: t[0] * t[1]
)  # a phrase repeated: the lookup has something to guess


@SOME
@given(prompt=LOOPY_PROMPT, n=st.integers(1, 40), sampling=SAMPLING, seed=st.integers(0, 2**32 - 1),
       prompt_lookup=st.integers(1, 12))  # fmt: skip
def test_prompt_lookup_gives_what_plain_decoding_gives(lm64, prompt, n, sampling, seed, prompt_lookup):
    def run(lookup: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return generate(lm64, [prompt], n, generator=g, prompt_lookup=lookup, **sampling)

    assert run(prompt_lookup) == run(0)


INVALID = st.one_of(
    st.fixed_dictionaries({"temperature": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")))}),
    st.fixed_dictionaries({"top_k": st.integers(max_value=0)}),
    st.fixed_dictionaries({"top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                                              st.just(float("nan")))}),  # fmt: skip
    st.fixed_dictionaries({"max_new_tokens": st.integers(max_value=-1)}),
    st.fixed_dictionaries({"prompts": st.just([])}),
    st.fixed_dictionaries({"prompts": st.lists(st.just([]), min_size=1, max_size=2)}),
    st.fixed_dictionaries({"prompts": st.tuples(st.integers(0, GEN_VOCAB - 1), st.one_of(
        st.integers(max_value=-1), st.integers(min_value=GEN_VOCAB))).map(lambda t: [list(t)])}),  # fmt: skip
)


NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "max_new_tokens": "max_new_tokens",
         "prompts": "prompt"}  # fmt: skip


@SOME
@given(bad=INVALID)
def test_generate_invalid_arguments_are_named(gen_lm, bad):
    kwargs = {"prompts": [[1, 2]], "max_new_tokens": 3, **bad}
    prompts, n = kwargs.pop("prompts"), kwargs.pop("max_new_tokens")
    (name,) = bad
    with pytest.raises(GenerationError) as info:
        generate(gen_lm, prompts, n, **kwargs)
    assert isinstance(info.value, Gpt2labError)
    assert NAMES[name] in str(info.value) or (name == "prompts" and "no prompts" in str(info.value))


# --- compiled decoding ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "prompts", "n", "lookup"),
    [
        (LIVELY, [_prompt(1, 1)], 12, 0),
        (LIVELY, [_prompt(40, 40)], 20, 0),  # 59 tokens in a cache of 64 (n_ctx, under one COMPILED_CACHE_STEP)
        (LIVELY, [_prompt(n, seed=n) for n in (3, 11, 1, 7)], 12, 0),  # padded batch
        (SHORT, [_prompt(6, 5)], 40, 0),  # three context cuts
        (SHORT, [_prompt(10, 1), _prompt(3, 2)], 30, 0),  # padded batch with cuts
        (LIVELY, [_loop_prompt()], 30, 4),  # prompt lookup: checks uncompiled, single steps compiled
    ],
)
def test_compiled_decoding_gives_the_tokens_of_uncompiled(cfg, prompts, n, lookup, cpp_compiler):
    model = _lively(cfg)
    expected = generate(model, prompts, n, prompt_lookup=lookup)
    assert generate(model, prompts, n, prompt_lookup=lookup, compile=True) == expected


def test_compiled_decoding_compiles_once_per_cache_length(lm, cpp_compiler):
    prompt = _prompt(5, 5)
    expected = generate(lm, [prompt], 10)
    generate(lm, [prompt], 3, compile=True)  # compiles (or loads Inductor's cached kernels)
    graphs = dynamo_counters["stats"]["unique_graphs"]
    steps = compiled_calls(lambda: generate(lm, [prompt], 10, compile=True))
    assert steps == (9, 1)  # every step after the prompt's; Dynamo checks the first, the others reuse its graph
    other = _prompt(9, 9)
    assert generate(lm, [other], 20, compile=True) == generate(lm, [other], 20)  # another length, same cache
    another = _lively(LIVELY, seed=1)  # another model of the same shapes: its weights are the graph's inputs
    assert generate(another, [prompt], 10, compile=True) == generate(another, [prompt], 10)
    assert dynamo_counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
    assert generate(lm, [prompt], 10, compile=True) == expected


def test_compiled_decoding_without_a_compiler_is_one_line(lm):
    with (
        inductor_config.patch({"cpp.cxx": ("gpt2lab-no-such-compiler",)}),
        pytest.raises(CompileUnavailable, match=r"^torch.compile needs a C\+\+ compiler") as err,
    ):
        stream(lm, [[1, 2]], 3, compile=True)
    assert "\n" not in str(err.value)
