"""Tests for reasoning/grpo.py: advantages, policy-loss variants, TIS, k3 KL, chunked log-probs.

Expected values come from independent plain-Python loops (math.exp on floats) or a naive full-logits
computation, never from the code under test.
"""

import math
import types

import pytest
import torch

from reasoning.grpo import aggregate_tokens, chunked_token_logprobs, group_advantages, mask_truncated_rows, policy_loss
from reasoning.rl import token_logprobs


# ---------------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------------

def test_advantages_pinned_population_std():
    adv, zero_var = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), group_size=4, normalize_std=True)
    # mean 0.25; population variance (3·0.25² + 0.75²)/4 = 0.1875; std = sqrt(3)/4
    std = math.sqrt(3) / 4
    expected = [-0.25 / (std + 1e-6)] * 3 + [0.75 / (std + 1e-6)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert adv.tolist() == pytest.approx([-0.5773503, -0.5773503, -0.5773503, 1.7320508], abs=1e-5)
    assert zero_var.tolist() == [False]


def test_advantages_without_std_are_centered_rewards():
    adv, _ = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), group_size=4, normalize_std=False)
    assert adv.tolist() == [-0.25, -0.25, -0.25, 0.75]


def test_advantages_eps_is_added_to_std():
    adv, _ = group_advantages(torch.tensor([0.0, 2.0]), group_size=2, eps=1.0)   # std 1 → divide by 2
    assert adv.tolist() == [-0.5, 0.5]


@pytest.mark.parametrize("normalize_std", [True, False])
def test_advantages_groups_sum_to_zero_and_shapes_agree(normalize_std):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(5, 8, generator=gen, dtype=torch.float64)
    adv2d, zv2d = group_advantages(rewards, 8, normalize_std)
    adv1d, zv1d = group_advantages(rewards.reshape(-1), 8, normalize_std)
    assert adv2d.shape == (5, 8) and adv1d.shape == (40,)
    assert torch.equal(adv2d.reshape(-1), adv1d) and torch.equal(zv2d, zv1d)
    assert adv2d.sum(dim=1).abs().max() < 1e-12
    if normalize_std:   # unit RMS within each group is what the population-std convention buys
        assert torch.allclose(adv2d.pow(2).mean(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-5)
    for p in range(5):  # independent per-group loop
        group = rewards[p].tolist()
        mean = sum(group) / 8
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / 8)
        for g in range(8):
            expected = (group[g] - mean) / (std + 1e-6) if normalize_std else group[g] - mean
            assert adv2d[p, g].item() == pytest.approx(expected, abs=1e-12)


def test_advantages_of_no_groups_are_empty_without_warnings():
    """An RL step whose prompts were all too long has no rewards: empty advantages and flags, and no std() warning."""
    import warnings

    for normalize_std in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            advantages, zero_variance = group_advantages(torch.zeros(0), 4, normalize_std=normalize_std)
        assert advantages.shape == (0,) and advantages.dtype == torch.float32
        assert zero_variance.shape == (0,) and zero_variance.dtype == torch.bool


def test_advantages_all_equal_groups_are_exact_zero_and_reported():
    # 0.1 three times: the float mean is not exactly 0.1, yet the advantages must be exactly 0 (not ±1e-17 / NaN)
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    adv, zero_var = group_advantages(rewards, 3, normalize_std=True)
    assert zero_var.tolist() == [True, False, True, True]
    assert not torch.isnan(adv).any()
    assert torch.all(adv[zero_var] == 0)
    assert torch.all(adv[1] != 0)
    assert zero_var.float().mean().item() == 0.75


def test_advantages_single_sample_groups_and_integer_rewards():
    adv, zero_var = group_advantages(torch.tensor([1, 0, 1]), 1)
    assert adv.dtype.is_floating_point and adv.tolist() == [0.0, 0.0, 0.0] and zero_var.all()


@pytest.mark.parametrize("rewards,group_size", [(torch.zeros(6), 4), (torch.zeros(2, 3), 2), (torch.zeros(4), 0),
                                                (torch.zeros(2, 2, 2), 2)])
def test_advantages_bad_input(rewards, group_size):
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size)


# ---------------------------------------------------------------------------------------------------------------------
# policy loss: an independent reference written as plain loops over Python floats
# ---------------------------------------------------------------------------------------------------------------------

def naive_policy_loss(lp, old, adv, mask, loss_type, clip_low, clip_high, max_tokens_norm=None, ref=None,
                      kl_coef=0.0, sampler=None, tis_cap=None):
    num_seq, num_tok = len(lp), len(lp[0])
    seq_sums, seq_counts = [], []
    for b in range(num_seq):
        s, n = 0.0, 0
        for t in range(num_tok):
            if not mask[b][t]:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
            term = -min(ratio * adv[b], clipped * adv[b])
            if tis_cap is not None:
                term *= min(math.exp(old[b][t] - sampler[b][t]), tis_cap)
            if ref is not None:
                d = ref[b][t] - lp[b][t]
                term += kl_coef * (math.exp(d) - d - 1)
            s += term
            n += 1
        seq_sums.append(s)
        seq_counts.append(n)
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(seq_sums, seq_counts)) / num_seq
    if loss_type == "dr_grpo":
        return sum(seq_sums) / (num_seq * max_tokens_norm)
    return sum(seq_sums) / max(sum(seq_counts), 1)


def _tiny_batch(seed=2, B=3, T=5):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 - 0.1
    lp = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)   # ratios well outside 1±0.2 too
    adv = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)[:B]
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    ref = old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    sampler = old + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    return lp, old, adv, mask, ref, sampler


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("with_kl,with_tis", [(False, False), (True, False), (False, True), (True, True)])
def test_loss_matches_naive_loop(loss_type, with_kl, with_tis):
    lp, old, adv, mask, ref, sampler = _tiny_batch()
    kwargs = dict(loss_type=loss_type, clip_low=0.2, clip_high=0.28, max_tokens_norm=16)
    if with_kl:
        kwargs.update(ref_logprobs=ref, kl_coef=0.05)
    if with_tis:
        kwargs.update(sampler_logprobs=sampler, tis_cap=1.5)
    loss, stats = policy_loss(lp, old, adv, mask, **kwargs)
    expected = naive_policy_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), loss_type, 0.2, 0.28, 16,
                                 ref.tolist() if with_kl else None, 0.05 if with_kl else 0.0,
                                 sampler.tolist() if with_tis else None, 1.5 if with_tis else None)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["loss"].item() == pytest.approx(expected, abs=1e-12)
    # the batch really exercises both clip sides and the TIS cap, otherwise this test would prove little
    assert stats["clip_frac_low"].item() > 0 and stats["clip_frac_high"].item() > 0
    if with_tis:
        assert 0 < stats["is_capped_frac"].item() < 1


def test_loss_types_differ_by_their_normalisers():
    # ratio 1 ⇒ per-token loss −A. Row 2 is fully masked (e.g. a truncated completion): it still counts as a
    # sequence for grpo's mean over sequences and dr_grpo's B, and contributes no tokens to dapo.
    lp = torch.zeros(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    get = lambda lt: policy_loss(lp, lp, adv, mask, loss_type=lt, max_tokens_norm=10)[0].item()
    adv = torch.tensor([-2.0, -2.0, 5.0], dtype=torch.float64)
    assert get("grpo") == pytest.approx((2.0 + 2.0 + 0.0) / 3) and get("dapo") == pytest.approx(2.0)
    assert get("dr_grpo") == pytest.approx(2.0 * 5 / (3 * 10))
    adv = torch.tensor([-2.0, 4.0, 5.0], dtype=torch.float64)    # per-token 2 on row 0 (4 tokens), −4 on row 1
    assert get("grpo") == pytest.approx((2.0 - 4.0 + 0.0) / 3)
    assert get("dapo") == pytest.approx((4 * 2.0 - 4.0) / 5)
    assert get("dr_grpo") == pytest.approx((4 * 2.0 - 4.0) / 30)


# ratio just inside / outside 1±eps with positive and negative advantages (clip_low=0.2, clip_high=0.28)
DELTA = 1e-3
CLIP_CASES = [
    # ratio,              A,    clipped (gradient must vanish)
    (1.28 - DELTA,        1.0,  False),
    (1.28 + DELTA,        1.0,  True),
    (1.28 + DELTA,       -1.0,  False),   # pessimistic bound keeps the unclipped term for A<0 above 1+eps
    (0.80 + DELTA,       -1.0,  False),
    (0.80 - DELTA,       -1.0,  True),
    (0.80 - DELTA,        1.0,  False),
    (1.00,                0.5,  False),
]


@pytest.mark.parametrize("ratio,advantage,clipped", CLIP_CASES)
def test_clip_boundaries(ratio, advantage, clipped):
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.tensor([advantage], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
    loss.backward()
    if clipped:
        bound = 1.28 if ratio > 1 else 0.80
        assert loss.item() == pytest.approx(-bound * advantage, abs=1e-12)
        assert logp.grad.item() == 0.0
        side = "clip_frac_high" if ratio > 1 else "clip_frac_low"
        assert stats[side].item() == 1.0
    else:
        assert loss.item() == pytest.approx(-ratio * advantage, abs=1e-12)
        assert logp.grad.item() == pytest.approx(-ratio * advantage, abs=1e-12)   # d(−r·A)/dlogp = −r·A
        assert stats["clip_frac_high"].item() == 0.0 and stats["clip_frac_low"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_first_pass_gradient_is_reinforce(loss_type):
    """old = current (detached) ⇒ ratio 1, no clipping ⇒ ∇loss = −agg(A·∇logp) (REINFORCE with the same weights)."""
    gen = torch.Generator().manual_seed(1)
    B, T, V = 3, 4, 6
    theta = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([0.9, -1.1, 0.3], dtype=torch.float64)
    logp = torch.log_softmax(theta, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, loss_type=loss_type, max_tokens_norm=7)
    (grad,) = torch.autograd.grad(loss, theta)
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_frac_low"].item() == 0.0
    # independent REINFORCE surrogate: Σ_b Σ_t weight_bt · A_b · logp_bt with the loss type's token weights
    counts = mask.sum(dim=1).tolist()
    surrogate = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                weight = {"grpo": 1 / (B * counts[b]), "dr_grpo": 1 / (B * 7), "dapo": 1 / sum(counts)}[loss_type]
                logp_bt = torch.log_softmax(theta[b, t], dim=-1)[tokens[b, t]]
                surrogate = surrogate - weight * adv[b].item() * logp_bt
    (expected,) = torch.autograd.grad(surrogate, theta)
    assert torch.allclose(grad, expected, atol=1e-14, rtol=0)
    assert grad.abs().max() > 1e-3


def test_k3_kl_nonnegative_zero_at_equality_and_added_with_coef():
    for d in torch.linspace(-5, 5, 41, dtype=torch.float64).tolist():   # d = ref − logp
        logp = torch.tensor([[-1.0]], dtype=torch.float64)
        _, stats = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), ref_logprobs=logp + d)
        k3 = math.exp(d) - d - 1
        assert stats["kl_mean"].item() >= 0
        assert stats["kl_mean"].item() == pytest.approx(k3, abs=1e-12)
    lp, old, adv, mask, _, _ = _tiny_batch()
    lp = lp.clone().requires_grad_(True)
    base, _ = policy_loss(lp, old, adv, mask)
    same, stats = policy_loss(lp, old, adv, mask, ref_logprobs=lp.detach(), kl_coef=0.5)
    assert stats["kl_mean"].item() == 0.0 and same.item() == base.item()
    (g_base,) = torch.autograd.grad(base, lp)
    (g_same,) = torch.autograd.grad(same, lp)
    assert torch.equal(g_base, g_same)    # ∇k3 = 1 − exp(ref − logp) = 0 when the policy equals the reference


def test_tis_weights_are_capped_and_scale_the_gradient():
    logp = torch.full((1, 4), -1.0, dtype=torch.float64, requires_grad=True)
    old = logp.detach()
    is_ratio = torch.tensor([[0.5, 1.5, 3.0, 10.0]], dtype=torch.float64)   # π_old / π_sampler
    sampler = old - is_ratio.log()
    adv = torch.tensor([2.0], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4), loss_type="dapo", sampler_logprobs=sampler, tis_cap=2.0)
    (grad,) = torch.autograd.grad(loss, logp)
    weights = [0.5, 1.5, 2.0, 2.0]
    assert grad[0].tolist() == pytest.approx([-2.0 * w / 4 for w in weights], abs=1e-12)
    assert stats["is_capped_frac"].item() == 0.5
    assert stats["is_ratio_max"].item() == pytest.approx(10.0)
    assert stats["is_weight_mean"].item() == pytest.approx(sum(weights) / 4)
    expected_diff = sum(abs(math.log(r)) for r in [0.5, 1.5, 3.0, 10.0]) / 4
    assert stats["is_logp_abs_diff_mean"].item() == pytest.approx(expected_diff)
    # sampler log-probs without a cap: mismatch is logged, the loss is untouched
    plain, _ = policy_loss(logp, old, adv, torch.ones(1, 4), loss_type="dapo")
    logged, stats = policy_loss(logp, old, adv, torch.ones(1, 4), loss_type="dapo", sampler_logprobs=sampler)
    assert logged.item() == plain.item() and "is_ratio_max" in stats and "is_capped_frac" not in stats


def test_masked_positions_may_hold_garbage():
    lp, old, adv, mask, ref, sampler = _tiny_batch()
    lp = lp.clone()
    for t in (old, ref, sampler, lp):
        t[~mask.bool()] = float("-inf")
    lp.requires_grad_(True)
    loss, stats = policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, sampler_logprobs=sampler, tis_cap=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert torch.all(lp.grad[~mask.bool()] == 0)
    assert all(torch.isfinite(v) for v in stats.values())


def test_entropy_stat_is_masked_mean():
    lp = torch.zeros(1, 3)
    mask, entropy = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 2.0, 9.0]])
    _, stats = policy_loss(lp, lp, torch.ones(1), mask, entropy=entropy)
    assert stats["entropy_mean"].item() == pytest.approx(1.5)


def test_aggregate_tokens_ignores_masked_garbage():
    per_token = torch.tensor([[1.0, float("inf")], [3.0, float("nan")]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert aggregate_tokens(per_token, mask, "dapo").item() == 2.0
    assert aggregate_tokens(per_token, mask, "grpo").item() == 2.0
    assert aggregate_tokens(per_token, mask, "dr_grpo", max_tokens_norm=4).item() == 0.5


def test_mask_truncated_rows():
    mask = torch.ones(3, 4)
    out = mask_truncated_rows(mask, [False, True, False])
    assert out.tolist() == [[1] * 4, [0] * 4, [1] * 4] and mask.sum() == 12
    bool_out = mask_truncated_rows(mask.bool(), torch.tensor([True, False, False]))
    assert bool_out.dtype == torch.bool and bool_out.sum() == 8
    with pytest.raises(ValueError):
        mask_truncated_rows(mask, [True])


@pytest.mark.parametrize("kwargs", [dict(loss_type="ppo"), dict(loss_type="dr_grpo"), dict(kl_coef=0.1),
                                    dict(tis_cap=2.0), dict(clip_low=1.0)])
def test_policy_loss_bad_arguments(kwargs):
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        policy_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), **kwargs)
    with pytest.raises(ValueError):
        aggregate_tokens(lp, torch.ones(2, 3), "nope")


# ---------------------------------------------------------------------------------------------------------------------
# chunked log-probs
# ---------------------------------------------------------------------------------------------------------------------

def naive_logprobs(hidden, weight, targets, softcap, temperature):
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp_all = torch.log_softmax(logits / temperature, dim=-1)                       # (B, T, V)
    picked = logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    valid = targets >= 0
    return torch.where(valid, picked, 0.0), torch.where(valid, entropy, 0.0)


def _chunk_inputs(dtype, seed=0, B=2, T=6, d=16, V=37):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=gen, dtype=dtype)
    weight = (torch.randn(V, d, generator=gen, dtype=dtype) * 0.7)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, 2] = -1
    targets[1, -1] = -1
    upstream = torch.randn(B, T, generator=gen, dtype=dtype)
    return hidden, weight, targets, upstream


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 12, 64])       # B·T = 12: non-divisors, exact, larger than N
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_matches_naive_fp32(chunk_size, softcap, temperature):
    hidden, weight, targets, upstream = _chunk_inputs(torch.float32)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = chunked_token_logprobs(h1, w1, targets, softcap=softcap, chunk_size=chunk_size,
                                     temperature=temperature, compute_entropy=True)
    ref_lp, ref_ent = naive_logprobs(h2, w2, targets, softcap, temperature)
    assert lp.shape == targets.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-6, rtol=1e-6)
    assert not ent.requires_grad
    (lp * upstream).sum().backward()
    (ref_lp * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-6, rtol=1e-6)
    assert torch.all(lp[targets < 0] == 0) and torch.all(h1.grad[targets < 0] == 0)


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_chunked_matches_naive_fp64_and_gradcheck(softcap):
    hidden, weight, targets, upstream = _chunk_inputs(torch.float64, seed=3, B=2, T=3, d=5, V=7)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    fn = lambda h, w: chunked_token_logprobs(h, w, targets, softcap=softcap, chunk_size=4, temperature=0.8)
    torch.autograd.gradcheck(fn, (hidden, weight))
    lp = fn(hidden, weight)
    ref, _ = naive_logprobs(hidden, weight, targets, softcap, 0.8)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, ref, atol=1e-12, rtol=0)


def test_chunked_weight_only_or_hidden_only_grad():
    hidden, weight, targets, upstream = _chunk_inputs(torch.float64)
    w = weight.clone().requires_grad_(True)
    (chunked_token_logprobs(hidden, w, targets, chunk_size=5) * upstream).sum().backward()
    w_ref = weight.clone().requires_grad_(True)
    (naive_logprobs(hidden, w_ref, targets, None, 1.0)[0] * upstream).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-12, rtol=0)


def test_chunked_low_precision_hidden_runs_close():
    # bf16 activations with fp32 master weights, as under autocast on GPU: logits/logprobs still in fp32
    hidden, weight, targets, upstream = _chunk_inputs(torch.float32)
    h = hidden.bfloat16().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp = chunked_token_logprobs(h, w, targets, softcap=3.0, chunk_size=5)
    (lp * upstream).sum().backward()
    assert lp.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref, _ = naive_logprobs(hidden, weight, targets, 3.0, 1.0)
    torch.testing.assert_close(lp, ref, atol=0.1, rtol=0.05)


def test_chunked_bf16_matmuls_keep_fp32_hidden_logits_and_grads():
    """matmul_dtype=bf16 on fp32 inputs: the lm_head matmuls get bf16 operands, everything else stays fp32, and the
    result is within bf16 rounding of the fp32 one (naive reference)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm_.default):
                self.seen.add((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    hidden, weight, targets, upstream = _chunk_inputs(torch.float32)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    spy = MatmulDtypes()
    with spy:
        lp = chunked_token_logprobs(h, w, targets, softcap=3.0, chunk_size=5, matmul_dtype=torch.bfloat16)
        (lp * upstream).sum().backward()
    assert spy.seen == {(torch.bfloat16, torch.bfloat16)}
    assert lp.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref, _ = naive_logprobs(h2, w2, targets, 3.0, 1.0)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(lp, ref, atol=0.05, rtol=0.02)
    assert (lp - ref).abs().max() > 0  # the bf16 path really ran
    torch.testing.assert_close(h.grad, h2.grad, atol=0.05, rtol=0.05)
    torch.testing.assert_close(w.grad, w2.grad, atol=0.05, rtol=0.05)
    fp32 = chunked_token_logprobs(hidden, weight, targets, softcap=3.0, chunk_size=5, matmul_dtype=torch.float32)
    assert torch.equal(fp32, chunked_token_logprobs(hidden, weight, targets, softcap=3.0, chunk_size=5))
    with pytest.raises(ValueError, match="matmul_dtype"):
        chunked_token_logprobs(hidden, weight, targets, matmul_dtype=torch.int8)


def test_chunked_softcap_zero_means_off_like_the_model():
    hidden, weight, targets, _ = _chunk_inputs(torch.float64)
    off = chunked_token_logprobs(hidden, weight, targets, softcap=0)
    assert torch.equal(off, chunked_token_logprobs(hidden, weight, targets, softcap=None))
    assert not torch.allclose(off, chunked_token_logprobs(hidden, weight, targets, softcap=2.0))


def test_chunked_bad_inputs():
    hidden, weight, targets, _ = _chunk_inputs(torch.float32)
    with pytest.raises(ValueError):
        chunked_token_logprobs(hidden, weight, targets.masked_fill(targets == targets[0, 0], 37))
    with pytest.raises(ValueError):
        chunked_token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError):
        chunked_token_logprobs(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError):
        chunked_token_logprobs(hidden, weight, targets[:, :2])
    with pytest.raises(ValueError):
        chunked_token_logprobs(hidden, weight, targets, softcap=-1.0)


def test_trainer_logprobs_use_forward_hidden_lm_head_and_softcap():
    torch.manual_seed(0)

    class TinyModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(softcap=2.0)
            self.wte = torch.nn.Embedding(11, 8)
            self.lm_head = torch.nn.Linear(8, 11, bias=False)

        def forward_hidden(self, idx):
            return torch.tanh(self.wte(idx))

    model = TinyModel()
    idx = torch.randint(0, 11, (2, 5))
    targets = torch.randint(0, 11, (2, 5))
    lp = token_logprobs(model, idx, targets, temperature=0.9, chunk_size=3, compute_entropy=False)
    ref, _ = naive_logprobs(model.forward_hidden(idx), model.lm_head.weight, targets, 2.0, 0.9)
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=1e-6)


def test_trainer_logprobs_match_real_gpt_logits():
    # integration with reasoning.gpt: forward_hidden + lm_head + config.softcap reproduce GPT.forward's logits
    from reasoning.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(max_seq_len=16, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, softcap=15.0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():    # the default init gives near-uniform predictions, which would hide a softcap slip
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(50.0)
    idx = torch.randint(0, 50, (2, 7))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1
    lp = token_logprobs(model, idx, targets, temperature=1.0, chunk_size=5, compute_entropy=False)
    (lp.sum()).backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logp_all = torch.log_softmax(model(idx), dim=-1)
    ref = torch.where(targets >= 0, logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ref.sum().backward()
    with torch.no_grad():   # logits large enough that dropping the softcap would change the answer
        uncapped = chunked_token_logprobs(model.forward_hidden(idx), model.lm_head.weight, targets, softcap=None)
    assert (uncapped - ref).abs().max() > 0.1
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, model.lm_head.weight.grad, atol=1e-5, rtol=1e-5)
