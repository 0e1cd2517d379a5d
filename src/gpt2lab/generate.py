"""Text generation: a pure sampler and a KV-cached decoder.

:func:`sample` turns logits into token ids (greedy, temperature, top-k, top-p).
:func:`stream` runs the prompt once (prefill), then decodes one token at a time against
the model's preallocated KV cache, computing logits for the last position only; it yields
every step's tokens, so a CLI can print text as it comes; :func:`generate` collects them.
While it decodes on a CPU, the model's plain linear layers run the few-row CPU kernels of
:mod:`gpt2lab.kernels` (swapped in, and back out at the end); on a GPU, PyTorch's own. A single
sequence on a CPU with AVX-512 (fp32, or bf16 with AVX512-BF16) decodes each token after the
prompt with one call of gpt2lab's fused kernel (:func:`gpt2lab.kernels.fused_decode_step`), which
runs the whole model's step at the pace its weights stream from memory, and so does a short prompt
and each prompt-lookup check (up to ``FusedDecodeStep.max_tokens`` tokens: 16 in fp32 and in bf16
on a CPU with AMX, 8 in bf16 without it and in int8); the tokens are those of the layers called one
by one, up to float rounding (int8 layers of :mod:`gpt2lab.quantize`: on their int8 weights with
fp32 activations). Greedy decoding and top-k sampling of :data:`~gpt2lab.kernels.SCREEN_MIN_TOKENS` new
tokens or more ask it for the logits that may be each row's largest one or k only (``keep``): it then
reads lm_head through an int8 screen and computes those rows alone, the others -inf, with the same picks
and draws (see :mod:`gpt2lab.kernels`). A model with other layers
(LoRA) or with forward hooks decodes layer by layer, so that its layers and hooks run. Tokens
are drawn on the device of the ``generator`` given (a CPU generator on a GPU model: the same
tokens as on a CPU, up to float rounding of the probabilities).

Past the context length (``n_ctx``, 1024 for GPT-2) the context is cut, not refused:
whenever the tokens to attend to would exceed ``n_ctx``, only their last ``n_ctx // 2``
are kept, run again as a fresh prefill (positions restart at 0), and decoding goes on.
Generation therefore never fails on length, costs one extra prefill per ``n_ctx // 2``
new tokens, and each token sees between ``n_ctx // 2`` and ``n_ctx`` tokens of context.
A prompt longer than ``n_ctx`` is cut the same way before the first step. A warning is
logged once per call when this happens.

Prompt-lookup decoding (``prompt_lookup=N``, off by default, batch 1 only) is speculative
decoding with the text itself as the draft model: when the last few tokens occurred
before, the (up to N) tokens that followed them are guessed, and one forward pass over the
guesses checks them all. Decoding one token costs about as much as checking several (the
time goes into reading the weights), so every guess that holds saves a step; with the fused
step a check takes at most ``max_tokens - 1`` guesses (each costs its arithmetic: for GPT-2
124M on 2 cores ~8% of a step in fp32, ~30-40% in int8, ~20% in bf16, ~2% in bf16 on AMX; past
them the layers cost more than the guesses save). Each position is still sampled from the
model's own distribution, in order, with one draw of the generator per new token, and a guess
is kept only while it equals that token; the output therefore has exactly the distribution of
plain decoding (greedy: the same tokens, up to float rounding of near-ties). Repetitive or
copy-heavy text gains the most.

Compiled decoding (``compile=True``) runs each one-token step through
:func:`gpt2lab.kernels.compiled_decode_step` (``torch.compile``; a C++ compiler is needed): the
same tokens up to float rounding, with less time between the weight reads. Each step then
attends to the whole KV cache through a mask, so that its shapes never change (gpt2lab's
attention kernel reads the keys and values only up to the last column in use); the cache length
is rounded up to a multiple of :data:`COMPILED_CACHE_STEP`, and only each new length (or batch
size, or dtype) compiles again, ~25 s the first time on a 2-core CPU. Dynamo checks the compiled
graph's guards at a run's first step, and the later steps call the graph directly, on the same
input tensors updated in place (so a model changed while a :func:`stream` runs is not seen). The
prompt (prefill) and prompt-lookup checks run as without it.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gpt2lab.errors import Gpt2labError
from gpt2lab.kernels import SCREEN_MIN_TOKENS, compiled_decode_step, few_row_kernels, fused_decode_step
from gpt2lab.model import GPT2

log = logging.getLogger(__name__)

LOOKUP_MAX_NGRAM = 3  # prompt lookup matches the last 3, 2, then 1 tokens
COMPILED_CACHE_STEP = 256  # compiled decoding: cache lengths are multiples of this (or n_ctx), one graph each


class GenerationError(Gpt2labError, ValueError):
    """A generation argument is invalid; the message names it and what is allowed."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise :class:`GenerationError` for a temperature, top-k or top-p of the wrong type or out of range."""
    if not _is_number(temperature):
        raise GenerationError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not _is_int(top_k):
        raise GenerationError(f"top_k must be an integer >= 1 or None (off), got {top_k!r}")
    if top_p is not None and not _is_number(top_p):
        raise GenerationError(f"top_p must be a number in (0, 1] or None (off), got {top_p!r}")
    if not temperature >= 0:  # also catches NaN
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be an integer >= 1 or None (off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] or None (off), got {top_p}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sampling_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution :func:`sample` draws from: fp32 probabilities (B, V) for ``logits`` (B, V).

    The logits are divided by ``temperature`` (> 0), cut to the ``top_k`` largest (ties at
    the k-th value are kept), then to the smallest set of tokens whose probability reaches
    ``top_p`` (at least the most likely token), and renormalised.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise GenerationError("temperature 0 is greedy decoding and has no distribution; use sample()")
    logits = logits.float() / temperature  # fp32: bf16 probabilities are too coarse to sample from
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) probability of the better tokens
        # A token is dropped once the better ones already reach top_p; the best one always stays.
        drop = mass_before >= top_p
        drop[:, 0] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _greedy(temperature: float, top_k: int | None) -> bool:
    """Whether :func:`sample` takes the argmax (no draw)."""
    return temperature == 0 or top_k == 1


def _kept(temperature: float, top_k: int | None, vocab_size: int) -> int:
    """How many of each row's largest logits :func:`sample` looks at (0: all of them)."""
    if _greedy(temperature, top_k):
        return 1
    return top_k if top_k is not None and top_k < vocab_size else 0


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) drawn from ``logits`` (B, vocab_size) with ``generator``, on ``logits``' device.

    ``temperature == 0`` or ``top_k == 1`` is greedy (argmax; the lowest id wins a tie);
    otherwise one token is drawn from :func:`sampling_probs`, on the generator's device (so a
    seed draws the same tokens whatever device the model runs on).
    """
    check_sampling(temperature, top_k, top_p)
    if _greedy(temperature, top_k):
        # max's indices: the same ids as argmax (the first of equal maxima), 2.6x faster on a CPU (50257
        # logits: fp32 25 vs 66 us, bf16 37 us vs 97 for argmax of the fp32 copy, 163 for bf16's argmax).
        return logits.max(dim=-1).indices
    probs = sampling_probs(logits, temperature, top_k, top_p)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_rows(prompts: torch.Tensor | Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints; raises on an empty batch, an empty prompt or an id outside the vocabulary."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise GenerationError(f"a prompt tensor must be (batch, length), got shape {tuple(prompts.shape)}")
        rows = prompts.tolist()
    else:
        rows = [list(map(int, row)) for row in prompts]
    if not rows:
        raise GenerationError("no prompts given; pass at least one list of token ids")
    for i, row in enumerate(rows):
        if not row:
            raise GenerationError(f"prompt {i} is empty; start it with at least one token (e.g. <|endoftext|>)")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})")
    return rows


def lookup_draft(history: Sequence[int], max_tokens: int, max_ngram: int = LOOKUP_MAX_NGRAM) -> list[int]:
    """Up to ``max_tokens`` guessed next tokens: what followed the last n-gram of ``history`` before.

    For n = ``max_ngram`` down to 1, finds the latest earlier occurrence of the last n tokens
    and copies what followed it. The copy may run into the tokens it produces, as in LZ77,
    so a loop of period p is guessed p tokens at a time and beyond. [] when nothing matches.
    """
    if max_tokens < 1:
        return []
    seq = list(history)
    end = len(seq)
    # Earlier positions of the last token, latest first (recent text predicts best): only
    # there can an n-gram match end, so the scan stays cheap next to a forward pass.
    ends = [e for e in range(end - 2, -1, -1) if seq[e] == seq[-1]]
    for n in range(min(max_ngram, end - 1), 0, -1):
        tail = seq[end - n :]
        for e in ends:
            if e >= n - 1 and seq[e - n + 1 : e + 1] == tail:
                src = e + 1
                for _ in range(max_tokens):
                    seq.append(seq[src])
                    src += 1
                return seq[end:]
    return []


class _Decoder:
    """The state of one batched, cached decoding run: a left-padded context window and its cache.

    ``tokens``/``valid`` (B, n_ctx) hold the current context, left-padded; ``length`` columns are
    in use and in the KV cache. ``next_pos`` (B, 1) is each row's position id for the next token.
    """

    def __init__(
        self,
        model: GPT2,
        rows: list[list[int]],
        max_new_tokens: int,
        compiled: Callable[..., torch.Tensor] | None,
        keep: int = 0,
    ):
        cfg = model.config
        self.keep = keep  # the fused step computes only the logits that may be among each row's keep largest
        self.model = model
        self.compiled = compiled
        self.window = max(cfg.n_ctx // 2, 1)
        device = model.wte.weight.device
        width = max(map(len, rows))
        self.cut = width > cfg.n_ctx
        if self.cut:
            rows = [row[-self.window :] for row in rows]
            width = max(map(len, rows))
        B = len(rows)
        self.tokens = torch.zeros(B, cfg.n_ctx, dtype=torch.long, device=device)
        self.valid = torch.zeros(B, cfg.n_ctx, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            self.tokens[i, width - len(row) : width] = torch.tensor(row, dtype=torch.long)
            self.valid[i, width - len(row) : width] = True
        self.padded = any(len(row) != width for row in rows)
        self.length = 0
        self.width = width
        self.next_pos = torch.zeros(B, 1, dtype=torch.long, device=device)
        # The last sampled token is never fed back, hence the - 1.
        cache_len = width + max_new_tokens - 1 if max_new_tokens > 1 else width
        if compiled is not None:
            cache_len = -(-cache_len // COMPILED_CACHE_STEP) * COMPILED_CACHE_STEP
        model.setup_cache(B, min(cfg.n_ctx, cache_len))
        # One sequence on a CPU: each step (a short prompt too) is one call of gpt2lab's kernel, unless compiling
        # (one sequence is never padded, so the kernel attends to every column in use).
        self.fused = fused_decode_step(model, B) if compiled is None else None
        self.tops: list[int] | None = None  # the fused step's largest logits' ids, for the logits last returned
        # Its bookkeeping writes through NumPy views of these CPU tensors: ~0.2 us a write, where indexing a
        # tensor costs 15-20 us just after a step (the step's weights have pushed Python's data out of the
        # CPU caches): ~1% of a bf16 step of GPT-2 124M each.
        self.host = (self.tokens.numpy(), self.valid.numpy(), self.next_pos.numpy()) if self.fused is not None else None
        # A compiled step's inputs: the same tensors at every step, updated in place (see CompiledDecodeStep).
        self.step_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.cache_mask = self.valid[:, : model.cache_len]  # (B, cache_len), a view

    @property
    def room(self) -> int:
        """How many draft tokens the next :meth:`step` should check after its token: no more than fit in the
        cache without a cut, nor than the fused step takes (past them the layers cost more than it saves)."""
        room = self.model.cache_len - self.length - 1
        return room if self.fused is None else min(room, self.fused.max_tokens - 1)

    def prefill(self) -> torch.Tensor:
        """Run the ``width`` context columns from cache position 0; logits (B, 1, vocab_size) of the last one."""
        T = self.width
        if self.fused is not None and T <= self.fused.max_tokens:  # one sequence, never padded
            logits, self.tops = self.fused(self.host[0][0, :T].tolist(), 0, 0, keep=self.keep)
            self.length, self.next_pos[0, 0] = T, T
            return logits
        valid = self.valid[:, :T]
        pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T) each row counts from its first real token
        key_mask = valid if self.padded else None
        logits = self.model(self.tokens[:, :T], pos=pos, start=0, key_mask=key_mask, last_only=True)
        self.length, self.tops = T, None
        self.next_pos.copy_(pos[:, -1:] + 1)
        return logits

    def step(self, ids: list[int], draft: Sequence[int] = ()) -> torch.Tensor:
        """Feed ``ids`` (a token a row) and then ``draft`` (batch 1 only, at most :attr:`room` tokens).

        Returns logits (B, 1 + len(draft), vocab_size): position j predicts the token after
        the j-th fed one. Cuts the context when it is full (then without a draft).
        """
        n_ctx = self.model.config.n_ctx
        if self.length == n_ctx:
            return self._cut_and_prefill(ids)
        col, T = self.length, 1 + len(draft)
        self.tops = None
        if self.host is not None and T <= self.fused.max_tokens:  # the fused step
            tokens, valid, next_pos = self.host
            fed = [*ids, *draft]
            tokens[0, col : col + T], valid[0, col : col + T] = fed, True
            logits, self.tops = self.fused(fed, int(next_pos[0, 0]), col, logit_rows=T, keep=self.keep)
            self.length, next_pos[0, 0] = col + T, next_pos[0, 0] + T
            return logits
        device = self.tokens.device
        fed = torch.tensor([[*ids, *draft]] if draft else [[i] for i in ids], device=device)  # (B, T)
        self.tokens[:, col : col + T] = fed
        self.valid[:, col : col + T] = True
        key_mask = self.valid[:, : col + T] if self.padded else None  # no mask at all for an unpadded batch
        pos = self.next_pos if T == 1 else self.next_pos + torch.arange(T, device=device)  # (B, T)
        if T == 1 and self.compiled is not None:
            self.step_ids.copy_(fed)
            self.column.fill_(col)
            logits = self.compiled(self.step_ids, pos, self.column, self.cache_mask)
        else:
            logits = self.model(fed, pos=pos, start=col, key_mask=key_mask, last_only=T == 1)
        self.length = col + T
        self.next_pos += T
        return logits

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` fed tokens (rejected guesses); their cache entries get overwritten."""
        if n:
            self.length -= n
            self.next_pos -= n
            self.valid[:, self.length : self.length + n] = False

    def _cut_and_prefill(self, ids: list[int]) -> torch.Tensor:
        keep = self.window - 1  # + the new token = window
        n_ctx = self.model.config.n_ctx
        self.tokens[:, :keep] = self.tokens[:, n_ctx - keep : n_ctx].clone()
        self.valid[:, :keep] = self.valid[:, n_ctx - keep : n_ctx].clone()
        self.tokens[:, keep] = torch.tensor(ids, device=self.tokens.device)
        self.valid[:, keep] = True
        self.valid[:, keep + 1 :] = False  # the columns after the new context are free again
        self.width = self.window
        self.padded = not bool(self.valid[:, : self.window].all())
        self.cut = True
        return self.prefill()


def stream(
    model: GPT2,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    prompt_lookup: int = 0,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Decode a batch of prompts step by step; yields each step's new token per prompt.

    Args:
        model: the language model; it runs in eval mode (its mode is restored afterwards)
            and its KV cache is set up here and freed at the end.
        prompts: token ids, a (B, T) tensor or B lists of different lengths (left-padded
            internally; each row gets its own positions and never attends to padding).
        max_new_tokens: at most this many steps.
        temperature, top_k, top_p, generator: as in :func:`sample`.
        eos_id: a row that samples this token is finished (the token itself is not
            yielded); None generates ``max_new_tokens`` tokens for every row.
        prompt_lookup: guess up to this many tokens per forward pass by prompt lookup
            (see the module docstring); 0 = off. Used for a single prompt only.
        compile: decode with ``torch.compile`` (see the module docstring); raises
            :class:`~gpt2lab.kernels.CompileUnavailable` here when it cannot run the model (no
            C++ compiler, or int8 layers).

    Yields:
        one list of B items per new token: the token id, or None for a finished row.
        It stops early when every row has finished. See the module docstring for what
        happens past the context length.
    """
    # Checked here, not in the generator, so a bad argument fails at the call.
    check_sampling(temperature, top_k, top_p)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_int(prompt_lookup) or prompt_lookup < 0:
        raise GenerationError(f"prompt_lookup must be an integer >= 0 (0 = off), got {prompt_lookup!r}")
    rows = _as_rows(prompts, model.config.vocab_size)
    if prompt_lookup and len(rows) > 1:
        log.info("prompt lookup works on one prompt at a time; decoding %d prompts without it", len(rows))
        prompt_lookup = 0
    compiled = compiled_decode_step(model) if compile else None
    return _stream(model, rows, max_new_tokens, (temperature, top_k, top_p), eos_id, generator, prompt_lookup,
                   compiled)  # fmt: skip


@contextlib.contextmanager
def _decoding(model: GPT2) -> Iterator[None]:
    """Eval mode and, on a CPU, the few-row kernels for the block; then the cache is freed and the mode restored."""
    was_training = model.training
    model.eval()
    on_cpu = model.wte.weight.device.type == "cpu"
    try:
        with few_row_kernels(model) if on_cpu else contextlib.nullcontext():
            yield
    finally:
        model.clear_cache()
        model.train(was_training)


@torch.inference_mode()
def _stream(
    model: GPT2,
    rows: list[list[int]],
    max_new_tokens: int,
    sampling: tuple[float, int | None, float | None],
    eos_id: int | None,
    generator: torch.Generator | None,
    prompt_lookup: int,
    compiled: Callable[..., torch.Tensor] | None,
) -> Iterator[list[int | None]]:
    if max_new_tokens == 0:
        return
    with _decoding(model):
        keep = _kept(*sampling[:2], model.config.vocab_size) if max_new_tokens >= SCREEN_MIN_TOKENS else 0
        dec = _Decoder(model, rows, max_new_tokens, compiled, keep)
        history = list(rows[0]) if prompt_lookup else []  # the text prompt lookup searches
        finished = [False] * len(rows)
        logits, draft = dec.prefill(), []  # logits (B, 1 + len(draft), V)
        n_new, warned = 0, False
        guesses = prompt_lookup  # draft size: +2 after a draft that fully held, -1 after a miss (as transformers)
        greedy = _greedy(*sampling[:2])  # sample()'s argmax, which the fused step finds as it goes
        while True:
            if dec.cut and not warned:
                log.warning(
                    "context longer than the model's %d tokens: keeping the last %d and continuing",
                    model.config.n_ctx, dec.window,
                )  # fmt: skip
                warned = True
            # Sample position by position; a guess survives only while it equals the sampled token.
            for j in range(logits.shape[1]):
                if greedy and dec.tops is not None:  # from the fused step
                    ids = [dec.tops[j]]
                else:
                    ids = sample(logits[:, j], *sampling, generator=generator).tolist()  # (B,)
                if eos_id is not None:
                    finished = [done or t == eos_id for t, done in zip(ids, finished)]
                yield [None if done else t for t, done in zip(ids, finished)]
                n_new += 1
                if n_new == max_new_tokens or all(finished):
                    return
                if prompt_lookup:
                    history.append(ids[0])
                if j == len(draft) or ids[0] != draft[j]:
                    break
            dec.rewind(len(draft) - j)  # the guesses after the j accepted ones
            if draft:
                guesses = min(prompt_lookup, guesses + 2) if j == len(draft) else max(1, guesses - 1)
            if prompt_lookup:
                budget = min(guesses, max_new_tokens - n_new - 1, dec.room)  # never past the cache or the end
                draft = lookup_draft(history[-model.config.n_ctx :], budget)
            logits = dec.step(ids, draft)


def generate(
    model: GPT2,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    prompt_lookup: int = 0,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt, without the EOS); arguments as in :func:`stream`."""
    out: list[list[int]] = [[] for _ in range(len(prompts))]
    for step in stream(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_id=eos_id, generator=generator, prompt_lookup=prompt_lookup, compile=compile):  # fmt: skip
        for row, tok in zip(out, step):
            if tok is not None:
                row.append(tok)
    return out
