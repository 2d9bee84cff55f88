"""FlashAttention-3 is actually taken by our model under CUDA's autocast policy, checked on a CPU.

CPU autocast does not reproduce CUDA's policy: CUDA autocast runs rms_norm in fp32 (so q/k left the q/k-norm in
fp32 while v, from a linear, was bf16, and the FA3 dtype check fell back to SDPA), CPU autocast passes bf16
through. So the tests impose CUDA's policy: linears autocast to bf16 (CPU autocast does that), and F.rms_norm is
patched to compute and return fp32. FA3 is "available" through a fake kernel module that records what reaches it;
the decode path must find a KV cache in FA3's (B, S, H, D) layout, in the dtype of q (no fp32 copies).
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from reasoning import flash_attention as fa
from reasoning.gpt import GPT, GPTConfig, KVCache

ARCHITECTURES = {  # our default model and the switches reasoning/hf.py sets for the imported families
    "ours": dict(),
    "qwen3": dict(mlp="swiglu", softcap=None, norm_weight=True, qk_norm=True, qk_norm_weight=True),
    "qwen2": dict(mlp="swiglu", softcap=None, norm_weight=True, qk_norm=False, attn_bias=True),
    "llama": dict(mlp="swiglu", softcap=None, norm_weight=True, qk_norm=False),
}

_real_rms_norm = F.rms_norm


def fp32_rms_norm(x, shape, weight=None, eps=None):
    """CUDA autocast's policy for rms_norm: computed and returned in fp32."""
    return _real_rms_norm(x.float(), shape, None if weight is None else weight.float(), eps)


class FakeFA3:
    """Records the dtypes each FA3 entry point receives; returns zeros of q's shape and dtype."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, causal=True, window_size=(-1, -1)):
        self.calls.append(("func", q.dtype, k.dtype, v.dtype, None))
        return torch.zeros_like(q)

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                                window_size=(-1, -1)):
        self.calls.append(("kvcache", q.dtype, k_cache.dtype, v_cache.dtype, k.dtype))
        return torch.zeros_like(q)


def tiny(arch: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(max_seq_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       **ARCHITECTURES[arch])
    model = GPT(config)
    model.init_weights()
    return model


def cuda_policy():
    """CPU autocast to bf16 (linears in bf16) + rms_norm in fp32, as CUDA autocast does it."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fa3_gets_one_dtype_in_training_and_decode(arch):
    model = tiny(arch)
    fake = FakeFA3()
    idx = torch.randint(0, 64, (2, 8))
    with mock.patch.object(F, "rms_norm", fp32_rms_norm), mock.patch.object(fa, "_fa3_module", fake), \
            mock.patch.object(fa, "_use_fa3", lambda device, dtype: dtype in (torch.bfloat16, torch.float16)):
        with cuda_policy():
            model(idx, idx, loss_reduction="sum")
            # the KV cache is allocated the way the engine does it: in the autocast dtype, layout from the backend
            cache = KVCache.for_model(model.config, 2, 16, dtype=torch.bfloat16)
            with torch.no_grad():
                model(idx, kv_cache=cache)  # prefill
                model(idx[:, :1], kv_cache=cache)  # one decode step
    assert cache.layout == "bshd"  # FA3's kvcache kernel layout (B, S, Hkv, D)
    train_calls = [c for c in fake.calls if c[0] == "func"]
    cache_calls = [c for c in fake.calls if c[0] == "kvcache"]
    assert len(train_calls) == model.config.n_layer  # every layer took FA3, none fell back to SDPA
    assert len(cache_calls) == 2 * model.config.n_layer
    for _, q, k, v, k_new in fake.calls:
        assert q == k == v == torch.bfloat16, fake.calls
        assert k_new in (None, torch.bfloat16)


@pytest.mark.parametrize("arch", ["ours", "qwen3"])
def test_sdpa_cache_is_heads_first_and_read_in_its_own_dtype(arch):
    """Without FA3 the cache is (B, H, S, D), and attention_with_cache gets q in the cache's dtype, so its
    `.to(q.dtype)` reads of the cache are no-ops rather than fp32 copies of every key and value."""
    model = tiny(arch)
    seen = []
    real = fa.attention_with_cache

    def recording(q, k_cache, v_cache, *args, **kwargs):
        seen.append((q.dtype, k_cache.dtype, kwargs.get("layout")))
        return real(q, k_cache, v_cache, *args, **kwargs)

    idx = torch.randint(0, 64, (2, 6))
    with mock.patch.object(F, "rms_norm", fp32_rms_norm), mock.patch("reasoning.gpt.attention_with_cache", recording):
        with cuda_policy(), torch.no_grad():
            cache = KVCache.for_model(model.config, 2, 16, dtype=torch.bfloat16)
            model(idx, kv_cache=cache)
            model(idx[:, :1], kv_cache=cache)
    assert cache.layout == "bhsd"
    assert seen and all(entry == (torch.bfloat16, torch.bfloat16, "bhsd") for entry in seen), seen


def test_residual_stream_is_in_the_autocast_dtype():
    """The embedding output (an fp32 table lookup) joins the autocast dtype: no fp32 residual stream on GPU."""
    model = tiny("ours")
    dtypes = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    with mock.patch.object(F, "rms_norm", fp32_rms_norm), cuda_policy():
        model(torch.randint(0, 64, (1, 4)))
    hook.remove()
    assert dtypes == [torch.bfloat16]
    dtypes.clear()
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    model(torch.randint(0, 64, (1, 4)))  # no autocast (CPU default): unchanged fp32
    hook.remove()
    assert dtypes == [torch.float32]
