"""GRPO math core: group advantages, the clipped policy loss (GRPO / Dr. GRPO / DAPO), and chunked log-probs.

Why this file exists: RL with verifiable rewards needs three numerically delicate pieces that are easy to get
subtly wrong and that the RL loop (scripts/chat_rl.py) only has to call:

1. `group_advantages`  — reward minus its group mean, optionally divided by the group std (GRPO, DeepSeekMath);
   groups whose rewards are all equal carry no signal and are reported so the caller can filter them (DAPO's
   dynamic sampling) and log how often that happens.
2. `policy_loss`       — the PPO clipped surrogate with asymmetric clipping ("clip-higher", DAPO), three ways of
   aggregating tokens (GRPO per-sequence mean, Dr. GRPO constant normaliser, DAPO token mean), an optional k3 KL
   penalty to a reference policy, and truncated importance sampling (TIS) that corrects for the sampler/trainer
   log-prob mismatch (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training";
   the verl `tis_imp_ratio_cap` recipe).
3. `chunked_token_logprobs` — per-token log-probs (and entropy) of the chosen tokens without ever holding the
   (B, T, V) logits: the memory wall of GRPO (Unsloth's observation), since G samples × T tokens × V floats
   dwarfs the model itself. Backward recomputes each chunk's logits.

References: DeepSeekMath (GRPO), Dr. GRPO ("Understanding R1-Zero-Like Training"), DAPO, Schulman's k3 KL
estimator ("Approximating KL Divergence"), verl / TRL GRPOTrainer for conventions.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


# ---------------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6):
    """Group-relative advantages: A = r − mean(group), optionally ÷ (std(group) + eps).

    rewards: (N,) laid out prompt-major (prompt0 sample0..G-1, prompt1 ...), as the engine returns them, or (P, G).
    Returns (advantages, zero_variance):
      advantages    same shape as `rewards`, floating point;
      zero_variance (P,) bool, True for groups whose rewards are all exactly equal. Their advantages are exactly 0
                    (never NaN, never ±tiny from rounding), so they add nothing to the loss; the caller may drop
                    them (dynamic sampling) and should log `zero_variance.float().mean()`.

    Std convention (pinned): the POPULATION std (divide by G, `unbiased=False`). With it, normalised advantages
    have exactly unit RMS within every non-degenerate group, and G=1 is well defined (always zero-variance rather
    than NaN). Example: [0, 0, 0, 1] → mean 0.25, std sqrt(0.1875) = 0.4330127, so the advantages are
    [-0.25, -0.25, -0.25, 0.75] / (0.4330127 + eps) ≈ [-0.57735, -0.57735, -0.57735, 1.73205]. (TRL uses the
    sample std, which would give [-0.5, -0.5, -0.5, 1.5] here.)
    Dr. GRPO argues the std division biases towards too-easy / too-hard prompts: pass normalize_std=False.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be (N,) or (P, G), got shape {tuple(rewards.shape)}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but group_size={group_size}; "
                         f"expected (P, {group_size})")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    if r.numel() == 0:  # no groups (every prompt of an RL step was too long to sample)
        return torch.zeros_like(r), torch.zeros(0, dtype=torch.bool)
    grouped = r.reshape(-1, group_size)                                   # (P, G)
    zero_variance = grouped.amax(dim=1) == grouped.amin(dim=1)            # exact test: no tolerance games
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    # mean() of identical floats need not reproduce them exactly (e.g. three 0.1s), so force the zeros.
    advantages = torch.where(zero_variance[:, None], torch.zeros_like(centered), centered)
    return advantages.reshape(rewards.shape), zero_variance


# ---------------------------------------------------------------------------------------------------------------------
# Policy loss
# ---------------------------------------------------------------------------------------------------------------------

def mask_truncated_rows(mask: torch.Tensor, truncated) -> torch.Tensor:
    """Return a copy of `mask` (B, T) with every row of a truncated completion zeroed (DAPO's overlong filtering).

    truncated: (B,) bools, e.g. `[g.stop_reason != "stop" for g in generations]`.
    """
    truncated = torch.as_tensor(truncated, dtype=torch.bool, device=mask.device)
    if truncated.shape != mask.shape[:1]:
        raise ValueError(f"truncated must have shape ({mask.shape[0]},) to match mask {tuple(mask.shape)}, "
                         f"got {tuple(truncated.shape)}")
    return mask.masked_fill(truncated[:, None], 0)


def aggregate_tokens(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                     max_tokens_norm: int | float | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token quantity to a scalar the way `loss_type` prescribes (mask: (B, T) float 0/1).

    grpo    : mean over each sequence's valid tokens, then mean over ALL B sequences (a fully masked row counts
              as 0, so dropping rows does not change the effective step size of the others; TRL does the same).
              Long answers get less weight per token — the length bias Dr. GRPO points out.
    dr_grpo : sum over all valid tokens / (B × max_tokens_norm); a constant normaliser (e.g. the generation
              budget) removes the length bias.
    dapo    : token-level mean: sum over all valid tokens / total valid tokens.
    Note for gradient accumulation / DDP: the dapo denominator here is this micro-batch's token count.
    """
    total = torch.where(mask > 0, per_token * mask, 0.0)       # where(): garbage at masked slots must not leak
    if loss_type == "grpo":
        return (total.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        if max_tokens_norm is None or max_tokens_norm <= 0:
            raise ValueError(f"loss_type='dr_grpo' needs max_tokens_norm > 0 (e.g. the generation budget), "
                             f"got {max_tokens_norm!r}")
        return total.sum() / (per_token.shape[0] * max_tokens_norm)
    if loss_type == "dapo":
        return total.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, x * mask, 0.0).sum() / mask.sum().clamp(min=1)


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not bool(mask.any()):
        return x.new_zeros(())
    return x[mask > 0].max()


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                loss_type: str = "grpo", clip_low: float = 0.2, clip_high: float = 0.2,
                max_tokens_norm: int | float | None = None, ref_logprobs: torch.Tensor | None = None,
                kl_coef: float = 0.0, sampler_logprobs: torch.Tensor | None = None, tis_cap: float | None = None,
                entropy: torch.Tensor | None = None):
    """PPO-clipped policy-gradient loss for GRPO-style RL. Returns (loss scalar, stats dict of detached 0-d tensors).

    Shapes: logprobs / old_logprobs / mask / ref_logprobs / sampler_logprobs / entropy (B, T); advantages (B,).
      logprobs         current policy, differentiable;
      old_logprobs     trainer's log-probs of the policy that generated the batch (detached; = logprobs.detach()
                       on the first pass over a batch);
      sampler_logprobs the rollout engine's log-probs of the same tokens (numerically differ from the trainer's).
    Per valid token, with ratio = exp(logp − old_logp):
      pg  = −min(ratio·A, clip(ratio, 1−clip_low, 1+clip_high)·A)          (clip_high > clip_low = DAPO clip-higher)
      pg *= w,  w = min(exp(old_logp − sampler_logp), tis_cap), detached     (TIS; only when tis_cap is given)
      kl  = exp(ref − logp) − (ref − logp) − 1                               (k3 estimator of KL(π‖ref), ≥ 0)
    loss = agg(pg) + kl_coef · agg(kl), agg = `aggregate_tokens(…, loss_type)`.

    TIS (Yao et al. 2025; verl's `tis_imp_ratio_cap`): the engine samples from π_sampler but the trainer scores
    with π_old, so the PPO gradient is off-policy by the factor π_old/π_sampler per token. Weighting each token's
    surrogate by that ratio, truncated at C (typically 2) to bound the variance, corrects most of the bias.
    The weight is a constant (no gradient) and does not touch the KL term. sampler_logprobs without tis_cap only
    logs the mismatch.

    Tokens with mask 0 are ignored entirely (their log-probs may be garbage, even -inf). To drop truncated
    completions, zero their rows first with `mask_truncated_rows`.
    Stats: loss, pg_loss, ratio_mean, ratio_max, clip_frac_low (A<0 and ratio<1−clip_low: gradient cut),
    clip_frac_high (A>0 and ratio>1+clip_high), and when given: kl_mean, entropy_mean, is_logp_abs_diff_mean,
    is_ratio_max, is_capped_frac, is_weight_mean. Token statistics are means over valid tokens.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs),
                    ("sampler_logprobs", sampler_logprobs), ("entropy", entropy)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} must have shape {tuple(logprobs.shape)} like logprobs, got {tuple(t.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must have shape ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if tis_cap is not None and (sampler_logprobs is None or tis_cap <= 0):
        raise ValueError(f"tis_cap needs sampler_logprobs and must be > 0, got tis_cap={tis_cap!r}")

    m = mask.to(logprobs.dtype)
    valid = m > 0
    zero = torch.zeros_like(logprobs)
    # where() before exp: masked positions may hold -inf/garbage and must not leak NaN into values or gradients.
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).detach()[:, None]                     # (B, 1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)
    pg_per_token = -surrogate

    stats = {}
    if sampler_logprobs is not None:
        with torch.no_grad():
            mismatch = torch.where(valid, old_logprobs - sampler_logprobs, zero)   # log(π_old / π_sampler)
            is_ratio = torch.exp(mismatch)
            stats["is_logp_abs_diff_mean"] = _masked_mean(mismatch.abs(), m)
            stats["is_ratio_max"] = _masked_max(is_ratio, m)
            if tis_cap is not None:
                is_weight = is_ratio.clamp(max=tis_cap)
                stats["is_capped_frac"] = _masked_mean((is_ratio > tis_cap).to(m.dtype), m)
                stats["is_weight_mean"] = _masked_mean(is_weight, m)
        if tis_cap is not None:
            pg_per_token = pg_per_token * is_weight

    pg_loss = aggregate_tokens(pg_per_token, m, loss_type, max_tokens_norm)
    loss = pg_loss
    if ref_logprobs is not None:
        delta = torch.where(valid, ref_logprobs.detach() - logprobs, zero)      # log(π_ref / π)
        kl_per_token = torch.exp(delta) - delta - 1.0
        if kl_coef != 0.0:
            loss = loss + kl_coef * aggregate_tokens(kl_per_token, m, loss_type, max_tokens_norm)
        stats["kl_mean"] = _masked_mean(kl_per_token.detach(), m)

    with torch.no_grad():
        stats["loss"] = loss.detach()
        stats["pg_loss"] = pg_loss.detach()
        stats["ratio_mean"] = _masked_mean(ratio, m)
        stats["ratio_max"] = _masked_max(ratio, m)
        stats["clip_frac_low"] = _masked_mean(((ratio < 1.0 - clip_low) & (adv < 0)).to(m.dtype), m)
        stats["clip_frac_high"] = _masked_mean(((ratio > 1.0 + clip_high) & (adv > 0)).to(m.dtype), m)
        if entropy is not None:
            stats["entropy_mean"] = _masked_mean(entropy.detach(), m)
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# Chunked per-token log-probs and entropy
# ---------------------------------------------------------------------------------------------------------------------

def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b as out_dtype. Low-precision operands on CUDA accumulate into an fp32 (out_dtype) result directly
    (bf16 tensor cores, no rounding of the products' sum to bf16); elsewhere the product is rounded to the operands'
    dtype and then upcast (the CPU has no fp32-output bf16 matmul)."""
    if a.dtype == out_dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a, b).to(out_dtype)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None, temperature: float,
                  out: torch.Tensor) -> torch.Tensor:
    """Sampling logits softcap(h @ W^T) / temperature of one chunk (n, V), the order the engine applies them.

    The result has out's dtype (float32, or float64 for float64 inputs) and, when h already has that dtype, is
    written into `out` (one buffer reused by every chunk instead of a fresh (n, V) allocation each time).
    With softcap the values are c/τ·tanh(z/c), so backward recovers tanh for the softcap derivative in place.
    """
    if h.dtype == out.dtype:
        z = torch.mm(h, weight.t(), out=out[: h.shape[0]])
    else:
        z = _matmul(h, weight.t(), out.dtype)           # low-precision matmul (lm_head's dtype), fp32 logits
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap / temperature)
    elif temperature != 1.0:
        z.div_(temperature)
    return z


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(softcap(h W^T)/τ)[target] row by row in chunks; backward recomputes each chunk's logits.

    Forward keeps only two (N,) vectors (row max, log-sum-exp of the shifted row) besides the inputs; nothing of
    size N × V outlives a chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, temperature, chunk_size, compute_entropy, matmul_dtype):
        # hidden (N, d), weight (V, d), targets (N,) long with -1 = ignore.
        # Matmuls run in matmul_dtype (None: hidden's dtype, what the model's lm_head would use under autocast);
        # autocast is switched off so that dtype choice is ours and identical in forward and backward. The
        # log-softmax, its sums and every gradient accumulate in fp32 (fp64 for fp64 inputs) whatever it is.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            mm_dtype = matmul_dtype or hidden.dtype
            w = weight.to(mm_dtype)
            acc = torch.promote_types(hidden.dtype, torch.float32)     # float32, or float64 for float64 inputs
            n_rows = hidden.shape[0]
            valid = targets >= 0
            safe_targets = targets.clamp(min=0)
            logprobs = torch.zeros(n_rows, dtype=acc, device=hidden.device)
            # logsumexp kept as row max + log Σ exp(logit − max): z − max is exact, so log p = (z − max) − log_sum
            # is as accurate as log_softmax's, whereas z − lse loses an ulp of |lse| (visible at low temperature)
            row_max = torch.zeros(n_rows, dtype=acc, device=hidden.device)
            log_sum = torch.zeros(n_rows, dtype=acc, device=hidden.device)
            entropy = torch.zeros(n_rows, dtype=acc, device=hidden.device) if compute_entropy else None
            buffer = torch.empty(min(chunk_size, n_rows), w.shape[0], dtype=acc, device=hidden.device)
            for start in range(0, n_rows, chunk_size):
                rows = slice(start, min(start + chunk_size, n_rows))
                logits = _chunk_logits(hidden[rows].to(mm_dtype), w, softcap, temperature, buffer)  # (n, V)
                chunk_max = logits.amax(dim=1, keepdim=True)
                shifted = logits.sub_(chunk_max)                       # in place: the raw logits are not needed
                chunk_log_sum = torch.exp(shifted).sum(dim=1, keepdim=True).log_()
                row_max[rows], log_sum[rows] = chunk_max.squeeze(1), chunk_log_sum.squeeze(1)
                log_p = shifted.sub_(chunk_log_sum)                    # (n, V) log-probabilities
                picked = log_p.gather(1, safe_targets[rows, None]).squeeze(1)
                logprobs[rows] = torch.where(valid[rows], picked, 0.0)
                if compute_entropy:
                    entropy[rows] = torch.where(valid[rows], -(log_p.exp() * log_p).sum(dim=1), 0.0)
        ctx.save_for_backward(hidden, weight, targets, row_max, log_sum)
        ctx.softcap, ctx.temperature, ctx.chunk_size, ctx.mm_dtype = softcap, temperature, chunk_size, mm_dtype
        if compute_entropy:
            ctx.mark_non_differentiable(entropy)
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, *unused_entropy_grad):
        hidden, weight, targets, row_max, log_sum = ctx.saved_tensors
        softcap, temperature, chunk_size, mm_dtype = ctx.softcap, ctx.temperature, ctx.chunk_size, ctx.mm_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(mm_dtype)
            n_rows = hidden.shape[0]
            # ignored targets get no gradient; the 1/τ of the chain rule is folded in once here
            g = torch.where(targets >= 0, grad_logprobs.to(row_max.dtype), 0.0) / temperature   # (N,)
            safe_targets = targets.clamp(min=0)
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
            # float32 (or float64) accumulator across chunks whatever the parameter dtype
            grad_weight = torch.zeros(w.shape, dtype=row_max.dtype, device=w.device) if need_w else None
            buffer = torch.empty(min(chunk_size, n_rows), w.shape[0], dtype=row_max.dtype, device=hidden.device)
            for start in range(0, n_rows, chunk_size):
                rows = slice(start, min(start + chunk_size, n_rows))
                h = hidden[rows].to(mm_dtype)
                logits = _chunk_logits(h, w, softcap, temperature, buffer)
                g_rows = g[rows, None]
                # grad_z = g/τ · (onehot − p) [· (1 − tanh²) with softcap]; in place on the logits buffer unless
                # the softcap derivative still needs the logits (then one (n, V) temporary)
                shifted = logits.sub(row_max[rows, None]) if softcap is not None else logits.sub_(row_max[rows, None])
                grad_z = shifted.sub_(log_sum[rows, None]).exp_().mul_(-g_rows)
                grad_z.scatter_add_(1, safe_targets[rows, None], g_rows)
                if softcap is not None:
                    tanh = logits.mul_(temperature / softcap)              # the buffer holds c/τ·tanh(z/c)
                    grad_z.mul_(tanh.mul_(tanh).neg_().add_(1.0))
                grad_z = grad_z.to(mm_dtype)
                if need_h:
                    if mm_dtype == hidden.dtype:
                        torch.mm(grad_z, w, out=grad_hidden[rows])
                    else:
                        grad_hidden[rows] = _matmul(grad_z, w, row_max.dtype)
                if need_w:
                    if grad_z.dtype == grad_weight.dtype:
                        grad_weight.addmm_(grad_z.t(), h)
                    else:
                        grad_weight += _matmul(grad_z.t(), h, grad_weight.dtype)
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                           softcap: float | None = None, chunk_size: int = 1024, temperature: float = 1.0,
                           compute_entropy: bool = False, matmul_dtype: torch.dtype | None = None):
    """Per-token log-probs of `targets` under softmax(softcap(hidden @ W^T) / temperature), never building (…, V).

    hidden (B, T, d) (any leading shape), lm_head_weight (V, d), targets (B, T) long; -1 = ignored position
    (log-prob 0, no gradient). softcap: logits = c·tanh(z/c) as in the model (None or 0: off); temperature
    divides the softcapped logits, matching the sampler, so these log-probs are comparable with the engine's.
    Rows of the flattened (B·T) positions are processed `chunk_size` at a time: extra memory is two or three
    chunk_size × V float32 buffers (1024 rows × 32768 vocab ≈ 128 MB each) instead of several B × T × V tensors.
    Gradients flow to hidden and lm_head_weight (backward recomputes each chunk's logits).
    matmul_dtype: the dtype of the (n, d) x (d, V) matmuls (None: hidden's). torch.bfloat16 runs them on bf16
    operands (tensor cores on a GPU, with fp32 accumulation and fp32 logits there; on a CPU the product is rounded
    to bf16 first); the log-softmax, its sums and the gradient accumulators stay fp32 either way.
    Returns logprobs (B, T) float32 (float64 for float64 inputs), and with compute_entropy=True also entropy (B, T)
    of the same distribution — DETACHED (for logging only; it is not differentiable).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on leading dims")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be (V, {hidden.shape[-1]}), got {tuple(lm_head_weight.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and softcap < 0:
        raise ValueError(f"softcap must be None, 0 (off) or > 0, got {softcap}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    vocab_size = lm_head_weight.shape[0]
    if targets.numel() and (int(targets.min()) < -1 or int(targets.max()) >= vocab_size):
        raise ValueError(f"targets must lie in [-1, {vocab_size}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if flat_hidden.shape[0] == 0:
        empty = hidden.new_zeros(targets.shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return (empty, empty.clone()) if compute_entropy else empty
    flat_targets = targets.reshape(-1).long()
    if matmul_dtype is not None and matmul_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"matmul_dtype must be None, torch.bfloat16, torch.float16 or torch.float32, "
                         f"got {matmul_dtype}")
    out = _ChunkedTokenLogprobs.apply(flat_hidden, lm_head_weight, flat_targets,
                                      float(softcap) if softcap else None, float(temperature),
                                      chunk_size, compute_entropy, matmul_dtype)
    if compute_entropy:
        return out[0].reshape(targets.shape), out[1].reshape(targets.shape)
    return out.reshape(targets.shape)
