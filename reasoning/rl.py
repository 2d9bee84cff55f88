"""Reinforcement learning with verifiable rewards (GRPO family) as a library: `RLConfig` + `train_rl(config)`;
scripts/chat_rl.py is its CLI, reasoning/grpo.py holds the math (advantages, clipped loss, chunked log-probs) and
reasoning/rollout.py the batch (prompt stream, sampled groups with rewards and advantages, trainer rows).

One RL step, on every rank:
  1. **Rollout.** Each step takes the next `prompts_per_step` prompts of an endless stream over the train split
     (reshuffled each epoch), rank r the r-th contiguous slice of them, so the stream position is one integer.
     Each is sampled `num_samples` (G) times by reasoning.engine.Engine, which also returns the sampler's per-token
     log-probs. A prompt too long for the model's context is skipped (and counted), not fatal.
  2. **Reward.** reasoning.rewards functions (correctness, format, optional DAPO soft overlong penalty),
     combined with weights; every part is logged on its own.
  3. **Advantages.** `grpo.group_advantages` per prompt group. Groups whose G rewards are all equal carry no signal
     (their advantages are exactly 0): their share is logged, and `filter_zero_variance` drops them from the
     training batch (DAPO's dynamic sampling, without the re-sampling).
  4. **Optimisation.** `ppo_epochs` passes over the batch, each split into `num_minibatches` optimizer steps, each
     accumulated from micro-batches of `device_batch_size` rows. The trainer's log-probs come from
     `grpo.chunked_token_logprobs` on `forward_hidden` + `lm_head` (B x T x V logits never exist), at the sampling
     temperature so they are comparable with the sampler's. `old` log-probs (PPO ratio denominator) and the frozen
     reference's (k3 KL, only when `kl_coef` > 0: otherwise no reference model is even loaded) come from one
     no-grad pass before the first update; with a single update per batch `old` is the live forward, detached.
     Truncated importance sampling (`tis_cap`) reweights tokens by min(pi_old / pi_sampler, cap).

Loss normalisation across micro-batches and ranks: `policy_loss` aggregates one micro-batch; we rescale it by
(its rows, or tokens for "dapo") / (the optimizer step's total over all ranks) x world_size, so the accumulated,
rank-averaged gradient equals the gradient of the aggregate over the whole step. The optimizer (MuonAdamW)
averages gradients across ranks itself, so the model is not wrapped in DDP.

Distributed invariant: every rank runs the same number of optimizer steps and, within each, at least one
backward: a rank whose share of a minibatch is empty (everything filtered or skipped) runs a zero-weighted
backward, so the gradient all-reduce always has every rank's (possibly zero) gradient. When a step has no
trainable token on any rank, every rank skips the update together (the decision uses all-reduced counts).

Periodic held-out evaluation (reasoning.evaluation): greedy pass@1 and sampled pass@k on the task's test split.
Checkpoints hold model, optimizer, step, prompt cursor, every rank's RNG and the metric history; `resume=True`
continues exactly (rollout seeds and minibatch shuffles are functions of (seed, step, rank), not of RNG state).

References: DeepSeekMath (GRPO), DAPO (clip-higher, dynamic sampling, token-level loss, overlong shaping),
Dr. GRPO, verl / TRL GRPOTrainer (minibatching, TIS), nanochat's chat_rl (the simple on-policy loop).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from reasoning import checkpoint as ckpt
from reasoning.checkpointing import set_activation_checkpointing
from reasoning.common import UserError, get_base_dir, get_compute_dtype, init_distributed, print0
from reasoning.grpo import LOSS_TYPES, chunked_token_logprobs, policy_loss
from reasoning.microbatch import micro_batches
from reasoning.rollout import PromptStream, TrainingRows, collect_rollout, training_rows
from reasoning.training import (DEVICE_HELP, FinetuneConfig, NonFiniteLossError, RunLog, RunProgress, all_reduce_sum,
                                autocast_factory, check_weights_finite, load_optimizer_state, load_resume_checkpoint,
                                option, save_training_checkpoint, start_run)
from tasks.synthetic import DIFFICULTY as _SYNTHETIC_DIFFICULTY

STAGE = "rl"
DEFAULT_DEVICE_BATCH_SIZE = 32  # rows per micro-batch when --device-batch-size is -1 off CUDA
LOGPROB_MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --logprob-matmul-dtype
LOG_NAME = "chat_rl"


@dataclass
class RLConfig(FinetuneConfig):
    """RL settings; the optimizer, logging and checkpoint settings come from FinetuneConfig (reasoning.training)."""
    # model source: the reasoning.checkpoint.add_model_args flags (the script adds them itself)
    stage: str = field(default="sft", metadata=option("source stage", cli=False))
    tag: str | None = field(default=None, metadata=option("source tag", cli=False))
    step: int | None = field(default=None, metadata=option("source step", cli=False))
    init_from: str | None = field(default=None, metadata=option("source spec", cli=False))
    # prompts
    task: str = field(default="synthetic", metadata=option(
        "prompt source: synthetic | GSM8K | MATH (comma list mixes them; NAME@PATH gives a task its own data)"))
    task_size: int = field(default=-1, metadata=option("train prompts per task (-1: all; synthetic: 20000)"))
    synthetic_difficulty: str = field(default="easy", metadata=option("synthetic task preset (tasks.synthetic)",
                                                                      choices=tuple(_SYNTHETIC_DIFFICULTY)))
    # rollouts
    num_steps: int = field(default=100, metadata=option("RL steps (one rollout batch each)"))
    prompts_per_step: int = field(default=16, metadata=option("prompts per step, all ranks together"))
    num_samples: int = field(default=8, metadata=option("G: samples per prompt (the group)"))
    max_new_tokens: int = field(default=256, metadata=option("generation budget per sample"))
    temperature: float = field(default=1.0, metadata=option("sampling temperature (> 0)"))
    top_k: int | None = field(default=None, metadata=option("sample from the k most likely tokens only"))
    # rewards
    format_weight: float = field(default=0.0, metadata=option(
        "weight of the format reward (think span closed, one \\boxed{}); it is logged even at 0"))
    require_think: bool = field(default=True, metadata=option("format reward needs a closed think span"))
    overlong_buffer: int = field(default=0, metadata=option(
        "DAPO soft overlong penalty over the last N tokens of the budget (0: off)"))
    overlong_weight: float = field(default=1.0, metadata=option("weight of the overlong penalty"))
    grader_timeout: float = field(default=1.5, metadata=option("seconds per answer comparison (math_equal)"))
    # advantages and loss
    loss_type: str = field(default="grpo", metadata=option("token aggregation: grpo | dr_grpo | dapo"))
    std_normalize: bool = field(default=True, metadata=option(
        "divide advantages by the group std (GRPO); Dr. GRPO turns it off"))
    filter_zero_variance: bool = field(default=False, metadata=option(
        "drop groups whose rewards are all equal from the training batch (DAPO dynamic sampling)"))
    shuffle_advantages: bool = field(default=False, metadata=option(
        "negative control: permute the advantages across the step's trained rows (and so across groups), so they no "
        "longer belong to the samples that earned them; every other part of the update is unchanged"))
    clip_low: float = field(default=0.2, metadata=option("PPO clip below: ratio >= 1 - clip_low"))
    clip_high: float = field(default=0.28, metadata=option("PPO clip above: ratio <= 1 + clip_high (DAPO clip-higher)"))
    kl_coef: float = field(default=0.0, metadata=option("k3 KL penalty to the frozen source model (0: no reference)"))
    tis_cap: float = field(default=2.0, metadata=option(
        "truncated importance sampling cap on pi_trainer/pi_sampler per token (0: off)"))
    mask_truncated: bool = field(default=False, metadata=option(
        "give no loss to completions cut by the token budget (DAPO overlong filtering)"))
    ppo_epochs: int = field(default=1, metadata=option("optimisation passes over each rollout batch"))
    num_minibatches: int = field(default=1, metadata=option("optimizer steps per pass"))
    device_batch_size: int = field(default=-1, metadata=option(
        "rows per forward/backward micro-batch (-1: 32, or on CUDA the largest power of two up to 32 that the memory "
        "planner says fits the GPU; it changes only how the update is split, not the update)"))
    logprob_chunk_size: int = field(default=1024, metadata=option("token rows per chunk of the log-prob kernel"))
    logprob_matmul_dtype: str = field(default="fp32", metadata=option(
        "operand dtype of the log-prob kernel's lm_head matmuls (bf16: tensor cores; logits, log-softmax and "
        "gradients still accumulate in fp32)", choices=tuple(LOGPROB_MATMUL_DTYPES)))
    # optimizer: FinetuneConfig's rates, scaled down (an RL update moves a fine-tuned model; SFT's scale is 1)
    lr_scale: float = field(default=0.05, metadata=option("multiplier on every learning rate below"))
    # evaluation
    eval_every: int = field(default=20, metadata=option(
        "held-out eval every N steps (0: only at the start and end, <0: never)"))
    eval_task: str | None = field(default=None, metadata=option("eval task, test split (default: --task)"))
    eval_problems: int = field(default=128, metadata=option("held-out problems per eval"))
    eval_max_tokens: int = field(default=-1, metadata=option("tokens per eval completion (-1: --max-new-tokens)"))
    eval_batch_size: int = field(default=64, metadata=option("problems per engine call in the eval"))
    eval_pass_k: int = field(default=4, metadata=option("samples per problem for pass@k (<= 1: greedy pass@1 only)"))
    eval_temperature: float = field(default=1.0, metadata=option("sampling temperature of the pass@k eval"))
    seed: int = field(default=0, metadata=option("seed of the prompt order, rollouts and minibatch shuffles"))
    device: str | None = field(default=None, metadata=option(DEVICE_HELP))

    def validate(self) -> None:
        """Raise UserError naming the first bad setting (they come from command-line flags)."""
        super().validate()
        self.require_positive("num_steps", "prompts_per_step", "num_samples", "max_new_tokens", "ppo_epochs",
                              "num_minibatches", "logprob_chunk_size", "eval_problems", "eval_batch_size")
        if self.device_batch_size != -1 and self.device_batch_size < 1:
            raise UserError(f"--device-batch-size {self.device_batch_size}: expected rows > 0 or -1 (auto)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"--temperature {self.temperature}: expected a number > 0 (RL needs diverse samples)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k {self.top_k}: expected a positive integer")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss-type {self.loss_type}: expected one of {', '.join(LOSS_TYPES)}")
        if not 0 <= self.clip_low < 1:
            raise UserError(f"--clip-low {self.clip_low}: expected a number in [0, 1)")
        self.require_non_negative("clip_high", "kl_coef", "tis_cap", "format_weight", "overlong_weight",
                                  "eval_temperature", "overlong_buffer")
        if not (math.isfinite(self.grader_timeout) and self.grader_timeout > 0):
            raise UserError(f"--grader-timeout {self.grader_timeout}: expected seconds > 0")
        if self.overlong_buffer > self.max_new_tokens:
            raise UserError(f"--overlong-buffer {self.overlong_buffer}: expected at most --max-new-tokens "
                            f"{self.max_new_tokens}")
        if self.task_size == 0 or self.task_size < -1:
            raise UserError(f"--task-size {self.task_size}: expected a positive number of prompts or -1")
        if self.eval_max_tokens == 0 or self.eval_max_tokens < -1:
            raise UserError(f"--eval-max-tokens {self.eval_max_tokens}: expected a positive integer or -1")


def add_rl_args(parser) -> None:
    """One --flag per RLConfig field (reasoning.training), booleans as --flag / --no-flag pairs. The model-source
    fields have none: reasoning.checkpoint.add_model_args gives those flags."""
    RLConfig.add_args(parser, negatable_booleans=True)


config_from_args = RLConfig.from_args


# ----------------------------------------------------------------------------------------------- tasks, rewards

def build_rl_tasks(config: RLConfig):
    """(train task, held-out eval task or None): the train split of `task`, the test split of `eval_task`."""
    from tasks.registry import build_mixture

    options = {"synthetic": {"difficulty": config.synthetic_difficulty}}
    size = None if config.task_size == -1 else config.task_size
    train = build_mixture(config.task, split="train", data_path=config.data_path, seed=config.seed, size=size,
                          task_options=options)
    held_out = None
    if config.eval_every >= 0:
        held_out = build_mixture(config.eval_task or config.task, split="test", data_path=config.data_path,
                                 seed=config.seed, task_options=options)
    return train, held_out


def _gold(example: dict) -> str:
    return str(example["answer"])


def build_reward(config: RLConfig):
    """CombinedReward: correctness (weight 1), format (format_weight, logged even at 0), overlong penalty."""
    from reasoning.rewards import combine_rewards, correctness_reward, format_reward, overlong_penalty

    fns = [correctness_reward(_gold, timeout=config.grader_timeout), format_reward(config.require_think)]
    weights = [1.0, config.format_weight]
    if config.overlong_buffer > 0:
        fns.append(overlong_penalty(config.max_new_tokens, config.overlong_buffer))
        weights.append(config.overlong_weight)
    return combine_rewards(fns, weights)


def _seed_for(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the keys (rollouts and shuffles must not depend on RNG state)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------- the update

def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, config: RLConfig, compute_entropy: bool):
    """Trainer log-probs (and detached entropy) of `targets` (B, T) at the sampling temperature, chunked over V.

    Only positions with a target go through the output head: prompts and padding are most of a rollout row,
    and the head's (n, V) logits are the expensive part. Other positions get 0."""
    forward_hidden = getattr(model, "compiled_forward_hidden", None) or model.forward_hidden  # see train_rl
    hidden = forward_hidden(inputs)                                       # (B, T, d)
    valid = targets >= 0
    out = chunked_token_logprobs(hidden[valid], model.lm_head.weight, targets[valid], softcap=model.config.softcap,
                                 chunk_size=config.logprob_chunk_size, temperature=config.temperature,
                                 compute_entropy=compute_entropy,
                                 matmul_dtype=LOGPROB_MATMUL_DTYPES[config.logprob_matmul_dtype])  # (n_valid,) each
    results = []
    for flat in (out if compute_entropy else (out,)):
        full = flat.new_zeros(targets.shape)
        full[valid] = flat                                                # differentiable scatter back to (B, T)
        results.append(full)
    return tuple(results) if compute_entropy else results[0]


def _slice(rows_data: TrainingRows, index: list[int], device):
    """(inputs, targets, sampler, mask) of some rows, trimmed to their longest row, on `device`."""
    width = max(rows_data.lengths[i] for i in index)
    ix = torch.tensor(index, dtype=torch.long)
    return tuple(t[ix, :width].to(device) for t in (rows_data.inputs, rows_data.targets,
                                                    rows_data.sampler_logprobs, rows_data.mask))


@torch.no_grad()
def reference_pass(model, ref_model, data: TrainingRows, rows: list[int], config: RLConfig, device, autocast):
    """Per-row (T,)-padded old log-probs (policy before any update), reference log-probs (or None) and entropy,
    all (N, T) on the CPU, filled for `rows`."""
    N, T = data.targets.shape
    old = torch.zeros((N, T))
    entropy = torch.zeros((N, T))
    ref = torch.zeros((N, T)) if ref_model is not None else None
    for index in micro_batches(data.lengths, rows, config.device_batch_size, config.max_tokens_per_micro_batch):
        inputs, targets, _, _ = _slice(data, index, device)
        width = inputs.shape[1]
        with autocast():
            lp, ent = token_logprobs(model, inputs, targets, config, compute_entropy=True)
            old[index, :width] = lp.float().cpu()
            entropy[index, :width] = ent.float().cpu()
            if ref_model is not None:
                ref[index, :width] = token_logprobs(ref_model, inputs, targets, config, False).float().cpu()
    return old, ref, entropy


_STAT_KEYS = ("loss", "pg_loss", "ratio_mean", "ratio_max", "clip_frac_low", "clip_frac_high", "kl_mean",
              "entropy_mean", "is_logp_abs_diff_mean", "is_ratio_max", "is_capped_frac", "is_weight_mean")


def _zero_backward(model, data: TrainingRows, device, autocast):
    """A backward with weight 0 through every parameter (on one rollout row, or one token if there is none): a rank
    whose share of a minibatch is empty still has (zero) gradients to bring to the all-reduce."""
    inputs = data.inputs[:1, :data.lengths[0]] if data.lengths else torch.zeros((1, 1), dtype=torch.long)
    with autocast():
        logits = model.compute_logits(model.forward_hidden(inputs.to(device)))
    (logits.sum() * 0.0).backward()


def optimize_rollout(model, optimizer, data: TrainingRows, advantages: torch.Tensor, rows: list[int],
                     config: RLConfig, step: int, lr_mult: float, rank: int, world_size: int, device, autocast,
                     ref_model=None) -> dict:
    """ppo_epochs x num_minibatches optimizer steps over `rows` (this rank's trainable rows). Returns token-weighted
    loss statistics (this rank's sums and weights, for the caller to all-reduce), grad norms and update count."""
    updates_per_batch = config.ppo_epochs * config.num_minibatches
    precomputed = updates_per_batch > 1 or ref_model is not None
    old = ref = entropy = None
    if precomputed and rows:
        model.eval()
        old, ref, entropy = reference_pass(model, ref_model, data, rows, config, device, autocast)
        model.train()
    # one row = one unit (grpo, dr_grpo normalise per sequence), one token = one unit (dapo)
    units = data.mask.sum(dim=1) if config.loss_type == "dapo" else torch.ones(data.mask.shape[0])
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult

    stat_sums = dict.fromkeys(_STAT_KEYS, 0.0)
    stat_weight = dict.fromkeys(_STAT_KEYS, 0.0)
    grad_norms, updates = [], 0
    for epoch in range(config.ppo_epochs):
        order = list(rows)
        np.random.default_rng(_seed_for(config.seed, step, epoch, rank)).shuffle(order)
        chunks = [[int(i) for i in c] for c in np.array_split(np.array(order, dtype=np.int64),
                                                              config.num_minibatches)]
        counts = torch.tensor([float(units[c].sum()) if c else 0.0 for c in chunks], dtype=torch.float64)
        counts = all_reduce_sum(counts)  # the global normaliser of every minibatch of this pass
        for chunk, total in zip(chunks, counts.tolist()):
            if not chunk:  # nothing here, but other ranks may have rows: enter their all-reduce with zeros
                _zero_backward(model, data, device, autocast)
            # micro-batches of similar lengths pad less; neither their order nor their grouping changes the
            # accumulated gradient (each is scaled by its share of the minibatch's units above)
            for index in micro_batches(data.lengths, chunk, config.device_batch_size,
                                       config.max_tokens_per_micro_batch):
                inputs, targets, sampler, mask = _slice(data, index, device)
                width = inputs.shape[1]
                with autocast():
                    if old is None and epoch == 0:  # single update per batch: the live forward is also "old"
                        logprobs, ent = token_logprobs(model, inputs, targets, config, compute_entropy=True)
                    else:
                        logprobs = token_logprobs(model, inputs, targets, config, compute_entropy=False)
                        ent = entropy[index, :width].to(device) if entropy is not None and epoch == 0 else None
                old_lp = logprobs.detach() if old is None else old[index, :width].to(device)
                loss, stats = policy_loss(
                    logprobs, old_lp, advantages[index].to(device), mask, loss_type=config.loss_type,
                    clip_low=config.clip_low, clip_high=config.clip_high, max_tokens_norm=config.max_new_tokens,
                    ref_logprobs=None if ref is None else ref[index, :width].to(device), kl_coef=config.kl_coef,
                    sampler_logprobs=sampler, tis_cap=config.tis_cap or None, entropy=ent)
                # nothing to learn on any rank (total 0): the backward still runs, with weight 0
                scale = 0.0 if total == 0 else float(units[index].sum()) / total * world_size
                (loss * scale).backward()
                tokens = float(mask.sum())
                if tokens > 0:
                    for key in _STAT_KEYS:
                        if key in stats:
                            stat_sums[key] += float(stats[key]) * tokens
                            stat_weight[key] += tokens
            if total == 0:  # every rank agrees (all-reduced count): no update from an empty minibatch
                model.zero_grad(set_to_none=True)
                continue
            optimizer.reduce_gradients()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                  config.grad_clip if config.grad_clip > 0 else float("inf"))
            if not math.isfinite(float(norm)):
                raise NonFiniteLossError(f"step {step}: gradient norm {float(norm)}: RL diverged; stopped before the "
                                         f"update. Try a lower --lr-scale.")
            optimizer.step()
            model.zero_grad(set_to_none=True)
            grad_norms.append(float(norm))
            updates += 1
    return {"stat_sums": stat_sums, "stat_weight": stat_weight, "grad_norms": grad_norms, "updates": updates}


# ----------------------------------------------------------------------------------------------- evaluation

def held_out_eval(model, tokenizer, task, config: RLConfig) -> dict:
    """Greedy pass@1 and (eval_pass_k > 1) sampled pass@k on the first eval_problems test problems."""
    from reasoning.evaluation import EvalSettings, broadcast_summary, evaluate_task

    max_tokens = config.max_new_tokens if config.eval_max_tokens == -1 else config.eval_max_tokens
    greedy = EvalSettings(max_tokens=max_tokens, batch_size=config.eval_batch_size, seed=config.seed)
    summary = broadcast_summary(evaluate_task(model, tokenizer, task, greedy, max_problems=config.eval_problems))
    result = {"accuracy": summary["accuracy"], "eval_response_len": summary.get("mean_completion_tokens")}
    if config.eval_pass_k > 1:
        k = config.eval_pass_k
        sampled = EvalSettings(num_samples=k, temperature=config.eval_temperature, max_tokens=max_tokens,
                               batch_size=max(1, config.eval_batch_size // k), seed=config.seed)
        summary = broadcast_summary(evaluate_task(model, tokenizer, task, sampled, max_problems=config.eval_problems))
        result["pass@1_sampled"] = summary["pass@1"]
        result[f"pass@{k}"] = summary[f"pass@{k}"]
    return result


# ----------------------------------------------------------------------------------------------- the loop

def _load_policy(config: RLConfig, device, base_dir: str):
    return ckpt.load_model_from_args(config, device, phase="train", base_dir=base_dir)


def _load_reference(config: RLConfig, device, base_dir: str):
    """The frozen source model for the KL penalty (always the source checkpoint, also when resuming)."""
    ref_model, _, _ = ckpt.load_model_from_args(config, device, phase="eval", base_dir=base_dir)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    return ref_model


def _mean_tail(points: list, n: int = 10):
    values = [v for _, v in points[-n:]]
    return sum(values) / len(values) if values else None


def plan_memory(config: RLConfig, model_config, world_size: int = 1, target: str = "cuda", fake: bool = True,
                prompt_tokens: int = 256):
    """Per-rank memory plan (reasoning.memplan): rollout (the engine, KV cache up front), the update (chunked
    log-probs + optimizer step, every position planned as a completion token: an upper bound) and the held-out
    eval, each with the optimizer state alive: [PhasePlan "rollout", "train", "eval"]."""
    from reasoning import memplan

    prompts = max(1, config.prompts_per_step // world_size)
    G = config.num_samples
    width = min(prompt_tokens + config.max_new_tokens - 1, model_config.max_seq_len)
    rows = min(config.device_batch_size, prompts * G)
    if config.max_tokens_per_micro_batch:  # the budget's worst case: full-width rows up to it (one at least)
        rows = min(rows, max(1, config.max_tokens_per_micro_batch // width))
    checkpointing = memplan.planned_mode(config.activation_checkpointing)
    rows_per_step = rows * memplan.micro_steps(math.ceil(prompts * G / rows))
    eval_tokens = config.max_new_tokens if config.eval_max_tokens == -1 else config.eval_max_tokens
    one_update = dataclasses.replace(config, num_minibatches=1, ppo_epochs=1)

    def update():
        data = TrainingRows(torch.zeros((rows_per_step, width), dtype=torch.long),
                            torch.zeros((rows_per_step, width), dtype=torch.long), torch.zeros((rows_per_step, width)),
                            torch.ones((rows_per_step, width)), [width] * rows_per_step)
        s.model.train()
        optimize_rollout(s.model, s.optimizer, data, torch.ones(rows_per_step), list(range(rows_per_step)),
                         one_update, 0, 1.0, 0, 1, torch.device("cpu"), s.autocast or contextlib.nullcontext,
                         reference)

    with memplan.Session(model_config, target, fake) as s:
        s.build_optimizer(**config.optimizer_args(config.lr_scale))
        reference = s.add_frozen_copy() if config.kl_coef > 0 else None  # the KL penalty's frozen model
        # the update first: it creates the optimizer state that every phase lives with from the second step on
        set_activation_checkpointing(s.model, checkpointing)
        train = s.phase("chat_rl", "train", {"device_batch_size": rows, "width": width,
                                             "logprob_chunk_size": config.logprob_chunk_size,
                                             "activation_checkpointing": checkpointing},
                        lambda: [update() for _ in range(2)])
        plans = [s.phase("chat_rl", "rollout", {"rows": prompts * G, "prompt_tokens": prompt_tokens,
                                                "max_new_tokens": config.max_new_tokens},
                         lambda: s.generate(prompts, prompt_tokens, G, config.max_new_tokens)), train]
        if config.eval_every >= 0:
            plans.append(s.phase("chat_rl", "eval", {"rows": config.eval_batch_size, "max_tokens": eval_tokens},
                                 lambda: s.generate(config.eval_batch_size, prompt_tokens, 1, eval_tokens)))
    return plans


def resolve_device_batch(config: RLConfig, model_config, device, world_size: int,
                         gpu_memory_gib: float | None = None) -> RLConfig:
    """The config with a concrete device batch size and activation checkpointing mode (reasoning.memplan: on CUDA
    the planner plans the rollout, the update and the eval, and checks or chooses both)."""
    from reasoning import memplan

    def plan_of(rows: int, mode: str):
        return plan_memory(dataclasses.replace(config, device_batch_size=rows, activation_checkpointing=mode),
                           model_config, world_size)

    rows, mode = memplan.resolve_training_memory(
        config.device_batch_size, DEFAULT_DEVICE_BATCH_SIZE, config.activation_checkpointing, plan_of,
        gpu_memory_gib if gpu_memory_gib is not None else memplan.detected_gpu_memory(device),
        other_flags="--prompts-per-step, --num-samples, --max-new-tokens or --eval-batch-size")
    return dataclasses.replace(config, device_batch_size=rows, activation_checkpointing=mode)


def train_rl(config: RLConfig, tasks=None) -> dict:
    """Run (or resume) GRPO-style RL per `config`; every rank must call it. `tasks` = (train, held-out or None)
    overrides build_rl_tasks (tests). Returns a summary: metrics, series, per-step records, checkpoint dir."""
    from reasoning.engine import Engine
    from reasoning.evaluation import resolve_source

    config.validate()
    start_time = time.perf_counter()
    info = init_distributed(config.device)
    rank, world_size, device = info.rank, info.world_size, info.device
    if config.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {config.prompts_per_step}: expected a multiple of the number of "
                        f"processes ({world_size})")
    base_dir = config.base_dir or get_base_dir()
    autocast = autocast_factory(device, get_compute_dtype(device))
    source = resolve_source(config, base_dir)
    model, tokenizer, source_meta = _load_policy(config, device, base_dir)
    config = resolve_device_batch(config, model.config, device, world_size)  # on CUDA: plans every phase
    set_activation_checkpointing(model, config.activation_checkpointing)
    ref_model = _load_reference(config, device, base_dir) if config.kl_coef > 0 else None
    train_task, eval_task = tasks if tasks is not None else build_rl_tasks(config)
    reward = build_reward(config)
    tag = config.out_tag or source["tag"]
    ckpt_dir = ckpt.checkpoint_dir(STAGE, tag, base_dir)

    # ---- resume: weights, optimizer, cursor, RNG and history from our own last checkpoint
    resume_meta = load_resume_checkpoint(ckpt_dir, model, device, world_size, "rng", str(source["dir"]),
                                         meta_types={"cursor": int, "records": list}) if config.resume else None
    optimizer = model.setup_optimizer(**config.optimizer_args(config.lr_scale),
                                      compile_backend=config.optimizer_compile_backend(device))
    if config.compile_on(device):
        # only the log-prob passes of the update go through the compiled forward (rows of varying length:
        # dynamic=None); the engine's KV-cache forward stays eager
        model.compiled_forward_hidden = torch.compile(model.forward_hidden, dynamic=None,
                                                      backend=config.compile_backend)
    if resume_meta is not None:
        load_optimizer_state(ckpt_dir, resume_meta, optimizer, device)
        ckpt.set_rng_state(resume_meta["rng"][rank])
    progress = RunProgress(resume_meta, config.num_steps, config.stop_at_step, "--num-steps", start_time)
    stream = PromptStream(train_task, config.seed, 0 if resume_meta is None else resume_meta["cursor"])
    history = resume_meta["history"] if resume_meta is not None else \
        {"reward": [], "train_accuracy": [], "accuracy": [], "evals": []}
    records = [] if resume_meta is None else resume_meta.get("records", [])
    engine = Engine(model, tokenizer)

    # settings are checked by now: the tag's owner and the folder's writability are next, before any training
    run_id = start_run(ckpt_dir, resume_meta, config.overwrite, "--out-tag")
    log = RunLog.for_run(base_dir, f"{LOG_NAME}_{tag}", config, progress.resumed_at)
    G, P = config.num_samples, config.prompts_per_step
    print0(f"rl: {len(train_task):,} train prompts ({getattr(train_task, 'name', config.task)}), "
           f"{config.num_steps} steps x {P} prompts x {G} samples ({world_size} ranks), {config.ppo_epochs} pass(es) "
           f"x {config.num_minibatches} minibatch(es), "
           f"loss {config.loss_type}, kl {config.kl_coef}{' (no reference model)' if ref_model is None else ''} | "
           f"from {source['dir']} step {source['step']} -> {ckpt_dir}{progress.resumed_note}")

    def save(step: int):
        meta = {
            "rl_config": config.to_dict(), "stage": STAGE,
            "tokenizer_dir": source_meta.get("tokenizer_dir"),
            "source": {"dir": source["dir"], "step": source["step"]}, "cursor": stream.cursor,
            "history": history, "records": records,
            "train_seconds": progress.seconds(),
        }
        save_training_checkpoint(ckpt_dir, step, model, optimizer, meta, config.keep_last, run_id, config.overwrite)

    def evaluate(step: int):
        result = held_out_eval(model, tokenizer, eval_task, config)
        history["accuracy"].append([step, result["accuracy"]])
        history["evals"].append({"step": step, **result})
        print0(f"step {step:05d} | eval " + " | ".join(f"{k} {v:.4f}" for k, v in result.items() if v is not None))
        log.log({"step": step, **{f"eval/{k}": v for k, v in result.items()}})

    step = progress.start_step
    model.train()
    try:
        while True:
            at = progress.at(step)
            if eval_task is not None and len(eval_task) and at.evaluate_due(config.eval_every):
                evaluate(step)
            if at.save_due(config.save_every):
                save(step)
            if at.last:
                break
            record = rl_step(model, optimizer, engine, tokenizer, stream, reward, config, step, rank, world_size,
                             device, autocast, ref_model)
            check_weights_finite(model, step, ckpt_dir, run_id)  # only step boundaries are ever saved
            step += 1
            record["step"] = step
            records.append(record)
            history["reward"].append([step, record["reward"]])
            history["train_accuracy"].append([step, record["reward/correctness"]])
            log.log(record)
            if step % config.log_every == 0 or step == config.num_steps:
                print0(f"step {step:05d}/{config.num_steps} | reward {record['reward']:.3f} | "
                       f"correct {record['reward/correctness']:.3f} | zero-var {record['zero_variance_frac']:.2f} | "
                       f"len {record['response_len']:.0f} | kl {record.get('kl', 0.0):.4f} | "
                       f"ent {record.get('entropy', float('nan')):.3f} | clip {record.get('clip_frac', 0.0):.3f} | "
                       f"rollout {record['t_rollout']:.1f}s train {record['t_train']:.1f}s | "
                       f"{record['tok_per_s']:.0f} tok/s")
    finally:
        log.close()

    accuracies = [v for _, v in history["accuracy"]]
    metrics = {
        "initial_accuracy": accuracies[0] if accuracies else None,
        "accuracy": accuracies[-1] if accuracies else None,
        "mean_reward": _mean_tail(history["reward"]),          # the last steps: one batch is noisy
        "initial_reward": _mean_tail(history["reward"][:10]),
        "train_accuracy": _mean_tail(history["train_accuracy"]),
        "steps": step,
    }
    return {
        "step": step, "num_steps": config.num_steps, "finished": step == config.num_steps, "metrics": metrics,
        "series": {"reward": history["reward"], "accuracy": history["accuracy"],
                   "train_accuracy": history["train_accuracy"]},
        "records": records, "evals": history["evals"], "seconds": progress.seconds(),
        "checkpoint_dir": ckpt_dir, "config": config.to_dict(), "source": source, "tag": tag,
        "world_size": world_size, "reference_loaded": ref_model is not None,
    }


def shuffled_advantages(advantages: torch.Tensor, rows: list[int], seed: int, step: int, rank: int) -> torch.Tensor:
    """A copy of `advantages` (N,) whose entries at `rows` are permuted among themselves (seeded by seed, step, rank).

    The negative control of the RL experiment (dev/rl_learning.py): the update keeps its size, its rows, the same
    multiset of advantages and every other setting, but an advantage no longer tells its row whether that sample
    was rewarded, so whatever held-out gain remains is not learned from the reward."""
    out = advantages.clone()
    if len(rows) > 1:
        index = torch.tensor(rows, dtype=torch.long)
        order = np.random.default_rng(_seed_for(seed, step, rank, 0, 0xAD)).permutation(len(rows))
        out[index] = advantages[index[torch.from_numpy(order)]]
    return out


def rl_step(model, optimizer, engine, tokenizer, stream: PromptStream, reward, config: RLConfig, step: int,
            rank: int, world_size: int, device, autocast, ref_model=None) -> dict:
    """Rollout -> reward -> advantages -> update for one step; returns the step's metrics (all ranks combined)."""
    t0 = time.perf_counter()
    examples = stream.next_examples(config.prompts_per_step, rank, world_size)
    seed = _seed_for(config.seed, step, rank)
    t_gen = time.perf_counter()
    rollout = collect_rollout(engine, tokenizer, examples, reward, config.num_samples, config.max_new_tokens,
                              config.temperature, seed, top_k=config.top_k, std_normalize=config.std_normalize)
    t_rollout = time.perf_counter() - t_gen
    data = training_rows(rollout.prompts, rollout.generations, config.mask_truncated)
    G = config.num_samples
    if config.filter_zero_variance:
        keep = ~rollout.zero_variance.repeat_interleave(G)
        rows = [i for i in range(len(rollout.generations)) if bool(keep[i])]
    else:
        rows = list(range(len(rollout.generations)))
    advantages = shuffled_advantages(rollout.advantages, rows, config.seed, step, rank) \
        if config.shuffle_advantages else rollout.advantages
    t1 = time.perf_counter()
    lr_mult = config.lr_multiplier(step, config.num_steps)
    result = optimize_rollout(model, optimizer, data, advantages, rows, config, step, lr_mult, rank,
                              world_size, device, autocast, ref_model)
    t_train = time.perf_counter() - t1

    # ---- metrics: sums over this rank, all-reduced in one collective
    gens = rollout.generations
    lengths = torch.tensor([len(g.tokens) for g in gens], dtype=torch.float64)
    names = sorted(rollout.parts)  # every reward's name, also for an empty rollout: the vectors must align
    local = [float(len(gens)), float(rollout.rewards.sum()), *[float(rollout.parts[n].sum()) for n in names],
             float(rollout.zero_variance.sum()), float(rollout.zero_variance.numel()), float(lengths.sum()),
             float(sum(g.stop_reason != "stop" for g in gens)), float(len(rows)), float(rollout.skipped)]
    local += [result["stat_sums"][k] for k in _STAT_KEYS] + [result["stat_weight"][k] for k in _STAT_KEYS]
    totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
    n_rows, reward_sum = totals[0], totals[1]
    part_sums = dict(zip(names, totals[2:2 + len(names)]))
    zero_var, groups, length_sum, truncated, trained_rows, skipped = totals[2 + len(names):8 + len(names)]
    stat_sums = dict(zip(_STAT_KEYS, totals[8 + len(names):8 + len(names) + len(_STAT_KEYS)]))
    stat_weight = dict(zip(_STAT_KEYS, totals[8 + len(names) + len(_STAT_KEYS):]))
    n_rows, groups = max(n_rows, 1.0), max(groups, 1.0)  # every prompt of every rank skipped: report zeros
    stat = {k: stat_sums[k] / stat_weight[k] for k in _STAT_KEYS if stat_weight[k] > 0}
    elapsed = time.perf_counter() - t0
    record = {
        "reward": reward_sum / n_rows,
        **{f"reward/{n}": part_sums[n] / n_rows for n in names},
        "zero_variance_frac": zero_var / groups,
        "trained_rows": trained_rows,
        "skipped_prompts": skipped,
        "response_len": length_sum / n_rows,
        "truncated_frac": truncated / n_rows,
        "updates": result["updates"],
        "grad_norm": sum(result["grad_norms"]) / len(result["grad_norms"]) if result["grad_norms"] else 0.0,
        "lr_mult": lr_mult,
        "tok_per_s": length_sum / max(t_rollout, 1e-9) / world_size,  # per rank, like the engine sees it
        "t_rollout": t_rollout, "t_train": t_train, "t_step": elapsed,
    }
    renames = {"kl_mean": "kl", "entropy_mean": "entropy", "is_logp_abs_diff_mean": "is_logp_abs_diff"}
    for key, value in stat.items():
        record[renames.get(key, key)] = value
    if "clip_frac_low" in stat:
        record["clip_frac"] = stat["clip_frac_low"] + stat.get("clip_frac_high", 0.0)
    return record
