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


def in_layout(cache, layout):
    """A (B, S, Hkv, D) cache stored in `layout`, and back: "bhsd" keeps (B, Hkv, S, D) physically."""
    return cache.transpose(1, 2).contiguous() if layout == "bhsd" else cache


def from_layout(cache, layout):
    return cache.transpose(1, 2) if layout == "bhsd" else cache


@pytest.mark.parametrize("n_kv_head", [4, 1])
@pytest.mark.parametrize("T_new", [1, 3])
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_attention_with_cache_ragged(n_kv_head, T_new, window, layout):
    B, H, D, max_len = 3, 4, 8, 12
    cache_lengths = torch.tensor([0, 3, 6], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(B, max_len, n_kv_head, D, generator=g)
    v_cache = torch.randn(B, max_len, n_kv_head, D, generator=g)
    q = torch.randn(B, T_new, H, D, generator=g)
    k_new = torch.randn(B, T_new, n_kv_head, D, generator=g)
    v_new = torch.randn(B, T_new, n_kv_head, D, generator=g)
    before_k = k_cache.clone()

    k_stored, v_stored = in_layout(k_cache, layout), in_layout(v_cache, layout)
    y = fa.attention_with_cache(q, k_stored, v_stored, cache_lengths, k_new=k_new, v_new=v_new, window=window,
                                layout=layout)
    k_cache, v_cache = from_layout(k_stored, layout), from_layout(v_stored, layout)

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
    k_again, v_again = k_stored.clone(), v_stored.clone()
    key_len = int(cache_lengths.max()) + T_new
    y_trim = fa.attention_with_cache(q, k_again, v_again, cache_lengths, window=window, key_len=key_len,
                                     layout=layout)
    torch.testing.assert_close(y_trim, y, atol=1e-6, rtol=1e-6)


def test_key_spans_cover_rows_and_bound_their_keys():
    g = torch.Generator().manual_seed(0)
    for B in (1, 3, 8, 17, 64):
        for descending in (True, False):
            bounds = torch.randint(1, 300, (B,), generator=g).tolist()
            if descending:
                bounds.sort(reverse=True)
            spans = fa.key_spans(bounds)
            assert spans[0][0] == 0 and spans[-1][1] == B
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous runs
            for start, stop, S in spans:
                assert S == max(bounds[start:stop])  # every row's keys, and no more than the longest row's
                assert stop - start >= min(B, fa.SPAN_MIN_ROWS)  # no tiny runs: each costs a kernel call
    # the point of splitting: the engine's rows (sorted by length, 10x spread) read few keys beyond their own
    bounds = torch.linspace(328, 148, 64).round().long().tolist()
    spans = fa.key_spans(bounds)
    read = sum((stop - start) * S for start, stop, S in spans)
    assert 1 < len(spans) <= 64 // fa.SPAN_MIN_ROWS
    assert read <= 1.1 * sum(bounds) < 0.8 * len(bounds) * max(bounds)


@pytest.mark.parametrize("n_kv_head", [4, 2])
@pytest.mark.parametrize("T_new, window", [(1, None), (2, None), (1, 5)])
@pytest.mark.parametrize("shuffled", [False, True])
def test_attention_with_cache_in_spans_matches_naive(n_kv_head, T_new, window, shuffled):
    """Rows split into runs (each reading only its own longest row's keys) give the same attention."""
    B, H, D, max_len = 20, 4, 8, 48
    lengths = torch.linspace(40, 2, B).round().int()
    if shuffled:  # runs then mix long and short rows: still exact, only less trimming
        lengths = lengths[torch.randperm(B, generator=torch.Generator().manual_seed(3))]
    g = torch.Generator().manual_seed(2)
    k_cache = torch.randn(B, max_len, n_kv_head, D, generator=g)
    v_cache = torch.randn(B, max_len, n_kv_head, D, generator=g)
    q = torch.randn(B, T_new, H, D, generator=g)
    k_new = torch.randn(B, T_new, n_kv_head, D, generator=g)
    v_new = torch.randn(B, T_new, n_kv_head, D, generator=g)
    spans = fa.key_spans([int(n) + T_new for n in lengths])
    assert len(spans) > 1 or shuffled

    k_stored, v_stored = in_layout(k_cache, "bhsd"), in_layout(v_cache, "bhsd")
    y = fa.attention_with_cache(q, k_stored, v_stored, lengths, k_new=k_new, v_new=v_new, window=window,
                                layout="bhsd", spans=spans)
    k_after, v_after = from_layout(k_stored, "bhsd"), from_layout(v_stored, "bhsd")
    i = torch.arange(T_new)[None, :, None]
    j = torch.arange(max_len)[None, None, :]
    limit = lengths.long()[:, None, None] + i
    allowed = (j <= limit) if window is None else (j <= limit) & (j > limit - window)
    torch.testing.assert_close(y.double(), naive_attention(q, k_after, v_after, allowed), atol=1e-5, rtol=1e-5)
    whole = fa.attention_with_cache(q, k_stored, v_stored, lengths, window=window, layout="bhsd")
    torch.testing.assert_close(y, whole, atol=1e-6, rtol=1e-6)


def test_gqa_with_a_mask_folded_into_query_groups(monkeypatch):
    """The GPU path for GQA + mask (query heads of one kv head folded into the query axis), forced on CPU."""
    q, k, v = random_qkv(2, 9, 6, 2, 8)
    grads = {}
    for native in (("cpu",), ()):
        monkeypatch.setattr(fa, "GQA_MASK_NATIVE_DEVICES", native)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        y = fa.attention(*leaves, window=3)
        torch.testing.assert_close(y.double(), naive_attention(q, k, v, train_mask(2, 9, True, 3)), atol=1e-5,
                                   rtol=1e-5)
        y.square().sum().backward()
        grads[native] = [t.grad for t in leaves]
    for folded, native in zip(grads[()], grads[("cpu",)]):  # training through the fold too
        torch.testing.assert_close(folded, native, atol=1e-5, rtol=1e-5)
    lengths = torch.tensor([5, 0], dtype=torch.int32)
    k_cache, v_cache = in_layout(k, "bhsd"), in_layout(v, "bhsd")
    y = fa.attention_with_cache(q[:, :2], k_cache, v_cache, lengths, layout="bhsd")
    allowed = torch.arange(9)[None, None, :] <= lengths.long()[:, None, None] + torch.arange(2)[None, :, None]
    torch.testing.assert_close(y.double(), naive_attention(q[:, :2], k, v, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("key_len", [None, 6])  # 6 = T: known-empty caches take the plain causal kernel
def test_cache_prefill_equals_training_attention(layout, key_len):
    # an empty cache + a full block is ordinary causal attention
    B, T, H, Hkv, D = 2, 6, 4, 2, 8
    q, k, v = random_qkv(B, T, H, Hkv, D)
    k_cache, v_cache = in_layout(torch.zeros(B, 10, Hkv, D), layout), in_layout(torch.zeros(B, 10, Hkv, D), layout)
    y = fa.attention_with_cache(q, k_cache, v_cache, torch.zeros(B, dtype=torch.int32), k_new=k, v_new=v,
                                key_len=key_len, layout=layout)
    torch.testing.assert_close(y, fa.attention(q, k, v), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(from_layout(k_cache, layout)[:, :T], k)


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
    with pytest.raises(ValueError, match="layout"):
        fa.attention_with_cache(q, k, v, torch.zeros(1, dtype=torch.int32), layout="bsdh")
    with pytest.raises(ValueError, match="spans"):
        fa.attention_with_cache(q, k, v, torch.zeros(1, dtype=torch.int32), spans=[(0, 2, 4)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_fa3_request_without_gpu_fails_clearly():
    with pytest.raises(RuntimeError, match="FlashAttention-3"):
        fa.set_backend("fa3")
    assert fa.get_backend() == "sdpa"  # a failed request leaves the previous choice in place


def test_resolve_backend_on_cpu_is_sdpa():
    fa.set_backend("auto")
    assert fa.resolve_backend("cpu") == "sdpa"
    assert fa.resolve_backend("cpu", torch.float32) == "sdpa"
    assert fa.cache_layout("cpu", torch.bfloat16) == "bhsd"  # SDPA's layout; FA3 would get "bshd"
