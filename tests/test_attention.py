"""reasoning.flash_attention: the SDPA path against a naive float64 attention written out by hand."""

import pytest
import torch

from reasoning import flash_attention as fa


@pytest.fixture(autouse=True)
def sdpa_backend():
    fa.set_backend("sdpa")
    yield
    fa.set_backend("auto")


def naive_attention(q, k, v, allowed):
    """q (B, T, H, D), k/v (B, S, Hkv, D), allowed (B, T, S) bool -> (B, T, H, D) in float64, one head at a time."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, D = q.shape
    group = H // k.size(2)
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    for h in range(H):
        kh, vh = k[:, :, h // group], v[:, :, h // group]  # query head h reads kv head h // group
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], kh) / D ** 0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = torch.einsum("bts,bsd->btd", scores.softmax(-1), vh)
    return out


def random_qkv(B, T, H, Hkv, D, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    return (torch.randn(B, T, H, D, generator=g), torch.randn(B, S, Hkv, D, generator=g),
            torch.randn(B, S, Hkv, D, generator=g))


def train_mask(B, T, causal, window):
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i) if causal else torch.ones(T, T, dtype=torch.bool)
    if window is not None:
        allowed = allowed & (j > i - window)
    return allowed.expand(B, T, T)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 1), (True, 3), (True, 50)])
def test_attention_matches_naive(n_kv_head, causal, window):
    B, T, H, D = 2, 9, 4, 8
    q, k, v = random_qkv(B, T, H, n_kv_head, D)
    y = fa.attention(q, k, v, causal=causal, window=window)
    assert y.shape == (B, T, H, D) and y.dtype == torch.float32
    expected = naive_attention(q, k, v, train_mask(B, T, causal, window))
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_window_one_sees_only_itself():
    # with W=1 each query's output is exactly its own value vector (an independent check of the window rule)
    q, k, v = random_qkv(1, 6, 2, 2, 4)
    torch.testing.assert_close(fa.attention(q, k, v, window=1), v)


def test_attention_gradients_match_naive():
    q, k, v = random_qkv(2, 7, 4, 2, 8)
    for t in (q, k, v):
        t.requires_grad_(True)
    fa.attention(q, k, v, window=4).square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    naive_attention(q64, k64, v64, train_mask(2, 7, True, 4)).square().sum().backward()
    for g, ref in zip(got, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(g.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv_head", [4, 1])
@pytest.mark.parametrize("T_new", [1, 3])
@pytest.mark.parametrize("window", [None, 2])
def test_attention_with_cache_ragged(n_kv_head, T_new, window):
    B, H, D, max_len = 3, 4, 8, 12
    cache_lengths = torch.tensor([0, 3, 6], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(B, max_len, n_kv_head, D, generator=g)
    v_cache = torch.randn(B, max_len, n_kv_head, D, generator=g)
    q = torch.randn(B, T_new, H, D, generator=g)
    k_new = torch.randn(B, T_new, n_kv_head, D, generator=g)
    v_new = torch.randn(B, T_new, n_kv_head, D, generator=g)
    before_k = k_cache.clone()

    y = fa.attention_with_cache(q, k_cache, v_cache, cache_lengths, k_new=k_new, v_new=v_new, window=window)

    # the new block landed at slots lengths[b] .. lengths[b]+T_new-1 of each row, nothing else changed
    expected_k = before_k.clone()
    for b in range(B):
        start = int(cache_lengths[b])
        expected_k[b, start:start + T_new] = k_new[b]
    assert torch.equal(k_cache, expected_k)
    # query i of row b sees slots j < lengths[b] + i + 1 (and > lengths[b] + i - window)
    i = torch.arange(T_new)[None, :, None]
    j = torch.arange(max_len)[None, None, :]
    limit = cache_lengths.long()[:, None, None] + i
    allowed = j <= limit
    if window is not None:
        allowed &= j > limit - window
    expected = naive_attention(q, k_cache, v_cache, allowed)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)

    # trimming the keys to a bound on the used length changes nothing
    k_again, v_again = k_cache.clone(), v_cache.clone()
    key_len = int(cache_lengths.max()) + T_new
    y_trim = fa.attention_with_cache(q, k_again, v_again, cache_lengths, window=window, key_len=key_len)
    torch.testing.assert_close(y_trim, y, atol=1e-6, rtol=1e-6)


def test_cache_prefill_equals_training_attention():
    # an empty cache + a full block is ordinary causal attention
    B, T, H, Hkv, D = 2, 6, 4, 2, 8
    q, k, v = random_qkv(B, T, H, Hkv, D)
    k_cache, v_cache = torch.zeros(B, 10, Hkv, D), torch.zeros(B, 10, Hkv, D)
    y = fa.attention_with_cache(q, k_cache, v_cache, torch.zeros(B, dtype=torch.int32), k_new=k, v_new=v)
    torch.testing.assert_close(y, fa.attention(q, k, v), atol=1e-6, rtol=1e-6)


def test_bad_arguments():
    q, k, v = random_qkv(1, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="window"):
        fa.attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="causal"):
        fa.attention(q, k, v, causal=False, window=2)
    q3, k3, v3 = random_qkv(1, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="n_kv_head"):
        fa.attention(q3, k3, v3)
    with pytest.raises(ValueError, match="backend"):
        fa.set_backend("flash")
    with pytest.raises(ValueError, match="k_new"):
        fa.attention_with_cache(q, k, v, torch.zeros(1, dtype=torch.int32), k_new=k)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_fa3_request_without_gpu_fails_clearly():
    with pytest.raises(RuntimeError, match="FlashAttention-3"):
        fa.set_backend("fa3")
    assert fa.get_backend() == "sdpa"  # a failed request leaves the previous choice in place


def test_resolve_backend_on_cpu_is_sdpa():
    fa.set_backend("auto")
    assert fa.resolve_backend("cpu") == "sdpa"
    assert fa.resolve_backend("cpu", torch.float32) == "sdpa"
