"""RL with verifiable rewards (GRPO / Dr. GRPO / DAPO) on an SFT checkpoint; writes <base>/checkpoints/rl/<tag>/.

    # CPU / offline (runs/runcpu.sh): synthetic arithmetic prompts, 8 samples each
    python -m scripts.chat_rl --task synthetic --num-steps 60 --prompts-per-step 16 --num-samples 8
    # GPUs: GSM8K prompts, DAPO-style token loss with clip-higher and overlong shaping
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --task GSM8K --data-path ../shared/data \\
        --prompts-per-step 128 --num-samples 16 --max-new-tokens 1024 --loss-type dapo --clip-high 0.28 \\
        --filter-zero-variance --overlong-buffer 256 --num-minibatches 4 --run rl_d20
    python -m scripts.chat_rl ... --resume      # continue from the last checkpoint of the output tag

The source model comes from --stage/--tag/--step/--init-from (default: the newest sft checkpoint); the output tag
defaults to the source's tag (--out-tag overrides). Every other flag is a field of RLConfig below.
Metrics go to <base>/logs/chat_rl_<tag>.jsonl (and wandb with --run NAME); on success the report gets a "chat_rl"
section (initial/final held-out accuracy, mean reward, reward and accuracy curves). Exit code 3 on divergence.

This file is the whole stage, read top to bottom: the settings (RLConfig), the setup helpers, the update of one
rollout batch (`update_policy`), the loop (`train`), the memory plan, the CLI. The parts live in reasoning/:
rollout.py (prompt stream, sampled groups, trainer rows), rl.py (micro-batches, frozen log-probs, metrics),
grpo.py (advantages, clipped loss, chunked log-probs), rewards.py, engine.py, checkpoint.py (ModelSource),
training.py (the step's parts every trainer shares), resume.py (run checkpoints); the tasks come from tasks/registry.py.

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
Checkpoints hold model, optimizer, step, prompt cursor, every rank's RNG and the metric history; `--resume`
continues exactly (rollout seeds and minibatch shuffles are functions of (seed, step, rank), not of RNG state).

References: DeepSeekMath (GRPO), DAPO (clip-higher, dynamic sampling, token-level loss, overlong shaping),
Dr. GRPO, verl / TRL GRPOTrainer (minibatching, TIS), nanochat's chat_rl (the simple on-policy loop).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from reasoning import checkpoint as ckpt
from reasoning.checkpoint import ModelSource, add_model_args
from reasoning.common import UserError, get_base_dir, get_compute_dtype, init_distributed, print0, run_main, \
    seed_everything
from reasoning.engine import Engine
from reasoning.grpo import LOSS_TYPES, group_advantages, policy_loss
from reasoning.checkpointing import set_activation_checkpointing
from reasoning.microbatch import micro_batches
from reasoning.rl import (FrozenLogprobs, Learner, UpdateResult, frozen_logprobs, minibatches, rows_on_device, seed_for, shuffled_advantages, step_record, token_logprobs, trained_rows,
                          zero_backward)
from reasoning.rollout import PromptStream, TrainingRows, sample_groups, score_groups, training_rows
from reasoning.cli import DEVICE_HELP, finish_training_script, option, parse_script_args, script_parser
from reasoning.resume import load_optimizer_state, load_resume_checkpoint, save_training_checkpoint, start_run
from reasoning.training import (FinetuneConfig, RunLog, RunProgress, autocast_factory, check_step_finite,
                                check_weights_finite, clip_gradients, run_trainer, set_learning_rate)
from tasks.registry import build_rl_tasks

STAGE = "rl"
DEFAULT_DEVICE_BATCH_SIZE = 32  # rows per micro-batch when --device-batch-size is -1 off CUDA
LOG_NAME = "chat_rl"
LOGPROB_MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --logprob-matmul-dtype


@dataclass
class RLConfig(FinetuneConfig):
    """RL settings; the optimizer, logging and checkpoint settings come from FinetuneConfig (reasoning.training).
    The model source is not a setting: the --stage/--tag/--step/--init-from flags resolve to a ModelSource."""
    # prompts
    task: str = field(default="synthetic", metadata=option(
        "prompt source: synthetic | GSM8K | MATH (comma list mixes them; NAME@PATH gives a task its own data)"))
    task_size: int = field(default=-1, metadata=option("train prompts per task (-1: all; synthetic: 20000)"))
    synthetic_difficulty: str = field(default="easy", metadata=option("synthetic task preset (tasks.synthetic)"))
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

    @property
    def matmul_dtype(self) -> torch.dtype:
        return LOGPROB_MATMUL_DTYPES[self.logprob_matmul_dtype]

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

    @property
    def eval_tokens(self) -> int:
        """Tokens per held-out eval completion."""
        return self.max_new_tokens if self.eval_max_tokens == -1 else self.eval_max_tokens


# ----------------------------------------------------------------------------------------------- setup helpers

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


def load_reference(source: ModelSource, device):
    """The frozen source model for the KL penalty (always the source checkpoint, also when resuming)."""
    reference, _, _ = source.load(device, phase="eval")
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def held_out_eval(model, tokenizer, task, config: RLConfig) -> dict:
    """Greedy pass@1 and (eval_pass_k > 1) sampled pass@k on the first eval_problems test problems."""
    from reasoning.evaluation import EvalSettings, broadcast_summary, evaluate_task

    greedy = EvalSettings(max_tokens=config.eval_tokens, batch_size=config.eval_batch_size, seed=config.seed)
    summary = broadcast_summary(evaluate_task(model, tokenizer, task, greedy, max_problems=config.eval_problems))
    result = {"accuracy": summary["accuracy"], "eval_response_len": summary.get("mean_completion_tokens")}
    if config.eval_pass_k > 1:
        k = config.eval_pass_k
        sampled = EvalSettings(num_samples=k, temperature=config.eval_temperature, max_tokens=config.eval_tokens,
                               batch_size=max(1, config.eval_batch_size // k), seed=config.seed)
        summary = broadcast_summary(evaluate_task(model, tokenizer, task, sampled, max_problems=config.eval_problems))
        result["pass@1_sampled"] = summary["pass@1"]
        result[f"pass@{k}"] = summary[f"pass@{k}"]
    return result


def _mean_tail(points: list, n: int = 10):
    values = [v for _, v in points[-n:]]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------- the update

def needs_frozen_logprobs(config: RLConfig, learner: Learner) -> bool:
    """A no-grad pass before the update is needed when more than one optimizer step uses the batch (the PPO ratio's
    `old` must stay the policy that sampled) or a KL reference is loaded; else `old` is the live forward, detached."""
    return config.ppo_epochs * config.num_minibatches > 1 or learner.reference is not None


def micro_batch_loss(learner: Learner, data: TrainingRows, index: list[int], advantages: torch.Tensor,
                     frozen: FrozenLogprobs | None, first_pass: bool, config: RLConfig):
    """(loss, stats, mask) of `grpo.policy_loss` on the rows `index`, aggregated over this micro-batch only."""
    inputs, targets, sampler, mask = rows_on_device(data, index, learner.device)
    width, device = inputs.shape[1], learner.device
    with learner.autocast():
        if frozen is None and first_pass:  # single update per batch: the live forward is also "old"
            logprobs, entropy = token_logprobs(learner.model, inputs, targets, config.temperature,
                                               config.logprob_chunk_size, True, config.matmul_dtype)
        else:
            logprobs = token_logprobs(learner.model, inputs, targets, config.temperature, config.logprob_chunk_size,
                                      False, config.matmul_dtype)
            entropy = frozen.entropy[index, :width].to(device) if frozen is not None and first_pass else None
    old = logprobs.detach() if frozen is None else frozen.old[index, :width].to(device)
    reference = None if frozen is None or frozen.reference is None else frozen.reference[index, :width].to(device)
    loss, stats = policy_loss(
        logprobs, old, advantages[index].to(device), mask, loss_type=config.loss_type, clip_low=config.clip_low,
        clip_high=config.clip_high, max_tokens_norm=config.max_new_tokens, ref_logprobs=reference,
        kl_coef=config.kl_coef, sampler_logprobs=sampler, tis_cap=config.tis_cap or None, entropy=entropy)
    return loss, stats, mask


def update_policy(learner: Learner, data: TrainingRows, advantages: torch.Tensor, rows: list[int],
                  frozen: FrozenLogprobs | None, config: RLConfig, step: int) -> UpdateResult:
    """ppo_epochs x num_minibatches optimizer steps over `rows` (this rank's trained rows), at the learning rate the
    caller set. Returns this rank's loss statistics (for step_record to all-reduce), grad norms and update count."""
    model, optimizer, result = learner.model, learner.optimizer, UpdateResult()
    # one row = one unit (grpo, dr_grpo normalise per sequence), one token = one unit (dapo)
    units = data.mask.sum(dim=1) if config.loss_type == "dapo" else torch.ones(data.mask.shape[0])
    for epoch in range(config.ppo_epochs):
        shuffle_seed = seed_for(config.seed, step, epoch, learner.rank)
        for minibatch, total in zip(*minibatches(rows, units, config.num_minibatches, shuffle_seed)):
            if not minibatch:  # nothing here, but other ranks may have rows: enter their all-reduce with zeros
                zero_backward(learner, data)
            minibatch_loss = 0.0  # this rank's share of the minibatch's loss (for the finiteness check)
            # micro-batches of similar lengths pad less; neither their order nor their grouping (rows, or a token
            # budget) changes the accumulated gradient: each is scaled by its share of the minibatch's units
            for index in micro_batches(data.lengths, minibatch, config.device_batch_size,
                                       config.max_tokens_per_micro_batch):
                loss, stats, mask = micro_batch_loss(learner, data, index, advantages, frozen, epoch == 0, config)
                # the micro-batch's share of the minibatch, over all ranks (nothing to learn anywhere: weight 0)
                scale = 0.0 if total == 0 else float(units[index].sum()) / total * learner.world_size
                (loss * scale).backward()
                minibatch_loss += float(loss.detach()) * scale / learner.world_size
                result.add_stats(stats, float(mask.sum()))
            if total == 0:  # every rank agrees (all-reduced count): no update from an empty minibatch
                model.zero_grad(set_to_none=True)
                continue
            optimizer.reduce_gradients()
            norm = float(clip_gradients(model, config.grad_clip))
            check_step_finite(step, minibatch_loss, norm, learner.ckpt_dir, learner.run_id, hint="a lower --lr-scale")
            optimizer.step()
            model.zero_grad(set_to_none=True)
            result.grad_norms.append(norm)
            result.updates += 1
    return result


# ----------------------------------------------------------------------------------------------- the loop

def train(config: RLConfig, source: ModelSource, tasks=None) -> dict:
    """Run (or resume) GRPO-style RL of the model at `source` per `config`; every rank must call it. `tasks` =
    (train, held-out or None) overrides tasks.registry.build_rl_tasks (tests). Returns a summary: metrics, series,
    per-step records, checkpoint dir."""
    # ---- setup: settings, processes, policy (+ frozen reference for KL), tasks, reward, engine
    config.validate()
    start_time = time.perf_counter()
    info = init_distributed(config.device)
    rank, world_size, device = info.rank, info.world_size, info.device
    if config.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {config.prompts_per_step}: expected a multiple of the number of "
                        f"processes ({world_size})")
    base_dir = config.base_dir or get_base_dir()
    autocast = autocast_factory(device, get_compute_dtype(device))
    model, tokenizer, _ = source.load(device, phase="train")
    config = resolve_device_batch(config, model.config, device, world_size)  # on CUDA: plans every phase
    set_activation_checkpointing(model, config.activation_checkpointing)
    reference = load_reference(source, device) if config.kl_coef > 0 else None
    train_task, eval_task = tasks if tasks is not None else build_rl_tasks(config)
    reward = build_reward(config)
    tag = config.out_tag or source.tag
    ckpt_dir = ckpt.checkpoint_dir(STAGE, tag, base_dir)

    # ---- resume (weights, optimizer, cursor, RNG and history from our own last checkpoint), optimizer, compile
    resume_meta = load_resume_checkpoint(ckpt_dir, model, device, world_size, "rng", source.dir,
                                         meta_types={"cursor": int, "records": list}) if config.resume else None
    optimizer = model.setup_optimizer(config.optimizer_settings(),
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
    learner = Learner(model, optimizer, reference, device, autocast, rank, world_size, ckpt_dir, run_id)
    log = RunLog.for_run(base_dir, f"{LOG_NAME}_{tag}", config, progress.resumed_at)
    G, P = config.num_samples, config.prompts_per_step
    print0(f"rl: {len(train_task):,} train prompts ({getattr(train_task, 'name', config.task)}), "
           f"{config.num_steps} steps x {P} prompts x {G} samples ({world_size} ranks), {config.ppo_epochs} pass(es) "
           f"x {config.num_minibatches} minibatch(es), "
           f"loss {config.loss_type}, kl {config.kl_coef}{' (no reference model)' if reference is None else ''} | "
           f"from {source.dir} step {source.step} -> {ckpt_dir}{progress.resumed_note}")

    def save(step: int):
        meta = {
            "rl_config": config.to_dict(), "stage": STAGE, "tokenizer_dir": source.tokenizer_dir,
            "source": {"dir": source.dir, "step": source.step}, "cursor": stream.cursor,
            "history": history, "records": records, "train_seconds": progress.seconds(),
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
            # ---- evaluate, checkpoint, stop: at step boundaries
            at = progress.at(step)
            if eval_task is not None and len(eval_task) and at.evaluate_due(config.eval_every):
                evaluate(step)
            if at.save_due(config.save_every):
                save(step)
            if at.last:
                break

            # ---- rollout: this rank's prompts, G samples each from the engine (with its log-probs), their rewards
            started = time.perf_counter()
            examples = stream.next_examples(P, rank, world_size)
            seed = seed_for(config.seed, step, rank)
            t_rollout = time.perf_counter()
            batch = sample_groups(engine, tokenizer, examples, seed, num_samples=G,
                                  max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_k=config.top_k)
            scores = score_groups(batch, reward)
            t_rollout = time.perf_counter() - t_rollout

            # ---- advantages per group, the rows to train on (all, or only groups with a signal), trainer rows
            advantages, zero_variance = group_advantages(scores.rewards, G, normalize_std=config.std_normalize)
            rows = trained_rows(zero_variance, G, config.filter_zero_variance)
            if config.shuffle_advantages:  # the negative control
                advantages = shuffled_advantages(advantages, rows, config.seed, step, rank)
            data = training_rows(batch.prompts, batch.generations, config.mask_truncated)

            # ---- update: old/reference log-probs (one no-grad pass, when needed), LR, the optimizer steps
            t_train = time.perf_counter()
            frozen = None
            if needs_frozen_logprobs(config, learner) and rows:
                frozen = frozen_logprobs(learner, data, rows, config.device_batch_size, config.temperature,
                                         config.logprob_chunk_size, config.max_tokens_per_micro_batch,
                                         config.matmul_dtype)
            lr_mult = config.lr_multiplier(step, config.num_steps)
            set_learning_rate(optimizer, lr_mult)
            update = update_policy(learner, data, advantages, rows, frozen, config, step)
            t_train = time.perf_counter() - t_train

            # ---- log (metrics of all ranks, one all-reduce), then the weights' health
            record = step_record(batch, scores, zero_variance, rows, update, lr_mult,
                                 {"t_rollout": t_rollout, "t_train": t_train, "started": started}, world_size)
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
        "checkpoint_dir": ckpt_dir, "config": config.to_dict(), "source": {"dir": source.dir, "step": source.step},
        "tag": tag, "world_size": world_size, "reference_loaded": reference is not None,
    }


# ----------------------------------------------------------------------------------------------- memory plan

def plan_memory(config: RLConfig, model_config, world_size: int = 1, target: str = "cuda", fake: bool = True,
                prompt_tokens: int = 256):
    """Per-rank memory plan (reasoning.memplan): rollout (the engine, KV cache up front), the update (chunked
    log-probs + optimizer step, every position planned as a completion token: an upper bound) and the held-out
    eval, each with the optimizer state alive: [PhasePlan "rollout", "train", "eval"]."""
    import contextlib

    from reasoning import memplan

    prompts = max(1, config.prompts_per_step // world_size)
    G = config.num_samples
    width = min(prompt_tokens + config.max_new_tokens - 1, model_config.max_seq_len)
    rows = min(config.device_batch_size, prompts * G)
    if config.max_tokens_per_micro_batch:  # the budget's worst case: full-width rows up to it (one at least)
        rows = min(rows, max(1, config.max_tokens_per_micro_batch // width))
    checkpointing = memplan.planned_mode(config.activation_checkpointing)
    rows_per_step = rows * memplan.micro_steps(math.ceil(prompts * G / rows))
    one_update = dataclasses.replace(config, num_minibatches=1, ppo_epochs=1)

    def update():
        data = TrainingRows(torch.zeros((rows_per_step, width), dtype=torch.long),
                            torch.zeros((rows_per_step, width), dtype=torch.long), torch.zeros((rows_per_step, width)),
                            torch.ones((rows_per_step, width)), [width] * rows_per_step)
        s.model.train()
        learner = Learner(s.model, s.optimizer, reference, torch.device("cpu"), s.autocast or contextlib.nullcontext)
        all_rows = list(range(rows_per_step))
        frozen = None
        if needs_frozen_logprobs(one_update, learner):
            frozen = frozen_logprobs(learner, data, all_rows, rows, config.temperature, config.logprob_chunk_size,
                                     config.max_tokens_per_micro_batch, config.matmul_dtype)
        update_policy(learner, data, torch.ones(rows_per_step), all_rows, frozen, one_update, 0)

    with memplan.Session(model_config, target, fake) as s:
        s.build_optimizer(settings=config.optimizer_settings())
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
            plans.append(s.phase("chat_rl", "eval", {"rows": config.eval_batch_size, "max_tokens": config.eval_tokens},
                                 lambda: s.generate(config.eval_batch_size, prompt_tokens, 1, config.eval_tokens)))
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


# ----------------------------------------------------------------------------------------------- CLI

def build_parser():
    parser = script_parser(__doc__)
    add_model_args(parser, default_stage="sft")
    RLConfig.add_args(parser, negatable_booleans=True)  # booleans as --flag / --no-flag pairs
    return parser


def main(argv: list[str] | None = None):
    args = parse_script_args(build_parser(), argv)
    config = RLConfig.from_args(args)
    config.validate()
    seed_everything(config.seed)
    source = ModelSource.from_args(args, config.base_dir)
    summary = run_trainer(train, config, source)
    m = summary["metrics"]
    finish_training_script(
        "chat_rl", summary,
        {k: m[k] for k in ("initial_accuracy", "accuracy", "mean_reward")} | {"steps": summary["step"]},
        config=summary["config"] | {"source": summary["source"], "world_size": summary["world_size"]},
        metrics=m, base_dir=config.base_dir)


if __name__ == "__main__":
    run_main(main)
