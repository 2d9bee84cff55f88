"""Pretraining's parts: `TrainConfig`, the schedules, the model and data set-up, evaluation, memory plan.

The loop itself reads top to bottom in scripts/base_train.py (`train(config) -> summary`).

One optimizer step = `total_batch_size` tokens (fixed: 2**19 by default, nanochat's d20 batch), gathered as
micro-batches of `device_batch_size` rows on every data-parallel rank and accumulated; the device batch size only
decides how many micro-batches that takes (memory), never the optimisation. The loss of every micro-batch is a SUM over its valid targets divided by the
number of valid targets of the whole step (all micro-batches, all ranks), so the accumulated gradient is exactly the
gradient of one big batch, however unevenly the targets are spread (`reasoning.training.accumulate_gradients`,
shared with SFT).

Distributed runs (torchrun) do not wrap the model in DDP: `reasoning.optim.MuonAdamW` averages gradients across
ranks itself. Each rank therefore scales its loss by world_size so that the average is the global mean.
`simulate_ranks=N` makes one process play N data-parallel ranks (one loader each, their micro-batches accumulated):
a run on one device then sees the same data and gradients as an N-rank torchrun run -- useful to debug a multi-GPU
recipe on one GPU, and how the tests check that torchrun runs match single-process ones.

Schedules (nanochat-style): learning rate = linear warmup, constant, linear warmdown to `final_lr_frac`; Muon
momentum ramps from 0.85 to 0.95 over the first steps. Both are written into the optimizer's param groups as
plain floats every step; the optimizer's (optionally compiled) kernels read them as tensors, and the compiled model
never sees them, so changing them never triggers a recompile.

Checkpoints (`reasoning.checkpoint`) hold the model, the optimizer state, and in meta: the step, every data rank's
loader position, every process's RNG state and the metric history. `resume=True` restores all of it, so on CPU a
resumed run is bitwise identical to one that never stopped. A non-finite loss or gradient norm stops the run
before the optimizer step, weights an update made non-finite stop it before the next save (`NonFiniteLossError`);
checkpoints already written are untouched, so the last one is good.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from reasoning.cli import DEVICE_HELP, option
from reasoning.common import UserError, print0
from reasoning.mfu import model_flops_utilization
from reasoning.optim import OptimizerSettings
from reasoning.training import TrainerConfig, lr_multiplier, set_learning_rate

STAGE = "base"
DEFAULT_DEVICE_BATCH_SIZE = 32  # rows per micro-batch when --device-batch-size is -1 off CUDA (the tuned recipe)
DEFAULT_TOTAL_BATCH_TOKENS = 2**19  # 256 rows of 2048 tokens: nanochat's d20 batch
DEFAULT_SAMPLE_PROMPTS = (
    "The capital of France is",
    "A spider has",
    "After Monday comes",
    "Question: What is 7 + 5?\nSolution:",
    "The color of the sky is",
    "Once upon a time, there was a",
)


@dataclass
class TrainConfig(TrainerConfig):
    """Pretraining settings; the optimizer rates, logging and run-folder settings come from TrainerConfig."""
    # model
    depth: int = field(default=20, metadata=option("model size dial: number of layers; width = depth × aspect ratio"))
    aspect_ratio: int = field(default=64, metadata=option("model width per layer (n_embd ≈ depth × this)"))
    head_dim: int | None = field(default=None, metadata=option("attention head size (default: gpt.config_from_depth)"))
    max_seq_len: int = field(default=2048, metadata=option("context length in tokens"))
    vocab_size: int = field(default=-1, metadata=option(
        "model vocabulary (-1: the tokenizer's); a larger one pads the embedding, e.g. to a multiple of 128"))
    # batch and length of training
    device_batch_size: int = field(default=-1, metadata=option(
        "rows per micro-batch per process (-1: 32, or on CUDA the largest power of two up to 32 that the memory "
        "planner says fits the GPU); only sets how many micro-batches accumulate to --total-batch-size"))
    total_batch_size: int = field(default=DEFAULT_TOTAL_BATCH_TOKENS, metadata=option(
        "tokens per optimizer step, all ranks together, reached by gradient accumulation"))
    num_iterations: int = field(default=-1, metadata=option(
        "optimizer steps (-1: derive from --target-param-data-ratio)"))
    target_param_data_ratio: float = field(default=20.0, metadata=option(
        "training tokens per non-embedding parameter when --num-iterations is -1 (Chinchilla: 20)"))
    simulate_ranks: int = field(default=1, metadata=option(
        "data-parallel ranks each process plays (one loader each, accumulated): N on one device reproduces an "
        "N-rank torchrun run"))
    # optimizer (the learning rates, warmup, final LR and clipping are TrainerConfig's)
    adam_beta1: float = field(default=0.8, metadata=option("AdamW beta1"))
    adam_beta2: float = field(default=0.95, metadata=option("AdamW beta2"))
    warmdown_ratio: float = field(default=0.2, metadata=option("fraction of steps of linear LR warmdown at the end"))
    muon_momentum_start: float = field(default=0.85, metadata=option("Muon momentum at step 0"))
    muon_momentum_end: float = field(default=0.95, metadata=option("Muon momentum after the warmup"))
    muon_momentum_warmup: int = field(default=300, metadata=option("steps of the linear Muon momentum ramp"))
    shard_optimizer: bool = field(default=False, metadata=option(
        "ZeRO-2 style: each rank keeps the optimizer state of its share of the parameters"))
    # precision (--compile / --compile-backend are TrainerConfig's)
    fp8: bool = field(default=False, metadata=option("train the hidden linear layers in fp8 (reasoning.fp8)"))
    fp8_min_dim: int = field(default=128, metadata=option("only layers with both dims >= this go to fp8"))
    # evaluation
    eval_every: int = field(default=250, metadata=option(
        "val bits-per-byte every N steps (0: only at the start and end, <0: never)"))
    eval_tokens: int = field(default=10 * 2**20, metadata=option("validation tokens per evaluation (all ranks)"))
    sample_every: int = field(default=2000, metadata=option(
        "print greedy completions of fixed prompts every N steps (0: only at the end, <0: never)"))
    sample_tokens: int = field(default=24, metadata=option("tokens per sample completion"))
    sample_prompts: tuple[str, ...] = field(default=DEFAULT_SAMPLE_PROMPTS, metadata=option("", cli=False))
    # checkpoints
    tag: str | None = field(default=None, metadata=option("checkpoint tag (default d<depth>)"))
    save_every: int = field(default=0, metadata=option("checkpoint every N steps (0: only at the end, <0: never)"))
    resume: bool = field(default=False, metadata=option("continue from the last checkpoint of this tag"))
    stop_at_step: int = field(default=-1, metadata=option(
        "checkpoint and stop after this step, keeping the schedule of --num-iterations (time-sliced jobs)"))
    # environment
    seed: int = field(default=42, metadata=option("seed of the weight init"))
    device: str | None = field(default=None, metadata=option(DEVICE_HELP))
    data_dir: str | None = field(default=None, metadata=option("parquet shards (default $REASONING_DATA_DIR or "
                                                               "<base>/base_data)"))
    tokenizer_dir: str | None = field(default=None, metadata=option("tokenizer folder (default <base>/tokenizer)"))

    def validate(self) -> None:
        """Raise UserError naming the first bad setting (these values come from command-line flags)."""
        super().validate()
        self.require_positive("depth", "aspect_ratio", "max_seq_len", "simulate_ranks",
                              "eval_tokens", "fp8_min_dim")
        self.require_non_negative("target_param_data_ratio", "sample_tokens", "muon_momentum_warmup")
        self.require_fraction("warmdown_ratio", "adam_beta1", "adam_beta2", "muon_momentum_start",
                              "muon_momentum_end")
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise UserError(f"--warmup-ratio {self.warmup_ratio} + --warmdown-ratio {self.warmdown_ratio}: "
                            "expected a sum <= 1")
        if self.device_batch_size != -1 and self.device_batch_size < 1:
            raise UserError(f"--device-batch-size {self.device_batch_size}: expected rows > 0 or -1 (auto)")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise UserError(f"--head-dim {self.head_dim}: expected an even number >= 2")
        if self.total_batch_size < 1:
            raise UserError(f"--total-batch-size {self.total_batch_size}: expected a number of tokens > 0")
        if self.num_iterations != -1 and self.num_iterations < 0:
            raise UserError(f"--num-iterations {self.num_iterations}: expected >= 0 or -1")
        if self.vocab_size != -1 and self.vocab_size < 1:
            raise UserError(f"--vocab-size {self.vocab_size}: expected a positive size or -1 (the tokenizer's)")
        if self.num_iterations == -1 and self.target_param_data_ratio <= 0:
            raise UserError("--num-iterations -1 needs --target-param-data-ratio > 0")

    def optimizer_settings(self, lr_scale: float = 1.0) -> OptimizerSettings:
        """TrainerConfig's rates plus pretraining's AdamW betas and the Muon momentum the ramp ends at."""
        return dataclasses.replace(super().optimizer_settings(lr_scale), betas=(self.adam_beta1, self.adam_beta2),
                                   muon_momentum=self.muon_momentum_end)


add_train_args = TrainConfig.add_args  # one --flag per field (reasoning.cli.FlagConfig); scripts/base_train.py
config_from_args = TrainConfig.from_args


# -------------------------------------------------------------------------------------------- schedules

def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    """Low momentum early (the gradient direction changes fast), ramping linearly to `end`."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def apply_schedules(optimizer, step: int, config: TrainConfig, num_iterations: int) -> float:
    """Write this step's lr (and Muon momentum) into the param groups; returns the lr multiplier."""
    mult = lr_multiplier(step, num_iterations, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac)
    set_learning_rate(optimizer, mult)
    momentum = muon_momentum(step, config.muon_momentum_start, config.muon_momentum_end, config.muon_momentum_warmup)
    for group in optimizer.param_groups:
        if group.get("kind") == "muon":
            group["momentum"] = momentum
    return mult


# -------------------------------------------------------------------------------------------- evaluation

def _fp8_off(model):
    from reasoning.fp8 import fp8_disabled  # evaluation reads the high-precision master weights

    return fp8_disabled(model)


def sample_completions(model, tokenizer, prompts, max_tokens: int) -> list[dict]:
    """Greedy completions of fixed prompts, to watch what the model learned (rank 0 only)."""
    from reasoning.engine import Engine

    if not prompts or max_tokens <= 0:
        return []
    ids = [tokenizer.encode(p, prepend=tokenizer.bos_token_id) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        with _fp8_off(model):
            generations = Engine(model, tokenizer).generate(ids, max_tokens=max_tokens, temperature=0.0)
    finally:
        model.train(was_training)
    return [{"prompt": p, "completion": tokenizer.decode(g.tokens)} for p, g in zip(prompts, generations)]


# -------------------------------------------------------------------------------------------- the loop's parts

def _non_embedding_params(model) -> int:
    # the embedding table is a lookup, not a matmul: Chinchilla-style token budgets count the other weights
    embedding = 0 if model.config.tie_embeddings else model.wte.weight.numel()
    return model.num_params() - embedding


def plan_memory(config: TrainConfig, model_config, world_size: int = 1, target: str = "cuda", fake: bool = True):
    """Per-rank memory plan of the training step (reasoning.memplan): [PhasePlan "train"]."""
    from reasoning import memplan

    B, T = config.device_batch_size, config.max_seq_len
    data_ranks = world_size * config.simulate_ranks
    accumulation = max(1, config.total_batch_size // (B * T * data_ranks)) * config.simulate_ranks
    settings = {"device_batch_size": B, "max_seq_len": T, "accumulation": accumulation, "fp8": config.fp8}
    with memplan.Session(model_config, target, fake, config.fp8_min_dim if config.fp8 else None) as s:
        s.build_optimizer(settings=config.optimizer_settings())
        return [s.phase("base_train", "train", settings,
                        lambda: s.train_steps([(B, T)] * memplan.micro_steps(accumulation)))]


def resolve_device_batch(config: TrainConfig, model_config, device, world_size: int,
                         gpu_memory_gib: float | None = None) -> TrainConfig:
    """The config with a concrete device batch size (reasoning.memplan: on CUDA the planner checks or chooses it).
    The tokens per step (--total-batch-size) stay fixed: fewer rows per micro-batch mean more accumulation, so the
    optimisation does not depend on the GPU."""
    from reasoning import memplan

    data_ranks = world_size * config.simulate_ranks
    total = config.total_batch_size

    def plan_of(rows: int):
        return plan_memory(dataclasses.replace(config, device_batch_size=rows), model_config, world_size)

    rows = memplan.resolve_device_batch_size(
        config.device_batch_size, DEFAULT_DEVICE_BATCH_SIZE, plan_of,
        gpu_memory_gib if gpu_memory_gib is not None else memplan.detected_gpu_memory(device),
        allowed=lambda b: total % (b * config.max_seq_len * data_ranks) == 0,
        other_flags="--max-seq-len or --depth")
    return dataclasses.replace(config, device_batch_size=rows)


def load_tokenizer(config: TrainConfig, base_dir: str):
    """(tokenizer, its folder): --tokenizer-dir, else <base>/tokenizer."""
    from reasoning.tokenizer import Tokenizer, get_tokenizer

    if config.tokenizer_dir:
        if not os.path.isdir(config.tokenizer_dir):
            raise UserError(f"--tokenizer-dir {config.tokenizer_dir} does not exist")
        return Tokenizer.load(config.tokenizer_dir), config.tokenizer_dir
    return get_tokenizer(base_dir), os.path.join(base_dir, "tokenizer")


def model_config_of(config: TrainConfig, tokenizer):
    """The GPTConfig the flags describe: --depth sizes it; the vocabulary is the tokenizer's unless --vocab-size
    pads it."""
    from reasoning.gpt import config_from_depth

    overrides = {} if config.head_dim is None else {"head_dim": config.head_dim}
    vocab_size = tokenizer.vocab_size if config.vocab_size == -1 else config.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"--vocab-size {vocab_size}: smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    return config_from_depth(config.depth, vocab_size, max_seq_len=config.max_seq_len,
                             aspect_ratio=config.aspect_ratio, **overrides)


def build_model(model_config, device):
    """A freshly initialised GPT on `device` (built on the meta device first: no throw-away CPU copy). The caller
    seeds the RNG: the same seed on every rank gives the same weights without a broadcast."""
    from reasoning.gpt import GPT

    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def convert_to_fp8(model, config: TrainConfig) -> int:
    """--fp8: the hidden linear layers train in fp8 (reasoning.fp8); returns how many were converted (0 without)."""
    if not config.fp8:
        return 0
    from reasoning.fp8 import convert_to_float8

    layers = convert_to_float8(model, min_dim=config.fp8_min_dim)
    print0(f"fp8: {layers} linear layers converted (layers with a dim < {config.fp8_min_dim} stay high "
           "precision, as does lm_head)")
    return layers


def accumulation_steps(config: TrainConfig, data_ranks: int) -> int:
    """Micro-batches per optimizer step and data rank: --total-batch-size tokens in rows of --device-batch-size x
    --max-seq-len on every data rank."""
    tokens_per_micro_step = config.device_batch_size * config.max_seq_len * data_ranks
    if config.total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total-batch-size {config.total_batch_size}: expected a multiple of device_batch_size × "
                        f"max_seq_len × data ranks = {config.device_batch_size} × {config.max_seq_len} × "
                        f"{data_ranks} = {tokens_per_micro_step}")
    return config.total_batch_size // tokens_per_micro_step


def training_steps(config: TrainConfig, model) -> int:
    """--num-iterations, else the steps that give --target-param-data-ratio tokens per non-embedding parameter."""
    if config.num_iterations >= 0:
        return config.num_iterations
    target_tokens = config.target_param_data_ratio * _non_embedding_params(model)
    return max(1, round(target_tokens / config.total_batch_size))


def build_train_loaders(config: TrainConfig, tokenizer, rank: int, world_size: int, device,
                        resume_meta: dict | None) -> tuple[list, list]:
    """(loaders, their states): one packed-row loader per data rank this process plays (--simulate-ranks), each
    on its own thread one batch ahead of the step (identical batches, reasoning.dataloader.Prefetcher), continuing
    from the checkpoint's positions on resume."""
    from reasoning.dataloader import Prefetcher, build_train_loader

    data_ranks = world_size * config.simulate_ranks
    states = [None] * config.simulate_ranks
    if resume_meta is not None:
        first = rank * config.simulate_ranks
        states = resume_meta["loader_states"][first:first + config.simulate_ranks]
    loaders = [Prefetcher(build_train_loader(tokenizer, config.device_batch_size, config.max_seq_len,
                                             config.data_dir, rank=rank * config.simulate_ranks + j,
                                             world_size=data_ranks, device=device, resume_state=states[j]))
               for j in range(config.simulate_ranks)]
    return loaders, states


def next_micro_batches(loaders: list, loader_states: list, accumulation: int) -> list:
    """One optimizer step's micro-batches of this process: `accumulation` rounds over its loaders, [(inputs (B, T),
    targets (B, T)), ...]; `loader_states` is updated in place to the position after them (what a save records)."""
    micro_batches = []
    for _ in range(accumulation):
        for j, loader in enumerate(loaders):
            inputs, targets, loader_states[j] = next(loader)
            micro_batches.append((inputs, targets))
    return micro_batches


def sample_due(at, every: int) -> bool:
    """Whether the greedy samples are printed at this step boundary: every N steps (N > 0) and at the end (0: only
    at the end, < 0: never); not again at the step a resumed run starts from."""
    return at.fresh and every >= 0 and (at.finished or (every > 0 and at.step > 0 and at.step % every == 0))


def steady_throughput(step_times: list[float], tokens_per_step: int, flops_per_token: float, peak,
                      world_size: int) -> tuple[float | None, float | None]:
    """(tokens/s, MFU) of the run's steady steps: the first steps pay for compilation and warm-up, so they are left
    out when there are more."""
    steady = step_times[min(5, len(step_times) // 2):] if step_times else []
    tok_per_s = tokens_per_step * len(steady) / sum(steady) if steady else None
    mfu = model_flops_utilization(flops_per_token, tok_per_s, peak, world_size) if tok_per_s else None
    return tok_per_s, mfu
