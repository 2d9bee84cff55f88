"""Supervised fine-tuning as a library: `SFTConfig` + `train_sft(config, model, tokenizer, ...)`;
scripts/chat_sft.py is its CLI.

Data: a task mixture (tasks.registry spec, e.g. "synthetic" or "GSM8K,MATH,SmolTalk,customjson:FILE") rendered with
`tokenizer.render_conversation` -> (ids, mask). Training targets are the next tokens where the mask says the
assistant produced them, -1 everywhere else (prompts, tool outputs, padding):
    ids     <bos> <user_start> .. <user_end> <assistant_start> a1 a2 <assistant_end>
    mask      0        0       ..     0             0          1  1        1
    inputs = ids[:-1], targets[t] = ids[t+1] if mask[t+1] else -1.
Rows are either padded to the longest conversation of the micro-batch (default) or packed (`pack=True`: whole
conversations concatenated into rows of max_seq_len + 1 tokens, a conversation that does not fit starts the next
row; each starts with <bos> like a pretraining document).

The data order is an endless stream: epoch e visits the task in a permutation seeded by (seed, e); global stream
position g goes to rank g mod world_size, so a rank's position is one integer and resuming is exact.

One optimizer step = `total_batch_rows` rows (conversations or packed rows; 32 by default) from all ranks, each
rank's share cut into micro-batches of at most `device_batch_size` rows whose gradients accumulate: the device batch
size decides memory and the number of micro-batches, never the optimisation (the step's rows are the same); the loss is the sum of token losses divided by the number of valid targets in the whole step
(reasoning.training.accumulate_gradients), so long and short conversations weigh by their tokens. LR: linear warmup,
then linear decay to `final_lr_frac` (nanochat SFT decays to 0). Muon for matrices, AdamW for the rest
(`model.setup_optimizer`), every lr multiplied by `lr_scale`.

Periodically: validation loss (same masking) on held-out conversations and a greedy generative eval on a small
held-out slice of `eval_task` (reasoning.evaluation). Checkpoints hold model, optimizer, step, every rank's stream
position and RNG, and the metric history, so `resume=True` continues bitwise-identically on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from reasoning import checkpoint as ckpt
from reasoning.checkpointing import set_activation_checkpointing
from reasoning.common import UserError, get_base_dir, get_compute_dtype, get_rank, get_world_size, print0
from reasoning.microbatch import micro_batches
from reasoning.training import (FinetuneConfig, NonFiniteLossError, RunLog, RunProgress, accumulate_gradients,
                                all_reduce_sum, autocast_factory, check_weights_finite, diverged_message,
                                gather_objects, load_optimizer_state, load_resume_checkpoint, option,
                                save_training_checkpoint, start_run)
from tasks.synthetic import DIFFICULTY as _SYNTHETIC_DIFFICULTY

STAGE = "sft"
DEFAULT_DEVICE_BATCH_SIZE = 8  # rows per micro-batch when --device-batch-size is -1 off CUDA


@dataclass
class SFTConfig(FinetuneConfig):
    """SFT settings; the optimizer, logging and checkpoint settings come from FinetuneConfig (reasoning.training)."""
    # data
    task: str = field(default="synthetic", metadata=option(
        "training mixture: comma list of synthetic, GSM8K, MATH, SmolTalk, customjson:FILE (NAME*N oversamples, "
        "NAME@PATH gives a task its own data)"))
    task_size: int = field(default=-1, metadata=option(
        "examples per task in the mixture (-1: all; synthetic: 20000 generated)"))
    synthetic_difficulty: str = field(default="easy", metadata=option("synthetic task preset",
                                                                      choices=tuple(_SYNTHETIC_DIFFICULTY)))
    synthetic_answer_only: float = field(default=0.0, metadata=option(
        "fraction of synthetic training examples that state the answer without worked steps (tasks/synthetic.py)"))
    val_examples: int = field(default=256, metadata=option("held-out conversations for the validation loss"))
    pack: bool = field(default=False, metadata=option("pack conversations into full rows instead of padding"))
    max_seq_len: int = field(default=1024, metadata=option("tokens per training row (longer conversations are cut)"))
    # length and batch
    num_epochs: float = field(default=1.0, metadata=option("passes over the mixture when --num-iterations is -1"))
    num_iterations: int = field(default=-1, metadata=option("optimizer steps (-1: from --num-epochs)"))
    device_batch_size: int = field(default=-1, metadata=option(
        "rows per micro-batch per process at most (-1: 8, or on CUDA the largest power of two up to 8 that the "
        "memory planner says fits the GPU); only sets how many micro-batches accumulate to --total-batch-rows"))
    total_batch_rows: int = field(default=32, metadata=option(
        "rows (conversations, or packed rows) per optimizer step, all ranks together; a multiple of the world size"))
    # evaluation
    eval_every: int = field(default=100, metadata=option(
        "val loss + generative eval every N steps (0: only at the start and end, <0: never)"))
    eval_task: str = field(default="synthetic", metadata=option("generative eval task (test split)"))
    eval_problems: int = field(default=64, metadata=option("problems in the generative eval"))
    eval_max_tokens: int = field(default=256, metadata=option("new tokens per eval completion"))
    eval_batch_size: int = field(default=32, metadata=option("problems per engine call in the eval"))
    seed: int = field(default=0, metadata=option("seed of the data order"))

    def validate(self) -> None:
        """Raise UserError naming the first bad setting (they come from command-line flags)."""
        super().validate()
        self.require_positive("max_seq_len", "total_batch_rows", "eval_problems", "eval_max_tokens",
                              "eval_batch_size")
        self.require_non_negative("num_epochs", "val_examples")
        self.require_fraction("synthetic_answer_only")
        if self.num_iterations < -1:
            raise UserError(f"--num-iterations {self.num_iterations}: expected >= 0 or -1")
        if self.num_iterations == -1 and self.num_epochs <= 0:
            raise UserError("--num-iterations -1 needs --num-epochs > 0")
        if self.device_batch_size != -1 and self.device_batch_size < 1:
            raise UserError(f"--device-batch-size {self.device_batch_size}: expected rows > 0 or -1 (auto)")
        if self.task_size == 0 or self.task_size < -1:
            raise UserError(f"--task-size {self.task_size}: expected a positive number of examples or -1")


add_sft_args = SFTConfig.add_args  # one --flag per field (reasoning.training); scripts/chat_sft.py
config_from_args = SFTConfig.from_args


# ----------------------------------------------------------------------------------------------- data

def conversation_targets(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(ids, mask) of one rendered conversation -> (inputs, targets): targets[t] = ids[t+1] where the assistant
    produced token t+1, else -1."""
    inputs = ids[:-1]
    targets = [token if trained else -1 for token, trained in zip(ids[1:], mask[1:])]
    return inputs, targets


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, length: int | None = None):
    """[(inputs, targets)] -> (B, T) long tensors, right-padded (inputs with pad_id, targets with -1)."""
    length = length or max(len(inputs) for inputs, _ in rows)
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for b, (x, y) in enumerate(rows):
        inputs[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[b, :len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets


class ConversationStream:
    """This rank's share of the endless, epoch-shuffled stream of rendered conversations, served as micro-batches.

    `position` counts the conversations this rank has consumed; its k-th one is global stream element
    k * world_size + rank, i.e. example order_e[g mod N] of epoch e = g // N."""

    def __init__(self, task, tokenizer, max_seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 pack: bool = False, position: int = 0):
        if len(task) == 0:
            raise UserError("the SFT mixture has no examples")
        self.task, self.tokenizer = task, tokenizer
        self.max_seq_len, self.rank, self.world_size, self.seed, self.pack = max_seq_len, rank, world_size, seed, pack
        self.position = position
        self.pad_id = tokenizer.bos_token_id
        self._epoch, self._order = None, None

    def _global_index(self, k: int) -> tuple[int, int]:
        g = k * self.world_size + self.rank
        epoch, offset = divmod(g, len(self.task))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.task))
        return epoch, int(self._order[offset])

    def epoch(self) -> float:
        """Fractional epochs consumed (by the whole stream, measured at this rank)."""
        return self.position * self.world_size / len(self.task)

    def render(self, k: int) -> tuple[list[int], list[int]]:
        _, index = self._global_index(k)
        return self.tokenizer.render_conversation(self.task[index], max_tokens=self.max_seq_len + 1)

    def next_micro_batches(self, micro_rows: list[int], max_tokens: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One optimizer step's micro-batches of this rank, [(inputs, targets)] each (rows, T) on CPU.

        max_tokens 0: micro-batch k holds the next micro_rows[k] rows in stream order. Otherwise the step's
        sum(micro_rows) rows are grouped by length (reasoning.microbatch: at most max(micro_rows) rows and
        max_tokens padded tokens each), so short conversations share a micro-batch and long ones pad little; the
        step's rows, and so its update, are the same."""
        if not max_tokens:
            return [self.next_batch(rows) for rows in micro_rows]
        rows = self.next_rows(sum(micro_rows))
        groups = micro_batches([len(x) for x, _ in rows], range(len(rows)), max(micro_rows), max_tokens)
        return [pad_rows([rows[i] for i in group], self.pad_id) for group in groups]

    def next_batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of `rows` rows, (rows, T) on CPU."""
        return pad_rows(self.next_rows(rows), self.pad_id, self.max_seq_len if self.pack else None)

    def next_rows(self, rows: int) -> list[tuple[list[int], list[int]]]:
        """The next `rows` rows as unpadded (inputs, targets) lists (packed rows are all max_seq_len long)."""
        if not self.pack:
            batch = []
            for _ in range(rows):
                batch.append(conversation_targets(*self.render(self.position)))
                self.position += 1
            return batch
        width = self.max_seq_len + 1
        packed = []
        for _ in range(rows):
            ids, mask = [], []
            while True:
                conv_ids, conv_mask = self.render(self.position)
                if ids and len(ids) + len(conv_ids) > width:
                    break  # does not fit: it opens the next row (the position stays on it)
                ids += conv_ids
                mask += conv_mask
                self.position += 1
                if len(ids) >= width:
                    break
            ids, mask = ids[:width], mask[:width]
            pad = width - len(ids)
            packed.append(conversation_targets(ids + [self.pad_id] * pad, mask + [0] * pad))
        return packed

    def trainable_fraction(self, sample: int = 64) -> float:
        """Share of (the first `sample`) conversations that keep a supervised token after the cut at max_seq_len."""
        count = min(sample, len(self.task))
        kept = sum(any(t >= 0 for t in conversation_targets(*self.render(k))[1]) for k in range(count))
        return kept / max(count, 1)

    def mean_rendered_length(self, sample: int = 256) -> float:
        lengths = [len(self.render(k)[0]) for k in range(min(sample, len(self.task)))]
        return sum(lengths) / len(lengths)


# ----------------------------------------------------------------------------------------------- tasks

def build_sft_tasks(config: SFTConfig):
    """(train task, validation task or None, generative eval task or None) for the config.

    Validation: the test splits of the mixture's tasks, capped at val_examples. A task without a test split
    (customjson, a single local file, a folder holding only the train file) is left out with a notice; a
    mixture with none left gets no validation loss."""
    from tasks.common import TaskMixture
    from tasks.registry import build_mixture, build_task, parse_mixture

    options = {"synthetic": {"difficulty": config.synthetic_difficulty}}
    size = None if config.task_size == -1 else config.task_size
    train_options = {"synthetic": dict(options["synthetic"], answer_only_frac=config.synthetic_answer_only)}
    train = build_mixture(config.task, split="train", data_path=config.data_path, seed=config.seed, size=size,
                          task_options=train_options)
    val = None
    if config.val_examples > 0:
        held_out = []
        for name, times, path in parse_mixture(config.task):
            path = path or config.data_path
            if name.startswith("customjson:") or (path and os.path.isfile(path) and name != "synthetic"):
                print0(f"validation: {name} has no test split here; left out of the validation loss")
                continue
            try:
                task = build_task(name, split="test", data_path=path, seed=config.seed, **options.get(name, {}))
            except UserError as e:
                print0(f"validation: {name} test split unavailable ({e}); left out of the validation loss")
                continue
            held_out.extend([task] * times)
        if held_out:
            val = (held_out[0] if len(held_out) == 1 else TaskMixture(held_out, seed=config.seed))
            val = val[:config.val_examples]
    gen_eval = None
    if config.eval_every >= 0 and config.eval_task:
        gen_eval = build_task(config.eval_task, split="test", data_path=config.data_path, seed=config.seed,
                              size=config.eval_problems, **options.get(config.eval_task.lower(), {}))
    return train, val, gen_eval


# ----------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def validation_loss(model, tokenizer, task, max_seq_len: int, batch_size: int, device, autocast) -> float:
    """Mean token loss over the assistant tokens of every conversation in `task` (rank r takes r, r+W, ...)."""
    rank, world = get_rank(), get_world_size()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, number of targets)
    mine = list(range(rank, len(task), world))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            rows = [conversation_targets(*tokenizer.render_conversation(task[i], max_tokens=max_seq_len + 1))
                    for i in mine[start:start + batch_size]]
            inputs, targets = pad_rows(rows, tokenizer.bos_token_id)
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast():
                loss_sum = model(inputs, targets, loss_reduction="sum")
            totals[0] += loss_sum.double()
            totals[1] += (targets >= 0).sum()
    finally:
        model.train(was_training)
    all_reduce_sum(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def generative_accuracy(model, tokenizer, task, config: SFTConfig) -> float:
    from reasoning.evaluation import EvalSettings, broadcast_summary, evaluate_task

    settings = EvalSettings(max_tokens=config.eval_max_tokens, batch_size=config.eval_batch_size)
    summary = broadcast_summary(evaluate_task(model, tokenizer, task, settings))
    return summary["accuracy"]


# ----------------------------------------------------------------------------------------------- the loop

def _downsample(points: list, limit: int = 500) -> list:
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def plan_memory(config: SFTConfig, model_config, world_size: int = 1, target: str = "cuda", fake: bool = True,
                prompt_tokens: int = 256):
    """Per-rank memory plan (reasoning.memplan): the training step with rows padded to max_seq_len (the worst
    case) and the in-loop generative eval: [PhasePlan "train", "eval"]."""
    from reasoning import memplan

    B, T = config.device_batch_size, min(config.max_seq_len, model_config.max_seq_len)
    accumulation = max(1, math.ceil(config.total_batch_rows / (B * world_size)))
    if config.max_tokens_per_micro_batch:  # the budget's worst case: full-length rows up to it (one at least)
        B = min(B, max(1, config.max_tokens_per_micro_batch // T))
    checkpointing = memplan.planned_mode(config.activation_checkpointing)
    plans = []
    with memplan.Session(model_config, target, fake) as s:
        s.build_optimizer(**config.optimizer_args(config.lr_scale))
        set_activation_checkpointing(s.model, checkpointing)
        plans.append(s.phase("chat_sft", "train", {"device_batch_size": B, "max_seq_len": T,
                                                   "accumulation": accumulation,
                                                   "activation_checkpointing": checkpointing},
                             lambda: s.train_steps([(B, T)] * memplan.micro_steps(accumulation))))
        if config.eval_every >= 0:
            plans.append(s.phase("chat_sft", "eval", {"rows": config.eval_batch_size,
                                                      "max_tokens": config.eval_max_tokens},
                                 lambda: s.generate(config.eval_batch_size, prompt_tokens, 1,
                                                    config.eval_max_tokens)))
    return plans


def resolve_device_batch(config: SFTConfig, model_config, device, world_size: int,
                         gpu_memory_gib: float | None = None) -> SFTConfig:
    """The config with a concrete device batch size and activation checkpointing mode (reasoning.memplan: on CUDA
    the planner checks or chooses them). The rows per step (--total-batch-rows) stay fixed: fewer rows per
    micro-batch mean more accumulation."""
    from reasoning import memplan

    def plan_of(rows: int, mode: str):
        return plan_memory(dataclasses.replace(config, device_batch_size=rows, activation_checkpointing=mode),
                           model_config, world_size)

    rows, mode = memplan.resolve_training_memory(
        config.device_batch_size, DEFAULT_DEVICE_BATCH_SIZE, config.activation_checkpointing, plan_of,
        gpu_memory_gib if gpu_memory_gib is not None else memplan.detected_gpu_memory(device),
        allowed=lambda b: True,  # the last micro-batch of a step may be smaller
        other_flags="--max-seq-len or --eval-batch-size")
    return dataclasses.replace(config, device_batch_size=rows, activation_checkpointing=mode)


def train_sft(config: SFTConfig, model, tokenizer, source: dict, device, rank: int = 0, world_size: int = 1,
              tasks=None) -> dict:
    """Fine-tune `model` (loaded from `source`: {"dir", "step", "tag", "tokenizer_dir"}) per `config`.

    `tasks` = (train, val, gen_eval) overrides build_sft_tasks (tests). Returns a summary: metrics, series,
    checkpoint dir, steps. Every rank must call it (collectives inside)."""
    config.validate()
    config = resolve_device_batch(config, model.config, device, world_size)
    set_activation_checkpointing(model, config.activation_checkpointing)
    start_time = time.perf_counter()
    base_dir = config.base_dir or get_base_dir()
    autocast = autocast_factory(device, get_compute_dtype(device))
    train_task, val_task, eval_task = tasks if tasks is not None else build_sft_tasks(config)
    tag = config.out_tag or source.get("tag") or f"d{model.config.n_layer}"
    ckpt_dir = ckpt.checkpoint_dir(STAGE, tag, base_dir)

    # ---- resume: weights, optimizer, stream positions, RNG and history from our own last checkpoint
    resume_meta = load_resume_checkpoint(ckpt_dir, model, device, world_size, "positions", str(source.get("dir"))) \
        if config.resume else None
    optimizer = model.setup_optimizer(**config.optimizer_args(config.lr_scale),
                                      compile_backend=config.optimizer_compile_backend(device))
    compiled = config.compile_model(model, device, dynamic=None)  # padded rows: the length varies per micro-batch
    if resume_meta is not None:
        load_optimizer_state(ckpt_dir, resume_meta, optimizer, device)

    # ---- batch geometry and length
    total_rows = config.total_batch_rows
    if total_rows % world_size:
        raise UserError(f"--total-batch-rows {total_rows}: expected a multiple of the world size {world_size}")
    rank_rows = total_rows // world_size
    micro_rows = [min(config.device_batch_size, rank_rows - start)  # the last micro-batch may be smaller
                  for start in range(0, rank_rows, config.device_batch_size)]
    grad_accum = len(micro_rows)
    position = 0 if resume_meta is None else resume_meta["positions"][rank]
    stream = ConversationStream(train_task, tokenizer, config.max_seq_len, rank, world_size, config.seed,
                                config.pack, position)
    if stream.trainable_fraction() == 0:  # every reply cut off: not one token to learn from
        full = [len(tokenizer.render_conversation(train_task[k])[0]) for k in range(min(64, len(train_task)))]
        raise UserError(f"--max-seq-len {config.max_seq_len}: the conversations are cut before any assistant token "
                        f"(uncut they are {min(full)}-{max(full)} tokens); expected a longer one")
    if config.num_iterations >= 0:
        num_iterations = config.num_iterations
    else:
        conversations_per_row = 1.0
        if config.pack:  # estimated from a sample: packed rows hold a data-dependent number of conversations
            conversations_per_row = max(1.0, (config.max_seq_len + 1) / stream.mean_rendered_length())
        num_iterations = max(1, math.ceil(config.num_epochs * len(train_task) / (total_rows * conversations_per_row)))
    progress = RunProgress(resume_meta, num_iterations, config.stop_at_step, "--num-iterations", start_time)
    history = {"train_loss": [], "val_loss": [], "accuracy": []} if resume_meta is None else resume_meta["history"]
    if resume_meta is not None:
        ckpt.set_rng_state(resume_meta["rng"][rank])

    # settings are checked by now: the tag's owner and the folder's writability are next, before any training
    run_id = start_run(ckpt_dir, resume_meta, config.overwrite, "--out-tag")
    log = RunLog.for_run(base_dir, f"{STAGE}_{tag}", config, progress.resumed_at)
    print0(f"sft: {len(train_task):,} conversations ({config.task}), {num_iterations} steps of {total_rows} rows "
           f"({world_size} ranks x {grad_accum} micro-batches of <= {config.device_batch_size} rows, "
           f"{'packed' if config.pack else 'padded'}, <= {config.max_seq_len} tokens) | from {source.get('dir')} "
           f"step {source.get('step')} -> {ckpt_dir}{progress.resumed_note}")

    def save(step: int):
        meta = {
            "sft_config": config.to_dict(), "stage": STAGE, "tokenizer_dir": source.get("tokenizer_dir"),
            "source": {"dir": source.get("dir"), "step": source.get("step")}, "num_iterations": num_iterations,
            "history": history, "train_seconds": progress.seconds(), "positions": gather_objects(stream.position),
        }
        save_training_checkpoint(ckpt_dir, step, model, optimizer, meta, config.keep_last, run_id, config.overwrite)

    def evaluate(step: int):
        record = {"step": step}
        if val_task is not None and len(val_task):
            record["val_loss"] = validation_loss(model, tokenizer, val_task, config.max_seq_len,
                                                 config.device_batch_size, device, autocast)
            history["val_loss"].append([step, record["val_loss"]])
        if eval_task is not None and len(eval_task):
            record["accuracy"] = generative_accuracy(model, tokenizer, eval_task, config)
            history["accuracy"].append([step, record["accuracy"]])
        if len(record) > 1:
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
            log.log(record)

    step = progress.start_step
    losses: list[tuple[int, float]] = []
    model.train()
    try:
        while True:
            at = progress.at(step)
            if at.evaluate_due(config.eval_every):
                evaluate(step)
            if at.save_due(config.save_every):
                save(step)
            if at.last:
                break

            t0 = time.perf_counter()
            micro_batches = [tuple(t.to(device) for t in batch)
                             for batch in stream.next_micro_batches(micro_rows, config.max_tokens_per_micro_batch)]
            valid = sum(int((t >= 0).sum()) for _, t in micro_batches)
            loss = accumulate_gradients(compiled, micro_batches, autocast)
            optimizer.reduce_gradients()  # average across ranks now (no-op alone) to measure and clip the norm
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip if config.grad_clip > 0
                                                  else float("inf"))
            loss_value, norm_value = float(loss), float(norm)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                raise NonFiniteLossError(diverged_message(step, f"loss {loss_value}, gradient norm {norm_value}",
                                                          ckpt_dir, run_id, "stopped before the update",
                                                          "a lower --lr-scale"))
            lr_mult = config.lr_multiplier(step, num_iterations)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
            optimizer.step()
            model.zero_grad(set_to_none=True)
            check_weights_finite(model, step, ckpt_dir, run_id)
            dt = time.perf_counter() - t0
            step += 1
            losses.append((step, loss_value))
            history["train_loss"].append([step, loss_value])
            log.log({"step": step, "loss": loss_value, "lr_mult": lr_mult, "grad_norm": norm_value,
                     "valid_tokens": valid, "epoch": stream.epoch(), "dt": dt})
            if step % config.log_every == 0 or step == num_iterations:
                print0(f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} | lr x {lr_mult:.3f} | "
                       f"gnorm {norm_value:.3f} | epoch {stream.epoch():.2f} | {valid} tokens (rank 0) | "
                       f"{dt * 1000:.0f} ms")
    finally:
        log.close()

    train_losses = [v for _, v in history["train_loss"]]
    tail = train_losses[-max(1, min(20, len(train_losses) // 5)):] if train_losses else []
    val_losses = [v for _, v in history["val_loss"]]
    accuracies = [v for _, v in history["accuracy"]]
    metrics = {
        "train_loss": sum(tail) / len(tail) if tail else None,  # mean of the last steps: one batch is noisy
        "val_loss": val_losses[-1] if val_losses else None,
        "initial_val_loss": val_losses[0] if val_losses else None,
        "accuracy": accuracies[-1] if accuracies else None,
        "initial_accuracy": accuracies[0] if accuracies else None,
        "steps": step,
        "epochs": stream.epoch(),
    }
    return {
        "step": step, "num_iterations": num_iterations, "finished": step == num_iterations, "metrics": metrics,
        "series": {name: _downsample(points) for name, points in history.items()}, "losses": losses,
        "seconds": progress.seconds(), "checkpoint_dir": ckpt_dir,
        "config": config.to_dict(), "tag": tag, "world_size": world_size,
    }

