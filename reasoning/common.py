"""Shared runtime helpers: device/dtype choice, torchrun setup, rank-0 printing, the base dir, seeding, atomic writes.

Every script starts from here so that device selection, distributed init (nccl on CUDA, gloo on CPU) and
the artifact folder behave the same way in every stage. Every artifact file (checkpoints, tokenizer, shards,
eval predictions, report sections) goes through `atomic_write`, so a crash never leaves a torn file under a
real name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reasoning.distributed import barrier  # imports nothing of ours: no cycle


class UserError(Exception):
    """A mistake in the user's input (bad flag, missing file). Scripts print it as one line, no traceback."""


def die(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_main(main_fn):
    """Call a script's main() and turn UserError into a one-line message with exit code 2.

    After a normal return, every rank meets at a barrier before the process group goes: a rank that left right
    after its last collective could otherwise tear down gloo's connections while a peer's side of that collective
    was still in flight (seen as 'terminate called without an active exception', SIGABRT, on a loaded box). On an
    error no barrier: the other ranks may never get there."""
    try:
        result = main_fn()
        barrier()
        return result
    except UserError as e:
        die(str(e))
    finally:
        cleanup_distributed()


def get_device(override: str | None = None) -> torch.device:
    """cuda > mps > cpu, unless `override` or $REASONING_DEVICE says otherwise."""
    choice = override or os.environ.get("REASONING_DEVICE") or ""
    if choice:
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise UserError(f"device {choice!r}: expected cpu, cuda, cuda:N or mps") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"device {choice!r}: expected cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {choice!r} requested but CUDA is not available (use --device cpu)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {choice!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and not (mps is not None and mps.is_available()):
            raise UserError(f"device {choice!r} requested but MPS is not available (use --device cpu)")
        return device
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


@contextlib.contextmanager
def evaluating(model):
    """model.eval() inside the block, the previous train/eval mode restored after it (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class DistInfo:
    is_ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def enable_tf32(device: torch.device) -> None:
    """fp32 matmuls on CUDA in TF32 (the few left outside autocast: the optimizer's fp32 steps, fp32 evals), as
    nanochat does; on a CPU this setting has no effect."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def init_distributed(device_override: str | None = None) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (RANK in env); otherwise a single process.

    Multi-node: RANK is the global rank (rank 0 alone writes artifacts: the base dir must be shared between nodes,
    or its checkpoints copied, see README), LOCAL_RANK the rank within this node, which picks the GPU."""
    is_ddp = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if not is_ddp:
        device = get_device(device_override)
        enable_tf32(device)
        return DistInfo(False, 0, 0, 1, device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = get_device(device_override)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # LOCAL_RANK, not RANK: node 1's ranks start at 8
        torch.cuda.set_device(device)
        enable_tf32(device)
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
    make_dir(base, "base dir ($REASONING_BASE_DIR)")
    return base


def make_dir(path: str, what: str, writable: bool = False) -> str:
    """os.makedirs(path, exist_ok=True), with a one-line UserError naming `what` and `path` when it cannot be made
    (a regular file in the way, no permission, a read-only file system); `writable` also requires that files can be
    created in it, so a run finds out before it has trained anything."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{what} {path}: cannot create it, a regular file is in the way") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot create it ({e.strerror or e})") from None
    if writable and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: not writable (read-only folder or file system)")
    return path


def seed_everything(seed: int):
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is a dependency, but seeding should not be what breaks without it
        pass
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- atomic writes

def _open_temp_file(path: str, mode: str, label: str | None = None):
    """A new, hidden, uniquely named file next to `path` (`.<name>.<random>.tmp`, or `.<name>.<label>.<random>.tmp`
    so that the writer can recognise its own leftovers later), opened for writing.

    Not tempfile.mkstemp: that creates files with mode 0600, while artifacts should get the ordinary permissions
    (0666 minus the umask) that open() gives, so others sharing a run dir can read them. Mode "x" is open()'s
    exclusive create, so two writers can never share a temp file."""
    directory, name = os.path.dirname(path) or ".", os.path.basename(path)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{label + '.' if label else ''}{secrets.token_hex(4)}.tmp")
        try:
            return open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"}))
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temp file for {path}")


def _fsync_directory(directory: str):
    """Make a rename durable by syncing the directory entry; not supported on every OS/filesystem, so best effort."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write(path: str, write_fn, mode: str = "wb", temp_label: str | None = None) -> None:
    """Write `path` all-or-nothing: write_fn(file) fills a temp file in the same directory, which is then
    flushed, fsynced and `os.replace`d over `path` (an atomic rename on POSIX and Windows).

    On any failure, KeyboardInterrupt included, the temp file is removed and `path` keeps its previous content
    (or stays absent). `mode` is "wb" (bytes) or "w" (text, UTF-8). The directory must exist. `file.name` is
    the temp file's path, so write_fn can flush and read back what it wrote to validate it (raise to abort).
    `temp_label` goes into the temp file's name (checkpoints put their run id there, to prune what a killed save of
    the same run left behind)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode={mode!r}: expected 'wb' or 'w'")
    f = _open_temp_file(path, mode, temp_label)
    try:
        with f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(f.name)
        raise
    _fsync_directory(os.path.dirname(path) or ".")


def atomic_write_text(path: str, text: str, temp_label: str | None = None) -> None:
    """`text` as UTF-8 into `path`, atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(text), mode="w", temp_label=temp_label)


def atomic_write_json(path: str, obj, **json_kw) -> None:
    """json.dumps(obj, **json_kw) into `path`, atomically. Serialised first: an object that is not JSON raises
    before any file is touched."""
    atomic_write_text(path, json.dumps(obj, **json_kw))


# ----------------------------------------------------------------------------------------------- user data files

def parse_json(text: str | bytes, where: str, expected: str | None = None):
    """json.loads for data a user supplied: malformed JSON, or JSON nested past what the decoder can recurse into
    (`[[[[...` 100k deep raises RecursionError), is a one-line UserError naming `where` (and `expected`, what the
    file should hold, when given)."""
    suffix = f"; expected {expected}" if expected else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){suffix}") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply{suffix}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not valid UTF-8 (byte {e.start + 1}){suffix}") from None


def iter_jsonl(path: str, stop_at_torn_line: bool = False):
    """(line number, object) for each non-blank line of a JSONL file. A line that is not UTF-8, not JSON, nested
    too deeply or not an object is a one-line UserError naming `path:line`. Read as bytes and decoded line by line:
    a bad byte names its line (a text-mode read fails somewhere in a buffer, naming no line).

    `stop_at_torn_line` is for the files we append to ourselves (eval predictions, metrics logs): a kill mid-write
    leaves a torn line, so such a line (unterminated, or bad as above) quietly ends the readable part."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if stop_at_torn_line and not raw.endswith(b"\n"):
                return
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = parse_json(line, where)
                if not isinstance(row, dict):
                    raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            except UnicodeDecodeError as e:
                if stop_at_torn_line:
                    return
                raise UserError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            except UserError:
                if stop_at_torn_line:
                    return
                raise
            yield line_number, row


def read_jsonl(path: str, stop_at_torn_line: bool = False) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped); errors and `stop_at_torn_line` as in iter_jsonl."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    return [row for _, row in iter_jsonl(path, stop_at_torn_line)]
