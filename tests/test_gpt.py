"""reasoning.gpt: loss, causality, KV-cache parity (ragged prefill, per-row decode, row surgery), variants,
init, accounting. Tiny fp32 models on CPU."""

import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reasoning import flash_attention as fa
from reasoning.gpt import GPT, GPTConfig, KVCache, apply_rotary, config_from_depth, rotary_tables

VOCAB = 61

VARIANTS = {
    "default_gqa": dict(),
    "mha": dict(n_kv_head=4),
    "mqa_no_qk_norm": dict(n_kv_head=1, qk_norm=False),
    "qwen3_like": dict(mlp="swiglu", norm_weight=True, qk_norm_weight=True, tie_embeddings=True, rope_theta=1e6,
                       intermediate_size=48, softcap=None),
    "qwen2_like": dict(mlp="swiglu", norm_weight=True, attn_bias=True, qk_norm=False, softcap=0),
    "window": dict(window=3, head_dim=12),
}


def make_config(**overrides):
    fields = dict(max_seq_len=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def build(config=None, perturb=0.1, seed=0, **overrides):
    """Meta-device build → to_empty → init_weights, then (by default) noise on every parameter so that the
    zero-initialised projections and biases take part and attention patterns matter."""
    config = config or make_config(**overrides)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model.eval()


def tokens(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def new_cache(model, batch_size, max_len):
    return KVCache.for_model(model.config, batch_size, max_len)


# ----------------------------------------------------------------------------------------------------------

def test_shapes_and_dtypes():
    model = build()
    idx = tokens(3, 7)
    logits = model(idx)
    assert logits.shape == (3, 7, VOCAB) and logits.dtype == torch.float32
    assert model.forward_hidden(idx).shape == (3, 7, 32)
    loss = model(idx, targets=tokens(3, 7, seed=1))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_logits_are_softcapped_head_of_hidden():
    model = build(perturb=3.0)  # big weights so the cap is active
    idx = tokens(2, 5)
    logits = model(idx)
    raw = model.lm_head(model.forward_hidden(idx))
    torch.testing.assert_close(logits, 15.0 * torch.tanh(raw / 15.0))
    assert logits.abs().max() < 15.0 and raw.abs().max() > 15.0


def test_loss_ignores_minus_one_targets():
    model = build()
    idx, targets = tokens(2, 8), tokens(2, 8, seed=1)
    targets[0, :3] = -1
    targets[1, 5] = -1
    logits = model(idx)
    valid = targets != -1
    by_hand = -logits.log_softmax(-1)[valid].gather(-1, targets[valid][:, None]).mean()
    torch.testing.assert_close(model(idx, targets), by_hand)


def test_loss_reductions_agree():
    model = build()
    idx, targets = tokens(2, 8), tokens(2, 8, seed=1)
    targets[1, :4] = -1
    mean = model(idx, targets)
    total = model(idx, targets, loss_reduction="sum")
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 8)
    assert torch.all(per_token[targets == -1] == 0)
    torch.testing.assert_close(total, per_token.sum())
    torch.testing.assert_close(mean, total / (targets != -1).sum())
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets, loss_reduction="avg")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causality(variant):
    model = build(**VARIANTS[variant])
    idx = tokens(2, 12)
    logits = model(idx)
    for t in (0, 5, 10):
        changed = idx.clone()
        changed[:, t + 1:] = tokens(2, 11 - t, seed=t + 7)
        other = model(changed)
        torch.testing.assert_close(other[:, :t + 1], logits[:, :t + 1], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(other[:, t + 1:], logits[:, t + 1:])  # the change did reach later positions


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_prefill_then_decode_matches_full_forward(variant):
    model = build(**VARIANTS[variant])
    idx = tokens(2, 11)
    full = model(idx)
    cache = new_cache(model, 2, 16)
    pieces = [model(idx[:, :4], kv_cache=cache)]
    for t in range(4, 11):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.lengths.tolist() == [11, 11]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def ragged_batch(prompts):
    """Right-pad prompts into (B, T) with junk tokens in the padding; return ids and true lengths."""
    width = max(len(p) for p in prompts)
    ids = tokens(len(prompts), width, seed=99)  # random padding: it must not matter
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.tensor(p)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.int32)


def reference_logits(model, seq):
    return model(torch.tensor([seq]))[0]  # (T, V) from a plain forward of one row


@pytest.mark.parametrize("variant", ["default_gqa", "window", "qwen3_like"])
def test_ragged_prefill_and_per_row_decode(variant):
    model = build(**VARIANTS[variant])
    prompts = [tokens(5, seed=1).tolist(), tokens(2, seed=2).tolist(), tokens(7, seed=3).tolist()]
    continuations = [tokens(4, seed=10 + r).tolist() for r in range(3)]
    ids, lengths = ragged_batch(prompts)
    cache = new_cache(model, 3, 16)
    prefill = model(ids, kv_cache=cache, new_lengths=lengths)
    assert cache.lengths.tolist() == [5, 2, 7]
    decoded = []
    for step in range(4):
        step_ids = torch.tensor([[c[step]] for c in continuations])
        decoded.append(model(step_ids, kv_cache=cache)[:, 0])
    for row in range(3):
        ref = reference_logits(model, prompts[row] + continuations[row])
        n = len(prompts[row])
        torch.testing.assert_close(prefill[row, :n], ref[:n], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.stack([d[row] for d in decoded]), ref[n:], atol=1e-5, rtol=0)


def test_select_rows_retires_and_reorders():
    model = build()
    prompts = [tokens(3, seed=1).tolist(), tokens(6, seed=2).tolist(), tokens(4, seed=3).tolist()]
    continuation = tokens(3, 5, seed=4)  # (row, step)
    ids, lengths = ragged_batch(prompts)
    cache = new_cache(model, 3, 16)
    model(ids, kv_cache=cache, new_lengths=lengths)
    for step in range(2):
        model(continuation[:, step:step + 1], kv_cache=cache)
    keep = torch.tensor([2, 0])  # row 1 retires, rows come back in a new order
    cache.select_rows(keep)
    assert cache.batch_size == 2 and cache.lengths.tolist() == [6, 5]
    for step in range(2, 5):
        logits = model(continuation[keep, step:step + 1], kv_cache=cache)[:, 0]
        for new_row, old_row in enumerate(keep.tolist()):
            seq = prompts[old_row] + continuation[old_row, :step + 1].tolist()
            torch.testing.assert_close(logits[new_row], reference_logits(model, seq)[-1], atol=1e-5, rtol=0)


def test_repeat_rows_shares_one_prefill():
    model = build()
    prompts = [tokens(4, seed=1).tolist(), tokens(2, seed=2).tolist()]
    ids, lengths = ragged_batch(prompts)
    cache = new_cache(model, 2, 12)
    model(ids, kv_cache=cache, new_lengths=lengths)
    cache.repeat_rows(3)
    assert cache.batch_size == 6 and cache.lengths.tolist() == [4, 4, 4, 2, 2, 2]
    samples = tokens(6, 3, seed=5)  # each of the 6 rows continues differently
    for step in range(3):
        logits = model(samples[:, step:step + 1], kv_cache=cache)[:, 0]
    for row in range(6):
        seq = prompts[row // 3] + samples[row].tolist()
        torch.testing.assert_close(logits[row], reference_logits(model, seq)[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["default_gqa", "window"])
def test_cache_layouts_agree_through_prefill_decode_and_row_surgery(variant):
    """The SDPA layout (B, Hkv, S, D) and FA3's (B, S, Hkv, D) hold the same keys and give the same logits."""
    model = build(**VARIANTS[variant])
    assert new_cache(model, 1, 4).layout == "bhsd"  # what CPU attention reads fastest
    prompts = [tokens(5, seed=1).tolist(), tokens(2, seed=2).tolist(), tokens(7, seed=3).tolist()]
    ids, lengths = ragged_batch(prompts)
    steps = tokens(3, 4, seed=6)
    logits = {}
    caches = {}
    for layout in ("bshd", "bhsd"):
        cache = KVCache.for_model(model.config, 3, 16, layout=layout)
        out = [model(ids, kv_cache=cache, new_lengths=lengths)[:, -1]]
        out.append(model(steps[:, :1], kv_cache=cache)[:, 0])
        cache.select_rows(torch.tensor([2, 0]))
        out.append(model(steps[[2, 0], 1:2], kv_cache=cache)[:, 0])
        cache.repeat_rows(2)
        out.append(model(steps[[2, 2, 0, 0], 2:3], kv_cache=cache)[:, 0])
        logits[layout], caches[layout] = out, cache
    for a, b in zip(logits["bshd"], logits["bhsd"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    hd = model.config.get_head_dim()
    assert caches["bshd"].k.shape == (2, 4, 16, 2, hd) and caches["bhsd"].k.shape == (2, 4, 2, 16, hd)
    filled = int(caches["bhsd"].lengths.max())
    for name in ("k", "v"):
        bshd, bhsd = getattr(caches["bshd"], name), getattr(caches["bhsd"], name)
        torch.testing.assert_close(bshd.transpose(2, 3)[..., :filled, :], bhsd[..., :filled, :], atol=1e-6, rtol=0)


def test_fa3_backend_gets_caches_in_its_own_layout(monkeypatch):
    """When FA3 is the backend, KVCache allocates (B, S, Hkv, D) buffers and hands them to
    flash_attn_with_kvcache untouched. FA3 needs a Hopper GPU, so a stand-in kernel with FA3's signature runs
    the SDPA path on those same buffers; the logits must be those of a cache-free forward."""
    model = build(**VARIANTS["window"])
    prompts = [tokens(5, seed=1).tolist(), tokens(2, seed=2).tolist()]
    steps = tokens(2, 3, seed=4)
    references = [reference_logits(model, p + steps[row].tolist()) for row, p in enumerate(prompts)]
    use_fa3 = [True]
    calls = []

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                                window_size=(-1, -1)):
        calls.append(tuple(k_cache.shape))
        assert causal and cache_seqlens.dtype == torch.int32
        use_fa3[0] = False
        try:
            return fa.attention_with_cache(q, k_cache, v_cache, cache_seqlens, k_new=k, v_new=v, layout="bshd",
                                           window=None if window_size[0] < 0 else window_size[0] + 1)
        finally:
            use_fa3[0] = True

    monkeypatch.setattr(fa, "_use_fa3", lambda device, dtype: use_fa3[0])
    monkeypatch.setattr(fa, "_fa3_module", types.SimpleNamespace(flash_attn_with_kvcache=flash_attn_with_kvcache))
    cache = new_cache(model, 2, 12)
    assert cache.layout == "bshd"
    ids, lengths = ragged_batch(prompts)
    prefill = model(ids, kv_cache=cache, new_lengths=lengths)
    decoded = [model(steps[:, t:t + 1], kv_cache=cache)[:, 0] for t in range(3)]
    hd = model.config.get_head_dim()
    assert calls and set(calls) == {(2, 12, model.config.n_kv_head, hd)}
    for row, p in enumerate(prompts):
        torch.testing.assert_close(prefill[row, :len(p)], references[row][:len(p)], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.stack([d[row] for d in decoded]), references[row][len(p):], atol=1e-5,
                                   rtol=0)


def test_group_prefills_written_into_one_cache_decode_like_one_prefill():
    """The engine's path: prompts prefilled in separate caches, copied with write_rows, then decoded together;
    host bounds stay exact with list new_lengths and only ever over-estimate with tensor ones."""
    model = build()
    prompts = [tokens(9, seed=1).tolist(), tokens(8, seed=2).tolist(), tokens(3, seed=3).tolist()]
    big = new_cache(model, 3, 16)
    for start, group in ((0, prompts[:2]), (2, prompts[2:])):
        ids, lengths = ragged_batch(group)
        cache = new_cache(model, len(group), ids.size(1))
        model(ids, kv_cache=cache, new_lengths=lengths.tolist())
        assert cache.bounds == lengths.tolist()
        big.write_rows(start, cache)
    assert big.lengths.tolist() == big.bounds == [9, 8, 3]
    steps = tokens(3, 3, seed=8)
    for step in range(3):
        new_lengths = torch.tensor([1, 0, 1]) if step == 2 else None  # row 1 stops growing
        logits = model(steps[:, step:step + 1], kv_cache=big, new_lengths=new_lengths)[:, 0]
        if step < 2:
            for row in range(3):
                seq = prompts[row] + steps[row, :step + 1].tolist()
                torch.testing.assert_close(logits[row], reference_logits(model, seq)[-1], atol=1e-5, rtol=0)
    assert big.lengths.tolist() == [12, 10, 6] and big.bounds == [12, 11, 6]  # tensor: +1 for every row
    with pytest.raises(ValueError, match="does not fit"):
        big.write_rows(2, new_cache(model, 2, 4))


def test_cache_reset_and_overflow():
    model = build()
    cache = new_cache(model, 2, 6)
    first = model(tokens(2, 4), kv_cache=cache)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    torch.testing.assert_close(model(tokens(2, 4), kv_cache=cache), first)
    model(tokens(2, 2), kv_cache=cache)
    with pytest.raises(ValueError, match="KVCache full"):
        model(tokens(2, 1), kv_cache=cache)
    with pytest.raises(ValueError, match="new_lengths"):
        model(tokens(2, 1), kv_cache=new_cache(model, 2, 6), new_lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="rows"):
        model(tokens(3, 1), kv_cache=cache)


def test_cache_longer_than_rotary_tables():
    # max_seq_len=4 gives tables for 8 positions; a 20-slot cache must regrow them, not index out of range
    model = build(max_seq_len=4)
    assert model.rotary_cos.size(0) == 8
    idx = tokens(1, 14)
    cache = new_cache(model, 1, 20)
    pieces = [model(idx[:, :3], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(3, 14)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(idx), atol=1e-5, rtol=0)
    cos, _ = rotary_tables(model.rotary_cos.size(0), 8, 10000.0, "cpu")
    torch.testing.assert_close(model.rotary_cos, cos)


def test_rotary_is_rotate_half_convention():
    # reference: dims (i, i + D/2) form the complex number x_i + 1j * x_{i+D/2}, rotated by angle pos * theta^(-2i/D)
    D, T, theta = 8, 5, 500.0
    x = torch.randn(1, T, 2, D, dtype=torch.float64)
    cos, sin = rotary_tables(T, D, theta, "cpu")
    got = apply_rotary(x, cos.double()[None, :, None], sin.double()[None, :, None])
    z = torch.complex(x[..., :D // 2], x[..., D // 2:])
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs
    rotated = z * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_init_is_deterministic_and_sensible():
    a, b, c = build(perturb=0, seed=3), build(perturb=0, seed=3), build(perturb=0, seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert abs(a.wte.weight.std().item() - 1.0) < 0.1
    assert torch.all(a.blocks[0].attn.c_proj.weight == 0) and torch.all(a.blocks[0].mlp.c_proj.weight == 0)
    assert a.lm_head.weight.std() < 0.01
    # an untrained model predicts close to uniform
    loss = a(tokens(2, 8), tokens(2, 8, seed=1))
    assert abs(loss.item() - math.log(VOCAB)) < 0.05


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_backward_gives_finite_nonzero_grads(variant):
    model = build(**VARIANTS[variant]).train()
    model(tokens(2, 10), tokens(2, 10, seed=1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_tied_embeddings_survive_meta_build_and_dtype_moves():
    model = build(tie_embeddings=True)
    assert model.lm_head.weight is model.wte.weight
    assert "lm_head" not in model.param_groups()
    model.to(torch.float64)
    assert model.lm_head.weight is model.wte.weight
    assert model.rotary_cos.dtype == torch.float32  # tables are rebuilt in fp32, never rounded
    assert model(tokens(1, 4)).dtype == torch.float32


def test_variants_have_the_parameters_they_promise():
    plain = build(perturb=0)
    names = {n for n, _ in plain.named_parameters()}
    assert not any("bias" in n or "norm" in n or "c_gate" in n for n in names)
    qwen = build(perturb=0, **VARIANTS["qwen2_like"])
    qnames = {n for n, _ in qwen.named_parameters()}
    assert {"blocks.0.attn.c_q.bias", "blocks.0.attn.c_k.bias", "blocks.0.attn.c_v.bias"} <= qnames
    assert "blocks.0.attn.c_proj.bias" not in qnames
    assert {"blocks.0.mlp.c_gate.weight", "blocks.0.attn_norm.weight", "norm_f.weight"} <= qnames
    q3 = build(perturb=0, **VARIANTS["qwen3_like"])
    assert q3.blocks[1].attn.q_norm.weight.shape == (8,)
    assert q3.blocks[1].mlp.c_fc.weight.shape == (48, 32)


def test_param_groups_partition_parameters():
    for overrides in ({}, VARIANTS["qwen2_like"], VARIANTS["qwen3_like"]):
        model = build(perturb=0, **overrides)
        groups = model.param_groups()
        grouped = [id(p) for ps in groups.values() for p in ps]
        assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
        assert all(p.ndim == 2 for p in groups["matrix"])
        assert all(p.ndim == 1 for p in groups["scalar"])


def test_estimate_flops_hand_count():
    # d=32, 4 heads of 8, 2 kv heads, relu2 MLP 4x, V=61, 2 layers, seq 16
    d, hd, L, V, T = 32, 8, 2, 61, 16
    per_layer = d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d + 2 * d * 4 * d  # q, k+v, proj, fc+proj
    expected = 6 * (L * per_layer + d * V) + 12 * L * 4 * hd * T
    model = build(perturb=0)
    assert model.estimate_flops() == expected
    assert build(perturb=0, window=5).estimate_flops() == expected - 12 * L * 4 * hd * (T - 5)
    # a Linear subclass (e.g. Float8Linear) counts the same
    class CustomLinear(nn.Linear):
        pass
    old = model.blocks[0].mlp.c_fc
    model.blocks[0].mlp.c_fc = CustomLinear(old.in_features, old.out_features, bias=False)
    assert model.estimate_flops() == expected
    assert model.num_params() == L * per_layer + 2 * d * V


def test_config_from_depth():
    for depth in (1, 2, 3, 4):
        cfg = config_from_depth(depth, VOCAB, max_seq_len=64)
        assert cfg.n_head >= 2 and cfg.n_embd % cfg.n_head == 0 and cfg.n_embd >= depth * 64
        assert cfg.n_layer == depth and cfg.n_kv_head == cfg.n_head
    cfg = config_from_depth(20, 65536)
    assert (cfg.n_embd, cfg.n_head, cfg.get_head_dim()) == (1280, 10, 128)
    assert config_from_depth(26, 65536).n_embd == 1664
    assert config_from_depth(5, 100, head_dim=64).n_embd == 320  # exact multiple stays
    assert config_from_depth(3, 100, head_dim=128).n_embd == 256  # 192 rounded up to a multiple of 128
    cfg = config_from_depth(4, VOCAB, n_kv_head=1, mlp="swiglu", window=128)
    assert (cfg.n_kv_head, cfg.mlp, cfg.window) == (1, "swiglu", 128)
    with pytest.raises(ValueError, match="unknown overrides"):
        config_from_depth(2, VOCAB, n_heads=3)


def test_config_validation_and_round_trip():
    cfg = make_config(mlp="swiglu", window=4, softcap=None)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})
    bad = [dict(n_kv_head=3), dict(n_kv_head=8), dict(n_embd=30), dict(mlp="gelu"), dict(window=0),
           dict(head_dim=7), dict(qk_norm=False, qk_norm_weight=True), dict(n_layer=0)]
    for overrides in bad:
        with pytest.raises(ValueError, match="GPTConfig"):
            make_config(**overrides)
    assert make_config(n_embd=30, head_dim=8).get_head_dim() == 8  # explicit head_dim lifts the divisibility rule


def test_setup_optimizer_trains_every_group():
    model = build(perturb=0).train()
    optimizer = model.setup_optimizer()
    idx, targets = tokens(2, 8), tokens(2, 8, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(4):
        loss = model(idx, targets)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.1
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} was not updated"


def test_meta_model_loaded_with_assign_runs():
    # checkpoint loading may skip to_empty: load_state_dict(assign=True) onto a meta model; tables must follow
    model = build()
    with torch.device("meta"):
        clone = GPT(model.config)
    clone.load_state_dict(model.state_dict(), assign=True)
    idx = tokens(2, 6)
    torch.testing.assert_close(clone(idx), model(idx))


def test_tie_survives_assign_load_of_converted_state():
    # e.g. checkpoint loading casts each tensor (bf16 -> fp32), which breaks storage sharing in the state dict
    model = build(tie_embeddings=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        clone = GPT(model.config)
    clone.load_state_dict(state, assign=True)
    assert clone.lm_head.weight is clone.wte.weight
    torch.testing.assert_close(clone(tokens(1, 5)), model(tokens(1, 5)))
