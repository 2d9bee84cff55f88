"""Command-line plumbing every stage script shares: dataclass configs as --flags, the parser, the closing line.

  - `FlagConfig`: a dataclass config whose fields are its flags: one --flag per field, named after it, help and
    choices from the field's `option(...)` metadata; `add_args` / `from_args` / `to_dict` and the `require_*`
    checks `validate` methods use (one-line UserErrors naming the flag);
  - stage scripts (the eval scripts too): the parser that accepts torchrun's `--`, --device / --base-dir, the
    report section and the closing `RESULT key=value ...` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Callable

from reasoning.common import UserError, is_master

DEVICE_HELP = "cuda | cpu | mps (default: autodetect)"
BASE_DIR_HELP = "run folder (default $REASONING_BASE_DIR)"


def option(help_text: str, **extra) -> dict:
    """Field metadata: the --flag help text (cli=False for a field that has no flag of its own; choices=(...) for
    a field with a fixed set of values, checked by argparse and by `validate`)."""
    return {"help": help_text, **extra}


def flag_name(name: str) -> str:
    return name.replace("_", "-")


class FlagConfig:
    """Base of the dataclass configs whose fields are command-line flags (reasoning.training.TrainerConfig).
    In --help and `to_dict` a subclass's own fields come first, those of the configs it builds on after them."""

    def check_choices(self) -> None:
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
    def from_args(cls, args, **fields):
        """The config of parsed flags (one per cli field); a field without a flag of its own (cli=False) keeps its
        default unless the caller passes it in `fields`."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)},
                   **fields)

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists), in --help order."""
        values = {f.name: getattr(self, f.name) for f in self._ordered_fields()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


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

