"""Attention kernels behind one door: FlashAttention-3 on Hopper GPUs, PyTorch SDPA everywhere else.

Two entry points, both taking tensors in the (B, T, H, D) layout FlashAttention uses natively:

- `attention(q, k, v, causal=True, window=None)` for training / full-sequence forwards;
- `attention_with_cache(q, k_cache, v_cache, cache_lengths, k_new, v_new, ...)` for the KV-cache forward of
  the engine: it writes the new keys/values of row b at slots `cache_lengths[b] + i` and lets query i of row b
  see slots `j < cache_lengths[b] + i + 1` (bottom-right aligned causality, which is exactly what FA3's
  `flash_attn_with_kvcache` does, so both backends agree slot for slot);
- `attention_with_page_table(...)`: FA3's paged KV cache (the engine's `reasoning.gpt.PagedKVCache` on FA3);
  on SDPA the paged cache gathers a run of rows' pages and calls `sdpa_over_slots`, the masked kernel that
  `attention_with_cache` uses too.

The cache's physical layout belongs to the backend (`cache_layout`): FA3's kvcache kernel takes (B, S, Hkv, D)
("bshd"); SDPA wants each head's keys contiguous, (B, Hkv, S, D) ("bhsd"): reading a bshd cache through a
transposed view made each CPU decode attention call ~30% slower (dev/LOG.md). On the SDPA path a decode step can
also split the batch into runs of rows with similar lengths (`key_spans`), so short rows do not read the keys of
the longest one.

Grouped-query attention (k/v with fewer heads than q, n_head % n_kv_head == 0) is handled by both backends,
without copying k/v per query head.
A sliding `window` W means a query sees itself and the W-1 keys before it.

FA3 comes from the Hugging Face kernel hub (`kernels.get_kernel("kernels-community/flash-attn3")`). It is
loaded lazily on first use on an sm90 device, never at import, so importing this module works offline; if the
load fails we print one notice and use SDPA. `set_backend` forces a choice (tests use "sdpa").
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from reasoning.common import print0

_BACKENDS = ("auto", "sdpa", "fa3")
_FA3_REPO = "kernels-community/flash-attn3"

_backend = "auto"
_fa3_module = None  # the loaded kernel module, once loaded
_fa3_error: str | None = None  # why loading failed (so we try once, not every call)
_notice_printed = False
# Attention calls per kernel, counted inside attention()/attention_with_cache() themselves: the proof that the
# model's own forward took FA3 (dev/gpu_check.py reads it from the stages' RESULT lines).
CALLS = {"fa3": 0, "sdpa": 0}


def _count_call(kernel: str) -> None:
    # Eager calls only: inside torch.compile a traced `+= 1` on a global would guard on its value and recompile at
    # every call (dynamo's reorderable_logging_functions are dropped inside inlined frames such as this one, checked
    # on torch 2.13). A compiled forward takes the branch an eager one takes for the same dtypes.
    if not torch.compiler.is_compiling():
        CALLS[kernel] += 1


def set_backend(name: str) -> None:
    """Force the attention backend: "auto" (FA3 when possible), "sdpa", or "fa3" (fails loudly if unavailable)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(_BACKENDS)}")
    if name == "fa3" and _fa3_module is None:
        if _fa3_error is None:
            _load_fa3()
        if _fa3_module is None:
            raise RuntimeError(f"attention backend 'fa3' requested but FlashAttention-3 could not be loaded: "
                               f"{_fa3_error}")
    _backend = name


def get_backend() -> str:
    return _backend


def _never_traced(fn):
    """`torch.compiler.disable`, applied at the first call instead of at import: the decorator imports
    torch._dynamo (~1.3 s of CPU), which scripts that never compile should not pay for at start-up.

    Same behaviour: `fn` always runs eagerly, never traced. Only when the first call happens while dynamo traces
    does the trace break one extra time, at the `disable` call itself (resolve_backend before compiling avoids
    even that).
    """
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return call


@_never_traced  # hub download / import: never traced; runs at most once (see _use_fa3)
def _load_fa3() -> None:
    """Load FA3 from the kernel hub once; on failure keep the reason in _fa3_error."""
    global _fa3_module, _fa3_error
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) != (9, 0):
            raise RuntimeError(f"FA3 needs a Hopper GPU (sm90), found sm{major}{minor}")
        from kernels import get_kernel

        _fa3_module = get_kernel(_FA3_REPO)
    except Exception as e:  # offline, missing package, unsupported GPU: all mean "use SDPA"
        _fa3_error = f"{type(e).__name__}: {e}".splitlines()[0]


@_never_traced
def _print_fallback_notice() -> None:
    global _notice_printed
    _notice_printed = True
    print0(f"flash_attention: FlashAttention-3 unavailable ({_fa3_error}); using PyTorch SDPA")


def _use_fa3(device: torch.device, dtype: torch.dtype) -> bool:
    """FA3 runs on CUDA in half precision only; anything else goes to SDPA.

    After the first call this only reads module globals, so it traces cleanly under torch.compile.
    """
    if _backend == "sdpa" or device.type != "cuda":
        return False
    if dtype not in (torch.bfloat16, torch.float16):
        if _backend == "fa3":
            raise RuntimeError(f"attention backend 'fa3' needs bf16/fp16 inputs, got {dtype}")
        return False
    if _fa3_module is None and _fa3_error is None:
        _load_fa3()
    if _fa3_module is not None:
        return True
    if not _notice_printed:
        _print_fallback_notice()
    return False


def resolve_backend(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend attention will use for tensors on `device` in `dtype` ("fa3" | "sdpa").

    Calling it once before torch.compile keeps the (one-off) kernel loading out of the traced region, and
    gives scripts a name to log.
    """
    return "fa3" if _use_fa3(torch.device(device), dtype) else "sdpa"


def _fa3_window(window: int | None) -> tuple[int, int]:
    # FA's (left, right) counts keys besides the query itself; -1 = unbounded.
    return (-1, -1) if window is None else (window - 1, 0)


def _first(out):
    # Some FA3 builds return (out, softmax_lse), newer ones just out.
    return out[0] if isinstance(out, tuple) else out


def _check_window(window: int | None) -> None:
    if window is not None and window < 1:
        raise ValueError(f"attention window={window}: expected None or a positive number of tokens")


# devices whose SDPA runs GQA with an explicit mask in a fused kernel (CPU's flash kernel does: fast and exact)
GQA_MASK_NATIVE_DEVICES = ("cpu",)


def _sdpa_heads(q, k, v, mask=None, is_causal=False):
    """SDPA on heads-first tensors: q (B, H, T, D), k/v (B, Hkv, S, D) with Hkv dividing H -> (B, H, T, D).

    mask: bool, broadcastable to (B, 1, T, S), True = may attend.
    """
    n_head, n_kv_head = q.size(1), k.size(1)
    gqa = n_head != n_kv_head
    if gqa and mask is not None and q.device.type not in GQA_MASK_NATIVE_DEVICES:
        # The fused GPU kernels that take a mask do not take GQA (torch would use the quadratic-memory math
        # kernel). Fold each kv head's group of query heads into the query axis instead: plain attention over
        # Hkv heads with the mask repeated per group, and no per-query-head copy of k/v (repeat_interleave of
        # a long cache made a CPU decode call 13x slower in a microbench, dev/LOG.md).
        B, _, T, D = q.shape
        group = n_head // n_kv_head
        S = k.size(2)
        folded = q.reshape(B, n_kv_head, group * T, D)  # query head h = kv_head * group + g
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (T, S) -> (1, 1, T, S)
        rows = mask.size(0)  # 1 for a training mask: it stays shared across the batch
        mask = mask.expand(rows, 1, T, S)[:, :, None].expand(rows, 1, group, T, S).reshape(rows, 1, group * T, S)
        y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
        return y.view(B, n_head, T, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


def _sdpa(q, k, v, mask=None, is_causal=False):
    """SDPA on (B, T, H, D) tensors; k/v may have fewer heads (GQA)."""
    y = _sdpa_heads(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, is_causal)
    return y.transpose(1, 2)  # (B, T, H, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              window: int | None = None) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D). Causal by default; optional sliding window."""
    _check_window(window)
    if window is not None and not causal:
        raise ValueError("attention: a sliding window is only defined for causal attention")
    if q.size(2) % k.size(2) != 0:
        raise ValueError(f"attention: n_head={q.size(2)} must be a multiple of n_kv_head={k.size(2)}")
    if _use_fa3(q.device, q.dtype):
        _count_call("fa3")
        return _first(_fa3_module.flash_attn_func(q, k, v, causal=causal, window_size=_fa3_window(window)))
    _count_call("sdpa")
    T = q.size(1)
    if window is None or window >= T:
        return _sdpa(q, k, v, is_causal=causal)
    pos = torch.arange(T, device=q.device)
    delta = pos[:, None] - pos[None, :]  # (T, T): query position - key position
    return _sdpa(q, k, v, mask=(delta >= 0) & (delta < window))


CACHE_LAYOUTS = ("bshd", "bhsd")


def cache_layout(device: torch.device | str, dtype: torch.dtype) -> str:
    """Physical layout for KV-cache buffers that attention will read on `device` in `dtype`.

    "bshd" (B, S, Hkv, D) when FA3 will run (its kvcache kernel wants it), else "bhsd" (B, Hkv, S, D) for SDPA.
    """
    return "bshd" if _use_fa3(torch.device(device), dtype) else "bhsd"


# Each run costs one SDPA call (tens of us of fixed cost on CPU, against ~0.2 us per (row, key) pair at H*D = 256),
# so runs are not cut finer than this. Measured on the engine bench (dev/LOG.md): ~6 runs for 64 rows whose
# lengths spread 10x read 1.08x the keys of exact per-row trimming, against 1.53x for one run.
SPAN_MIN_ROWS = 8      # rows per run at least
SPAN_SLACK = 0.125     # a row joins the current run if its key bound is within 12.5% of the run's largest


def key_spans(key_bounds: list[int]) -> list[tuple[int, int, int]]:
    """Split rows into contiguous runs [start, stop) of similar key bounds: [(start, stop, max bound), ...].

    key_bounds[b] is an upper bound on the keys row b attends to in this forward (cache length + new tokens).
    Each run then reads only the keys its longest row needs. Runs are contiguous so that each is a view of the
    cache; the engine keeps rows sorted by prompt length, so runs follow the length profile closely.
    """
    spans, start = [], 0
    B = len(key_bounds)
    while start < B:
        longest, stop = key_bounds[start], start + 1
        while stop < B:
            bound = key_bounds[stop]
            if stop - start >= SPAN_MIN_ROWS and bound < (1 - SPAN_SLACK) * longest and B - stop >= SPAN_MIN_ROWS:
                break
            longest = max(longest, bound)
            stop += 1
        spans.append((start, stop, longest))
        start = stop
    return spans


def attention_with_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_lengths: torch.Tensor, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None, window: int | None = None,
                         key_len: int | None = None, layout: str = "bshd",
                         spans: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
    """Attention of a block of new queries against a per-row KV cache.

    q (B, T, H, D); k_cache/v_cache (B, max_len, Hkv, D) for layout "bshd" or (B, Hkv, max_len, D) for "bhsd"
    (see cache_layout); cache_lengths (B,) int32 = valid slots per row before this block. If k_new/v_new
    (B, T, Hkv, D) are given they are written in place at slots cache_lengths[b] .. cache_lengths[b]+T-1 first.
    Query i of row b attends to slots j < cache_lengths[b] + i + 1 (and j > cache_lengths[b] + i - window).
    Right-padded rows are fine: padding queries see only their own row's slots and their outputs are ignored by
    the caller. Returns (B, T, H, D).
    `key_len` is a known upper bound on max(cache_lengths) + T (the caller tracks it without a device sync);
    keys beyond it are never looked at, which keeps short caches cheap in a long buffer. `spans` (from
    key_spans) refines it per run of rows; FA3 needs neither (it reads each row's own length).
    """
    _check_window(window)
    if layout not in CACHE_LAYOUTS:
        raise ValueError(f"attention_with_cache: layout={layout!r}, expected one of {', '.join(CACHE_LAYOUTS)}")
    B, T, n_head, _ = q.shape
    if (k_new is None) != (v_new is None):
        raise ValueError("attention_with_cache: pass both k_new and v_new, or neither")
    if layout == "bshd" and _use_fa3(q.device, q.dtype) and k_cache.dtype == q.dtype:
        _count_call("fa3")
        y = _fa3_module.flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_lengths.to(torch.int32),
            causal=True, window_size=_fa3_window(window))
        return _first(y)

    _count_call("sdpa")
    # heads-first views (B, Hkv, max_len, D): free for "bhsd", strided for "bshd"
    k_heads = k_cache if layout == "bhsd" else k_cache.transpose(1, 2)
    v_heads = v_cache if layout == "bhsd" else v_cache.transpose(1, 2)
    positions = cache_lengths.long()[:, None] + torch.arange(T, device=q.device)  # (B, T) slot of each query
    if k_new is not None:
        rows = torch.arange(B, device=q.device)[:, None]
        k_heads[rows, :, positions] = k_new.to(k_cache.dtype)  # indexed view (B, T, Hkv, D), like k_new
        v_heads[rows, :, positions] = v_new.to(v_cache.dtype)
    max_len = k_heads.size(2)
    if spans is None:
        spans = [(0, B, max_len if key_len is None else key_len)]
    elif spans[0][0] != 0 or spans[-1][1] != B or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"attention_with_cache: spans {spans} do not cover rows 0..{B} in contiguous runs")
    q_heads = q.transpose(1, 2)  # (B, H, T, D)
    outputs = []
    for start, stop, S in spans:
        S = min(S, max_len)
        keys, values = k_heads[start:stop, :, :S].to(q.dtype), v_heads[start:stop, :, :S].to(q.dtype)
        outputs.append(sdpa_over_slots(q_heads[start:stop], keys, values, positions[start:stop], window))
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return y.transpose(1, 2)  # (B, T, H, D)


def sdpa_over_slots(q_heads: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    window: int | None = None) -> torch.Tensor:
    """SDPA of queries at cache slots `positions` (n, T) against keys/values in slots 0..S-1 of each row.

    q_heads (n, H, T, D), keys/values (n, Hkv, S, D) -> (n, H, T, D). Query i of row b sees slots j <=
    positions[b, i] (and j > positions[b, i] - window). Shared by the dense and the paged KV cache.
    """
    T, S = q_heads.size(2), keys.size(2)
    if S == T and (window is None or window >= T):
        # the run's rows had empty caches (a prefill): their mask is plain causal, which SDPA's kernels
        # apply by skipping blocks instead of reading a mask
        return _sdpa_heads(q_heads, keys, values, is_causal=True)
    slots = torch.arange(S, device=q_heads.device)
    limit = positions[:, :, None]  # (n, T, 1)
    allowed = slots <= limit  # (n, T, S)
    if window is not None:
        allowed &= slots > limit - window
    return _sdpa_heads(q_heads, keys, values, mask=allowed[:, None])  # mask (n, 1, T, S)


def fa3_takes_cache(q: torch.Tensor, cache_dtype: torch.dtype) -> bool:
    """Whether FA3 will run attention for queries q against a cache stored in cache_dtype."""
    return _use_fa3(q.device, q.dtype) and cache_dtype == q.dtype


def attention_with_page_table(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                              cache_lengths: torch.Tensor, page_table: torch.Tensor, k_new: torch.Tensor,
                              v_new: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """FA3's paged KV cache: k_pages/v_pages (num_pages, page_size, Hkv, D), page_table (B, pages per row) int32.

    FA3 writes k_new/v_new (B, T, Hkv, D) at slots cache_lengths[b].. through the page table and attends to each
    row's own pages only. Returns (B, T, H, D). (The SDPA path gathers the pages itself: reasoning.gpt.PagedKVCache.)
    """
    _count_call("fa3")
    y = _fa3_module.flash_attn_with_kvcache(
        q, k_pages, v_pages, k=k_new, v=v_new, cache_seqlens=cache_lengths.to(torch.int32),
        page_table=page_table, causal=True, window_size=_fa3_window(window))
    return _first(y)
