"""Batched KV-cache generation: the sampler behind RL rollouts, evaluation and chat.

One `generate` call runs every (prompt, sample) row of a batch together:

- **Ragged prefill, shared across samples.** The P distinct prompts are prefilled once, right-padded with
  `new_lengths` = true lengths (each row's rotary positions start at 0), in groups of similar length so that
  padding wastes little; the first-token logits come from each row's last real position.
  `KVCache.repeat_rows(G)` then gives every sample its own copy (GRPO's G rollouts per prompt cost one prefill).
- **Row retirement.** Finished rows leave the compute batch (`KVCache.select_rows`), so a decode step costs what
  its live rows cost. Compaction copies the cache, so it waits until a quarter of the batch has finished
  (`Engine.retire_fraction`); finished rows in the batch meanwhile write nothing (new_lengths 0). `retire=False`
  keeps every row to the end, which exists to test that retirement changes nothing.
- **Per-row, counter-based randomness.** The uniform that picks row r's t-th token is a hash of
  (seed, prompt_index, sample_index, t): a row's samples do not depend on which other rows share the batch,
  on retirement, or on the device. `seed` may also be a list with one seed per prompt; rows are then keyed by
  (seed[p], sample_index, t), independent of the prompt's position in the call. All rows draw in one
  vectorised op; the token is the inverse-CDF pick.
- **Sampling.** temperature 0 = greedy; otherwise softmax(logits / temperature) filtered by top-k, then top-p
  (smallest prefix of the sorted renormalised distribution whose mass reaches p), then min-p (keep p ≥ min_p·p_max).
  A temperature below GREEDY_BELOW_TEMPERATURE is greedy too: dividing by ~1e-38 overflows the logits to inf, and
  far above that the distribution is already one-hot. The most likely candidate always survives top-p, however
  small p is (a p that rounds to 0 in float32 would otherwise keep nothing).
- **Log-probs for RL.** `Generation.logprobs[t]` = log_softmax(logits / temperature)[token] over the FULL vocabulary,
  i.e. before top-k/top-p/min-p: exactly what the trainer recomputes (reasoning.grpo.chunked_token_logprobs), so
  the sampler/trainer ratio only measures numerical mismatch. At temperature 0 it is log_softmax(logits)[token].
  Forced tool tokens get 0.
- **Tool calls.** When a row samples <|python_start|> expr <|python_end|>, expr is evaluated by the safe
  calculator and `<|output_start|> result <|output_end|>` is forced into that row one token per step (mask 0), then
  sampling resumes. A rejected expression forces an empty output block, so the transcript keeps the chat format
  and the model is never credited with writing a tool result itself.
- **Latent mode** (`latent_steps=N`, Coconut; reasoning/latent.py): after the prefill each row is fed
  <|start-latent|>, then N positions whose inputs are the previous position's final hidden state, then
  <|end-latent|>; decoding starts after that. The span is not part of `tokens` (`Generation.latent_steps` = N)
  and takes N + 2 slots of the context. `_latent_phase` is the whole of it.

`tokens` include the stop token when stop_reason == "stop" (the trainer learns to emit <|assistant_end|>).
Results are prompt-major: prompt 0 samples 0..G-1, prompt 1, ...
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from reasoning.calculator import calculate
from reasoning.common import autocast_context, get_compute_dtype
from reasoning.gpt import KVCache
from reasoning.latent import END_LATENT, START_LATENT, run_latent_steps

STOP, LENGTH, CONTEXT = "stop", "length", "context"
DEFAULT_STOP_NAMES = ("<|assistant_end|>", "<|bos|>")
TOOL_NAMES = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


@dataclass
class Generation:
    """One sampled completion. mask[t] = 1 for sampled tokens, 0 for forced tool output."""
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None  # "stop" | "length" | "context"
    prompt_index: int = 0
    sample_index: int = 0
    latent_steps: int = 0  # latent positions before the tokens (latent mode)


# ----------------------------------------------------------------------------------------------------------
# counter-based random numbers: uniform(row key, step) as a pure function, vectorised over rows

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al.) on Python ints: a good 64-bit mixer for deriving keys."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_key(seed: int, prompt_index: int, sample_index: int) -> int:
    """64-bit key of one row; distinct rows get unrelated streams. (With per-prompt seeds, prompt_index is 0.)"""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ prompt_index) ^ sample_index)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A bijective 32-bit integer hash (xorshift-multiply). Values stay below 2**32 and the multiplier below
    # 2**27, so int64 arithmetic never overflows and every device computes the same bits.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def keys_tensor(keys: list[int], device) -> torch.Tensor:
    """Row keys as a (B, 2) int64 tensor of their low and high 32-bit halves."""
    return torch.tensor([[k & _MASK32, k >> 32] for k in keys], dtype=torch.int64, device=device)


def counter_uniforms(keys: torch.Tensor, counter: int) -> torch.Tensor:
    """(B, 2) int64 keys, step counter -> (B,) float64 uniforms in [0, 1) with 53 random bits."""
    low, high = keys[:, 0], keys[:, 1]
    a = _mix32(_mix32(low ^ (counter & _MASK32)) ^ high)
    b = _mix32(a ^ low ^ 0x9E3779B9)
    return ((a >> 5) * (1 << 26) + (b >> 6)).double() / float(1 << 53)


# ----------------------------------------------------------------------------------------------------------
# sampling

GREEDY_BELOW_TEMPERATURE = 1e-4  # and 0: greedy (log-probs as at temperature 1, see the module docstring)


def check_sampling_args(temperature, top_k, top_p, min_p):
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}: expected a finite number >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected None or an integer >= 1")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: expected None or a number in (0, 1]")
    if min_p is not None and (not isinstance(min_p, numbers.Real) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p={min_p!r}: expected None or a number in [0, 1]")


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised non-negative weights (B, C); never one of weight 0."""
    cdf = weights.double().cumsum(dim=-1)  # float64: tiny tokens keep their true share; non-decreasing, flat at 0s
    total = cdf[:, -1:]
    # target in [0, total): the first cdf entry above it belongs to a token with positive weight
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.size(1) - 1)


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, min_p: float | None = None):
    """logits (B, V) float32, uniforms (B,) in [0, 1) -> (tokens (B,) long, logprobs (B,) float32).

    logprobs are log_softmax(logits / temperature) at the token over the full vocabulary (temperature 1 when
    greedy), whatever the filters; see the module docstring.
    """
    logits = logits.float()
    if temperature < GREEDY_BELOW_TEMPERATURE:
        tokens = logits.argmax(dim=-1)
        scaled = logits
    else:
        scaled = logits / temperature
        vocab_size = scaled.size(-1)
        candidate_ids = None  # None: the candidates are the whole vocabulary in id order
        is_sorted = False
        if top_k is not None and top_k < vocab_size:
            candidates, candidate_ids = scaled.topk(top_k, dim=-1)  # sorted descending
            is_sorted = True
        elif top_p is not None and top_p < 1:
            candidates, candidate_ids = scaled.sort(dim=-1, descending=True)
            is_sorted = True
        else:
            candidates = scaled
        probs = torch.softmax(candidates, dim=-1)  # (B, C), renormalised over the candidates
        keep = None
        if top_p is not None and top_p < 1:
            mass_before = probs.cumsum(dim=-1) - probs
            keep = mass_before < top_p
            keep[:, 0] = True  # the most likely token, also when p rounds to 0 in float32
        if min_p is not None and min_p > 0:
            p_max = probs[:, :1] if is_sorted else probs.amax(dim=-1, keepdim=True)
            above = probs >= min_p * p_max
            keep = above if keep is None else keep & above
        weights = probs if keep is None else probs * keep
        choice = _inverse_cdf(weights, uniforms)
        tokens = choice if candidate_ids is None else candidate_ids.gather(1, choice[:, None]).squeeze(1)
    # one fused pass (log_softmax) costs half of gather - logsumexp, which runs as separate max/sub/exp/sum ops
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


# ----------------------------------------------------------------------------------------------------------
# the engine

def _special_id(tokenizer, name: str) -> int | None:
    if tokenizer is None or not hasattr(tokenizer, "encode_special"):
        return None
    try:
        return int(tokenizer.encode_special(name))
    except (KeyError, ValueError):
        return None


class Engine:
    """Generation for a GPT (reasoning.gpt) and its tokenizer (None: no tool calls, no default stop tokens).
    `latent_steps`: the latent mode every call uses unless it passes its own (a chat_latent checkpoint's count)."""

    # with retire=True, finished rows leave the batch once they are this fraction of it (0: at every finish)
    retire_fraction = 0.25

    def __init__(self, model, tokenizer=None, latent_steps: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.latent_steps = latent_steps
        special = {name: _special_id(tokenizer, name) for name in DEFAULT_STOP_NAMES + TOOL_NAMES}
        self.default_stop_tokens = [special[n] for n in DEFAULT_STOP_NAMES if special[n] is not None]
        tool_ids = [special[n] for n in TOOL_NAMES]
        self.tool_tokens = tool_ids if None not in tool_ids else None  # python_start, python_end, output_start/end

    def generate(self, prompts, num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 seed: int | list[int] | None = 0, stop_tokens=None, retire: bool = True,
                 latent_steps: int | None = None) -> list[Generation]:
        """Sample num_samples completions of every prompt (lists of token ids); prompt-major results.
        `latent_steps` N: latent mode (module docstring), N continuous thoughts before the first token."""
        rollout = _Rollout(self, prompts, num_samples, max_tokens, temperature, top_k, top_p, min_p, seed,
                           stop_tokens, retire, self.latent_steps if latent_steps is None else latent_steps)
        for _ in rollout.steps():
            pass
        return rollout.generations

    def generate_stream(self, prompts, num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                        seed: int | list[int] | None = 0, stop_tokens=None, retire: bool = True,
                        latent_steps: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Like generate, but yields (row, token, mask) as tokens are produced, row = prompt_index * G + sample.

        Arguments are checked now; the work happens as the caller iterates, and stops when it stops
        (break / close()): nothing runs ahead of the consumer.
        """
        rollout = _Rollout(self, prompts, num_samples, max_tokens, temperature, top_k, top_p, min_p, seed,
                           stop_tokens, retire, self.latent_steps if latent_steps is None else latent_steps)
        return _stream_events(rollout)


def _stream_events(rollout: "_Rollout"):
    try:
        for events in rollout.steps():
            yield from events
    finally:
        rollout.release()  # cancelled or done: drop the KV cache now rather than when the generator is collected


class _Rollout:
    """The state of one generate call: rows, their budgets and tool state, the KV cache of resident rows."""

    def __init__(self, engine: Engine, prompts, num_samples, max_tokens, temperature, top_k, top_p, min_p,
                 seed, stop_tokens, retire, latent_steps=None):
        model = engine.model
        config = model.config
        self.model, self.engine = model, engine
        self.context_len = config.sequence_len
        vocab_size = config.vocab_size
        self.prompts = _check_prompts(prompts, vocab_size, self.context_len)
        if not isinstance(num_samples, numbers.Integral) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r}: expected an integer >= 1")
        if not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r}: expected an integer >= 1")
        check_sampling_args(temperature, top_k, top_p, min_p)
        if seed is None:  # fresh randomness, still governed by torch's global seed
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, (list, tuple)):
            # one seed per prompt: a row is keyed by (its prompt's seed, sample) wherever the prompt sits in the
            # call, e.g. seeds derived from problem ids make eval samples independent of batching and sharding
            if len(seed) != len(self.prompts) or not all(isinstance(x, numbers.Integral) for x in seed):
                raise ValueError(f"seed: a list of seeds needs one integer per prompt ({len(self.prompts)}), "
                                 f"got {seed!r:.80}")
            row_seeds = [(int(seed[p]), 0) for p in range(len(self.prompts))]
        elif isinstance(seed, numbers.Integral):
            row_seeds = [(int(seed), p) for p in range(len(self.prompts))]
        else:
            raise ValueError(f"seed={seed!r}: expected an integer, a list of one integer per prompt, or None")
        stop_tokens = engine.default_stop_tokens if stop_tokens is None else list(stop_tokens)
        for token in stop_tokens:
            if not isinstance(token, numbers.Integral) or not 0 <= token < vocab_size:
                raise ValueError(f"stop token {token!r}: expected a token id in [0, {vocab_size})")
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.num_samples, self.max_tokens = int(num_samples), int(max_tokens)
        self.sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p)
        self.retire = retire
        self.tool_tokens = engine.tool_tokens
        self.tokenizer = engine.tokenizer

        self.latent_steps, self.latent_slots = self._check_latent(latent_steps)

        G = self.num_samples
        self.generations = [Generation(prompt_index=p, sample_index=s, latent_steps=self.latent_steps or 0)
                            for p in range(len(self.prompts)) for s in range(G)]
        # a row may produce max_tokens tokens, or fewer if prompt + completion would exceed the model's context
        self.budgets = [min(self.max_tokens,
                            self.context_len - len(self.prompts[g.prompt_index]) - self.latent_slots)
                        for g in self.generations]
        self.keys = [row_key(*row_seeds[g.prompt_index], g.sample_index) for g in self.generations]
        self.done = [False] * len(self.generations)
        self.python_start = [-1] * len(self.generations)  # where the open tool call's expression begins
        self.forced = [deque() for _ in self.generations]  # tool-output tokens still to force, per row
        self.cache = None
        self.resident = []  # row ids in the compute batch, in cache order
        self.resident_keys = None  # (len(resident), 2) random-stream keys of those rows

        self.device = next(model.parameters()).device
        # the dtype keys/values are produced in: bf16/fp16 under GPU autocast, else the weights' dtype (fp32 on CPU)
        compute_dtype = get_compute_dtype(self.device) if self.device.type == "cuda" else None
        self.autocast_dtype = compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else None
        self.dtype = self.autocast_dtype or model.lm_head.weight.dtype

    # -- driving --------------------------------------------------------------------------------------------

    def steps(self):
        """Run generation; yield the (row, token, mask) events of each step."""
        for row, budget in enumerate(self.budgets):
            if budget <= 0:  # the prompt already fills the context
                self._finish(row, CONTEXT)
        if all(self.done):
            return
        logits = self._prefill()
        if self.latent_steps is not None:
            logits = self._latent_phase()
        step = 0
        while True:
            events = self._take_step(logits, step)
            yield events
            if all(self.done[row] for row in self.resident):
                break
            if self.retire:
                self._retire_finished()
            logits = self._decode()
            step += 1
        self.release()

    def release(self):
        self.cache = None
        self.resident_keys = None

    def _compute(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return autocast_context(self.device, self.autocast_dtype)

    @torch.inference_mode()
    def _prefill(self) -> torch.Tensor:
        """Prefill the distinct prompts that still have budget; return first-token logits (B_resident, V).

        Prompts are sorted by length and prefilled in groups of similar length (each group right-padded to its
        longest prompt), so padding costs little even when lengths vary 10x; the groups' keys/values are copied
        into one cache whose rows follow the sorted order.
        """
        G = self.num_samples
        config = self.model.config
        active = sorted({g.prompt_index for g, d in zip(self.generations, self.done) if not d},
                        key=lambda p: -len(self.prompts[p]))
        # a row feeds back its prompt and every generated token but the last: len + budget - 1 slots, plus one
        # spare where a finished row that still rides in the batch writes its (discarded) input
        max_len = max(len(self.prompts[p]) + self.budgets[p * G] for p in active) + self.latent_slots
        self.cache = KVCache.for_model(config, len(active), max_len, device=self.device, dtype=self.dtype)
        logits = torch.empty(len(active), config.vocab_size, device=self.device)
        for start, stop in _length_groups([len(self.prompts[p]) for p in active]):
            group = [self.prompts[p] for p in active[start:stop]]
            width = len(group[0])
            idx = torch.tensor([prompt + [0] * (width - len(prompt)) for prompt in group], dtype=torch.long,
                               device=self.device)  # (n, width) right-padded
            lengths = [len(prompt) for prompt in group]
            cache = KVCache.for_model(config, len(group), width, device=self.device, dtype=self.dtype,
                                      layout=self.cache.layout)
            with self._compute():
                hidden = self.model.forward_hidden(idx, kv_cache=cache, new_lengths=lengths)  # (n, width, D)
                last = hidden[torch.arange(len(group), device=self.device),
                              torch.tensor(lengths, device=self.device) - 1]  # (n, D)
                logits[start:stop] = self.model.compute_logits(last)
            self.cache.write_rows(start, cache)
        if G > 1:
            self.cache.repeat_rows(G)
            logits = logits.repeat_interleave(G, dim=0)
        self.resident = [p * G + s for p in active for s in range(G)]
        self.resident_keys = keys_tensor([self.keys[row] for row in self.resident], self.device)
        return logits

    # -- latent mode (Coconut) ------------------------------------------------------------------------------

    def _check_latent(self, latent_steps) -> tuple[int | None, int]:
        """(latent steps or None, context slots the latent span takes)."""
        if latent_steps is None:
            return None, 0
        if not isinstance(latent_steps, numbers.Integral) or isinstance(latent_steps, bool) or latent_steps < 0:
            raise ValueError(f"latent_steps={latent_steps!r}: expected None or an integer >= 0")
        self.latent_ids = [_special_id(self.tokenizer, name) for name in (START_LATENT, END_LATENT)]
        if None in self.latent_ids:
            raise ValueError("latent_steps: the tokenizer has no <|start-latent|>/<|end-latent|> tokens "
                             "(reasoning.latent.with_latent_tokens)")
        return int(latent_steps), int(latent_steps) + 2

    @torch.inference_mode()
    def _latent_phase(self) -> torch.Tensor:
        """Every resident row (all fresh from the prefill) takes <|start-latent|>, latent_steps hidden states fed
        back, and <|end-latent|>; returns the logits of the first token after the span (B_resident, V)."""
        start, end = self.latent_ids
        rows = len(self.resident)
        with self._compute():
            marker = torch.full((rows, 1), start, dtype=torch.long, device=self.device)
            hidden = self.model.forward_hidden(marker, kv_cache=self.cache)[:, 0]  # (B, D)
            run_latent_steps(self.model, self.cache, hidden, self.latent_steps)
            marker = torch.full((rows, 1), end, dtype=torch.long, device=self.device)
            return self.model.compute_logits(self.model.forward_hidden(marker, kv_cache=self.cache)[:, -1])

    @torch.inference_mode()
    def _decode(self) -> torch.Tensor:
        """Feed every resident row its latest token; return next-token logits (B_resident, V)."""
        idx = torch.tensor([[self.generations[row].tokens[-1]] for row in self.resident], dtype=torch.long,
                           device=self.device)  # (B, 1)
        new_lengths = None
        if any(self.done[row] for row in self.resident):  # retire=False: finished rows must not grow
            new_lengths = [0 if self.done[row] else 1 for row in self.resident]
        with self._compute():
            hidden = self.model.forward_hidden(idx, kv_cache=self.cache, new_lengths=new_lengths)
            return self.model.compute_logits(hidden[:, -1])

    def _retire_finished(self):
        """Compact the batch once at least retire_fraction of its rows have finished.

        A compaction copies the whole KV cache (select_rows), about as much memory traffic as 2-3 decode steps,
        so compacting after every single finish costs more than it saves when rows finish one by one (measured
        in dev/LOG.md). Until then finished rows ride along, writing nothing (new_lengths 0).
        """
        keep = [i for i, row in enumerate(self.resident) if not self.done[row]]
        finished = len(self.resident) - len(keep)
        if finished == 0 or finished < self.engine.retire_fraction * len(self.resident):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.select_rows(index)
        self.resident_keys = self.resident_keys.index_select(0, index)
        self.resident = [self.resident[i] for i in keep]

    # -- one step of bookkeeping ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _take_step(self, logits: torch.Tensor, step: int) -> list[tuple[int, int, int]]:
        """Sample a token for every resident row (or take its forced token) and update the row states."""
        uniforms = counter_uniforms(self.resident_keys, step)
        tokens, logprobs = sample_from_logits(logits, uniforms, **self.sampling)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()  # the one host sync per step
        events = []
        for i, row in enumerate(self.resident):
            if self.done[row]:
                continue
            generation = self.generations[row]
            if self.forced[row]:
                token, mask, logprob = self.forced[row].popleft(), 0, 0.0
            else:
                token, mask, logprob = tokens[i], 1, logprobs[i]
            generation.tokens.append(token)
            generation.mask.append(mask)
            generation.logprobs.append(logprob)
            events.append((row, token, mask))
            if mask and token in self.stop_tokens:
                self._finish(row, STOP)
                continue
            if len(generation.tokens) >= self.budgets[row]:
                self._finish(row, LENGTH if self.budgets[row] == self.max_tokens else CONTEXT)
                continue
            if mask and self.tool_tokens is not None:
                self._track_tool_call(row, token)
        return events

    def _track_tool_call(self, row: int, token: int):
        python_start, python_end, output_start, output_end = self.tool_tokens
        tokens = self.generations[row].tokens
        if token == python_start:
            self.python_start[row] = len(tokens)
        elif token == python_end and self.python_start[row] >= 0:
            span = tokens[self.python_start[row]:-1]
            self.python_start[row] = -1
            try:
                expression = self.tokenizer.decode(span)
            except Exception:  # e.g. ids the model has but the tokenizer does not (padded vocab)
                expression = None
            result = calculate(expression)
            output = self.tokenizer.encode(result) if result is not None else []
            self.forced[row].extend([output_start, *output, output_end])

    def _finish(self, row: int, reason: str):
        self.done[row] = True
        self.generations[row].stop_reason = reason
        self.forced[row].clear()


PREFILL_SLACK = 0.25         # a prompt joins a prefill group if it is at most 25% shorter than the group's longest
PREFILL_SLACK_TOKENS = 32    # ... or at most this many tokens shorter (short prompts are cheap to pad)
PREFILL_GROUP_TOKENS = 16384  # padded tokens per prefill forward: bounds activation memory for large batches


def _length_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Split lengths sorted in decreasing order into [start, stop) runs that are cheap to right-pad together."""
    groups, start = [], 0
    while start < len(lengths):
        width, stop = lengths[start], start + 1
        while (stop < len(lengths) and (stop - start + 1) * width <= max(PREFILL_GROUP_TOKENS, width)
               and width - lengths[stop] <= max(PREFILL_SLACK * width, PREFILL_SLACK_TOKENS)):
            stop += 1
        groups.append((start, stop))
        start = stop
    return groups


def _check_prompts(prompts, vocab_size: int, context_len: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts: expected a non-empty list of token-id lists, got {prompts!r:.80}")
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
            raise ValueError(f"prompt {i}: expected a non-empty list of token ids, got {prompt!r:.80}")
        if len(prompt) > context_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, longer than the model context of "
                             f"{context_len} (sequence_len)")
        for j, token in enumerate(prompt):
            if not isinstance(token, numbers.Integral) or isinstance(token, bool) or not 0 <= token < vocab_size:
                raise ValueError(f"prompt {i} token {j} is {token!r}: expected a token id in [0, {vocab_size})")
        checked.append([int(t) for t in prompt])
    return checked
