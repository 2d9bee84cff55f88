"""Supervised fine-tuning's parts: `SFTConfig`, the conversation stream and its micro-batches, evaluation, memory plan.

The loop itself reads top to bottom in scripts/chat_sft.py (`train(config, model, tokenizer, source) -> summary`).

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
from dataclasses import dataclass, field

import numpy as np
import torch

from reasoning.checkpointing import set_activation_checkpointing
from reasoning.cli import option
from reasoning.common import UserError, get_rank, get_world_size
from reasoning.loss_eval import mean_token_loss
from reasoning.microbatch import micro_batches
from reasoning.training import FinetuneConfig, final_train_loss

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
    synthetic_difficulty: str = field(default="easy", metadata=option("synthetic task preset (tasks.synthetic)"))
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


add_sft_args = SFTConfig.add_args  # one --flag per field (reasoning.cli.FlagConfig); scripts/chat_sft.py
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


# ----------------------------------------------------------------------------------------------- evaluation

def validation_loss(model, tokenizer, task, max_seq_len: int, batch_size: int, device, autocast) -> float:
    """Mean token loss over the assistant tokens of every conversation in `task` (rank r takes r, r+W, ...)."""
    mine = list(range(get_rank(), len(task), get_world_size()))
    batches = (pad_rows([conversation_targets(*tokenizer.render_conversation(task[i], max_tokens=max_seq_len + 1))
                         for i in mine[start:start + batch_size]], tokenizer.bos_token_id)
               for start in range(0, len(mine), batch_size))
    return mean_token_loss(model, batches, device, autocast)


def generative_accuracy(model, tokenizer, task, config: SFTConfig) -> float:
    from reasoning.evaluation import EvalSettings, broadcast_summary, evaluate_task

    settings = EvalSettings(max_tokens=config.eval_max_tokens, batch_size=config.eval_batch_size)
    summary = broadcast_summary(evaluate_task(model, tokenizer, task, settings))
    return summary["accuracy"]


# ----------------------------------------------------------------------------------------------- the loop's parts

def downsample(points: list, limit: int = 500) -> list:
    """At most about `limit` of a curve's points, evenly strided, the last one kept (the report's curves)."""
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
        s.build_optimizer(settings=config.optimizer_settings())
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


def micro_batch_rows(config: SFTConfig, world_size: int) -> list[int]:
    """The rows of each micro-batch of this rank in one optimizer step: its share of --total-batch-rows cut into
    micro-batches of at most --device-batch-size rows (the last one may be smaller)."""
    if config.total_batch_rows % world_size:
        raise UserError(f"--total-batch-rows {config.total_batch_rows}: expected a multiple of the world size "
                        f"{world_size}")
    rank_rows = config.total_batch_rows // world_size
    return [min(config.device_batch_size, rank_rows - start) for start in range(0, rank_rows, config.device_batch_size)]


def next_micro_batches(stream: ConversationStream, micro_rows: list[int], device, max_tokens: int = 0) -> list:
    """One optimizer step's micro-batches of this rank: [(inputs (B, T), targets (B, T)), ...] on `device`
    (`max_tokens` > 0: grouped by length under that token budget; ConversationStream.next_micro_batches)."""
    return [tuple(t.to(device) for t in batch) for batch in stream.next_micro_batches(micro_rows, max_tokens)]


def check_trainable(stream: ConversationStream, config: SFTConfig) -> None:
    """UserError when --max-seq-len cuts every sampled conversation before its first assistant token (nothing to
    learn from)."""
    if stream.trainable_fraction() > 0:
        return
    task, tokenizer = stream.task, stream.tokenizer
    full = [len(tokenizer.render_conversation(task[k])[0]) for k in range(min(64, len(task)))]
    raise UserError(f"--max-seq-len {config.max_seq_len}: the conversations are cut before any assistant token "
                    f"(uncut they are {min(full)}-{max(full)} tokens); expected a longer one")


def training_steps(config: SFTConfig, stream: ConversationStream) -> int:
    """--num-iterations, else the steps of --num-epochs passes over the mixture (packed rows hold a data-dependent
    number of conversations: estimated from a sample)."""
    if config.num_iterations >= 0:
        return config.num_iterations
    conversations_per_row = 1.0
    if config.pack:
        conversations_per_row = max(1.0, (config.max_seq_len + 1) / stream.mean_rendered_length())
    return max(1, math.ceil(config.num_epochs * len(stream.task) / (config.total_batch_rows * conversations_per_row)))


def sft_metrics(history: dict, step: int, epochs: float) -> dict:
    """The summary's metrics of a run's history (every time slice): final train loss, first/last val loss and
    accuracy, steps, epochs."""
    val_losses = [v for _, v in history["val_loss"]]
    accuracies = [v for _, v in history["accuracy"]]
    return {
        "train_loss": final_train_loss(history["train_loss"]),
        "val_loss": val_losses[-1] if val_losses else None,
        "initial_val_loss": val_losses[0] if val_losses else None,
        "accuracy": accuracies[-1] if accuracies else None,
        "initial_accuracy": accuracies[0] if accuracies else None,
        "steps": step,
        "epochs": epochs,
    }
