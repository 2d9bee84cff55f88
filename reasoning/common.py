"""Shared runtime helpers: device/dtype choice, torchrun setup, rank-0 printing, the base dir, seeding.

Every script starts from here so that device selection, distributed init (nccl on CUDA, gloo on CPU) and
the artifact folder behave the same way in every stage.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake in the user's input (bad flag, missing file). Scripts print it as one line, no traceback."""


def die(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_main(main_fn):
    """Call a script's main() and turn UserError into a one-line message with exit code 2."""
    try:
        return main_fn()
    except UserError as e:
        die(str(e))
    finally:
        cleanup_distributed()


def get_device(override: str | None = None) -> torch.device:
    """cuda > mps > cpu, unless `override` or $REASONING_DEVICE says otherwise."""
    choice = override or os.environ.get("REASONING_DEVICE") or ""
    if choice:
        if choice.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {choice!r} requested but CUDA is not available (use --device cpu)")
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def get_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that support it (sm80+), fp32 elsewhere; $REASONING_DTYPE overrides."""
    env = os.environ.get("REASONING_DTYPE")
    if env:
        if env not in _DTYPES:
            raise UserError(f"REASONING_DTYPE={env!r}: expected one of bf16, fp16, fp32")
        return _DTYPES[env]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_context(device: torch.device | str, dtype: torch.dtype):
    """Mixed precision only where it pays (GPU bf16/fp16); CPU runs in plain fp32."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


@dataclass
class DistInfo:
    is_ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(device_override: str | None = None) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (RANK in env); otherwise a single process."""
    is_ddp = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if not is_ddp:
        return DistInfo(False, 0, 0, 1, get_device(device_override))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = get_device(device_override)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(True, rank, local_rank, world_size, device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_master() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs):
    if is_master():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def get_base_dir() -> str:
    """Every artifact of a run lives under one folder: $REASONING_BASE_DIR or ~/.cache/reasoning."""
    base = os.environ.get("REASONING_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "reasoning")
    os.makedirs(base, exist_ok=True)
    return base


def seed_everything(seed: int):
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is a dependency, but seeding should not be what breaks without it
        pass
    torch.manual_seed(seed)
