"""What the three trainers (reasoning/pretrain.py, sft.py, rl.py) and the stage scripts share.

Why its own module: pretraining, SFT and RL differ in their data and in what one step does, not in the scaffolding
around the step. One copy of that scaffolding keeps their command lines, logs and checkpoints consistent:
  - configs: `TrainerConfig`, the dataclass fields every trainer has (optimizer rates, the ends of the LR schedule,
    logging, checkpoint keeping, run folder), `FinetuneConfig`, those SFT and RL add (a source checkpoint and an
    output tag), and the dataclass <-> argparse plumbing: one --flag per field, named after it;
  - stage scripts (the eval scripts too): the parser that accepts torchrun's `--`, --device / --base-dir, the
    report section and the closing `RESULT key=value ...` line;
  - the loop: exact gradient accumulation, the LR schedule, `NonFiniteLossError`, `RunLog` (metrics JSONL, wandb),
    collectives that are no-ops in a single process, `RunProgress` / `StepBoundary` (where a time-sliced run
    stands: when to evaluate, save and stop, its training seconds);
  - checkpoints: `load_resume_checkpoint` / `load_optimizer_state` / `save_training_checkpoint`, what a resumable,
    time-sliced run needs (weights, optimizer, every process's RNG state, the trainer's own meta).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from reasoning import checkpoint as ckpt
from reasoning.checkpointing import CHECKPOINTING_CHOICES
from reasoning.common import (UserError, atomic_write_text, autocast_context, die, get_rank, get_world_size, is_master,
                              make_dir, print0)
from reasoning.distributed import all_gather_object, all_reduce_sum, barrier  # noqa: F401 (re-exported)

DEVICE_HELP = "cuda | cpu | mps (default: autodetect)"
BASE_DIR_HELP = "run folder (default $REASONING_BASE_DIR)"
LR_FIELDS = ("matrix_lr", "embedding_lr", "lm_head_lr", "scalar_lr")
# the optimizers keep learning rates in float32 param-group tensors: 3.5e38 is finite here and inf there
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class NonFiniteLossError(RuntimeError):
    """Training diverged: a NaN/inf loss or gradient norm (the run stopped before applying that update), or weights
    an update made non-finite (the run stopped before any checkpoint could hold them)."""


# -------------------------------------------------------------------------------------------- configs

def check_compile_backend(name: str) -> None:
    """A torch.compile backend dynamo knows, checked up front: an unknown one would otherwise surface as an
    InvalidBackend traceback from inside the first training step."""
    import torch._dynamo  # the import costs a second or two: only runs that compile pay it

    known = torch._dynamo.list_backends(exclude_tags=())  # the default list hides debug backends such as aot_eager
    if name not in known:
        debug = [b for b in ("aot_eager", "eager") if b in known]
        raise UserError(f"--compile-backend {name!r}: not a torch.compile backend; expected one of "
                        f"{', '.join(torch._dynamo.list_backends())} (or, for debugging, {', '.join(debug)})")


def option(help_text: str, **extra) -> dict:
    """Field metadata: the --flag help text (cli=False for a field that has no flag of its own; choices=(...) for
    a field with a fixed set of values, checked by argparse and by `validate`)."""
    return {"help": help_text, **extra}


def flag_name(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class TrainerConfig:
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
        for f in dataclasses.fields(self):  # fields declared with option(..., choices=...)
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise UserError(f"--{flag_name(f.name)} {getattr(self, f.name)!r}: expected one of "
                                f"{', '.join(map(str, choices))}")

    def _require(self, names, ok: Callable, expected: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not ok(value):
                raise UserError(f"--{flag_name(name)} {value}: expected {expected}")

    def require_positive(self, *names: str) -> None:
        self._require(names, lambda v: v >= 1, "a positive integer")

    def require_non_negative(self, *names: str) -> None:
        self._require(names, lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                      "a finite number >= 0")

    def require_fraction(self, *names: str) -> None:
        self._require(names, lambda v: 0 <= v <= 1, "a number in [0, 1]")

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

    def optimizer_args(self, lr_scale: float = 1.0) -> dict:
        """The learning rates (each times lr_scale) and weight decay for `model.setup_optimizer`."""
        return {"matrix_lr": self.matrix_lr * lr_scale, "embedding_lr": self.embedding_lr * lr_scale,
                "lm_head_lr": self.lm_head_lr * lr_scale, "scalar_lr": self.scalar_lr * lr_scale,
                "weight_decay": self.weight_decay}

    @classmethod
    def _ordered_fields(cls) -> list:
        """The config's own fields first, then those of the shared configs it builds on, nearest first (each group in
        declaration order). A field a subclass redefines (another default) stays where it was first declared."""
        classes = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]  # RLConfig, FinetuneConfig, ...
        names = [{f.name for f in dataclasses.fields(c)} for c in classes]
        return sorted(dataclasses.fields(cls), key=lambda f: max(i for i, n in enumerate(names) if f.name in n))

    @classmethod
    def add_args(cls, parser, negatable_booleans: bool = False) -> None:
        """One --flag per field (its name with dashes), default and help from the dataclass; fields with
        cli=False are left out. Booleans are switches (store_true), or --flag / --no-flag pairs."""
        for f in cls._ordered_fields():
            if not f.metadata.get("cli", True):
                continue
            flag = f"--{flag_name(f.name)}"
            kind = str(f.type)
            if kind == "bool | None":  # three states: --flag, --no-flag, or neither (None: decided at run time)
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                    help=f.metadata["help"])
                continue
            if kind == "bool":
                if negatable_booleans:
                    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                        help=f.metadata["help"])
                else:
                    parser.add_argument(flag, action="store_true", help=f.metadata["help"])
                continue
            parse = int if kind.startswith("int") else float if kind.startswith("float") else str
            default_text = "" if f.default is None else f" (default {f.default})"
            parser.add_argument(flag, type=parse, default=f.default, choices=f.metadata.get("choices"),
                                help=f.metadata["help"] + default_text)

    @classmethod
    def from_args(cls, args):
        """The config of parsed flags. A cli=False field takes a parsed value when the parser has one (RLConfig's
        model source comes from reasoning.checkpoint.add_model_args), else its default."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                      if f.metadata.get("cli", True) or hasattr(args, f.name)})

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists), in --help order."""
        values = {f.name: getattr(self, f.name) for f in self._ordered_fields()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass
class FinetuneConfig(TrainerConfig):
    """What SFT and RL add: they start from a checkpoint, scale every learning rate and write under an output tag."""
    lr_scale: float = field(default=1.0, metadata=option("multiplier on every learning rate below"))
    data_path: str | None = field(default=None, metadata=option(
        "local data file/folder for the hub tasks (default $REASONING_DATA_DIR, else the HF hub)"))
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

    def lr_multiplier(self, step: int, num_steps: int) -> float:
        """Linear warmup, then linear decay to final_lr_frac at the last step (no constant phase)."""
        return lr_multiplier(step, num_steps, self.warmup_ratio, 1.0 - self.warmup_ratio, self.final_lr_frac)


# -------------------------------------------------------------------------------------------- stage scripts

def script_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a stage script: its module docstring (usage examples) kept as written above the flags."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_script_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]); a leading `--` is dropped: `torchrun ... -m scripts.X -- --flags`
    passes its separator through."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return parser.parse_args(argv)


def add_run_args(parser, base_dir: bool = True) -> None:
    """--device (and --base-dir) for a script whose config does not already have them."""
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    if base_dir:
        parser.add_argument("--base-dir", default=None, help=BASE_DIR_HELP)


NOT_MEASURED = "na"  # a RESULT value that was not measured (runs/runcpu.sh prints the same); nan means diverged


def format_metric(value, spec: str = ".4f") -> str:
    """A metric for a RESULT line: None (not measured, e.g. no evaluation was run) prints as `na`."""
    return NOT_MEASURED if value is None else format(value, spec)


def _result_text(value) -> str:
    return format_metric(value) if value is None or isinstance(value, float) else str(value)


def device_figures() -> dict:
    """On a CUDA process: this rank's peak allocated memory and its attention calls per kernel (FA3 vs SDPA, counted
    inside the model's attention), which dev/gpu_check.py compares with the memory plan. {} elsewhere."""
    import torch

    from reasoning.flash_attention import CALLS

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"max_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "attn_fa3": CALLS["fa3"],
            "attn_sdpa": CALLS["sdpa"]}


def print_result(values: dict, stopped_at: int | None = None) -> None:
    """The last line of a pipeline script, on rank 0: `RESULT key=value ...` (floats with 4 decimals, None as na,
    anything else as given), then `stopped_at=STEP` for a run that --stop-at-step cut short. On CUDA the
    device figures (device_figures) are appended."""
    values = values | device_figures()
    if is_master():
        stopped = "" if stopped_at is None else f" stopped_at={stopped_at}"
        print("RESULT " + " ".join(f"{k}={_result_text(v)}" for k, v in values.items()) + stopped, flush=True)


def run_trainer(train_fn: Callable, *args, **kwargs) -> dict:
    """Call a trainer; a run that diverged (NonFiniteLossError) exits with its one-line message and code 3."""
    try:
        return train_fn(*args, **kwargs)
    except NonFiniteLossError as e:
        die(str(e), code=3)


def finish_training_script(name: str, summary: dict, result: dict, config: dict, metrics: dict,
                           base_dir: str | None, tables: dict | None = None) -> None:
    """The end of a training script, on rank 0: a finished run's report section `name` (curves that have points),
    then the RESULT line of `result` (print_result; stopped_at= when the run stopped early)."""
    if not is_master():
        return
    if summary["finished"]:
        from reasoning.report import log_stage

        log_stage(name, config=config, metrics=metrics, series={k: v for k, v in summary["series"].items() if v},
                  seconds=summary["seconds"], tables=tables, base_dir=base_dir)
    print_result(result, stopped_at=None if summary["finished"] else summary["step"])


# -------------------------------------------------------------------------------------------- the loop

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


gather_objects = all_gather_object  # [obj of rank 0, obj of rank 1, ...] on every rank (reasoning.distributed)


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
        """(the lines of records at or before `step`, how many lines were not JSON records)."""
        kept, torn = [], 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    record = None
                if not isinstance(record, dict) or not line.endswith("\n"):
                    torn += 1
                elif not isinstance(record.get("step", 0), (int, float)) or record.get("step", 0) <= step:
                    kept.append(line)
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


# -------------------------------------------------------------------------------------------- checkpoints

# what every trainer's meta holds, checked on resume (a hand-edited meta is a one-line error, not a traceback)
RESUME_META_TYPES = {"rng": list, "history": dict, "train_seconds": float, "run_id": str}


def load_resume_checkpoint(ckpt_dir: str, model, device, ranks: int, ranks_key: str,
                           source: str | None = None, meta_types: dict | None = None) -> dict | None:
    """--resume: load the last checkpoint of `ckpt_dir` into `model`; returns its meta, None if there is none.

    The last checkpoint is that of the run that wrote last (reasoning.checkpoint: run identity); the caller keeps its
    run id (`meta["run_id"]`, see `start_run`). `source` is where a fine-tuning run started from: with no
    checkpoint yet it starts there again; pretraining (source None) has nothing else to start from, so that is an
    error. The checkpoint must hold the same model and one saved state per rank (`meta[ranks_key]` has `ranks`
    entries), since each rank continues from its own. `meta_types` = {key: type} of the trainer's own meta keys.
    """
    last = ckpt.find_last_step(ckpt_dir)
    if last < 0:
        if source is None:
            raise UserError(f"--resume: no complete checkpoint in {ckpt_dir} (train without --resume first)")
        print0(f"--resume: no checkpoint in {ckpt_dir} yet; starting from {source}")
        return None
    model_state, _, meta = ckpt.load_checkpoint(ckpt_dir, last, device=device)
    meta_path = os.path.join(ckpt_dir, f"meta_{last:06d}.json")
    ckpt.check_meta_types(meta, meta_path, {**RESUME_META_TYPES, ranks_key: list, **(meta_types or {})})
    model_config = model.config.to_dict()
    if meta.get("model_config") != model_config:
        if source is None:  # pretraining: the flags define the model
            raise UserError(f"--resume: checkpoint {ckpt_dir} step {last} has model {meta.get('model_config')} but "
                            f"the flags give {model_config}; use the same --depth/--max-seq-len")
        raise UserError(f"--resume: {ckpt_dir} step {last} holds a different model than {source}")
    saved = len(meta.get(ranks_key, []))
    if saved != ranks:
        if source is None:  # pretraining counts data ranks: processes x simulated ranks
            raise UserError(f"--resume: checkpoint was written by {saved} data ranks but this run has {ranks} "
                            "(nproc_per_node × simulate_ranks); resume with the same layout")
        raise UserError(f"--resume: checkpoint was written by {saved} ranks but this run has {ranks}; resume with "
                        "the same number of processes")
    if len(meta.get("rng", [])) != get_world_size():
        raise UserError(f"checkpoint metadata {meta_path}: 'rng' holds {len(meta.get('rng', []))} states, expected "
                        f"one per process ({get_world_size()})")
    current = ckpt.rng_state()
    try:  # a malformed RNG state fails now, with the file's name, not at the trainer's set_rng_state
        ckpt.set_rng_state(meta["rng"][get_rank()])
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError) as e:
        raise UserError(f"checkpoint metadata {meta_path}: 'rng' is malformed ({type(e).__name__})") from None
    finally:
        ckpt.set_rng_state(current)
    model.load_state_dict(model_state)
    return meta


def start_run(ckpt_dir: str, resume_meta: dict | None, overwrite: bool, tag_flag: str) -> str:
    """The run id of this run (the same on every rank): a resumed run keeps its checkpoint's, a fresh one gets a new
    one. A fresh run refuses a tag that holds another run's checkpoints, unless `overwrite` (then they go at this
    run's first save: `save_training_checkpoint(replace_other_runs=True)`), and clears what killed saves left in a
    tag without checkpoints. The folder must be writable: found out now, not after hours of training."""
    make_dir(ckpt_dir, "checkpoint folder", writable=True)
    if resume_meta is not None:
        return resume_meta.get("run_id", "")
    runs = ckpt.checkpoint_runs(ckpt_dir)
    if runs and not overwrite:
        steps = sorted(s for run_steps in runs.values() for s in run_steps)
        shown = ", ".join(map(str, steps[-3:]))
        raise UserError(f"checkpoint tag {os.path.basename(ckpt_dir)} ({ckpt_dir}) already holds another run's "
                        f"checkpoints (steps {'..., ' if len(steps) > 3 else ''}{shown}); pass --resume to continue "
                        f"that run, or --overwrite to replace it, or pick another {tag_flag}")
    if runs:
        print0(f"--overwrite: the checkpoints in {ckpt_dir} (another run) are deleted at this run's first save")
    elif get_rank() == 0:
        removed = ckpt.remove_leftovers(ckpt_dir)
        if removed:
            print0(f"{ckpt_dir}: removed {removed} leftover file(s) of a killed save (no complete checkpoint)")
    return gather_objects(ckpt.new_run_id())[0]  # rank 0's id, everywhere


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


def _optimizer_rank(optimizer) -> int:
    # a sharded optimizer's state is one file per rank; unsharded state is the same everywhere: rank 0's serves all
    return get_rank() if getattr(optimizer, "shard", False) else 0


def load_optimizer_state(ckpt_dir: str, meta: dict, optimizer, device) -> None:
    """The optimizer state of the checkpoint whose meta `load_resume_checkpoint` returned (this rank's share)."""
    _, state, _ = ckpt.load_checkpoint(ckpt_dir, meta["step"], device=device, load_optimizer=True,
                                       rank=_optimizer_rank(optimizer))
    optimizer.load_state_dict(state)


def save_training_checkpoint(ckpt_dir: str, step: int, model, optimizer, meta: dict, keep_last: int, run_id: str,
                             replace_other_runs: bool = False) -> None:
    """Every rank calls it. `meta` (the trainer's own) gets what `load_resume_checkpoint` checks and restores:
    "model_config" and "rng", every process's RNG state (gathered). Ranks of a sharded optimizer write their own
    optimizer file first and pass its checksum to rank 0, which writes meta last; that completes the checkpoint
    (reasoning.checkpoint). keep_last 0 keeps every checkpoint of this run; other runs' are kept unless
    `replace_other_runs` (--overwrite)."""
    meta = {"model_config": model.config.to_dict(), **meta, "rng": gather_objects(ckpt.rng_state())}
    optim_rank = _optimizer_rank(optimizer)
    written = {}
    if optim_rank != 0:
        written = ckpt.save_checkpoint(ckpt_dir, step, None, optimizer.state_dict(), rank=optim_rank, run_id=run_id)
    # a collective: every optimizer file exists before rank 0 writes meta, which records their checksums
    other_files = {name: entry for files in gather_objects(written) for name, entry in files.items()}
    if get_rank() == 0:
        ckpt.save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta=meta, rank=0,
                             keep_last=keep_last or None, run_id=run_id, other_files=other_files,
                             replace_other_runs=replace_other_runs)
    if get_world_size() > 1:
        barrier()
