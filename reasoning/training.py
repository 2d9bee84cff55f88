"""The trainer loop's parts, shared by pretraining, SFT and RL (scripts/base_train.py, chat_sft.py, chat_rl.py).

Why its own module: the stages differ in their data and in what one step does, not in the scaffolding around the
step. One copy of that scaffolding keeps their settings, logs and numbers consistent:
  - settings: `TrainerConfig`, the fields every trainer has (optimizer rates, the ends of the LR schedule, clipping,
    logging, checkpoint keeping, run folder, compilation), `FinetuneConfig`, those SFT and RL add (a source
    checkpoint, an LR scale, an output tag); their --flags come from reasoning.cli.FlagConfig;
  - the step: exact gradient accumulation (`accumulate_gradients`), the LR multiplier written into the optimizer
    (`lr_multiplier`, `set_learning_rate`), the gradient norm and clipping (`clip_gradients`), the divergence checks
    (`check_step_finite`, `check_weights_finite`, `NonFiniteLossError`);
  - around the step: `RunProgress` / `StepBoundary` (where a time-sliced run stands: when to evaluate, save and
    stop, its training seconds), `RunLog` (metrics JSONL, wandb), `final_train_loss` (the summary's figure).
Run checkpoints (resume, save) are reasoning.resume's; the command-line plumbing is reasoning.cli's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from reasoning import checkpoint as ckpt
from reasoning.checkpointing import CHECKPOINTING_CHOICES
from reasoning.cli import BASE_DIR_HELP, FlagConfig, flag_name, option
from reasoning.common import (UserError, atomic_write_text, autocast_context, die, get_rank, get_world_size,
                              iter_jsonl, make_dir, print0)
from reasoning.distributed import all_reduce_sum
from reasoning.optim import OptimizerSettings

LR_FIELDS = ("matrix_lr", "embedding_lr", "lm_head_lr", "scalar_lr")
# the optimizers keep learning rates in float32 param-group tensors: 3.5e38 is finite here and inf there
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class NonFiniteLossError(RuntimeError):
    """Training diverged: a NaN/inf loss or gradient norm (the run stopped before applying that update), or weights
    an update made non-finite (the run stopped before any checkpoint could hold them)."""


# -------------------------------------------------------------------------------------------- settings

def check_compile_backend(name: str) -> None:
    """A torch.compile backend dynamo knows, checked up front: an unknown one would otherwise surface as an
    InvalidBackend traceback from inside the first training step."""
    import torch._dynamo  # the import costs a second or two: only runs that compile pay it

    known = torch._dynamo.list_backends(exclude_tags=())  # the default list hides debug backends such as aot_eager
    if name not in known:
        debug = [b for b in ("aot_eager", "eager") if b in known]
        raise UserError(f"--compile-backend {name!r}: not a torch.compile backend; expected one of "
                        f"{', '.join(torch._dynamo.list_backends())} (or, for debugging, {', '.join(debug)})")


@dataclass
class TrainerConfig(FlagConfig):
    """The settings every trainer has. A trainer's config subclasses it; in --help and `to_dict` the trainer's own
    fields come first, these after them."""
    # optimizer: Muon for the hidden matrices, AdamW for the rest; LR warmup and the multiplier at the last step
    matrix_lr: float = field(default=0.02, metadata=option("Muon learning rate of the hidden matrices"))
    embedding_lr: float = field(default=0.2, metadata=option("AdamW learning rate of the token embedding"))
    lm_head_lr: float = field(default=0.004, metadata=option("AdamW learning rate of the output head"))
    scalar_lr: float = field(default=0.5, metadata=option("AdamW learning rate of gains and biases"))
    weight_decay: float = field(default=0.0, metadata=option("decoupled weight decay of the Muon matrices"))
    warmup_ratio: float = field(default=0.0, metadata=option("fraction of steps of linear LR warmup"))
    final_lr_frac: float = field(default=0.0, metadata=option("LR multiplier reached at the last step"))
    grad_clip: float = field(default=1.0, metadata=option("clip the global gradient norm to this (0: off)"))
    # logging, checkpoints, run folder
    log_every: int = field(default=1, metadata=option("print a progress line every N steps"))
    run: str | None = field(default=None, metadata=option("wandb run name (wandb is used only when given)"))
    wandb_project: str = field(default="reasoning", metadata=option("wandb project"))
    keep_last: int = field(default=2, metadata=option("keep this many newest checkpoints (0: all)"))
    overwrite: bool = field(default=False, metadata=option(
        "start a fresh run in a checkpoint tag that holds another run's checkpoints; they are deleted once this "
        "run has saved its first checkpoint"))
    base_dir: str | None = field(default=None, metadata=option(BASE_DIR_HELP))
    # speed: the model's training forward (and the optimizer kernels) through torch.compile
    compile: bool | None = field(default=None, metadata=option(
        "torch.compile the training forward and the optimizer kernels (--compile / --no-compile; default: on CUDA)"))
    compile_backend: str = field(default="inductor", metadata=option("torch.compile backend (tests use aot_eager)"))

    def validate(self) -> None:
        """Raise UserError naming the first bad setting (these values come from command-line flags)."""
        self.require_positive("log_every")
        self.require_non_negative("matrix_lr", "embedding_lr", "lm_head_lr", "scalar_lr", "weight_decay",
                                  "grad_clip", "keep_last")
        self.require_fraction("warmup_ratio", "final_lr_frac")
        self.require_float32_rates()
        if self.compile:
            check_compile_backend(self.compile_backend)
        self.check_choices()

    def require_float32_rates(self, lr_scale: float = 1.0) -> None:
        """Every learning rate (times lr_scale) below the largest float32: above it the optimizer's rate is inf."""
        for name in LR_FIELDS:
            value = getattr(self, name)
            if value * lr_scale > FLOAT32_MAX:
                scaled = f" (x --lr-scale {lr_scale} = {value * lr_scale:g})" if lr_scale != 1.0 else ""
                raise UserError(f"--{flag_name(name)} {value:g}{scaled}: expected a learning rate below "
                                f"{FLOAT32_MAX:.4g} (the largest float32)")

    def compile_on(self, device) -> bool:
        """Whether to compile on `device`: --compile / --no-compile, else on for CUDA (nanochat's fast path) and off
        elsewhere (on a CPU the compile time is rarely won back)."""
        return self.compile if self.compile is not None else torch.device(device).type == "cuda"

    def compile_model(self, model, device, dynamic: bool | None = False):
        """`model` compiled for its training forward per `compile_on` (else itself). dynamic=None for trainers whose
        row lengths vary (SFT): dynamo then marks the length dynamic after the first recompile."""
        if not self.compile_on(device):
            return model
        return torch.compile(model, dynamic=dynamic, backend=self.compile_backend)

    def optimizer_compile_backend(self, device):
        """The backend of the optimizer's compiled kernels: only on CUDA (on a CPU inductor's C++ build of a few
        elementwise kernels costs more than it saves)."""
        return self.compile_backend if self.compile_on(device) and torch.device(device).type == "cuda" else None

    def optimizer_settings(self, lr_scale: float = 1.0) -> OptimizerSettings:
        """The optimizer's hyperparameters of this config: its learning rates (each times lr_scale), weight decay;
        the rest at reasoning.optim's defaults unless a trainer's config sets them (pretraining's betas)."""
        return OptimizerSettings(matrix_lr=self.matrix_lr * lr_scale, embedding_lr=self.embedding_lr * lr_scale,
                                 lm_head_lr=self.lm_head_lr * lr_scale, scalar_lr=self.scalar_lr * lr_scale,
                                 weight_decay=self.weight_decay)


@dataclass
class FinetuneConfig(TrainerConfig):
    """What SFT and RL add: they start from a checkpoint, scale every learning rate and write under an output tag."""
    lr_scale: float = field(default=1.0, metadata=option("multiplier on every learning rate below"))
    data_path: str | None = field(default=None, metadata=option(
        "local data file/folder for the hub tasks (default $REASONING_TASK_DATA_DIR, else the HF hub)"))
    out_tag: str | None = field(default=None, metadata=option("output checkpoint tag (default: the source's tag)"))
    save_every: int = field(default=0, metadata=option("checkpoint every N steps (0: only at the end)"))
    resume: bool = field(default=False, metadata=option("continue from the last checkpoint of --out-tag"))
    stop_at_step: int = field(default=-1, metadata=option(
        "checkpoint and stop after this step, keeping the schedule of the full run (time-sliced jobs)"))
    # training-pass memory (reasoning.microbatch, reasoning.checkpointing): how a step is computed, never what
    max_tokens_per_micro_batch: int = field(default=0, metadata=option(
        "tokens (padding included) per training micro-batch at most: rows are grouped by length under this budget "
        "and --device-batch-size (0: no budget, rows only); it changes how the update is split, not the update"))
    activation_checkpointing: str = field(default="auto", metadata=option(
        "recompute each transformer block in the backward (on), also keeping the block inputs in CPU memory "
        "(offload); auto: off, or on CUDA the cheapest mode the memory planner says fits",
        choices=CHECKPOINTING_CHOICES))

    def validate(self) -> None:
        super().validate()
        self.require_non_negative("lr_scale", "max_tokens_per_micro_batch")
        self.require_float32_rates(self.lr_scale)

    def optimizer_settings(self, lr_scale: float | None = None) -> OptimizerSettings:
        """Every learning rate times --lr-scale."""
        return super().optimizer_settings(self.lr_scale if lr_scale is None else lr_scale)

    def lr_multiplier(self, step: int, num_steps: int) -> float:
        """Linear warmup, then linear decay to final_lr_frac at the last step (no constant phase)."""
        return lr_multiplier(step, num_steps, self.warmup_ratio, 1.0 - self.warmup_ratio, self.final_lr_frac)


# -------------------------------------------------------------------------------------------- the step

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


def autocast_factory(device, dtype: torch.dtype) -> Callable[[], ContextManager]:
    """A function making a fresh mixed-precision context per use (a context manager cannot be entered twice)."""
    return functools.partial(autocast_context, device, dtype)


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
    count = all_reduce_sum(count).item()
    if count == 0:
        raise ValueError("accumulate_gradients: no valid targets (all -1) in this step on any rank")
    scale = get_world_size() / count
    total = torch.zeros((), dtype=torch.float32, device=device)
    for inputs, targets in micro_batches:
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss_sum = model(inputs, targets, loss_reduction="sum")
        (loss_sum * scale).backward()
        total += loss_sum.detach().float()
    return all_reduce_sum(total) / count


def set_learning_rate(optimizer, multiplier: float) -> None:
    """This step's learning rates: every param group's initial rate times the schedule's multiplier (written as a
    plain float: the optimizer's compiled kernels read it as a tensor, so a new value never recompiles)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier


def gradient_norm(model) -> torch.Tensor:
    """Global L2 norm of the gradients (0-d float32), with one fused norm per gradient list and no host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def clip_gradients(model, max_norm: float, host_norm: float | None = None):
    """Scale the gradients so that their global L2 norm is at most `max_norm` (0: no clipping); returns the norm
    before clipping.

    Two ways to compute the scale, kept because each stage's numbers are pinned (the two differ in the last bit):
      - host_norm None (SFT, RL): torch.nn.utils.clip_grad_norm_, the norm and the scale stay on the device;
      - host_norm given (pretraining, which has already read the norm to the host together with the loss in one
        transfer, `gradient_norm`): the scale is computed on the host in float64, gradients are scaled only when
        the norm exceeds max_norm.
    """
    if host_norm is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if max_norm > 0 and host_norm > max_norm:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(max_norm / (host_norm + 1e-6))
    return host_norm


def check_step_finite(step: int, loss: float, grad_norm: float, ckpt_dir: str, run_id: str,
                      hint: str = "a lower learning rate") -> None:
    """Before the optimizer step: NonFiniteLossError when the loss or the gradient norm is NaN/inf (the update is
    not applied; the message names this run's last good checkpoint)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteLossError(diverged_message(step, f"loss {loss}, gradient norm {grad_norm}", ckpt_dir, run_id,
                                                  "stopped before the update", hint))


def check_weights_finite(model, step: int, ckpt_dir: str, run_id: str) -> None:
    """After an optimizer step: NonFiniteLossError naming the step when a weight is inf/NaN, before any checkpoint
    could save it. One fused max-abs norm per parameter list and one host sync (a max, unlike a 2-norm, cannot
    overflow on finite weights)."""
    norms = torch._foreach_norm([p.detach() for p in model.parameters()], ord=float("inf"))
    if not math.isfinite(float(torch.stack([n.float() for n in norms]).max())):
        raise NonFiniteLossError(diverged_message(step, "the update made weights inf/NaN", ckpt_dir, run_id,
                                                  "stopped before saving them"))


def diverged_message(step: int, what: str, ckpt_dir: str, run_id: str, stopped: str, hint: str = "a lower "
                     "learning rate") -> str:
    """The one-line divergence error: the step, what went non-finite, and this run's last good checkpoint."""
    last = ckpt.find_last_step(ckpt_dir, run_id)
    where = f"last good checkpoint: {ckpt_dir} step {last}" if last >= 0 else "no checkpoint of this run was written"
    return f"step {step}: {what}: training diverged; {stopped} ({where}). Try {hint}."


# -------------------------------------------------------------------------------------------- around the step

@dataclass(frozen=True)
class StepBoundary:
    """A run's position before its training step `step` (= after `step` optimizer steps): what is due there.

    evaluate_due(N): at step 0, at the end and every N steps (N > 0); at the start and end only (0); never (< 0).
    save_due(N): every N steps (N > 0) and where this time slice ends (the schedule's end or --stop-at-step), never
    at step 0; N < 0 counts as 0 here (pretraining, whose --save-every -1 means never, checks that itself).
    A resumed run starts at the step its checkpoint was written: that step's evaluation and save are done already
    (`fresh` is False there)."""
    step: int
    num_steps: int
    stop_at_step: int = -1
    resumed_at: int | None = None

    @property
    def finished(self) -> bool:
        return self.step == self.num_steps

    @property
    def last(self) -> bool:
        """The loop ends here: the schedule is done, or --stop-at-step stops this time slice."""
        return self.finished or self.step == self.stop_at_step

    @property
    def fresh(self) -> bool:
        return self.step != self.resumed_at

    def evaluate_due(self, every: int) -> bool:
        return self.fresh and every >= 0 and (self.step == 0 or self.finished or (every > 0 and self.step % every == 0))

    def save_due(self, every: int) -> bool:
        return self.fresh and self.step > 0 and (self.last or (every > 0 and self.step % every == 0))


class RunProgress:
    """Where a run stands across its time slices (--resume, --stop-at-step): the step this slice starts at, the
    boundary before each step, and the training seconds of every slice so far (`seconds()`)."""

    def __init__(self, resume_meta: dict | None, num_steps: int, stop_at_step: int, steps_flag: str,
                 start_time: float):
        self.start_step = 0 if resume_meta is None else resume_meta["step"]
        if self.start_step > num_steps:
            raise UserError(f"--resume: checkpoint is at step {self.start_step}, past {steps_flag} {num_steps}")
        self.resumed_at = None if resume_meta is None else self.start_step  # that step's eval and save are done
        self.num_steps, self.stop_at_step, self.start_time = num_steps, stop_at_step, start_time
        self.seconds_before = 0.0 if resume_meta is None else resume_meta.get("train_seconds", 0.0)

    def at(self, step: int) -> StepBoundary:
        return StepBoundary(step, self.num_steps, self.stop_at_step, self.resumed_at)

    @property
    def resumed_note(self) -> str:
        """The end of a trainer's start-up line."""
        return "" if self.resumed_at is None else f" | resumed at step {self.resumed_at}"

    def seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self.start_time)


def final_train_loss(history: list) -> float | None:
    """The training loss a run reports: the mean over its last steps (a fifth of them, 1 to 20), since one batch's
    loss is noisy. `history` = [[step, loss], ...] of the whole run (every time slice); None before any step."""
    losses = [loss for _, loss in history]
    if not losses:
        return None
    tail = losses[-max(1, min(20, len(losses) // 5)):]
    return sum(tail) / len(tail)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class RunLog:
    """Metrics JSONL (rank 0 only: the others pass path=None) and wandb (only with a run name).

    On resume the records past the checkpoint's step are dropped (those steps are about to be trained again), and
    so are lines that are not JSON records (a torn last line: the run was killed or the disk filled mid-write),
    with one notice; the log is rewritten atomically. A fresh run replaces an old log of the same name."""

    def __init__(self, path: str | None, config: TrainerConfig, resume_step: int | None):
        self.path = path
        self.wandb = None
        if path is None:
            return
        make_dir(os.path.dirname(path), "metrics log folder")
        if resume_step is not None and os.path.exists(path):
            kept, torn = self._records_up_to(path, resume_step)
            if torn:
                print0(f"metrics log {path}: dropped {torn} line(s) that are not JSON records (a torn write)")
            atomic_write_text(path, "".join(kept))
        elif os.path.exists(path):
            os.remove(path)
        if config.run:
            import wandb  # only imported when asked for: it is slow to import and may want a login

            self.wandb = wandb.init(project=config.wandb_project, name=config.run, config=config.to_dict())

    @staticmethod
    def _records_up_to(path: str, step: int) -> tuple[list[str], int]:
        """(the lines of records at or before `step`, how many lines were dropped from a torn one on)."""
        records = [record for _, record in iter_jsonl(path, stop_at_torn_line=True)]
        with open(path, "rb") as f:
            torn = sum(1 for line in f if line.strip()) - len(records)
        kept = [json.dumps(r) + "\n" for r in records
                if not isinstance(r.get("step", 0), (int, float)) or r.get("step", 0) <= step]
        return kept, torn

    @classmethod
    def for_run(cls, base_dir: str, name: str, config: TrainerConfig, resume_step: int | None) -> RunLog:
        """`<base>/logs/<name>.jsonl` on rank 0, a no-op log elsewhere."""
        return cls(os.path.join(base_dir, "logs", f"{name}.jsonl") if get_rank() == 0 else None, config, resume_step)

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


def run_trainer(train_fn: Callable, *args, **kwargs) -> dict:
    """Call a trainer; a run that diverged (NonFiniteLossError) exits with its one-line message and code 3."""
    try:
        return train_fn(*args, **kwargs)
    except NonFiniteLossError as e:
        die(str(e), code=3)


