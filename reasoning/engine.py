"""Batched KV-cache generation: the sampler behind RL rollouts, evaluation and chat.

One `generate` call runs every (prompt, sample) row of a batch:

- **Paged KV cache that grows with need** (`reasoning.gpt.PagedKVCache`). Keys/values live in blocks of
  `block_size` tokens taken from a pool as rows grow and returned when a row finishes, so a long-tailed batch
  holds the tokens its live rows really have, not rows x max_len. The pool grows on demand up to the KV budget
  (`max_kv_tokens`; on CUDA, by default, what KV_MEMORY_FRACTION of the GPU leaves, allocated at once as vLLM does).
- **Continuous batching.** Prompts wait in a queue and are admitted (prefilled) whenever batch slots
  (`max_batch_rows`) and blocks allow, so rows freed by finished ones are refilled at once. When growing rows would
  exceed the budget, the youngest row is preempted: its blocks are freed and it is queued first for recompute
  (a prefill of its prompt + tokens so far), which continues it exactly where it was.
- **Ragged prefill, shared across samples.** Admitted contexts are prefilled right-padded (`new_lengths` = true
  lengths), in groups of similar length so that padding wastes little; the first-token logits come from each row's
  last real position. A prompt's G samples are prefilled once and copy its blocks (GRPO's G rollouts per prompt
  cost one prefill).
- **Row retirement.** Finished rows leave the compute batch at once (a block-table rebuild, no cache copy).
  `retire=False` keeps them riding along, writing nothing, which exists to test that retirement changes nothing.
- **Compiled decode** (`compile_decode`): static shapes — the batch padded to a power of two, every row reading its
  whole block table — so torch.compile captures one graph per bucket (CUDA graphs on a GPU).
- **A dense mirror on CPU** (`kv_mirror`): SDPA cannot read pages, so on a CPU the cache keeps a dense copy of
  the compute batch per layer, rebuilt by one gather when the batch changes and otherwise only written with the
  new tokens; a decode step then reads each run of rows' keys as a view instead of gathering blocks.
- **Per-row, counter-based randomness.** The uniform that picks row r's t-th token is a hash of
  (seed, prompt_index, sample_index, t): a row's samples do not depend on which other rows share the batch,
  on retirement, admission order, preemption, or on the device. `seed` may also be a list with one seed per prompt; rows are then keyed by
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
  and takes N + 2 slots of the context. `_latent_span` (run after each admission's prefill) is the whole of
  it; latent mode holds every row's whole span in the cache (no preemption).

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
from reasoning.gpt import FP8_KV_DTYPE, PagedKVCache
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


def counter_uniforms(keys: torch.Tensor, counter) -> torch.Tensor:
    """(B, 2) int64 keys, step counter (an int, or (B,) int64: one per row) -> (B,) float64 uniforms in [0, 1)
    with 53 random bits."""
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

def special_token_id(tokenizer, name: str) -> int | None:
    """The id of special token `name`, or None where the tokenizer (or its absence) has no such token."""
    if tokenizer is None or not hasattr(tokenizer, "encode_special"):
        return None
    try:
        return int(tokenizer.encode_special(name))
    except (KeyError, ValueError):
        return None


# memory of the engine's KV cache
BLOCK_SIZE = 16  # tokens per KV block: small blocks waste little at a row's end; 16 is vLLM's default too
KV_MEMORY_FRACTION = 0.9  # vLLM's gpu_memory_utilization: the share of the GPU the process may fill, KV pool included


def kv_bytes_per_token(config, kv_dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in the cache, all layers (FP8 adds a float32 scale per kv head)."""
    element = torch.empty(0, dtype=kv_dtype).element_size()
    extra = 4 if kv_dtype == FP8_KV_DTYPE else 0
    return 2 * config.n_layer * config.n_kv_head * (config.get_head_dim() * element + extra)


def activation_reserve_bytes(config, rows: int) -> int:
    """What a generate call needs beside its KV pool, generously: one prefill group's MLP/attention temporaries
    (PREFILL_GROUP_TOKENS tokens, fp32 at worst) and a decode step's logits with the sampler's float64 CDF."""
    width = config.get_intermediate_size()
    prefill = PREFILL_GROUP_TOKENS * (4 * width + 8 * config.n_embd) * 4
    sampler = rows * config.vocab_size * 24
    return prefill + sampler


def kv_budget_tokens(config, gpu_total_bytes: int, in_use_bytes: int, rows: int, kv_dtype: torch.dtype,
                     fraction: float = KV_MEMORY_FRACTION) -> int:
    """The default KV budget on a GPU, as vLLM picks it: fraction x the device's memory, minus what is in use
    (weights, optimizer state) and the call's activations, divided by the bytes of one cached token."""
    spare = fraction * gpu_total_bytes - in_use_bytes - activation_reserve_bytes(config, rows)
    return max(0, int(spare) // kv_bytes_per_token(config, kv_dtype))


class Engine:
    """Generation for a GPT (reasoning.gpt) and its tokenizer (None: no tool calls, no default stop tokens).

    Memory and batching (keyword arguments, also attributes):
      max_kv_tokens   KV-cache budget in tokens (all rows together). None: on CUDA what KV_MEMORY_FRACTION of the
                      device leaves (kv_budget_tokens); elsewhere what every row could need (the pool still grows
                      only as rows grow). When growing rows would exceed it, the youngest row is preempted and
                      later recomputed (token-identical: its randomness is counter-based).
      max_batch_rows  rows decoded together; None = no limit but the budget. Finished rows free their slot and
                      blocks, and waiting prompts are admitted into them (continuous batching).
      block_size      tokens per KV block.
      kv_dtype        None = the compute dtype; torch.bfloat16; reasoning.gpt.FP8_KV_DTYPE (e4m3, per-token,
                      per-head scales).
      compile_decode  run the decode step through torch.compile with static shapes: the batch padded to a power
                      of two (padding rows write to the scratch block and are dropped) and every row reading its
                      whole block table; on CUDA in mode "reduce-overhead" (CUDA graphs). A backend name
                      (e.g. "aot_eager") compiles with that backend.
      latent_steps    the latent mode (Coconut) every call uses unless it passes its own (a chat_latent
                      checkpoint's count); module docstring.
      kv_mirror       on the SDPA path, keep a dense copy of the compute batch's keys/values per layer, written
                      incrementally, instead of gathering the rows' blocks per layer per step (PagedKVCache).
                      Faster (the gather was ~25% of CPU decode time) for rows x width more memory. None = on
                      for a CPU model (speed binds, memory does not), off elsewhere; never used by FA3 or FP8.
    """

    def __init__(self, model, tokenizer=None, *, max_kv_tokens: int | None = None, max_batch_rows: int | None = None,
                 block_size: int = BLOCK_SIZE, kv_dtype: torch.dtype | None = None, compile_decode=False,
                 latent_steps: int | None = None, kv_mirror: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.latent_steps = latent_steps
        special = {name: special_token_id(tokenizer, name) for name in DEFAULT_STOP_NAMES + TOOL_NAMES}
        self.default_stop_tokens = [special[n] for n in DEFAULT_STOP_NAMES if special[n] is not None]
        tool_ids = [special[n] for n in TOOL_NAMES]
        self.tool_tokens = tool_ids if None not in tool_ids else None  # python_start, python_end, output_start/end
        for name, value in (("max_kv_tokens", max_kv_tokens), ("max_batch_rows", max_batch_rows)):
            if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name}={value!r}: expected None or a positive integer")
        if not isinstance(block_size, numbers.Integral) or block_size < 1:
            raise ValueError(f"block_size={block_size!r}: expected a positive integer")
        if kv_dtype not in (None, torch.bfloat16, torch.float16, torch.float32, FP8_KV_DTYPE):
            raise ValueError(f"kv_dtype={kv_dtype!r}: expected None, torch.bfloat16, torch.float16, torch.float32 "
                             "or torch.float8_e4m3fn")
        if kv_mirror not in (None, True, False):
            raise ValueError(f"kv_mirror={kv_mirror!r}: expected None, True or False")
        self.max_kv_tokens, self.max_batch_rows, self.kv_mirror = max_kv_tokens, max_batch_rows, kv_mirror
        self.block_size, self.kv_dtype, self.compile_decode = int(block_size), kv_dtype, compile_decode
        self._compiled = None
        self._static_pool = None  # compiled decode keeps its KV pool between calls
        self.last_stats = {}  # of the latest generate call: peak_kv_bytes, preemptions, ...

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

    def decode_function(self):
        """model (B, 1) ids + a static PagedKVCache -> last-position logits (B, V), compiled once per engine."""
        if self._compiled is None:
            def decode(idx, cache):
                return self.model.compute_logits(self.model.forward_hidden(idx, kv_cache=cache)[:, -1])
            device = next(self.model.parameters()).device
            # one graph per batch bucket (fullgraph: a graph break would split the CUDA graph)
            options = dict(dynamic=False, fullgraph=True)
            if isinstance(self.compile_decode, str):
                self._compiled = torch.compile(decode, backend=self.compile_decode, **options)
            elif device.type == "cuda":
                self._compiled = torch.compile(decode, mode="reduce-overhead", **options)
            else:
                self._compiled = torch.compile(decode, **options)
        return self._compiled


def _stream_events(rollout: "_Rollout"):
    try:
        for events in rollout.steps():
            yield from events
    finally:
        rollout.release()  # cancelled or done: drop the KV cache now rather than when the generator is collected


def _bucket(rows: int) -> int:
    """Compiled decode batch sizes: powers of two, so a shrinking batch reuses a handful of graphs."""
    return 1 << max(0, rows - 1).bit_length()


class _Rollout:
    """The state of one generate call: rows, their budgets and tool state, the KV cache of resident rows.

    A row is waiting (its prompt, or a preempted row, in `waiting`), resident (in the compute batch, its keys in
    `blocks[row]`) or done. Each iteration samples a token for every resident row, retires finished rows, decodes
    the resident rows and admits waiting ones (prefill) while slots and blocks allow.
    """

    def __init__(self, engine: Engine, prompts, num_samples, max_tokens, temperature, top_k, top_p, min_p,
                 seed, stop_tokens, retire, latent_steps=None):
        model = engine.model
        config = model.config
        self.model, self.engine = model, engine
        self.max_seq_len = config.max_seq_len
        vocab_size = config.vocab_size
        self.prompts = _check_prompts(prompts, vocab_size, self.max_seq_len)
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
        n = len(self.generations)
        # a row may produce max_tokens tokens, or fewer if prompt + completion would exceed the model's context
        self.budgets = [min(self.max_tokens,
                            self.max_seq_len - len(self.prompts[g.prompt_index]) - self.latent_slots)
                        for g in self.generations]
        self.keys = [row_key(*row_seeds[g.prompt_index], g.sample_index) for g in self.generations]
        self.done = [False] * n
        self.python_start = [-1] * n  # where the open tool call's expression begins
        self.forced = [deque() for _ in self.generations]  # tool-output tokens still to force, per row
        self.blocks = [[] for _ in self.generations]  # KV blocks of each resident row
        self.cached = [0] * n  # tokens of each resident row in the cache (its next write slot)
        self.admitted_at = [0] * n  # admission order: the youngest resident row is preempted first
        self.admissions = 0
        self.waiting = deque()  # ("prompt", p): a prompt's G rows; ("row", r): a preempted row to recompute
        self.resident = []  # row ids in the compute batch, in cache order
        self.resident_keys = None  # (len(resident), 2) random-stream keys of those rows
        self.batch_dirty = True  # resident changed: the cache's batch (tables, lengths) must be rebuilt
        self.cache = None
        self.stats = engine.last_stats = dict(peak_kv_bytes=0, peak_kv_tokens=0, preemptions=0, admissions=0,
                                              max_kv_tokens=0)

        self.device = next(model.parameters()).device
        # the dtype keys/values are produced in: bf16/fp16 under GPU autocast, else the weights' dtype (fp32 on CPU)
        compute_dtype = get_compute_dtype(self.device) if self.device.type == "cuda" else None
        self.autocast_dtype = compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else None
        self.dtype = self.autocast_dtype or model.lm_head.weight.dtype
        self.kv_dtype = engine.kv_dtype or self.dtype
        # the pool at its full budget at once: on CUDA (static addresses, no regrowth copies, as vLLM) and for a
        # compiled decode (a fixed shape); elsewhere it grows with the rows
        self.preallocate = self.device.type == "cuda" or bool(engine.compile_decode)

    # -- driving --------------------------------------------------------------------------------------------

    def steps(self):
        """Run generation; yield the (row, token, mask) events of each step."""
        for row, budget in enumerate(self.budgets):
            if budget <= 0:  # the prompt already fills the context
                self._finish(row, CONTEXT)
        if all(self.done):
            return
        G = self.num_samples
        self.waiting.extend(("prompt", p) for p in range(len(self.prompts)) if not self.done[p * G])
        self._open_cache()
        logits = self._admit()
        while True:
            events = self._take_step(logits)
            yield events
            self._retire_finished()
            if not self.resident and not self.waiting:
                break
            parts = [self._decode(), self._admit()]
            logits = torch.cat([p for p in parts if p is not None])
        self.release()

    def release(self):
        self.cache = None
        self.resident_keys = None

    def _compute(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return autocast_context(self.device, self.autocast_dtype)

    def _open_cache(self):
        """A block pool bounded by the budget; on CUDA allocated at once (static addresses), else grown on demand."""
        engine, config, bs = self.engine, self.model.config, self.engine.block_size
        need = sum(-(-(len(self.prompts[g.prompt_index]) + self.latent_slots + b) // bs) * bs
                   for g, b, d in zip(self.generations, self.budgets, self.done) if not d)  # every row at its end
        budget = engine.max_kv_tokens
        if self.latent_steps is not None:
            # latent mode never preempts: a recompute would have to run the latent span again, not just a prefill
            budget = None
        elif budget is None and self.device.type == "cuda":
            budget = kv_budget_tokens(config, torch.cuda.get_device_properties(self.device).total_memory,
                                      torch.cuda.memory_allocated(self.device), len(self.generations), self.kv_dtype)
        need += self.engine.block_size * len(self.generations)  # the admission watermark: a spare block per row
        budget = need if budget is None else min(budget, need)
        self.stats["max_kv_tokens"] = budget
        max_blocks = 1 + max(1, budget // bs)
        pool = engine._static_pool
        if engine.compile_decode and pool is not None and pool.max_blocks >= max_blocks and (
                pool.kv_dtype, pool.dtype) == (self.kv_dtype, self.dtype):
            # compiled decode: the same pool (shapes, addresses) call after call; a new shape would recompile
            pool.reset()
            self.cache = pool
            return
        # compiled decode needs a pool of fixed shape (and, for CUDA graphs, fixed addresses): allocated at once
        mirror = self.device.type == "cpu" if engine.kv_mirror is None else engine.kv_mirror
        self.cache = PagedKVCache.for_model(config, bs, max_blocks, device=self.device, dtype=self.dtype,
                                            kv_dtype=self.kv_dtype, initial_blocks=64, preallocate=self.preallocate,
                                            mirror=mirror)
        if engine.compile_decode:
            engine._static_pool = self.cache
            if self.device.type == "cuda":  # CUDA graphs may then write the pool in place (unverified on a GPU)
                for pool in (self.cache.k, self.cache.v, self.cache.k_scale, self.cache.v_scale):
                    if pool is not None:
                        torch._dynamo.mark_static_address(pool)

    # -- admission and memory -------------------------------------------------------------------------------

    def _unit_rows(self, unit) -> list[int]:
        kind, index = unit
        if kind == "row":
            return [index]
        G = self.num_samples
        return [row for row in range(index * G, index * G + G) if not self.done[row]]

    def _context(self, row: int) -> list[int]:
        """What a row's cache must hold before its next token is sampled: its prompt and every token so far."""
        return self.prompts[self.generations[row].prompt_index] + self.generations[row].tokens

    @torch.inference_mode()
    def _admit(self) -> torch.Tensor | None:
        """Prefill waiting units (oldest first) while batch slots and KV blocks allow; their first-token logits
        (rows in admission order), or None when nothing was admitted."""
        bs, cache = self.engine.block_size, self.cache
        slots = self.engine.max_batch_rows
        admitted = []  # (rows, context, blocks per row)
        running, taken = len(self.resident), 0
        while self.waiting:
            rows = self._unit_rows(self.waiting[0])
            context = self._context(rows[0])
            # its context (+ the latent span in latent mode) and the slot of its next token
            per_row = -(-(len(context) + self.latent_slots + 1) // bs)
            if slots is not None and running + len(rows) > slots and running > 0:
                break
            available = cache.available_blocks() - taken
            # keep one free block per running row, so that the next decode step does not preempt at once
            if len(rows) * per_row + running + len(rows) > available:
                if running == 0 and len(rows) * per_row > available:
                    raise ValueError(f"max_kv_tokens={self.stats['max_kv_tokens']}: too small for "
                                     f"{len(rows)} row(s) of {len(context)} tokens; raise it")
                if running > 0:
                    break
            self.waiting.popleft()
            admitted.append((rows, context, per_row))
            running += len(rows)
            taken += len(rows) * per_row
        if not admitted:
            return None
        # one allocation for the whole admission: the pool grows (a copy on CPU) at most once
        blocks = cache.allocate(taken)
        for rows, _, per_row in admitted:
            for row in rows:
                self.blocks[row], blocks = blocks[:per_row], blocks[per_row:]
                self.admitted_at[row] = self.admissions
                self.admissions += 1
        admitted = [(rows, context) for rows, context, _ in admitted]
        self.stats["admissions"] += len(admitted)
        self._track_memory()
        logits = self._prefill(admitted)
        self.resident += [row for rows, _ in admitted for row in rows]
        self.batch_dirty = True
        return logits

    def _prefill(self, admitted) -> torch.Tensor:
        """Prefill each admitted context once, in groups of similar length (right-padded to the group's longest:
        padding wastes little even when lengths vary 10x); a prompt's G rows then copy its blocks. Returns the
        last-position logits, one per admitted row."""
        config, bs, cache = self.model.config, self.engine.block_size, self.cache
        order = sorted(range(len(admitted)), key=lambda i: -len(admitted[i][1]))
        first = torch.empty(len(admitted), config.vocab_size, device=self.device)
        for start, stop in _length_groups([len(admitted[i][1]) for i in order]):
            group = [admitted[i] for i in order[start:stop]]
            width = len(group[0][1])
            idx = torch.tensor([context + [0] * (width - len(context)) for _, context in group], dtype=torch.long,
                               device=self.device)  # (n, width) right-padded
            lengths = [len(context) for _, context in group]
            columns = -(-width // bs)
            cache.static = False
            cache.set_batch([self.blocks[rows[0]][:columns] for rows, _ in group], [0] * len(group),
                            table_width=columns)
            with self._compute():
                hidden = self.model.forward_hidden(idx, kv_cache=cache, new_lengths=lengths)  # (n, width, D)
                last = hidden[torch.arange(len(group), device=self.device),
                              torch.tensor(lengths, device=self.device) - 1]  # (n, D)
                first[torch.tensor(order[start:stop], device=self.device)] = self.model.compute_logits(last)
        if self.latent_steps is not None:
            first = self._latent_span(admitted)
        for rows, context in admitted:
            cached = len(context) + self.latent_slots
            filled = -(-cached // bs)
            for row in rows:
                self.cached[row] = cached
                if row != rows[0]:
                    cache.copy_blocks(self.blocks[rows[0]][:filled], self.blocks[row][:filled])
        self.batch_dirty = True
        which = [i for i, (rows, _) in enumerate(admitted) for _ in rows]  # each row's context
        return first.index_select(0, torch.tensor(which, device=self.device))

    def _preempt(self, row: int):
        """Free a resident row's blocks and queue it first for recompute (prefill of its prompt + tokens)."""
        self.cache.free(self.blocks[row])
        self.blocks[row], self.cached[row] = [], 0
        self.resident.remove(row)
        self.waiting.appendleft(("row", row))
        self.stats["preemptions"] += 1
        self.batch_dirty = True

    def _reserve_next_slots(self) -> list[tuple[int, int]]:
        """Give every live resident row a block for its next slot, preempting the youngest rows while the budget
        cannot; returns the (row, new block column) pairs that were added."""
        bs, added = self.engine.block_size, []
        needy = [row for row in self.resident if not self.done[row] and self.cached[row] >= len(self.blocks[row]) * bs]
        preempted = set()
        for row in sorted(needy, key=lambda r: self.admitted_at[r]):  # oldest first
            while row not in preempted:
                block = self.cache.allocate(1)
                if block is not None:
                    self.blocks[row] += block
                    added.append((row, len(self.blocks[row]) - 1))
                    break
                youngest = max((r for r in self.resident if not self.done[r]), key=lambda r: self.admitted_at[r])
                self._preempt(youngest)
                preempted.add(youngest)
        self._track_memory()
        return [(row, column) for row, column in added if row not in preempted]

    def _track_memory(self):
        cache, stats = self.cache, self.stats
        in_use = cache.num_blocks - 1 - len(cache.free_blocks)
        stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], cache.pool_bytes + cache.mirror_bytes)
        stats["peak_kv_tokens"] = max(stats["peak_kv_tokens"], in_use * self.engine.block_size)

    def _sync_batch(self, added: list[tuple[int, int]], static: bool):
        """Point the cache's batch at the resident rows: rebuilt when they changed, else only new table entries."""
        cache, bs = self.cache, self.engine.block_size
        if self.batch_dirty or static != cache.static:
            # rows sorted by length: runs of similar length then read few keys beyond their own (key_spans)
            self.resident.sort(key=lambda r: (-self.cached[r], r))
            tables = [self.blocks[row] for row in self.resident]
            lengths = [self.cached[row] for row in self.resident]
            if static:
                width = -(-self.max_seq_len // bs)
                cache.set_batch(tables, lengths, batch_size=_bucket(len(tables)), table_width=width)
            else:  # finished rows riding along (retire=False) still write, at a slot past their blocks
                width = max(max(len(t), self.cached[row] // bs + 1) for t, row in zip(tables, self.resident))
                cache.set_batch(tables, lengths, table_width=width + (-width) % 8)  # slack: rebuilt less often
            cache.static = static
            self.resident_keys = keys_tensor([self.keys[row] for row in self.resident], self.device)
            self.batch_dirty = False
            return
        position = {row: i for i, row in enumerate(self.resident)}
        if any(column >= cache.block_table.size(1) for _, column in added):
            self.batch_dirty = True
            return self._sync_batch([], static)
        cache.set_blocks([(position[row], column, self.blocks[row][column]) for row, column in added])

    # -- latent mode (Coconut) ------------------------------------------------------------------------------

    def _check_latent(self, latent_steps) -> tuple[int | None, int]:
        """(latent steps or None, context slots the latent span takes)."""
        if latent_steps is None:
            return None, 0
        if not isinstance(latent_steps, numbers.Integral) or isinstance(latent_steps, bool) or latent_steps < 0:
            raise ValueError(f"latent_steps={latent_steps!r}: expected None or an integer >= 0")
        self.latent_ids = [special_token_id(self.tokenizer, name) for name in (START_LATENT, END_LATENT)]
        if None in self.latent_ids:
            raise ValueError("latent_steps: the tokenizer has no <|start-latent|>/<|end-latent|> tokens "
                             "(reasoning.latent.with_latent_tokens)")
        return int(latent_steps), int(latent_steps) + 2

    def _latent_span(self, admitted) -> torch.Tensor:
        """Each freshly prefilled context (one per admitted unit, in its first row's blocks) takes
        <|start-latent|>, latent_steps hidden states fed back, and <|end-latent|>; a prompt's G rows then copy the
        blocks. Returns the logits of the first token after the span, one per admitted unit (n, V)."""
        start, end = self.latent_ids
        bs, cache, n = self.engine.block_size, self.cache, len(admitted)
        lengths = [len(context) for _, context in admitted]
        columns = -(-(max(lengths) + self.latent_slots) // bs)
        cache.static = False
        cache.set_batch([self.blocks[rows[0]][:columns] for rows, _ in admitted], lengths, table_width=columns)
        with self._compute():
            marker = torch.full((n, 1), start, dtype=torch.long, device=self.device)
            hidden = self.model.forward_hidden(marker, kv_cache=cache)[:, 0]  # (n, D)
            run_latent_steps(self.model, cache, hidden, self.latent_steps)
            marker = torch.full((n, 1), end, dtype=torch.long, device=self.device)
            return self.model.compute_logits(self.model.forward_hidden(marker, kv_cache=cache)[:, -1])

    @torch.inference_mode()
    def _decode(self) -> torch.Tensor | None:
        """Feed every resident row its latest token; return next-token logits (B_resident, V)."""
        added = self._reserve_next_slots()
        if not self.resident:
            return None
        static = bool(self.engine.compile_decode)
        self._sync_batch(added, static)
        B, cache = len(self.resident), self.cache
        new_lengths = [0 if self.done[row] else 1 for row in self.resident]  # finished rows (retire=False) stay put
        tokens = [self.generations[row].tokens[-1] for row in self.resident]
        if static:
            pad = cache.batch_size - B
            idx = torch.tensor(tokens + [0] * pad, dtype=torch.long, device=self.device)[:, None]
            with self._compute():
                logits = self.engine.decode_function()(idx, cache)[:B]
            cache.commit(new_lengths + [0] * pad)
        else:
            idx = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
            with self._compute():
                hidden = self.model.forward_hidden(idx, kv_cache=cache, new_lengths=new_lengths)
                logits = self.model.compute_logits(hidden[:, -1])
        for row, n in zip(self.resident, new_lengths):
            self.cached[row] += n
        self._track_memory()  # the SDPA mirror is built during the forward
        return logits

    def _retire_finished(self):
        """Finished rows leave the batch and return their blocks (a block-table rebuild, no copy of the cache).
        With retire=False they ride along, writing nothing, until every resident row has finished."""
        finished = [row for row in self.resident if self.done[row]]
        if not finished or (not self.retire and len(finished) < len(self.resident)):
            return
        for row in finished:
            self.cache.free(self.blocks[row])
            self.blocks[row] = []
        self.resident = [row for row in self.resident if not self.done[row]]
        self.batch_dirty = True

    # -- one step of bookkeeping ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _take_step(self, logits: torch.Tensor) -> list[tuple[int, int, int]]:
        """Sample a token for every resident row (or take its forced token) and update the row states.

        Row r's t-th token uses counter t = len(tokens so far): the same draw whenever and wherever the row runs.
        """
        if self.batch_dirty or self.resident_keys is None or len(self.resident_keys) != len(self.resident):
            self.resident_keys = keys_tensor([self.keys[row] for row in self.resident], self.device)
        counters = torch.tensor([len(self.generations[row].tokens) for row in self.resident], dtype=torch.int64,
                                device=self.device)
        uniforms = counter_uniforms(self.resident_keys, counters)
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


def _check_prompts(prompts, vocab_size: int, max_seq_len: int) -> list[list[int]]:
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
        if len(prompt) > max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, longer than the model context of "
                             f"{max_seq_len} (max_seq_len)")
        for j, token in enumerate(prompt):
            if not isinstance(token, numbers.Integral) or isinstance(token, bool) or not 0 <= token < vocab_size:
                raise ValueError(f"prompt {i} token {j} is {token!r}: expected a token id in [0, {vocab_size})")
        checked.append([int(t) for t in prompt])
    return checked
