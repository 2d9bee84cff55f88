"""Pretraining as a library: `TrainConfig` + `train(config) -> summary`; scripts/base_train.py is its CLI.

One optimizer step = `total_batch_size` tokens, gathered as micro-batches of `device_batch_size` rows on every
data-parallel rank and accumulated. The loss of every micro-batch is a SUM over its valid targets divided by the
number of valid targets of the whole step (all micro-batches, all ranks), so the accumulated gradient is exactly the
gradient of one big batch, however unevenly the targets are spread (`accumulate_gradients`).

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
before the optimizer step (`NonFiniteLossError`); checkpoints already written are untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.distributed as dist

from reasoning import checkpoint as ckpt
from reasoning.common import (UserError, autocast_context, get_base_dir, get_compute_dtype, init_distributed,
                              print0, seed_everything)
from reasoning.flash_attention import resolve_backend
from reasoning.mfu import model_flops_utilization, peak_flops

STAGE = "base"
EMA_BETA = 0.9  # smoothing of the printed/reported train loss
DEFAULT_SAMPLE_PROMPTS = (
    "The capital of France is",
    "A spider has",
    "After Monday comes",
    "Question: What is 7 + 5?\nSolution:",
    "The color of the sky is",
    "Once upon a time, there was a",
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; the run stopped before applying that update."""


def _opt(help_text: str, **extra):
    """Field metadata: the --flag help text (and cli=False for fields that have no flag)."""
    return {"help": help_text, **extra}


@dataclass
class TrainConfig:
    # model
    depth: int = field(default=20, metadata=_opt("model size dial: number of layers; width = depth × aspect ratio"))
    aspect_ratio: int = field(default=64, metadata=_opt("model width per layer (n_embd ≈ depth × this)"))
    head_dim: int | None = field(default=None, metadata=_opt("attention head size (default: gpt.config_from_depth)"))
    max_seq_len: int = field(default=2048, metadata=_opt("context length in tokens"))
    vocab_size: int = field(default=-1, metadata=_opt(
        "model vocabulary (-1: the tokenizer's); a larger one pads the embedding, e.g. to a multiple of 128"))
    # batch and length of training
    device_batch_size: int = field(default=32, metadata=_opt("rows per micro-batch per process"))
    total_batch_size: int = field(default=-1, metadata=_opt(
        "tokens per optimizer step, reached by gradient accumulation (-1: one micro-batch per data rank)"))
    num_iterations: int = field(default=-1, metadata=_opt(
        "optimizer steps (-1: derive from --target-param-data-ratio)"))
    target_param_data_ratio: float = field(default=20.0, metadata=_opt(
        "training tokens per non-embedding parameter when --num-iterations is -1 (Chinchilla: 20)"))
    simulate_ranks: int = field(default=1, metadata=_opt(
        "data-parallel ranks each process plays (one loader each, accumulated): N on one device reproduces an "
        "N-rank torchrun run"))
    # optimizer
    matrix_lr: float = field(default=0.02, metadata=_opt("Muon learning rate of the hidden matrices"))
    embedding_lr: float = field(default=0.2, metadata=_opt("AdamW learning rate of the token embedding"))
    lm_head_lr: float = field(default=0.004, metadata=_opt("AdamW learning rate of the output head"))
    scalar_lr: float = field(default=0.5, metadata=_opt("AdamW learning rate of gains and biases"))
    weight_decay: float = field(default=0.0, metadata=_opt("decoupled weight decay of the Muon matrices"))
    adam_beta1: float = field(default=0.8, metadata=_opt("AdamW beta1"))
    adam_beta2: float = field(default=0.95, metadata=_opt("AdamW beta2"))
    grad_clip: float = field(default=1.0, metadata=_opt("clip the global gradient norm to this (0: off)"))
    warmup_ratio: float = field(default=0.0, metadata=_opt("fraction of steps of linear LR warmup"))
    warmdown_ratio: float = field(default=0.2, metadata=_opt("fraction of steps of linear LR warmdown at the end"))
    final_lr_frac: float = field(default=0.0, metadata=_opt("LR multiplier reached at the last step"))
    muon_momentum_start: float = field(default=0.85, metadata=_opt("Muon momentum at step 0"))
    muon_momentum_end: float = field(default=0.95, metadata=_opt("Muon momentum after the warmup"))
    muon_momentum_warmup: int = field(default=300, metadata=_opt("steps of the linear Muon momentum ramp"))
    shard_optimizer: bool = field(default=False, metadata=_opt(
        "ZeRO-2 style: each rank keeps the optimizer state of its share of the parameters"))
    # speed / precision
    compile: bool = field(default=False, metadata=_opt("torch.compile the model"))
    compile_backend: str = field(default="inductor", metadata=_opt("torch.compile backend (tests use aot_eager)"))
    fp8: bool = field(default=False, metadata=_opt("train the hidden linear layers in fp8 (reasoning.fp8)"))
    fp8_min_dim: int = field(default=128, metadata=_opt("only layers with both dims >= this go to fp8"))
    # evaluation and logging
    eval_every: int = field(default=250, metadata=_opt(
        "val bits-per-byte every N steps (0: only at the start and end, <0: never)"))
    eval_tokens: int = field(default=10 * 2**20, metadata=_opt("validation tokens per evaluation (all ranks)"))
    sample_every: int = field(default=2000, metadata=_opt(
        "print greedy completions of fixed prompts every N steps (0: only at the end, <0: never)"))
    sample_tokens: int = field(default=24, metadata=_opt("tokens per sample completion"))
    sample_prompts: tuple[str, ...] = field(default=DEFAULT_SAMPLE_PROMPTS, metadata=_opt("", cli=False))
    log_every: int = field(default=1, metadata=_opt("print a progress line every N steps"))
    run: str | None = field(default=None, metadata=_opt("wandb run name (wandb is used only when given)"))
    wandb_project: str = field(default="reasoning", metadata=_opt("wandb project"))
    # checkpoints
    tag: str | None = field(default=None, metadata=_opt("checkpoint tag (default d<depth>)"))
    save_every: int = field(default=0, metadata=_opt("checkpoint every N steps (0: only at the end, <0: never)"))
    keep_last: int = field(default=2, metadata=_opt("keep this many newest checkpoints (0: all)"))
    resume: bool = field(default=False, metadata=_opt("continue from the last checkpoint of this tag"))
    stop_at_step: int = field(default=-1, metadata=_opt(
        "checkpoint and stop after this step, keeping the schedule of --num-iterations (time-sliced jobs)"))
    # environment
    seed: int = field(default=42, metadata=_opt("seed of the weight init"))
    device: str | None = field(default=None, metadata=_opt("cuda | cpu | mps (default: autodetect)"))
    data_dir: str | None = field(default=None, metadata=_opt("parquet shards (default $REASONING_DATA_DIR or "
                                                             "<base>/base_data)"))
    base_dir: str | None = field(default=None, metadata=_opt("run folder (default $REASONING_BASE_DIR)"))
    tokenizer_dir: str | None = field(default=None, metadata=_opt("tokenizer folder (default <base>/tokenizer)"))

    def validate(self) -> None:
        """Raise UserError naming the first bad setting (these values come from command-line flags)."""
        positive = ("depth", "aspect_ratio", "max_seq_len", "device_batch_size", "simulate_ranks", "log_every",
                    "eval_tokens", "fp8_min_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} {getattr(self, name)}: expected a positive integer")
        for name in ("matrix_lr", "embedding_lr", "lm_head_lr", "scalar_lr", "weight_decay", "grad_clip",
                     "target_param_data_ratio", "sample_tokens", "muon_momentum_warmup", "keep_last"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"--{_flag(name)} {value}: expected a finite number >= 0")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac", "adam_beta1", "adam_beta2",
                     "muon_momentum_start", "muon_momentum_end"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise UserError(f"--{_flag(name)} {value}: expected a number in [0, 1]")
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise UserError(f"--warmup-ratio {self.warmup_ratio} + --warmdown-ratio {self.warmdown_ratio}: "
                            "expected a sum <= 1")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise UserError(f"--head-dim {self.head_dim}: expected an even number >= 2")
        if self.total_batch_size != -1 and self.total_batch_size < 1:
            raise UserError(f"--total-batch-size {self.total_batch_size}: expected tokens > 0 or -1")
        if self.num_iterations != -1 and self.num_iterations < 0:
            raise UserError(f"--num-iterations {self.num_iterations}: expected >= 0 or -1")
        if self.vocab_size != -1 and self.vocab_size < 1:
            raise UserError(f"--vocab-size {self.vocab_size}: expected a positive size or -1 (the tokenizer's)")
        if self.num_iterations == -1 and self.target_param_data_ratio <= 0:
            raise UserError("--num-iterations -1 needs --target-param-data-ratio > 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sample_prompts"] = list(self.sample_prompts)
        return d


def _flag(name: str) -> str:
    return name.replace("_", "-")


# -------------------------------------------------------------------------------------------- command line

def add_train_args(parser) -> None:
    """One --flag per TrainConfig field (same name with dashes), defaults and help from the dataclass."""
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = f"--{_flag(f.name)}"
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        parse = int if kind.startswith("int") else float if kind.startswith("float") else str
        default_text = "" if f.default is None else f" (default {f.default})"
        parser.add_argument(flag, type=parse, default=f.default, help=f.metadata["help"] + default_text)


def config_from_args(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
    return TrainConfig(**values)


# -------------------------------------------------------------------------------------------- schedules

def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup to 1, constant, then linear warmdown to final_lr_frac at step == num_iterations."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if warmdown > 0 and step >= num_iterations - warmdown:
        remaining = max(0.0, (num_iterations - step) / warmdown)  # 1 at the start of the warmdown, 0 at the end
        return remaining + (1 - remaining) * final_lr_frac
    return 1.0


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    """Low momentum early (the gradient direction changes fast), ramping linearly to `end`."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def apply_schedules(optimizer, step: int, config: TrainConfig, num_iterations: int) -> float:
    """Write this step's lr (and Muon momentum) into the param groups; returns the lr multiplier."""
    mult = lr_multiplier(step, num_iterations, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac)
    momentum = muon_momentum(step, config.muon_momentum_start, config.muon_momentum_end, config.muon_momentum_warmup)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * mult
        if group.get("kind") == "muon":
            group["momentum"] = momentum
    return mult


# -------------------------------------------------------------------------------------------- one step

def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def accumulate_gradients(model, micro_batches, autocast: Callable[[], ContextManager] | None = None) -> torch.Tensor:
    """Backward of sum(token losses) / (valid targets of the whole step) over every micro-batch.

    micro_batches: [(inputs (B, T), targets (B, T) with -1 = ignore), ...] of this process. The valid-target
    count is summed over all micro-batches and all ranks first, so the accumulated gradient is the gradient of
    the mean loss of one batch holding everything. Under torch.distributed the loss is scaled by world_size
    because the optimizer averages (not sums) gradients over ranks. `autocast` makes a fresh mixed-precision
    context per forward. Returns the global mean loss (0-d float32, detached).
    """
    if not micro_batches:
        raise ValueError("accumulate_gradients needs at least one micro-batch")
    device = micro_batches[0][1].device
    count = torch.zeros((), dtype=torch.float64, device=device if device.type != "mps" else "cpu")
    for _, targets in micro_batches:
        count += (targets >= 0).sum().to(count.device)
    count = _all_reduce_sum(count).item()
    if count == 0:
        raise ValueError("accumulate_gradients: no valid targets (all -1) in this step on any rank")
    scale = _world_size() / count
    total = torch.zeros((), dtype=torch.float32, device=device)
    for inputs, targets in micro_batches:
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss_sum = model(inputs, targets, loss_reduction="sum")
        (loss_sum * scale).backward()
        total += loss_sum.detach().float()
    return _all_reduce_sum(total) / count


def _grad_norm(parameters) -> torch.Tensor:
    """Global L2 norm of the gradients (0-d float32); computing it is also the finiteness check."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


# -------------------------------------------------------------------------------------------- logging

class _RunLog:
    """Metrics JSONL (always, rank 0), wandb (only with a run name), progress lines."""

    def __init__(self, path: str | None, config: TrainConfig, resume_step: int | None):
        self.path = path
        self.wandb = None
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            # drop records past the checkpoint: those steps are about to be trained again
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        elif os.path.exists(path):
            os.remove(path)
        if config.run:
            import wandb  # only imported when asked for: it is slow to import and may want a login

            self.wandb = wandb.init(project=config.wandb_project, name=config.run, config=config.to_dict())

    def log(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# -------------------------------------------------------------------------------------------- evaluation

def _fp8_off(model):
    from reasoning.fp8 import fp8_disabled  # evaluation reads the high-precision master weights

    return fp8_disabled(model)


def evaluate_val_bpb(model, tokenizer, batch_size: int, seq_len: int, eval_tokens: int, data_dir: str | None = None,
                     device="cpu", dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1) -> float:
    """Bits per byte on the first `eval_tokens` tokens (all ranks together) of the validation split.

    Every rank must call it (the sums are all-reduced). fp8 layers run in high precision: this measures the weights.
    """
    from reasoning.dataloader import build_val_loader, evaluate_bpb

    loader = build_val_loader(tokenizer, batch_size, seq_len, data_dir, rank, world_size, device)
    steps = max(1, eval_tokens // (batch_size * seq_len * world_size))
    was_training = model.training
    model.eval()
    try:
        with _fp8_off(model), autocast_context(device, dtype):
            return evaluate_bpb(model, loader, tokenizer.token_bytes, max_steps=steps)
    finally:
        model.train(was_training)


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


# -------------------------------------------------------------------------------------------- the loop

def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _non_embedding_params(model) -> int:
    # the embedding table is a lookup, not a matmul: Chinchilla-style token budgets count the other weights
    embedding = 0 if model.config.tie_embeddings else model.wte.weight.numel()
    return model.num_params() - embedding


def train(config: TrainConfig) -> dict:
    """Pretrain (or resume) a GPT per `config`; returns a summary (metrics, series, per-step losses, paths).

    Raises NonFiniteLossError when the loss or gradient norm stops being finite, UserError on bad settings.
    """
    from reasoning.dataloader import build_train_loader
    from reasoning.gpt import GPT, config_from_depth
    from reasoning.tokenizer import Tokenizer, get_tokenizer

    config.validate()
    start_time = time.perf_counter()
    info = init_distributed(config.device)
    rank, world_size, device = info.rank, info.world_size, info.device
    master = rank == 0
    base_dir = config.base_dir or get_base_dir()
    if config.tokenizer_dir:
        tokenizer_path = config.tokenizer_dir
        if not os.path.isdir(tokenizer_path):
            raise UserError(f"--tokenizer-dir {tokenizer_path} does not exist")
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        tokenizer = get_tokenizer(base_dir)
        tokenizer_path = os.path.join(base_dir, "tokenizer")
    dtype = get_compute_dtype(device)
    autocast = functools.partial(autocast_context, device, dtype)  # a fresh context per use
    tag = config.tag or f"d{config.depth}"
    ckpt_dir = ckpt.checkpoint_dir(STAGE, tag, base_dir)

    # ---- model (same seed on every rank: identical init without a broadcast)
    seed_everything(config.seed)
    overrides = {} if config.head_dim is None else {"head_dim": config.head_dim}
    vocab_size = tokenizer.vocab_size if config.vocab_size == -1 else config.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"--vocab-size {vocab_size}: smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    model_config = config_from_depth(config.depth, vocab_size, sequence_len=config.max_seq_len,
                                     aspect_ratio=config.aspect_ratio, **overrides)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()

    # ---- resume
    resume_meta = None
    data_ranks = world_size * config.simulate_ranks
    if config.resume:
        last = ckpt.find_last_step(ckpt_dir)
        if last < 0:
            raise UserError(f"--resume: no complete checkpoint in {ckpt_dir} (train without --resume first)")
        model_state, _, resume_meta = ckpt.load_checkpoint(ckpt_dir, last, device=device)
        if resume_meta.get("model_config") != model_config.to_dict():
            raise UserError(f"--resume: checkpoint {ckpt_dir} step {last} has model {resume_meta.get('model_config')}"
                            f" but the flags give {model_config.to_dict()}; use the same --depth/--max-seq-len")
        saved_ranks = len(resume_meta.get("loader_states", []))
        if saved_ranks != data_ranks:
            raise UserError(f"--resume: checkpoint was written by {saved_ranks} data ranks but this run has "
                            f"{data_ranks} (nproc_per_node × simulate_ranks); resume with the same layout")
        model.load_state_dict(model_state)

    fp8_layers = 0
    if config.fp8:
        from reasoning.fp8 import convert_to_float8

        fp8_layers = convert_to_float8(model, min_dim=config.fp8_min_dim)
        print0(f"fp8: {fp8_layers} linear layers converted (layers with a dim < {config.fp8_min_dim} stay high "
               "precision, as does lm_head)")
    optimizer = model.setup_optimizer(
        matrix_lr=config.matrix_lr, embedding_lr=config.embedding_lr, lm_head_lr=config.lm_head_lr,
        scalar_lr=config.scalar_lr, weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2),
        muon_momentum=config.muon_momentum_end, shard=config.shard_optimizer,
        compile_backend=config.compile_backend if config.compile and device.type == "cuda" else None)
    optim_rank = rank if optimizer.shard else 0  # unsharded state is the same on every rank: one file suffices
    if resume_meta is not None:
        _, optim_state, _ = ckpt.load_checkpoint(ckpt_dir, resume_meta["step"], device=device, load_optimizer=True,
                                                 rank=optim_rank)
        optimizer.load_state_dict(optim_state)
    attention_backend = resolve_backend(device, dtype)  # loads FA3 (once) outside any compiled region
    compiled = torch.compile(model, dynamic=False, backend=config.compile_backend) if config.compile else model

    # ---- batch geometry and length of training
    tokens_per_micro_step = config.device_batch_size * config.max_seq_len * data_ranks
    total_batch = tokens_per_micro_step if config.total_batch_size == -1 else config.total_batch_size
    if total_batch % tokens_per_micro_step:
        raise UserError(f"--total-batch-size {total_batch}: expected a multiple of device_batch_size × max_seq_len × "
                        f"data ranks = {config.device_batch_size} × {config.max_seq_len} × {data_ranks} "
                        f"= {tokens_per_micro_step}")
    grad_accum = total_batch // tokens_per_micro_step
    num_params = model.num_params()
    if config.num_iterations >= 0:
        num_iterations = config.num_iterations
    else:
        target_tokens = config.target_param_data_ratio * _non_embedding_params(model)
        num_iterations = max(1, round(target_tokens / total_batch))
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)

    # ---- data (one loader per data rank this process plays)
    start_step = 0 if resume_meta is None else resume_meta["step"]
    if start_step > num_iterations:
        raise UserError(f"--resume: checkpoint is at step {start_step}, past --num-iterations {num_iterations}")
    loader_states = [None] * config.simulate_ranks
    if resume_meta is not None:
        first = rank * config.simulate_ranks
        loader_states = resume_meta["loader_states"][first:first + config.simulate_ranks]
    loaders = [build_train_loader(tokenizer, config.device_batch_size, config.max_seq_len, config.data_dir,
                                  rank=rank * config.simulate_ranks + j, world_size=data_ranks, device=device,
                                  resume_state=loader_states[j])
               for j in range(config.simulate_ranks)]
    history = {"val_bpb": [], "train_loss": []} if resume_meta is None else resume_meta["history"]
    elapsed_before = 0.0 if resume_meta is None else resume_meta.get("train_seconds", 0.0)
    ema_loss = 0.0 if resume_meta is None else resume_meta.get("ema_loss", 0.0)
    if resume_meta is not None:
        ckpt.set_rng_state(resume_meta["rng"][rank])

    log = _RunLog(os.path.join(base_dir, "logs", f"{STAGE}_{tag}.jsonl") if master else None, config,
                  start_step if resume_meta is not None else None)
    print0(f"model: depth {config.depth}, width {model_config.n_embd}, {model_config.n_head} heads, "
           f"{num_params:,} params, {flops_per_token:.3e} FLOPs/token | vocab {tokenizer.vocab_size}")
    print0(f"batch: {total_batch:,} tokens/step = {config.device_batch_size} rows × {config.max_seq_len} tokens × "
           f"{data_ranks} data ranks × {grad_accum} accumulation | {num_iterations} steps "
           f"({num_iterations * total_batch:,} tokens) | device {device} {str(dtype).replace('torch.', '')}, "
           f"attention {attention_backend}{', compiled' if config.compile else ''}"
           + (f" | resumed at step {start_step}" if resume_meta else ""))

    def save(step: int):
        meta = {
            "model_config": model_config.to_dict(), "train_config": config.to_dict(), "tokenizer_dir": tokenizer_path,
            "num_iterations": num_iterations, "history": history, "ema_loss": ema_loss,
            "train_seconds": elapsed_before + (time.perf_counter() - start_time),
            "loader_states": [s for states in _gather(loader_states, world_size) for s in states],
            "rng": _gather(ckpt.rng_state(), world_size),
        }
        if optim_rank != 0:  # every other rank's optimizer file must exist before rank 0 writes meta
            ckpt.save_checkpoint(ckpt_dir, step, None, optimizer.state_dict(), rank=optim_rank)
        if world_size > 1:
            dist.barrier()
        if master:
            ckpt.save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta=meta, rank=0,
                                 keep_last=config.keep_last or None)
        if world_size > 1:
            dist.barrier()

    losses: list[tuple[int, float]] = []
    step_times: list[float] = []
    samples: list[dict] = []
    step = start_step
    try:
        while True:
            finished = step == num_iterations
            stopping = step == config.stop_at_step
            fresh = resume_meta is None or step != start_step  # at the resumed step all this was done already
            if fresh and config.eval_every >= 0 and (
                    step == 0 or finished or (config.eval_every > 0 and step % config.eval_every == 0)):
                bpb = evaluate_val_bpb(compiled, tokenizer, config.device_batch_size, config.max_seq_len,
                                       config.eval_tokens, config.data_dir, device, dtype, rank, world_size)
                history["val_bpb"].append([step, bpb])
                print0(f"step {step:05d} | val bpb {bpb:.4f}")
                log.log({"step": step, "val_bpb": bpb})
            if fresh and master and config.sample_every >= 0 and (
                    finished or (config.sample_every > 0 and step > 0 and step % config.sample_every == 0)):
                samples = sample_completions(model, tokenizer, config.sample_prompts, config.sample_tokens)
                for s in samples:
                    print0(f"  {s['prompt']!r} -> {s['completion']!r}")
            if fresh and step > 0 and config.save_every >= 0 and (
                    finished or stopping or (config.save_every > 0 and step % config.save_every == 0)):
                save(step)
            if finished or stopping:
                break

            # ---- one optimizer step
            t0 = time.perf_counter()
            micro_batches = []
            for _ in range(grad_accum):
                for j, loader in enumerate(loaders):
                    inputs, targets, loader_states[j] = next(loader)
                    micro_batches.append((inputs, targets))
            loss = accumulate_gradients(compiled, micro_batches, autocast)
            optimizer.reduce_gradients()  # average across ranks now (no-op alone) to measure and clip the norm
            norm = _grad_norm(model.parameters()).to(loss.device)
            loss_value, norm_value = torch.stack([loss.float(), norm.float()]).tolist()  # one host sync
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                last = ckpt.find_last_step(ckpt_dir)
                where = f"last good checkpoint: {ckpt_dir} step {last}" if last >= 0 else "no checkpoint was written"
                raise NonFiniteLossError(f"step {step}: loss {loss_value}, gradient norm {norm_value}: training "
                                         f"diverged; stopped before the update ({where}). Try a lower learning rate.")
            if config.grad_clip > 0 and norm_value > config.grad_clip:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(config.grad_clip / (norm_value + 1e-6))
            lr_mult = apply_schedules(optimizer, step, config, num_iterations)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1

            # ---- bookkeeping
            losses.append((step, loss_value))
            ema_loss = EMA_BETA * ema_loss + (1 - EMA_BETA) * loss_value
            smooth = ema_loss / (1 - EMA_BETA ** step)  # debiased
            history["train_loss"].append([step, loss_value])
            step_times.append(dt)
            tok_per_s = total_batch / dt
            mfu = model_flops_utilization(flops_per_token, tok_per_s, peak, world_size)
            eta = (num_iterations - step) * statistics.median(step_times[-20:])  # median: ignores the compile step
            log.log({"step": step, "loss": loss_value, "smooth_loss": smooth, "lr_mult": lr_mult,
                     "grad_norm": norm_value, "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu})
            if step % config.log_every == 0 or step == num_iterations:
                mfu_text = f"{100 * mfu:.2f}%" if mfu is not None else "n/a"
                print0(f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} (ema {smooth:.4f}) | "
                       f"lr× {lr_mult:.3f} | gnorm {norm_value:.3f} | {dt * 1000:.0f} ms | {tok_per_s:,.0f} tok/s | "
                       f"mfu {mfu_text} | eta {_format_eta(eta)}")
    finally:
        log.close()

    # the first steps pay for compilation and warm-up; leave them out of the throughput figure when there are more
    steady = step_times[min(5, len(step_times) // 2):] if step_times else []
    tok_per_s = total_batch * len(steady) / sum(steady) if steady else None
    mfu = model_flops_utilization(flops_per_token, tok_per_s, peak, world_size) if tok_per_s else None
    val = [v for _, v in history["val_bpb"]]
    train_losses = [v for _, v in history["train_loss"]]
    metrics = {
        "initial_val_bpb": val[0] if val else None,
        "val_bpb": val[-1] if val else None,
        "min_val_bpb": min(val) if val else None,
        "train_loss": ema_loss / (1 - EMA_BETA ** len(train_losses)) if train_losses else None,
        "tok_per_s": tok_per_s,
        "mfu": mfu,
        "params": num_params,
        "flops_per_token": flops_per_token,
        "tokens": step * total_batch,
    }
    return {
        "step": step,
        "num_iterations": num_iterations,
        "finished": step == num_iterations,
        "metrics": metrics,
        "series": history,
        "losses": losses,  # (step, loss) of the steps trained in this call
        "samples": samples,
        "seconds": elapsed_before + (time.perf_counter() - start_time),
        "checkpoint_dir": ckpt_dir,
        "config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "world_size": world_size,
        "device": str(device),
        "fp8_layers": fp8_layers,
    }
