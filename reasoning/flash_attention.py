"""Attention kernels behind one door: FlashAttention-3 on Hopper GPUs, PyTorch SDPA everywhere else.

Two entry points, both taking tensors in the (B, T, H, D) layout FlashAttention uses natively:

- `attention(q, k, v, causal=True, window=None)` for training / full-sequence forwards;
- `attention_with_cache(q, k_cache, v_cache, cache_lengths, k_new, v_new, ...)` for the KV-cache forward of
  the engine: it writes the new keys/values of row b at slots `cache_lengths[b] + i` and lets query i of row b
  see slots `j < cache_lengths[b] + i + 1` (bottom-right aligned causality, which is exactly what FA3's
  `flash_attn_with_kvcache` does, so both backends agree slot for slot).

Grouped-query attention (k/v with fewer heads than q, n_head % n_kv_head == 0) is handled by both backends.
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


def _sdpa(q, k, v, mask=None, is_causal=False):
    """SDPA on (B, T, H, D) tensors; k/v may have fewer heads (GQA)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    n_head, n_kv_head = q.size(1), k.size(1)
    gqa = n_head != n_kv_head
    if gqa and mask is not None:
        # With an explicit mask the fused GPU kernels that accept one do not take GQA; repeating k/v keeps
        # us on them instead of the quadratic-memory math fallback.
        k = k.repeat_interleave(n_head // n_kv_head, dim=1)
        v = v.repeat_interleave(n_head // n_kv_head, dim=1)
        gqa = False
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
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
        return _first(_fa3_module.flash_attn_func(q, k, v, causal=causal, window_size=_fa3_window(window)))
    T = q.size(1)
    if window is None or window >= T:
        return _sdpa(q, k, v, is_causal=causal)
    pos = torch.arange(T, device=q.device)
    delta = pos[:, None] - pos[None, :]  # (T, T): query position - key position
    return _sdpa(q, k, v, mask=(delta >= 0) & (delta < window))


def attention_with_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_lengths: torch.Tensor, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None, window: int | None = None,
                         key_len: int | None = None) -> torch.Tensor:
    """Attention of a block of new queries against a per-row KV cache.

    q (B, T, H, D); k_cache/v_cache (B, max_len, Hkv, D); cache_lengths (B,) int32 = valid slots per row
    before this block. If k_new/v_new (B, T, Hkv, D) are given they are written in place at slots
    cache_lengths[b] .. cache_lengths[b]+T-1 first. Query i of row b attends to slots j < cache_lengths[b] + i + 1
    (and j > cache_lengths[b] + i - window). Right-padded rows are fine: padding queries see only their own row's
    slots and their outputs are ignored by the caller.
    `key_len` is a known upper bound on max(cache_lengths) + T (the caller tracks it without a device sync);
    keys beyond it are never looked at, which keeps short caches cheap in a long buffer.
    """
    _check_window(window)
    B, T, n_head, _ = q.shape
    if (k_new is None) != (v_new is None):
        raise ValueError("attention_with_cache: pass both k_new and v_new, or neither")
    if _use_fa3(q.device, q.dtype) and k_cache.dtype == q.dtype:
        y = _fa3_module.flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_lengths.to(torch.int32),
            causal=True, window_size=_fa3_window(window))
        return _first(y)

    positions = cache_lengths.long()[:, None] + torch.arange(T, device=q.device)  # (B, T) slot of each query
    if k_new is not None:
        rows = torch.arange(B, device=q.device)[:, None]
        k_cache[rows, positions] = k_new.to(k_cache.dtype)
        v_cache[rows, positions] = v_new.to(v_cache.dtype)
    S = k_cache.size(1) if key_len is None else min(key_len, k_cache.size(1))
    keys = k_cache[:, :S].to(q.dtype)
    values = v_cache[:, :S].to(q.dtype)
    slots = torch.arange(S, device=q.device)
    allowed = slots[None, None, :] <= positions[:, :, None]  # (B, T, S)
    if window is not None:
        allowed &= slots[None, None, :] > positions[:, :, None] - window
    return _sdpa(q, keys, values, mask=allowed[:, None])  # mask (B, 1, T, S) broadcasts over heads
