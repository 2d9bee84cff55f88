"""Parts of the RL stage (GRPO family); the loop that uses them, top to bottom, is scripts/chat_rl.py.

reasoning/rollout.py makes a step's batch (prompt stream, sampled and scored groups, trainer rows) and
reasoning/grpo.py holds the math (advantages, clipped loss, chunked log-probs). This module holds what the update
around that math needs:
  - `Learner`: the trained model with its optimizer, frozen KL reference and forward context, one value to pass.
  - rows: `trained_rows` (zero-variance filter), `shuffled_advantages` (negative control),
    `rows_on_device` (a micro-batch of reasoning.microbatch trimmed to its longest row), `minibatches` (seeded split of one
    pass with each minibatch's global normaliser).
  - log-probs: `token_logprobs` (trainer log-probs at the sampling temperature, only at target positions),
    `frozen_logprobs` (one no-grad pass: the policy before the update, the reference, entropy).
  - `zero_backward`: a rank with an empty minibatch still brings (zero) gradients to the all-reduce.
  - metrics: `LossStats` (token-weighted policy-loss statistics) and `step_record` (one all-reduce per step).
  - `seed_for`: rollout seeds and minibatch shuffles are functions of (seed, step, rank, ...), not of RNG state,
    which is what makes resume exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from reasoning.distributed import all_reduce_sum
from reasoning.grpo import chunked_token_logprobs
from reasoning.microbatch import micro_batches
from reasoning.rollout import GroupScores, RolloutBatch, TrainingRows


def seed_for(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the keys (rollouts and shuffles must not depend on RNG state)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


@dataclass
class Learner:
    """What an update works on: the policy, its optimizer, the frozen reference of the KL penalty (None without
    KL), where the forward runs (device, autocast context factory), this process's place among the ranks, and the
    run's checkpoints (a divergence error names the last good one)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    reference: torch.nn.Module | None
    device: torch.device
    autocast: object               # () -> context manager (reasoning.training.autocast_factory)
    rank: int = 0
    world_size: int = 1
    ckpt_dir: str = ""             # the run's checkpoint folder ("": none, e.g. the memory planner)
    run_id: str | None = None      # reasoning.resume.start_run's id of this run


# ----------------------------------------------------------------------------------------------- rows

def trained_rows(zero_variance: torch.Tensor, num_samples: int, filter_zero_variance: bool) -> list[int]:
    """Indices of the rows (N = P x G, prompt-major) the update trains on: all of them, or (DAPO dynamic sampling,
    without the re-sampling) those of groups whose rewards differ. zero_variance: (P,) bool."""
    n_rows = zero_variance.numel() * num_samples
    if not filter_zero_variance:
        return list(range(n_rows))
    keep = ~zero_variance.repeat_interleave(num_samples)
    return [i for i in range(n_rows) if bool(keep[i])]


def shuffled_advantages(advantages: torch.Tensor, rows: list[int], seed: int, step: int, rank: int) -> torch.Tensor:
    """A copy of `advantages` (N,) whose entries at `rows` are permuted among themselves (seeded by seed, step, rank).

    The negative control of the RL experiment (dev/rl_learning.py): the update keeps its size, its rows, the same
    multiset of advantages and every other setting, but an advantage no longer tells its row whether that sample
    was rewarded, so whatever held-out gain remains is not learned from the reward."""
    out = advantages.clone()
    if len(rows) > 1:
        index = torch.tensor(rows, dtype=torch.long)
        order = np.random.default_rng(seed_for(seed, step, rank, 0, 0xAD)).permutation(len(rows))
        out[index] = advantages[index[torch.from_numpy(order)]]
    return out


def minibatches(rows: list[int], units: torch.Tensor, num_minibatches: int, seed: int) -> tuple[list, list]:
    """One pass over `rows`: shuffled (by `seed`), split into `num_minibatches` (some may be empty), and each
    minibatch's loss units (rows, or tokens for "dapo": `units` (N,)) summed over all ranks, its normaliser."""
    order = list(rows)
    np.random.default_rng(seed).shuffle(order)
    chunks = [[int(i) for i in c] for c in np.array_split(np.array(order, dtype=np.int64), num_minibatches)]
    counts = torch.tensor([float(units[c].sum()) if c else 0.0 for c in chunks], dtype=torch.float64)
    return chunks, all_reduce_sum(counts).tolist()


def rows_on_device(data: TrainingRows, index: list[int], device):
    """(inputs, targets, sampler_logprobs, mask) of some rows, each (B, W) trimmed to their longest row W."""
    width = max(data.lengths[i] for i in index)
    ix = torch.tensor(index, dtype=torch.long)
    return tuple(t[ix, :width].to(device) for t in (data.inputs, data.targets, data.sampler_logprobs, data.mask))


# ----------------------------------------------------------------------------------------------- log-probs

def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_size: int,
                   compute_entropy: bool, matmul_dtype: torch.dtype = torch.float32):
    """Trainer log-probs (and detached entropy) of `targets` (B, T) at the sampling temperature, chunked over V.

    Only positions with a target go through the output head: prompts and padding are most of a rollout row,
    and the head's (n, V) logits are the expensive part. Other positions get 0."""
    # the stage compiles only the update's forward (rows of varying length); the engine's stays eager
    forward_hidden = getattr(model, "compiled_forward_hidden", None) or model.forward_hidden
    hidden = forward_hidden(inputs)                                       # (B, T, d)
    valid = targets >= 0
    out = chunked_token_logprobs(hidden[valid], model.lm_head.weight, targets[valid], softcap=model.config.softcap,
                                 chunk_size=chunk_size, temperature=temperature,
                                 compute_entropy=compute_entropy, matmul_dtype=matmul_dtype)  # (n_valid,) each
    results = []
    for flat in (out if compute_entropy else (out,)):
        full = flat.new_zeros(targets.shape)
        full[valid] = flat                                                # differentiable scatter back to (B, T)
        results.append(full)
    return tuple(results) if compute_entropy else results[0]


@dataclass
class FrozenLogprobs:
    """Log-probs fixed before a batch's first update, (N, T) on the CPU, filled at the trained rows."""
    old: torch.Tensor                # the policy before any update: the PPO ratio's denominator
    reference: torch.Tensor | None   # the frozen reference (k3 KL), None without one
    entropy: torch.Tensor            # the policy's entropy (logged)


@torch.no_grad()
def frozen_logprobs(learner: Learner, data: TrainingRows, rows: list[int], micro_rows: int, temperature: float,
                    chunk_size: int, max_tokens: int = 0, matmul_dtype: torch.dtype = torch.float32) -> FrozenLogprobs:
    """One no-grad pass over `rows` (eval mode) in micro-batches of at most `micro_rows` rows and `max_tokens`
    padded tokens (0: no token budget; reasoning.microbatch)."""
    model, reference = learner.model, learner.reference
    N, T = data.targets.shape
    out = FrozenLogprobs(torch.zeros((N, T)), torch.zeros((N, T)) if reference is not None else None,
                         torch.zeros((N, T)))
    model.eval()
    for index in micro_batches(data.lengths, rows, micro_rows, max_tokens):
        inputs, targets, _, _ = rows_on_device(data, index, learner.device)
        width = inputs.shape[1]
        with learner.autocast():
            lp, ent = token_logprobs(model, inputs, targets, temperature, chunk_size, True, matmul_dtype)
            out.old[index, :width] = lp.float().cpu()
            out.entropy[index, :width] = ent.float().cpu()
            if reference is not None:
                out.reference[index, :width] = token_logprobs(reference, inputs, targets, temperature, chunk_size,
                                                              False, matmul_dtype).float().cpu()
    model.train()
    return out


def zero_backward(learner: Learner, data: TrainingRows) -> None:
    """A backward with weight 0 through every parameter (on one rollout row, or one token if there is none): a rank
    whose share of a minibatch is empty still has (zero) gradients to bring to the all-reduce."""
    model = learner.model
    inputs = data.inputs[:1, :data.lengths[0]] if data.lengths else torch.zeros((1, 1), dtype=torch.long)
    with learner.autocast():
        logits = model.compute_logits(model.forward_hidden(inputs.to(learner.device)))
    (logits.sum() * 0.0).backward()


# ----------------------------------------------------------------------------------------------- metrics

STAT_KEYS = ("loss", "pg_loss", "ratio_mean", "ratio_max", "clip_frac_low", "clip_frac_high", "kl_mean",
             "entropy_mean", "is_logp_abs_diff_mean", "is_ratio_max", "is_capped_frac", "is_weight_mean")


@dataclass
class UpdateResult:
    """What one batch's update did, on this rank: token-weighted sums of `grpo.policy_loss`'s statistics (and their
    weights), the gradient norm of every optimizer step, the number of optimizer steps."""
    stat_sums: dict = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0.0))
    stat_weight: dict = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0.0))
    grad_norms: list = field(default_factory=list)
    updates: int = 0

    def add_stats(self, stats: dict, tokens: float) -> None:
        if tokens > 0:
            for key in STAT_KEYS:
                if key in stats:
                    self.stat_sums[key] += float(stats[key]) * tokens
                    self.stat_weight[key] += tokens


_RENAMES = {"kl_mean": "kl", "entropy_mean": "entropy", "is_logp_abs_diff_mean": "is_logp_abs_diff"}


def step_record(batch: RolloutBatch, scores: GroupScores, zero_variance: torch.Tensor, rows: list[int],
                update: UpdateResult, lr_mult: float, timings: dict, world_size: int) -> dict:
    """The step's metrics, all ranks combined: this rank's sums, all-reduced in one collective. `timings`: seconds
    "t_rollout" and "t_train", and "started", the step's time.perf_counter() at its start."""
    gens = batch.generations
    lengths = torch.tensor([len(g.tokens) for g in gens], dtype=torch.float64)
    names = sorted(scores.parts)  # every reward's name, also for an empty rollout: the vectors must align
    local = [float(len(gens)), float(scores.rewards.sum()), *[float(scores.parts[n].sum()) for n in names],
             float(zero_variance.sum()), float(zero_variance.numel()), float(lengths.sum()),
             float(sum(g.stop_reason != "stop" for g in gens)), float(len(rows)), float(batch.skipped)]
    local += [update.stat_sums[k] for k in STAT_KEYS] + [update.stat_weight[k] for k in STAT_KEYS]
    totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
    n_rows, reward_sum = totals[0], totals[1]
    part_sums = dict(zip(names, totals[2:2 + len(names)]))
    zero_var, groups, length_sum, truncated, trained, skipped = totals[2 + len(names):8 + len(names)]
    stat_sums = dict(zip(STAT_KEYS, totals[8 + len(names):8 + len(names) + len(STAT_KEYS)]))
    stat_weight = dict(zip(STAT_KEYS, totals[8 + len(names) + len(STAT_KEYS):]))
    n_rows, groups = max(n_rows, 1.0), max(groups, 1.0)  # every prompt of every rank skipped: report zeros
    stat = {k: stat_sums[k] / stat_weight[k] for k in STAT_KEYS if stat_weight[k] > 0}
    record = {
        "reward": reward_sum / n_rows,
        **{f"reward/{n}": part_sums[n] / n_rows for n in names},
        "zero_variance_frac": zero_var / groups,
        "trained_rows": trained,
        "skipped_prompts": skipped,
        "response_len": length_sum / n_rows,
        "truncated_frac": truncated / n_rows,
        "updates": update.updates,
        "grad_norm": sum(update.grad_norms) / len(update.grad_norms) if update.grad_norms else 0.0,
        "lr_mult": lr_mult,
        "tok_per_s": length_sum / max(timings["t_rollout"], 1e-9) / world_size,  # per rank, like the engine sees it
        "t_rollout": timings["t_rollout"], "t_train": timings["t_train"],
        "t_step": time.perf_counter() - timings["started"],
    }
    for key, value in stat.items():
        record[_RENAMES.get(key, key)] = value
    if "clip_frac_low" in stat:
        record["clip_frac"] = stat["clip_frac_low"] + stat.get("clip_frac_high", 0.0)
    return record
