"""Pretraining as a library: `TrainConfig` + `train(config) -> summary`; scripts/base_train.py is its CLI.

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
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from reasoning import checkpoint as ckpt
from reasoning.common import (UserError, autocast_context, get_base_dir, get_compute_dtype, init_distributed,
                              print0, seed_everything)
from reasoning.flash_attention import resolve_backend
from reasoning.mfu import model_flops_utilization, peak_flops
from reasoning.training import (DEVICE_HELP, NonFiniteLossError, RunLog, RunProgress, TrainerConfig,
                                accumulate_gradients, autocast_factory, check_weights_finite, diverged_message,
                                format_eta, gather_objects, load_optimizer_state, load_resume_checkpoint,
                                lr_multiplier, option, save_training_checkpoint, start_run)

STAGE = "base"
DEFAULT_DEVICE_BATCH_SIZE = 32  # rows per micro-batch when --device-batch-size is -1 off CUDA (the tuned recipe)
EMA_BETA = 0.9  # smoothing of the printed/reported train loss
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


add_train_args = TrainConfig.add_args  # one --flag per field (reasoning.training); scripts/base_train.py
config_from_args = TrainConfig.from_args


# -------------------------------------------------------------------------------------------- schedules

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

def _grad_norm(parameters) -> torch.Tensor:
    """Global L2 norm of the gradients (0-d float32); computing it is also the finiteness check."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


# -------------------------------------------------------------------------------------------- evaluation

def _fp8_off(model):
    from reasoning.fp8 import fp8_disabled  # evaluation reads the high-precision master weights

    return fp8_disabled(model)


def evaluate_val_bpb(model, tokenizer, batch_size: int, max_seq_len: int, eval_tokens: int, data_dir: str | None = None,
                     device="cpu", dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1) -> float:
    """Bits per byte on the first `eval_tokens` tokens (all ranks together) of the validation split.

    Every rank must call it (the sums are all-reduced). fp8 layers run in high precision: this measures the weights.
    """
    from reasoning.dataloader import build_val_loader, evaluate_bpb

    loader = build_val_loader(tokenizer, batch_size, max_seq_len, data_dir, rank, world_size, device)
    steps = max(1, eval_tokens // (batch_size * max_seq_len * world_size))
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
        s.build_optimizer(**config.optimizer_args())
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


def train(config: TrainConfig) -> dict:
    """Pretrain (or resume) a GPT per `config`; returns a summary (metrics, series, per-step losses, paths).

    Raises NonFiniteLossError when the loss or gradient norm stops being finite, UserError on bad settings.
    """
    from reasoning.dataloader import Prefetcher, build_train_loader, packing_stats
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
    autocast = autocast_factory(device, dtype)
    tag = config.tag or f"d{config.depth}"
    ckpt_dir = ckpt.checkpoint_dir(STAGE, tag, base_dir)

    # ---- model (same seed on every rank: identical init without a broadcast)
    seed_everything(config.seed)
    overrides = {} if config.head_dim is None else {"head_dim": config.head_dim}
    vocab_size = tokenizer.vocab_size if config.vocab_size == -1 else config.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"--vocab-size {vocab_size}: smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    model_config = config_from_depth(config.depth, vocab_size, max_seq_len=config.max_seq_len,
                                     aspect_ratio=config.aspect_ratio, **overrides)
    config = resolve_device_batch(config, model_config, device, world_size)  # before any weight is allocated
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()

    # ---- resume (every data rank saved its loader position)
    data_ranks = world_size * config.simulate_ranks
    resume_meta = load_resume_checkpoint(ckpt_dir, model, device, data_ranks, "loader_states",
                                         meta_types={"ema_loss": float}) if config.resume else None

    fp8_layers = 0
    if config.fp8:
        from reasoning.fp8 import convert_to_float8

        fp8_layers = convert_to_float8(model, min_dim=config.fp8_min_dim)
        print0(f"fp8: {fp8_layers} linear layers converted (layers with a dim < {config.fp8_min_dim} stay high "
               "precision, as does lm_head)")
    optimizer = model.setup_optimizer(
        **config.optimizer_args(), betas=(config.adam_beta1, config.adam_beta2), muon_momentum=config.muon_momentum_end,
        shard=config.shard_optimizer,
        compile_backend=config.optimizer_compile_backend(device))
    if resume_meta is not None:
        load_optimizer_state(ckpt_dir, resume_meta, optimizer, device)
    attention_backend = resolve_backend(device, dtype)  # loads FA3 (once) outside any compiled region
    compiled = config.compile_model(model, device)  # fixed (B, T) rows: dynamic=False

    # ---- batch geometry and length of training
    tokens_per_micro_step = config.device_batch_size * config.max_seq_len * data_ranks
    total_batch = config.total_batch_size
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
    progress = RunProgress(resume_meta, num_iterations, config.stop_at_step, "--num-iterations", start_time)
    loader_states = [None] * config.simulate_ranks
    if resume_meta is not None:
        first = rank * config.simulate_ranks
        loader_states = resume_meta["loader_states"][first:first + config.simulate_ranks]
    # each loader on its own thread, one batch ahead of the step (identical batches, see Prefetcher)
    loaders = [Prefetcher(build_train_loader(tokenizer, config.device_batch_size, config.max_seq_len,
                                             config.data_dir, rank=rank * config.simulate_ranks + j,
                                             world_size=data_ranks, device=device, resume_state=loader_states[j]))
               for j in range(config.simulate_ranks)]
    history = {"val_bpb": [], "train_loss": []} if resume_meta is None else resume_meta["history"]
    ema_loss = 0.0 if resume_meta is None else resume_meta.get("ema_loss", 0.0)
    if resume_meta is not None:
        ckpt.set_rng_state(resume_meta["rng"][rank])

    # settings are checked by now: the tag's owner and the folder's writability are next, before any training
    run_id = start_run(ckpt_dir, resume_meta, config.overwrite, "--tag")
    log = RunLog.for_run(base_dir, f"{STAGE}_{tag}", config, progress.resumed_at)
    print0(f"model: depth {config.depth}, width {model_config.n_embd}, {model_config.n_head} heads, "
           f"{num_params:,} params, {flops_per_token:.3e} FLOPs/token | vocab {tokenizer.vocab_size}")
    print0(f"batch: {total_batch:,} tokens/step = {config.device_batch_size} rows × {config.max_seq_len} tokens × "
           f"{data_ranks} data ranks × {grad_accum} accumulation | {num_iterations} steps "
           f"({num_iterations * total_batch:,} tokens) | device {device} {str(dtype).replace('torch.', '')}, "
           f"attention {attention_backend}{', compiled' if config.compile_on(device) else ''}"
           + progress.resumed_note)

    def save(step: int):
        meta = {
            "train_config": config.to_dict(), "tokenizer_dir": tokenizer_path, "num_iterations": num_iterations,
            "history": history, "ema_loss": ema_loss, "train_seconds": progress.seconds(),
            "loader_states": [s for states in gather_objects(loader_states) for s in states],
        }
        save_training_checkpoint(ckpt_dir, step, model, optimizer, meta, config.keep_last, run_id, config.overwrite)

    losses: list[tuple[int, float]] = []
    step_times: list[float] = []
    samples: list[dict] = []
    step = progress.start_step
    try:
        while True:
            at = progress.at(step)
            if at.evaluate_due(config.eval_every):
                bpb = evaluate_val_bpb(compiled, tokenizer, config.device_batch_size, config.max_seq_len,
                                       config.eval_tokens, config.data_dir, device, dtype, rank, world_size)
                history["val_bpb"].append([step, bpb])
                print0(f"step {step:05d} | val bpb {bpb:.4f}")
                log.log({"step": step, "val_bpb": bpb})
            if at.fresh and master and config.sample_every >= 0 and (
                    at.finished or (config.sample_every > 0 and step > 0 and step % config.sample_every == 0)):
                samples = sample_completions(model, tokenizer, config.sample_prompts, config.sample_tokens)
                for s in samples:
                    print0(f"  {s['prompt']!r} -> {s['completion']!r}")
            if config.save_every >= 0 and at.save_due(config.save_every):
                save(step)
            if at.last:
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
                raise NonFiniteLossError(diverged_message(step, f"loss {loss_value}, gradient norm {norm_value}",
                                                          ckpt_dir, run_id, "stopped before the update"))
            if config.grad_clip > 0 and norm_value > config.grad_clip:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(config.grad_clip / (norm_value + 1e-6))
            lr_mult = apply_schedules(optimizer, step, config, num_iterations)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            check_weights_finite(model, step, ckpt_dir, run_id)
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
            # share of the packed documents' tokens that reached a row (the rest were cropped), this process's
            # loaders since the start of the run
            pack = packing_stats([loader.counts for loader in loaders])["token_utilization"]
            log.log({"step": step, "loss": loss_value, "smooth_loss": smooth, "lr_mult": lr_mult,
                     "grad_norm": norm_value, "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu, "pack_util": pack})
            if step % config.log_every == 0 or step == num_iterations:
                mfu_text = f"{100 * mfu:.2f}%" if mfu is not None else "n/a"
                print0(f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} (ema {smooth:.4f}) | "
                       f"lr× {lr_mult:.3f} | gnorm {norm_value:.3f} | {dt * 1000:.0f} ms | {tok_per_s:,.0f} tok/s | "
                       f"mfu {mfu_text} | pack {100 * pack:.1f}% | eta {format_eta(eta)}")
    finally:
        log.close()
        for loader in loaders:
            loader.close()

    # the first steps pay for compilation and warm-up; leave them out of the throughput figure when there are more
    steady = step_times[min(5, len(step_times) // 2):] if step_times else []
    tok_per_s = total_batch * len(steady) / sum(steady) if steady else None
    mfu = model_flops_utilization(flops_per_token, tok_per_s, peak, world_size) if tok_per_s else None
    all_counts = [counts for rank_counts in gather_objects([loader.counts for loader in loaders])
                  for counts in rank_counts]  # every data rank's packing counters (a collective: all ranks call it)
    packing = packing_stats(all_counts)
    val = [v for _, v in history["val_bpb"]]
    train_losses = [v for _, v in history["train_loss"]]
    metrics = {
        "initial_val_bpb": val[0] if val else None,
        "val_bpb": val[-1] if val else None,
        "min_val_bpb": min(val) if val else None,
        "train_loss": ema_loss / (1 - EMA_BETA ** len(train_losses)) if train_losses else None,
        "tok_per_s": tok_per_s,
        "mfu": mfu,
        "pack_utilization": packing["token_utilization"] if packing["tokens_taken"] else None,
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
        "seconds": progress.seconds(),
        "checkpoint_dir": ckpt_dir,
        "config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "world_size": world_size,
        "device": str(device),
        "fp8_layers": fp8_layers,
    }
