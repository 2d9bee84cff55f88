"""GPT: the decoder-only transformer that every stage trains and samples from.

Defaults follow modern small-model practice (nanochat, modded-nanogpt): rotary position embeddings, QK-norm,
parameter-free RMSNorm, ReLU² MLP, grouped-query attention, untied input/output embeddings, a tanh logit
softcap and no biases. Switches in `GPTConfig` turn a block into the Llama/Qwen shape (SwiGLU, weighted RMSNorm,
q/k-norm gains, q/k/v biases, tied embeddings, rope_theta) so Hugging Face checkpoints map onto it name by name.
Rotary uses the HF "rotate_half" pairing (dimension i rotates with i + head_dim/2), so HF q/k weights load
without a permutation.

`KVCache` keeps per-layer keys/values with per-row lengths: the engine prefills ragged prompts right-padded in
one batch (`new_lengths` = true lengths) and then decodes one token per row, each row at its own position.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from reasoning.checkpointing import checkpointed_block
from reasoning.flash_attention import (CACHE_LAYOUTS, attention, attention_with_cache, attention_with_page_table,
                                      cache_layout, fa3_takes_cache, key_spans, sdpa_over_slots)

_MLP_KINDS = ("relu2", "swiglu")
_LOSS_REDUCTIONS = ("mean", "sum", "none")
_ROTARY_MARGIN = 2  # rotary tables cover this many times max_seq_len before they must be regrown
_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class GPTConfig:
    max_seq_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    softcap: float | None = 15.0  # tanh cap on logits; None or 0 disables
    rope_theta: float = 10000.0
    window: int | None = None  # sliding attention window (tokens seen, self included) in every layer
    # interop switches (HF Llama/Qwen shapes)
    mlp: str = "relu2"  # "relu2" | "swiglu"
    intermediate_size: int | None = None  # MLP width; default 4*n_embd (relu2) or ~8/3*n_embd (swiglu)
    head_dim: int | None = None  # default n_embd // n_head
    norm_weight: bool = False  # learned gain in the block/final RMSNorms
    tie_embeddings: bool = False
    qk_norm: bool = True
    qk_norm_weight: bool = False  # learned per-head_dim gain in the q/k norms (Qwen3)
    attn_bias: bool = False  # biases on q/k/v projections (Qwen2)
    rms_eps: float = 1e-6
    # Llama 3.x long-context frequency scaling ({"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}); None = plain RoPE
    rope_scaling: dict | None = None

    def __post_init__(self):
        for name in ("max_seq_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r}: expected a positive integer")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head}: expected a divisor of n_head={self.n_head}")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd}: expected a multiple of n_head={self.n_head} "
                             "(or set head_dim)")
        if self.get_head_dim() < 2 or self.get_head_dim() % 2 != 0:
            raise ValueError(f"GPTConfig head_dim={self.get_head_dim()}: rotary embeddings need an even head_dim")
        if self.mlp not in _MLP_KINDS:
            raise ValueError(f"GPTConfig.mlp={self.mlp!r}: expected one of {', '.join(_MLP_KINDS)}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"GPTConfig.intermediate_size={self.intermediate_size}: expected a positive integer")
        if self.window is not None and self.window < 1:
            raise ValueError(f"GPTConfig.window={self.window}: expected None or a positive number of tokens")
        if self.softcap is not None and self.softcap < 0:
            raise ValueError(f"GPTConfig.softcap={self.softcap}: expected None, 0 (off) or a positive cap")
        if self.rope_theta <= 0:
            raise ValueError(f"GPTConfig.rope_theta={self.rope_theta}: expected a positive base")
        if self.qk_norm_weight and not self.qk_norm:
            raise ValueError("GPTConfig.qk_norm_weight=True needs qk_norm=True")
        if self.rope_scaling is not None:
            missing = sorted(set(_ROPE_SCALING_KEYS) - set(self.rope_scaling))
            if missing or set(self.rope_scaling) - set(_ROPE_SCALING_KEYS):
                raise ValueError(f"GPTConfig.rope_scaling={self.rope_scaling!r}: expected exactly the keys "
                                 f"{', '.join(_ROPE_SCALING_KEYS)}")

    def get_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    def get_intermediate_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp == "swiglu":  # same parameter count as a 4x two-matrix MLP, rounded for matmul shapes
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


def config_from_depth(depth: int, vocab_size: int, max_seq_len: int = 2048, aspect_ratio: int = 64,
                      head_dim: int | None = None, **overrides) -> GPTConfig:
    """The single size dial: n_embd ≈ depth * aspect_ratio, rounded up to a multiple of head_dim.

    head_dim defaults to 128; tiny CPU models get the largest power of two that still leaves >= 2 heads.
    Any GPTConfig field can be overridden (n_kv_head, mlp, window, ...).
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r}: expected a positive integer")
    if aspect_ratio < 1:
        raise ValueError(f"aspect_ratio={aspect_ratio}: expected a positive integer")
    raw_width = depth * aspect_ratio
    if head_dim is None:
        head_dim = 128
        while head_dim > 2 and raw_width < 2 * head_dim:
            head_dim //= 2
    n_embd = head_dim * math.ceil(raw_width / head_dim)
    n_head = n_embd // head_dim
    fields = dict(max_seq_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                  n_kv_head=n_head, n_embd=n_embd)
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"config_from_depth: unknown overrides {unknown}; expected GPTConfig fields")
    fields.update(overrides)
    return GPTConfig(**fields)


# ----------------------------------------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    """RMSNorm over the last dim. Parameter-free by default; Llama/Qwen checkpoints carry a learned gain."""

    def __init__(self, dim: int, eps: float, weighted: bool):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim)) if weighted else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


def rotary_tables(length: int, head_dim: int, theta: float, device,
                  scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim // 2) in fp32 for positions 0..length-1.

    Angles are computed in float64 on the CPU (exact at long positions, and MPS has no float64), then moved.
    `scaling` (Llama 3.x): wavelengths longer than original_ctx / low_freq_factor are stretched by `factor`,
    those shorter than original_ctx / high_freq_factor are kept, and the band between is interpolated.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    if scaling is not None:
        factor, original_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        blend = ((original_ctx / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: stretch, 1: keep
        inv_freq = (1 - blend) * inv_freq / factor + blend * inv_freq
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device="cpu"), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) with the rotate_half pairing: dim i with dim i + D/2. cos/sin (.., T, 1, D/2)."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.get_head_dim()
        self.window = config.window
        d, hd = config.n_embd, self.head_dim
        self.c_q = nn.Linear(d, self.n_head * hd, bias=config.attn_bias)
        self.c_k = nn.Linear(d, self.n_kv_head * hd, bias=config.attn_bias)
        self.c_v = nn.Linear(d, self.n_kv_head * hd, bias=config.attn_bias)
        self.c_proj = nn.Linear(self.n_head * hd, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_eps, config.qk_norm_weight)
            self.k_norm = RMSNorm(hd, config.rms_eps, config.qk_norm_weight)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, kv_cache: "KVCache | None" = None, spans=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:  # per head, before rotary (Qwen3 order; matters once the norms have gains)
            # CUDA autocast runs rms_norm in fp32: back to v's dtype, or attention would get fp32 q/k beside a
            # bf16 v and fall back from FA3 (and read a bf16 KV cache through fp32 copies)
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is None:
            y = attention(q, k, v, causal=True, window=self.window)
        else:  # KVCache or PagedKVCache: writes k/v at each row's next slots, attends to the row's cache
            y = kv_cache.attend(self.layer_idx, q, k, v, self.window, spans)
        return self.c_proj(y.reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """ReLU² (default) or SwiGLU (silu(gate) * up, Llama/Qwen)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        width = config.get_intermediate_size()
        self.c_fc = nn.Linear(config.n_embd, width, bias=False)  # "up" in HF naming
        self.c_gate = nn.Linear(config.n_embd, width, bias=False) if config.mlp == "swiglu" else None
        self.c_proj = nn.Linear(width, config.n_embd, bias=False)  # "down"

    def forward(self, x):
        h = self.c_fc(x)
        h = F.silu(self.c_gate(x)) * h if self.c_gate is not None else F.relu(h).square()
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.rms_eps, config.norm_weight)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.rms_eps, config.norm_weight)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, spans=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, spans)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------------------------
# KV cache

class KVCache:
    """Per-layer key/value buffers with a valid length per row.

    k, v: (n_layer, B, n_kv_head, max_len, head_dim) in the "bhsd" layout (SDPA), or (n_layer, B, max_len,
    n_kv_head, head_dim) in "bshd" (FA3); the layout follows the attention backend for the cache's device and
    dtype (flash_attention.cache_layout) unless given. lengths: (B,) int32. A cached forward of T tokens writes
    row b at slots lengths[b] .. lengths[b]+T-1 (rotary positions = slot indices), then lengths += new_lengths
    (default T). Ragged prompts are prefilled right-padded with new_lengths = true lengths; the padding slots
    hold junk that is never attended to by real tokens and is overwritten by the next decode steps.

    The host keeps an upper bound on each row's length (`bounds`; exact when new_lengths are given as a list),
    so a forward can trim the keys it reads per run of rows without a device sync.
    """

    def __init__(self, batch_size: int, n_layer: int, n_kv_head: int, head_dim: int, max_len: int,
                 device=None, dtype: torch.dtype = torch.float32, layout: str | None = None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache: batch_size={batch_size} and max_len={max_len} must be positive")
        if layout is None:
            layout = cache_layout(device if device is not None else "cpu", dtype)
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"KVCache: layout={layout!r}, expected one of {', '.join(CACHE_LAYOUTS)}")
        self.layout = layout
        if layout == "bhsd":
            shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        else:
            shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        # zeros, not empty: masked-out slots still enter the softmax-weighted sum, and 0 * NaN would poison it
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.int32)
        self.bounds = [0] * batch_size  # host-side upper bound on lengths[b]

    @classmethod
    def for_model(cls, config: GPTConfig, batch_size: int, max_len: int, device=None,
                  dtype: torch.dtype = torch.float32, layout: str | None = None) -> "KVCache":
        return cls(batch_size, config.n_layer, config.n_kv_head, config.get_head_dim(), max_len, device, dtype,
                   layout)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3 if self.layout == "bhsd" else 2)

    @property
    def max_filled(self) -> int:
        """An upper bound on lengths.max(), known on the host."""
        return max(self.bounds)

    def heads_first(self, buffer: torch.Tensor) -> torch.Tensor:
        """k or v viewed as (n_layer, B, n_kv_head, max_len, head_dim) whatever the layout (a view, no copy)."""
        return buffer if self.layout == "bhsd" else buffer.transpose(2, 3)

    def reserve(self, num_new: int) -> list[tuple[int, int, int]]:
        """Check that num_new more slots fit in every row; return runs of rows (start, stop, key bound) whose
        keys after writing them lie below the bound (flash_attention.key_spans)."""
        if self.max_filled + num_new > self.max_len:
            self.bounds = self.lengths.tolist()  # exact values (a device sync), only when close to full
            if self.max_filled + num_new > self.max_len:
                raise ValueError(f"KVCache full: a row holds {self.max_filled} tokens and {num_new} more would "
                                 f"exceed max_len={self.max_len}")
        return key_spans([bound + num_new for bound in self.bounds])

    def advance(self, num_new: int, new_lengths=None) -> None:
        """Commit a forward of num_new slots per row, of which new_lengths[b] (default all) are real tokens.

        new_lengths as a list keeps the host bounds exact; as a tensor they grow by num_new (no device sync).
        """
        if new_lengths is None:
            self.lengths += num_new
            self.bounds = [bound + num_new for bound in self.bounds]
            return
        host = list(new_lengths) if isinstance(new_lengths, (list, tuple)) else None
        new_lengths = torch.as_tensor(new_lengths, dtype=torch.int32, device=self.lengths.device)
        if new_lengths.shape != self.lengths.shape:
            raise ValueError(f"new_lengths has shape {tuple(new_lengths.shape)}; expected ({self.batch_size},)")
        self.lengths += new_lengths
        if host is None:
            self.bounds = [bound + num_new for bound in self.bounds]
        else:
            self.bounds = [bound + int(n) for bound, n in zip(self.bounds, host)]

    def write_rows(self, start: int, other: "KVCache") -> None:
        """Copy all of `other` (keys, values, lengths) into rows start.. and its first other.max_len slots."""
        stop = start + other.batch_size
        if stop > self.batch_size or other.max_len > self.max_len or other.k.shape[0] != self.k.shape[0]:
            raise ValueError(f"write_rows: a cache of {other.batch_size} rows x {other.max_len} slots does not fit "
                             f"at row {start} of one with {self.batch_size} rows x {self.max_len} slots")
        width = other.max_len
        self.heads_first(self.k)[:, start:stop, :, :width] = other.heads_first(other.k)
        self.heads_first(self.v)[:, start:stop, :, :width] = other.heads_first(other.v)
        self.lengths[start:stop] = other.lengths
        self.bounds[start:stop] = other.bounds

    def select_rows(self, index) -> None:
        """Keep/reorder rows in place (row retirement, compaction): row i becomes old row index[i]."""
        host = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        index = torch.as_tensor(host, dtype=torch.long, device=self.lengths.device)
        if index.ndim != 1 or index.numel() == 0:
            raise ValueError(f"select_rows: expected a non-empty 1-D index, got shape {tuple(index.shape)}")
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.lengths = self.lengths.index_select(0, index)
        self.bounds = [self.bounds[i] for i in host]

    def repeat_rows(self, n: int) -> None:
        """Repeat every row n times consecutively (one prefill shared by n samples)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"repeat_rows: n={n!r}, expected a positive integer")
        if n > 1:
            self.k = self.k.repeat_interleave(n, dim=1)
            self.v = self.v.repeat_interleave(n, dim=1)
            self.lengths = self.lengths.repeat_interleave(n)
            self.bounds = [bound for bound in self.bounds for _ in range(n)]

    def reset(self) -> None:
        self.lengths.zero_()
        self.bounds = [0] * self.batch_size

    def attend(self, layer: int, q, k_new, v_new, window, spans):
        """Write k_new/v_new (B, T, Hkv, D) at each row's next slots of `layer`; attention of q (B, T, H, D)."""
        return attention_with_cache(q, self.k[layer], self.v[layer], self.lengths, k_new=k_new, v_new=v_new,
                                    window=window, layout=self.layout, spans=spans)


FP8_KV_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite e4m3fn value


class PagedKVCache:
    """The engine's KV cache: keys/values in a pool of fixed-size blocks, mapped per row by a block table.

    Memory follows the rows (vLLM's PagedAttention idea): a row holds ceil(length / block_size) blocks, taken
    from a free list as it grows and returned when it retires, so a long-tailed batch costs the tokens it
    really holds, not rows x max_len, and a freed block can serve a newly admitted prompt at once.

    pool k, v: "bshd" = (n_layer, num_blocks, block_size, Hkv, D), FA3's paged layout (`page_table`);
    "bhsd" = (n_layer, Hkv, num_blocks, block_size, D) for SDPA: gathering a run of rows' blocks then gives each
    head's keys contiguous, (n, Hkv, blocks * block_size, D) as a view of the gathered copy.
    Block 0 is scratch: table entries past a row's blocks and padding rows point at it; what is written there is
    never read by a real query (its slots lie beyond every row's length, so they are masked).
    The pool grows on demand (by 1/4, copying) up to `max_blocks`; `preallocate` takes them all at once
    (static addresses, what CUDA graphs need, and vLLM's behaviour on a GPU).

    `mirror=True` (SDPA, "bhsd", not FP8): each layer also keeps a dense (B, Hkv, max_len, D) copy of the compute
    batch, built by one gather at the first forward after `set_batch`/`copy_blocks` and then written with the new
    tokens only, so a forward reads each run of rows' keys as a view instead of gathering its blocks (the gather
    per layer per step cost ~25% of CPU decode time). The pool stays the source of truth; `mirror_bytes` is the
    extra memory (rows x table width).

    `kv_dtype` FP8 (float8_e4m3fn) stores keys/values in one byte with a float32 scale per (token, kv head):
    scale = amax over head_dim / 448, written with the token and applied when the blocks are gathered.

    The compute batch: `set_batch(tables, lengths)` (host lists of block ids and lengths per row); a forward of
    T tokens then writes row b at slots lengths[b].. (the same contract as KVCache). With `static=True` (compiled
    decode) `reserve` reads no host state and returns no spans (every row reads all table_width blocks, a fixed
    shape), and the forward does not advance: the caller commits with `commit(new_lengths)` outside the graph.
    """

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, block_size: int, max_blocks: int,
                 device=None, dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None,
                 layout: str | None = None, preallocate: bool = False, initial_blocks: int = 0,
                 mirror: bool = False):
        if block_size < 1 or max_blocks < 2:
            raise ValueError(f"PagedKVCache: block_size={block_size} must be >= 1 and max_blocks={max_blocks} >= 2 "
                             "(block 0 is scratch)")
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.quantized = self.kv_dtype == FP8_KV_DTYPE
        if layout is None:  # FA3 reads the pages itself only when they hold the compute dtype
            layout = cache_layout(device if device is not None else "cpu", dtype)
            layout = "bhsd" if self.quantized else layout
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"PagedKVCache: layout={layout!r}, expected one of {', '.join(CACHE_LAYOUTS)}")
        self.layout, self.device, self.dtype = layout, torch.device(device if device is not None else "cpu"), dtype
        self.n_layer, self.n_kv_head, self.head_dim, self.block_size = n_layer, n_kv_head, head_dim, block_size
        self.max_blocks = max_blocks
        self.k = self.v = self.k_scale = self.v_scale = None
        self.num_blocks = 0
        self._grow(max_blocks if preallocate else max(2, min(max_blocks, initial_blocks)))
        self.static = False
        # a dense mirror of the batch's keys/values per layer (`attend`): only where SDPA reads "bhsd" blocks of
        # the compute dtype (FA3 reads the pages itself; an FP8 mirror would need its dequantized values)
        self.use_mirror = bool(mirror) and self.layout == "bhsd" and not self.quantized
        self.set_batch([[]], [0])

    def reset(self) -> None:
        """Every block free again (the pool itself is kept: a compiled decode reuses it call after call)."""
        self.free_blocks = list(range(self.num_blocks - 1, 0, -1))
        self.static = False
        self.set_batch([[]], [0])

    @classmethod
    def for_model(cls, config: GPTConfig, block_size: int, max_blocks: int, **kwargs) -> "PagedKVCache":
        return cls(config.n_layer, config.n_kv_head, config.get_head_dim(), block_size, max_blocks, **kwargs)

    # -- the pool
    def _shape(self, num_blocks: int, scales: bool = False) -> tuple:
        L, H, bs, D = self.n_layer, self.n_kv_head, self.block_size, self.head_dim
        if self.layout == "bhsd":
            return (L, H, num_blocks, bs) + (() if scales else (D,))
        return (L, num_blocks, bs, H) + (() if scales else (D,))

    def _grow(self, num_blocks: int) -> None:
        block_dim = 2 if self.layout == "bhsd" else 1
        # zeros, not empty: masked slots still enter SDPA's weighted sum, and 0 * NaN would poison it
        new = [torch.zeros(self._shape(num_blocks - self.num_blocks), device=self.device, dtype=self.kv_dtype)
               for _ in range(2)]
        if self.quantized:
            new += [torch.ones(self._shape(num_blocks - self.num_blocks, True), device=self.device) for _ in range(2)]
        old = [self.k, self.v, self.k_scale, self.v_scale][:len(new)]
        grown = [n if o is None else torch.cat([o, n], dim=block_dim) for o, n in zip(old, new)]
        self.k, self.v = grown[:2]
        if self.quantized:
            self.k_scale, self.v_scale = grown[2:]
        self.free_blocks = list(range(num_blocks - 1, self.num_blocks - 1, -1)) + getattr(self, "free_blocks", [])
        if self.num_blocks == 0:
            self.free_blocks.remove(0)  # scratch
        self.num_blocks = num_blocks
        self.free_blocks.sort(reverse=True)  # pop() hands out the lowest ids first: deterministic placement

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (keys + values, all layers, scales included)."""
        per_token = 2 * self.n_layer * self.n_kv_head * (self.head_dim * self.k.element_size()
                                                         + (4 if self.quantized else 0))
        return per_token * self.block_size

    @property
    def pool_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def available_blocks(self) -> int:
        """Blocks that allocate() can still hand out (free now or by growing the pool)."""
        return len(self.free_blocks) + self.max_blocks - self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """n block ids, growing the pool if needed; None (nothing taken) if the budget cannot provide them."""
        if n > self.available_blocks():
            return None
        if n > len(self.free_blocks):
            wanted = self.num_blocks + n - len(self.free_blocks)
            self._grow(min(self.max_blocks, max(wanted, self.num_blocks + self.num_blocks // 4)))
        return [self.free_blocks.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self.free_blocks.extend(blocks)
        self.free_blocks.sort(reverse=True)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy the contents of blocks src[i] into dst[i] (one prefill shared by G samples)."""
        block_dim = 2 if self.layout == "bhsd" else 1
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for pool in (self.k, self.v, self.k_scale, self.v_scale):
            if pool is not None:
                pool.index_copy_(block_dim, d, pool.index_select(block_dim, s))
        self._drop_mirror()

    # -- the compute batch
    def set_batch(self, tables: list[list[int]], lengths: list[int], batch_size: int | None = None,
                  table_width: int | None = None) -> None:
        """Rows of the next forwards: their blocks and lengths; padded to batch_size rows of scratch (length 0)."""
        batch_size = len(tables) if batch_size is None else batch_size
        width = max(1, max(len(t) for t in tables)) if table_width is None else table_width
        rows = [t + [0] * (width - len(t)) for t in tables] + [[0] * width] * (batch_size - len(tables))
        self.block_table = torch.tensor(rows, dtype=torch.int32, device=self.device)  # (B, width)
        self.bounds = list(lengths) + [0] * (batch_size - len(tables))  # exact on the host
        self.lengths = torch.tensor(self.bounds, dtype=torch.int32, device=self.device)
        self._slots_of_forward = None
        self._drop_mirror()

    def _drop_mirror(self) -> None:
        self.mirror_k, self.mirror_v = [None] * self.n_layer, [None] * self.n_layer

    @property
    def mirror_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.mirror_k + self.mirror_v if m is not None)

    def set_blocks(self, updates: list[tuple[int, int, int]]) -> None:
        """Table entries (row, column, block) for rows that grew into new blocks."""
        if updates:
            rows, columns, blocks = (torch.tensor(x, device=self.device) for x in zip(*updates))
            self.block_table[rows, columns] = blocks.to(torch.int32)
            self._slots_of_forward = None

    @property
    def batch_size(self) -> int:
        return self.block_table.size(0)

    @property
    def max_len(self) -> int:
        return self.block_table.size(1) * self.block_size

    def reserve(self, num_new: int) -> list[tuple[int, int, int]] | None:
        if self.static:
            return None
        if max(self.bounds) + num_new > self.max_len:
            raise ValueError(f"PagedKVCache: a row holds {max(self.bounds)} tokens and {num_new} more exceed its "
                             f"{self.block_table.size(1)} blocks of {self.block_size}")
        return key_spans([bound + num_new for bound in self.bounds])

    def advance(self, num_new: int, new_lengths=None) -> None:
        if not self.static:
            self.commit(num_new if new_lengths is None else new_lengths)

    def commit(self, new_lengths) -> None:
        """Lengths += new_lengths (an int for every row, or a host list per row)."""
        if isinstance(new_lengths, int):
            new_lengths = [new_lengths] * self.batch_size
        self.bounds = [bound + int(n) for bound, n in zip(self.bounds, new_lengths)]
        self.lengths += torch.tensor(new_lengths, dtype=torch.int32, device=self.device)
        self._slots_of_forward = None

    # -- attention
    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(.., D) -> FP8 values and a float32 scale per vector (amax / 448; 1 for an all-zero vector)."""
        amax = x.float().abs().amax(dim=-1)
        scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
        return (x.float() / scale[..., None]).to(FP8_KV_DTYPE), scale

    def _slots(self, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, blocks, offsets), each (B, T), of the next T slots of every row."""
        positions = self.lengths.long()[:, None] + torch.arange(T, device=self.device)  # (B, T)
        blocks = self.block_table.long().gather(1, positions // self.block_size)  # (B, T)
        return positions, blocks, positions % self.block_size

    def _write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, T: int) -> torch.Tensor:
        """Store k_new/v_new (B, T, Hkv, D) at slots lengths[b]..; returns those slots (B, T)."""
        if self.static:  # traced: no Python state across layers
            positions, blocks, offsets = self._slots(T)
        else:  # the same slots for every layer of a forward: computed at its first layer
            if self._slots_of_forward is None or self._slots_of_forward[0].size(1) != T:
                self._slots_of_forward = self._slots(T)
            positions, blocks, offsets = self._slots_of_forward
        pools = [(self.k, self.k_scale, k_new), (self.v, self.v_scale, v_new)]
        for pool, scales, new in pools:
            if self.quantized:
                new, scale = self._quantize(new)
                if self.layout == "bhsd":
                    scales[layer][:, blocks, offsets] = scale.permute(2, 0, 1)
                else:
                    scales[layer][blocks, offsets] = scale
            if self.layout == "bhsd":
                pool[layer][:, blocks, offsets] = new.permute(2, 0, 1, 3).to(pool.dtype)  # (Hkv, B, T, D)
            else:
                pool[layer][blocks, offsets] = new.to(pool.dtype)
        return positions

    def _gather(self, pool, scales, layer: int, table: torch.Tensor, S: int, dtype) -> torch.Tensor:
        """The first S slots of each row of `table` (n, nb) as (n, Hkv, S, D) in `dtype`."""
        n, nb = table.shape
        H, D, S_all = self.n_kv_head, self.head_dim, nb * self.block_size
        idx = table.reshape(-1).long()
        # index_select copies whole blocks (memcpy-like); advanced indexing took ~3x longer on the CPU engine bench
        if self.layout == "bhsd":
            x = pool[layer].index_select(1, idx)  # (Hkv, n * nb, bs, D)
            x = x.view(H, n, S_all, D).permute(1, 0, 2, 3)  # (n, Hkv, S, D): each (row, head) contiguous
            scale = scales[layer].index_select(1, idx).view(H, n, S_all).permute(1, 0, 2) if self.quantized else None
        else:
            x = pool[layer].index_select(0, idx).view(n, S_all, H, D).transpose(1, 2)
            scale = scales[layer].index_select(0, idx).view(n, S_all, H).transpose(1, 2) if self.quantized else None
        x = x[:, :, :S]
        if self.quantized:
            return (x.float() * scale[:, :, :S, None]).to(dtype)
        return x.to(dtype)

    def _update_mirror(self, layer: int, k_new, v_new, positions: torch.Tensor, dtype) -> None:
        """Keep the dense mirror of `layer` equal to gathering the batch's blocks: built by one gather after the
        batch changed (set_batch), then only the new tokens (B, T, Hkv, D) are written at their slots (B, T)."""
        if self.mirror_k[layer] is None:  # the pool already holds the new tokens
            # (B, Hkv, S, D) views of a fresh (Hkv, B, S, D) copy: each (row, head) contiguous, as SDPA reads it
            self.mirror_k[layer] = self._gather(self.k, None, layer, self.block_table, self.max_len, dtype)
            self.mirror_v[layer] = self._gather(self.v, None, layer, self.block_table, self.max_len, dtype)
            return
        rows = torch.arange(positions.size(0), device=self.device)[:, None]  # (B, 1)
        # through the pool's dtype, so that the mirror holds exactly what a gather of the pool would give
        self.mirror_k[layer][rows, :, positions] = k_new.to(self.kv_dtype).to(dtype)  # (B, T, Hkv, D) slots
        self.mirror_v[layer][rows, :, positions] = v_new.to(self.kv_dtype).to(dtype)

    def attend(self, layer: int, q, k_new, v_new, window, spans):
        """Write k_new/v_new (B, T, Hkv, D) at each row's next slots of `layer`; attention of q (B, T, H, D)."""
        B, T = q.shape[:2]
        if self.layout == "bshd" and fa3_takes_cache(q, self.kv_dtype):
            return attention_with_page_table(q, self.k[layer], self.v[layer], self.lengths, self.block_table,
                                             k_new, v_new, window)
        positions = self._write(layer, k_new, v_new, T)
        if not self.static and max(self.bounds) == 0:
            # a prefill into empty rows: attend to the new keys themselves (exact, also for an FP8 cache)
            self.mirror_k[layer] = self.mirror_v[layer] = None
            return attention(q, k_new, v_new, causal=True, window=window)
        if spans is None:
            spans = [(0, B, self.max_len)]
        mirrored = self.use_mirror and not self.static
        if mirrored:
            self._update_mirror(layer, k_new, v_new, positions, q.dtype)
        q_heads = q.transpose(1, 2)  # (B, H, T, D)
        outputs = []
        for start, stop, S in spans:
            S = min(S, self.max_len)
            if mirrored:  # views: no copy
                keys, values = self.mirror_k[layer][start:stop, :, :S], self.mirror_v[layer][start:stop, :, :S]
            else:
                table = self.block_table[start:stop, :-(-S // self.block_size)]
                keys = self._gather(self.k, self.k_scale, layer, table, S, q.dtype)
                values = self._gather(self.v, self.v_scale, layer, table, S, q.dtype)
            outputs.append(sdpa_over_slots(q_heads[start:stop], keys, values, positions[start:stop], window))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return y.transpose(1, 2)  # (B, T, H, D)


# ----------------------------------------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    activation_checkpointing = "off"  # off | on | offload: reasoning.checkpointing.set_activation_checkpointing

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's reset_parameters, whose init path imports torch._dynamo (~1.5 s per process
        # start); init_weights() initialises every parameter anyway.
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd))
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.rms_eps, config.norm_weight)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Rotary tables are derived state: non-persistent (not in checkpoints), rebuilt whenever the module moves.
        cos, sin = rotary_tables(_ROTARY_MARGIN * config.max_seq_len, config.get_head_dim(), config.rope_theta,
                                 self.wte.weight.device, config.rope_scaling)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        # load_state_dict(assign=True) installs wte.weight and lm_head.weight as separate tensors: re-tie after.
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module._tie_embeddings())

    def _tie_embeddings(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _apply(self, fn, recurse=True):
        # to_empty()/to() build new tensors: on meta→device the tables would be garbage and a `.to(bf16)`
        # would round them, and parameters recreated one module at a time lose their tie. Repair both here.
        super()._apply(fn, recurse)
        self._tie_embeddings()
        self._build_rotary(self.rotary_cos.size(0), self.rotary_cos.device)
        return self

    def _build_rotary(self, length: int, device) -> None:
        self.rotary_cos, self.rotary_sin = rotary_tables(length, self.config.get_head_dim(), self.config.rope_theta,
                                                         device, self.config.rope_scaling)

    def _ensure_rotary(self, length: int, device: torch.device) -> None:
        # Host-side checks only. Regrow for a KV cache longer than the tables (rare); rebuild if the tables are
        # not where the inputs are (e.g. still on meta after load_state_dict(assign=True), which skips _apply).
        if length > self.rotary_cos.size(0) or self.rotary_cos.device != device:
            self._build_rotary(max(length, self.rotary_cos.size(0)), device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic under torch.manual_seed: fixed module order, default generator."""
        d = self.config.n_embd
        if self.config.tie_embeddings:
            # one matrix serves both ends; std 1/sqrt(d) keeps initial logits O(1) given unit-RMS hidden states
            nn.init.normal_(self.wte.weight, std=d ** -0.5)
        else:
            nn.init.normal_(self.wte.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=1e-3)  # near-uniform initial predictions
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for linear in (attn.c_q, attn.c_k, attn.c_v, mlp.c_fc, mlp.c_gate):
                if linear is not None:  # uniform with std 1/sqrt(fan_in)
                    bound = math.sqrt(3.0 / linear.in_features)
                    nn.init.uniform_(linear.weight, -bound, bound)
            # residual branches start as identity (zero output projections), as in nanochat / modded-nanogpt
            nn.init.zeros_(attn.c_proj.weight)
            nn.init.zeros_(mlp.c_proj.weight)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
        self._build_rotary(self.rotary_cos.size(0), self.rotary_cos.device)

    # -- forward ------------------------------------------------------------------------------------------

    def _activation_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.lm_head.weight.dtype

    def forward_hidden(self, idx: torch.Tensor | None, kv_cache: KVCache | None = None,
                       new_lengths=None, input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> final normed hidden states (B, T, n_embd).

        `input_embeds` (B, T, n_embd) replaces the token embeddings (idx None): latent reasoning feeds a
        position's output hidden state back as the next input (reasoning/latent.py)."""
        if input_embeds is not None:
            if idx is not None or input_embeds.ndim != 3 or input_embeds.size(-1) != self.config.n_embd:
                raise ValueError(f"input_embeds has shape {tuple(input_embeds.shape)}; expected (batch, time, "
                                 f"{self.config.n_embd}) and idx None")
            idx = input_embeds[..., 0]  # (B, T): only its shape and device are read below
        if idx.ndim != 2:
            raise ValueError(f"idx has shape {tuple(idx.shape)}; expected (batch, time)")
        B, T = idx.shape
        if kv_cache is None:
            if new_lengths is not None:
                raise ValueError("new_lengths is only meaningful together with a kv_cache")
            self._ensure_rotary(T, idx.device)
            cos, sin = self.rotary_cos[None, :T, None, :], self.rotary_sin[None, :T, None, :]  # (1, T, 1, D/2)
            spans = None
        else:
            if kv_cache.batch_size != B:
                raise ValueError(f"idx has {B} rows but the KV cache has {kv_cache.batch_size}")
            spans = kv_cache.reserve(T)  # runs of rows and the keys each must read
            self._ensure_rotary(kv_cache.max_len, idx.device)
            positions = kv_cache.lengths.long()[:, None] + torch.arange(T, device=idx.device)  # (B, T) slots
            cos, sin = self.rotary_cos[positions][:, :, None, :], self.rotary_sin[positions][:, :, None, :]
        dtype = self._activation_dtype(idx.device)
        cos, sin = cos.to(dtype), sin.to(dtype)
        # the residual stream in the activation dtype (bf16 under GPU autocast)
        x = (self.wte(idx) if input_embeds is None else input_embeds).to(dtype)
        # a training forward may keep only each block's input for the backward (reasoning.checkpointing)
        checkpointing = self.activation_checkpointing if kv_cache is None and torch.is_grad_enabled() else "off"
        for block in self.blocks:
            if checkpointing == "off":
                x = block(x, cos, sin, kv_cache, spans)
            else:
                x = checkpointed_block(block, x, cos, sin, offload=checkpointing == "offload")
        if kv_cache is not None:
            kv_cache.advance(T, new_lengths)
        return self.norm_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., n_embd) -> float32 logits (..., V), softcapped."""
        logits = self.lm_head(hidden).float()
        cap = self.config.softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean", new_lengths=None) -> torch.Tensor:
        """Logits (B, T, V) float32, or with targets the cross-entropy (ignore_index=-1, computed in fp32)."""
        if loss_reduction not in _LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r}: expected one of {', '.join(_LOSS_REDUCTIONS)}")
        logits = self.compute_logits(self.forward_hidden(idx, kv_cache, new_lengths))
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}; expected {tuple(idx.shape)} like idx")
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    # -- accounting / optimisation ------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied matrix once

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward).

        6 × (weights of every nn.Linear, found by walking modules so Float8Linear subclasses count too; the
        embedding lookup is not a matmul) + 12 · n_layer · n_head · head_dim · effective context for the two
        attention matmuls, where a sliding window caps the context.
        """
        cfg = self.config
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        context = cfg.max_seq_len if cfg.window is None else min(cfg.window, cfg.max_seq_len)
        return 6.0 * matmul_weights + 12.0 * cfg.n_layer * cfg.n_head * cfg.get_head_dim() * context

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser treatment: hidden matrices (Muon), embedding, lm_head, and 0/1-D scalars."""
        groups = {
            "matrix": [p for p in self.blocks.parameters() if p.ndim == 2],
            "embedding": [self.wte.weight],
            "scalar": [p for p in self.parameters() if p.ndim < 2],
        }
        if not self.config.tie_embeddings:
            groups["lm_head"] = [self.lm_head.weight]
        return groups

    def setup_optimizer(self, settings=None, **run_options):
        """Muon (hidden matrices) + AdamW (the rest) over param_groups(): optim.build_optimizer with `settings`
        (optim.OptimizerSettings, default its defaults) at this model's width; run_options = distributed, shard,
        compile_backend."""
        from reasoning.optim import OptimizerSettings, build_optimizer  # deferred: only training needs optim

        return build_optimizer(self.param_groups(), settings or OptimizerSettings(),
                               model_dim=self.config.n_embd, **run_options)  # the width scales some learning rates
