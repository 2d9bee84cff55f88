"""Checkpoints: atomic save/load of model weights, optimizer state and metadata, plus RNG capture for exact resume.

Layout of one checkpoint directory (`<base>/checkpoints/<stage>/<tag>/`):
    model_{step:06d}.pt              model state_dict (rank 0)
    optim_{step:06d}_rank{r}.pt      optimizer state of rank r (Muon/ZeRO-style optimizers shard it per rank)
    meta_{step:06d}.json             step, model_config, data position, RNG, anything the stage wants to resume

Every file is written with `common.atomic_write` (temp file, fsync, `os.replace`), so a crash
never leaves a half-written file under a real name. The meta file is written last: a step whose meta exists is
complete, and `find_last_step` only ever reports complete steps. In DDP each rank calls `save_checkpoint` with
its own optimizer state; a caller that needs every rank's optimizer file to exist before meta appears should
barrier before the rank-0 call writes meta (or save optimizers first, barrier, then call with meta).

Integrity: meta["files"] holds the sha256 and size of every .pt file of the step (hashed while it is written, so
saving reads nothing back); loading checks them and calls a mismatch corruption, naming the file
(`REASONING_VERIFY_CHECKSUMS=0` skips the check, e.g. for a huge file on slow storage).

Run identity: a training run writes its `run_id` as the first key of every meta file (read cheaply from the file's
head). A tag's checkpoints are grouped by run; `find_last_step` answers for the run that wrote last, pruning
only ever deletes the saving run's own steps (and the temp files its killed saves left, which carry the run id in
their names), so one run never deletes or resumes another's checkpoints. Checkpoints without a run id (written
before run ids existed, or by tools) form one run, "".
"""

from __future__ import annotations

import base64
import errno
import glob
import hashlib
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass

import torch

from reasoning.common import UserError, atomic_write, atomic_write_text, get_base_dir, make_dir

STAGES = ("base", "sft", "rl", "latent")  # latent: scripts/chat_latent.py (Coconut)
VERIFY_ENV = "REASONING_VERIFY_CHECKSUMS"  # "0": load without checking the files' checksums
SLOW_SAVE_ENV = "REASONING_TEST_SLOW_SAVE"  # test hook: seconds each checkpoint file write pauses halfway
_META_RE = re.compile(r"meta_(\d{6,})\.json$")
_STEP_FILE_RE = re.compile(r"(?:model|optim|meta)_(\d{6,})(?:_rank\d+)?\.(?:pt|json)$")
# `.model_000010.pt.<run id>.<random>.tmp`: what reasoning.common.atomic_write leaves when a save is killed
_TEMP_FILE_RE = re.compile(
    r"^\.(?:model|optim|meta)_\d{6,}(?:_rank\d+)?\.(?:pt|json)\.(?:([\w-]+)\.)?[0-9a-f]{8}\.tmp$")
_RUN_ID_RE = re.compile(rb'\A\{\s*"run_id":\s*"([\w-]*)"')


def checkpoint_dir(stage: str, tag: str, base_dir: str | None = None) -> str:
    return os.path.join(base_dir or get_base_dir(), "checkpoints", stage, tag)


def _model_path(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"model_{step:06d}.pt")


def _optim_path(ckpt_dir: str, step: int, rank: int) -> str:
    return os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt")


def _meta_path(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"meta_{step:06d}.json")


def _strip_compile_prefix(state: dict) -> dict:
    """torch.compile wraps modules as `_orig_mod`; checkpoints store the plain names so either side can load."""
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def new_run_id() -> str:
    """A fresh run identity: start time (sortable, readable) + random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()


class _HashingWriter:
    """A file wrapper for torch.save: writes pass through and are hashed on the way (checksum without a re-read).
    An OS error of a write is kept in `error`: torch's zip writer may replace it by its own error on the way out."""

    def __init__(self, file):
        self.file, self.sha256, self.bytes, self.error = file, hashlib.sha256(), 0, None
        self.pause = float(os.environ.get(SLOW_SAVE_ENV) or 0)

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        if self.pause > 0:  # the kill tests' hook: a SIGKILL lands inside a checkpoint write
            time.sleep(self.pause)
            self.pause = 0.0
        return written

    def flush(self) -> None:
        self.file.flush()


def _write_failure(path: str, error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "the folder is not writable"
    else:
        reason = error.strerror or str(error)
    return f"cannot write checkpoint file {path}: {reason}; the previous checkpoints are intact"


def _os_error(error: BaseException, writer: _HashingWriter | None = None) -> OSError | None:
    """The OS condition (disk full, read-only...) behind a failed write, if that is what it was: torch's zip writer
    reports a failed write as its own RuntimeError, raised while the OSError is being handled (its __context__)."""
    if writer is not None and writer.error is not None:
        return writer.error
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _save_tensors(path: str, obj, run_id: str | None) -> dict:
    """torch.save `obj` to `path` atomically; returns its {"sha256", "bytes"}. An OS failure (disk full, read-only
    folder) is a UserError naming the file; other errors (a test's simulated crash, a bug) keep their traceback."""
    writers = []

    def write(f):
        writers.append(_HashingWriter(f))
        torch.save(obj, writers[-1])

    try:
        atomic_write(path, write, temp_label=run_id or None)
    except Exception as e:
        cause = _os_error(e, writers[-1] if writers else None)
        if cause is None:
            raise
        raise UserError(_write_failure(path, cause)) from None
    return {"sha256": writers[-1].sha256.hexdigest(), "bytes": writers[-1].bytes}


def save_checkpoint(ckpt_dir: str, step: int, model_state: dict | None, optimizer_state: dict | None = None,
                    meta: dict | None = None, rank: int = 0, keep_last: int | None = None, run_id: str | None = None,
                    other_files: dict | None = None, replace_other_runs: bool = False) -> dict:
    """Save one step. Rank 0 writes the model and (last) the meta JSON; every rank writes its optimizer state.
    Returns {file name: {"sha256", "bytes"}} of the .pt files this call wrote.

    `meta` must be JSON-serialisable; "step", "run_id" and "files" (checksums of this call's files plus
    `other_files`, those other ranks wrote) are filled in. Rank 0 then prunes: with `run_id`, the temp files of
    this run's killed saves; `keep_last=N` deletes all but this run's N newest complete checkpoints, plus orphans
    (files of steps without meta) older than them; `replace_other_runs` also deletes other runs' checkpoints."""
    if step < 0:
        raise ValueError(f"step={step}: expected >= 0")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: expected >= 1 or None")
    meta = dict(meta or {})
    meta.pop("run_id", None)
    meta["step"] = step
    # serialise before writing anything: a meta that is not JSON fails here, not after the weights hit the disk
    json.dumps(meta)
    make_dir(ckpt_dir, "checkpoint folder")
    files = {}
    if optimizer_state is not None:
        path = _optim_path(ckpt_dir, step, rank)
        files[os.path.basename(path)] = _save_tensors(path, optimizer_state, run_id)
    if rank != 0:
        return files
    if model_state is not None:
        path = _model_path(ckpt_dir, step)
        files[os.path.basename(path)] = _save_tensors(path, _strip_compile_prefix(model_state), run_id)
    meta["files"] = {**(other_files or {}), **files}
    # the run id leads the file, so grouping a tag's checkpoints by run reads only the files' first bytes
    payload = json.dumps({"run_id": run_id, **meta} if run_id is not None else meta, indent=2)
    path = _meta_path(ckpt_dir, step)
    try:
        atomic_write_text(path, payload, temp_label=run_id or None)
    except OSError as e:
        if _os_error(e) is None:
            raise
        raise UserError(_write_failure(path, e)) from None
    if run_id is not None or keep_last is not None:
        _prune(ckpt_dir, keep_last, run_id or "", replace_other_runs)
    return files


_run_cache: dict[tuple, str] = {}


def _run_of(meta_path: str) -> str:
    """The run id of a meta file ("" when it has none), read from its head; cached by (path, mtime, size)."""
    try:
        st = os.stat(meta_path)
        key = (meta_path, st.st_mtime_ns, st.st_size)
        if key in _run_cache:
            return _run_cache[key]
        with open(meta_path, "rb") as f:
            match = _RUN_ID_RE.match(f.read(256))
    except OSError:
        return ""
    run = match.group(1).decode() if match else ""
    _run_cache[key] = run
    return run


def checkpoint_runs(ckpt_dir: str) -> dict[str, list[int]]:
    """{run id: its complete steps, ascending} of a checkpoint folder; the run that wrote last comes last."""
    runs: dict[str, list[int]] = {}
    written: dict[str, float] = {}
    for step in _complete_steps(ckpt_dir):
        path = _meta_path(ckpt_dir, step)
        run = _run_of(path)
        runs.setdefault(run, []).append(step)
        try:
            written[run] = max(written.get(run, 0.0), os.stat(path).st_mtime_ns)
        except OSError:
            pass
    return {run: runs[run] for run in sorted(runs, key=lambda r: written.get(r, 0.0))}


def _complete_steps(ckpt_dir: str) -> list[int]:
    steps = []
    for path in glob.glob(os.path.join(ckpt_dir, "meta_*.json")):
        match = _META_RE.search(os.path.basename(path))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def _remove(paths) -> None:
    # meta files first: a half-pruned step then looks incomplete instead of looking loadable with files missing
    for path in sorted(paths, key=lambda p: not os.path.basename(p).startswith("meta_")):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _prune(ckpt_dir: str, keep_last: int | None, run_id: str, replace_other_runs: bool = False) -> None:
    runs = checkpoint_runs(ckpt_dir)
    mine = runs.get(run_id, [])
    doomed_steps = set(mine[:-keep_last]) if keep_last else set()
    if replace_other_runs:
        doomed_steps |= {s for run, steps in runs.items() if run != run_id for s in steps}
    complete = {s for steps in runs.values() for s in steps}
    oldest_kept = min(set(mine) - doomed_steps, default=-1) if keep_last else -1
    doomed = []
    for name in os.listdir(ckpt_dir):
        match = _STEP_FILE_RE.search(name)
        if match:
            step = int(match.group(1))
            # orphans (a step without meta: a killed save) older than this run's oldest kept step go as well
            if step in doomed_steps or (step not in complete and step < oldest_kept):
                doomed.append(os.path.join(ckpt_dir, name))
            continue
        match = _TEMP_FILE_RE.match(name)
        if match and match.group(1) == run_id and run_id:  # this run's killed saves (no write of it is in flight)
            doomed.append(os.path.join(ckpt_dir, name))
    _remove(doomed)


def remove_leftovers(ckpt_dir: str) -> int:
    """In a folder without any complete checkpoint: delete what killed saves left (temp files, steps without meta)
    before a fresh run starts there. Returns how many files went."""
    if not os.path.isdir(ckpt_dir) or _complete_steps(ckpt_dir):
        return 0
    doomed = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir)
              if _STEP_FILE_RE.search(n) or _TEMP_FILE_RE.match(n)]
    _remove(doomed)
    return len(doomed)


def find_last_step(ckpt_dir: str, run_id: str | None = None) -> int:
    """Largest complete step (one with a meta file) of run `run_id` in ckpt_dir (default: of the run that wrote
    last); -1 when there is none."""
    if not os.path.isdir(ckpt_dir):
        return -1
    runs = checkpoint_runs(ckpt_dir)
    if run_id is None:
        return list(runs.values())[-1][-1] if runs else -1
    return runs[run_id][-1] if run_id in runs else -1


# ----------------------------------------------------------------------------------------------- loading

def verify_checksums_enabled() -> bool:
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _file_sha256(path: str, result: dict) -> None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)  # releases the GIL: runs beside torch.load's own read
        result["sha256"] = digest.hexdigest()
    except OSError as e:
        result["error"] = e


def _torch_load(path: str, device, meta: dict | None = None, meta_path: str = ""):
    """torch.load of a checkpoint file. When `meta` recorded its size and sha256 they are checked (the hash in a
    thread while torch.load reads, so the check costs about max(hash, load) rather than their sum); a mismatch is
    a UserError naming the file."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint file {path} is missing")
    expected = (meta or {}).get("files", {}).get(os.path.basename(path))
    hashing, result = None, {}
    if expected is not None and verify_checksums_enabled():
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise UserError(f"checkpoint file {path} is corrupt: {size} bytes, but {meta_path} recorded "
                            f"{expected['bytes']} (set {VERIFY_ENV}=0 to load it anyway)")
        hashing = threading.Thread(target=_file_sha256, args=(path, result), daemon=True)
        hashing.start()
    state, load_error = None, None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated/garbled files surface as many different exception types
        load_error = e
    if hashing is not None:
        hashing.join()
        if result.get("sha256") != expected["sha256"]:  # checked first: it says more than torch's error
            raise UserError(f"checkpoint file {path} is corrupt: its sha256 differs from the one recorded in "
                            f"{meta_path} (set {VERIFY_ENV}=0 to load it anyway)")
    if load_error is not None:
        raise UserError(f"checkpoint file {path} is corrupt or unreadable ({type(load_error).__name__}: "
                        f"{str(load_error).splitlines()[0] if str(load_error) else ''})") from None
    return state


def _resolve_step(ckpt_dir: str, step: int | None) -> int:
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"checkpoint directory {ckpt_dir} does not exist")
    if step is None:
        step = find_last_step(ckpt_dir)
        if step < 0:
            raise UserError(f"no complete checkpoint (meta_*.json) in {ckpt_dir}")
    return step


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", dict: "a JSON object", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_meta_types(meta: dict, path: str, expected: dict) -> None:
    """UserError naming the meta file and key when meta[key] (if present) is not of type expected[key]: a
    hand-edited or foreign meta file is refused here rather than failing somewhere deep in a trainer."""
    for key, kind in expected.items():
        if key not in meta:
            continue
        value = meta[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UserError(f"checkpoint metadata {path}: {key!r} is {type(value).__name__} {str(value)[:40]!r}, "
                            f"expected {_type_name(kind)}")


# model_config keys of older checkpoints -> today's GPTConfig field
_RENAMED_CONFIG_KEYS = {"sequence_len": "max_seq_len"}
# the keys checkpoint.py itself reads; the trainers check theirs (training.load_resume_checkpoint)
_META_TYPES = {"step": int, "run_id": str, "files": dict, "model_config": dict, "tokenizer_dir": (str, type(None))}


def load_meta(ckpt_dir: str, step: int | None = None) -> dict:
    """Only the metadata of a step (default: the last complete one)."""
    step = _resolve_step(ckpt_dir, step)
    path = _meta_path(ckpt_dir, step)
    if not os.path.exists(path):
        raise UserError(f"checkpoint step {step} not found: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"checkpoint metadata {path} is corrupt ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint metadata {path} is corrupt (expected a JSON object)")
    check_meta_types(meta, path, _META_TYPES)
    config = meta.get("model_config")
    if config is not None and "sequence_len" in config:  # written before the context length had one name
        meta["model_config"] = {_RENAMED_CONFIG_KEYS.get(key, key): value for key, value in config.items()}
    if meta.get("step", step) != step:
        raise UserError(f"checkpoint metadata {path}: 'step' is {meta['step']}, expected {step} (the file's step)")
    for name, entry in meta.get("files", {}).items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int) and not isinstance(entry.get("bytes"), bool)):
            raise UserError(f"checkpoint metadata {path}: files[{name!r}] is {str(entry)[:60]!r}, expected "
                            '{"sha256": hex string, "bytes": integer}')
    return meta


def load_checkpoint(ckpt_dir: str, step: int | None = None, device="cpu", load_optimizer: bool = False,
                    rank: int = 0) -> tuple[dict, dict | None, dict]:
    """(model_state, optimizer_state or None, meta) of `step` (default: the last complete step). The files'
    checksums recorded in meta are verified (unless REASONING_VERIFY_CHECKSUMS=0)."""
    step = _resolve_step(ckpt_dir, step)
    meta = load_meta(ckpt_dir, step)
    meta_path = _meta_path(ckpt_dir, step)
    model_state = _torch_load(_model_path(ckpt_dir, step), device, meta, meta_path)
    optim_state = _torch_load(_optim_path(ckpt_dir, step, rank), device, meta, meta_path) if load_optimizer else None
    return model_state, optim_state, meta


# ----------------------------------------------------------------------------------------------- RNG

def _tensor_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _text_to_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every RNG a training step may draw from (python, numpy, torch CPU, CUDA), as a JSON-serialisable dict
    so it can ride along in meta. Per process: in DDP each rank captures and restores its own."""
    import numpy as np

    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _tensor_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured. CUDA states are restored when this process has the same number of
    GPUs; resuming a GPU run on CPU (or vice versa) keeps the CPU streams exact and skips the rest."""
    import numpy as np

    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(_text_to_tensor(state["torch"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all([_text_to_tensor(s) for s in cuda_states])


# ----------------------------------------------------------------------------------------------- model source

def _latest_tag(stage_dir: str) -> str:
    """The tag whose newest complete checkpoint was written last."""
    candidates = []
    for tag in os.listdir(stage_dir) if os.path.isdir(stage_dir) else []:
        step = find_last_step(os.path.join(stage_dir, tag))
        if step >= 0:
            candidates.append((os.path.getmtime(_meta_path(os.path.join(stage_dir, tag), step)), tag))
    if not candidates:
        raise UserError(f"no checkpoints found under {stage_dir} (train that stage first, set REASONING_BASE_DIR to "
                        "the run's folder, e.g. ~/.cache/reasoning/runcpu after runs/runcpu.sh, or pass a path)")
    return max(candidates)[1]


def _hf_folder(spec: str) -> str:
    """hf:PATH -> PATH, which must be an existing folder (UserError otherwise)."""
    from reasoning.hf import hf_folder

    return hf_folder(spec[len("hf:"):])


def resolve_checkpoint_dir(source: str, tag: str | None = None, base_dir: str | None = None) -> str:
    """A stage name ("base", "sft", "rl": newest tag unless given) or a checkpoint directory path. For hf:PATH
    (a Hugging Face model folder, see reasoning/hf.py) it is PATH, which holds no steps (find_last_step: -1)."""
    if source.startswith("hf:"):
        return _hf_folder(source)
    if source in STAGES:
        stage_dir = os.path.join(base_dir or get_base_dir(), "checkpoints", source)
        return os.path.join(stage_dir, tag or _latest_tag(stage_dir))
    if os.path.isdir(source):
        return source
    raise UserError(f"checkpoint {source!r} not found: expected a stage ({', '.join(STAGES)}) or a directory")


@dataclass(frozen=True)
class ModelSource:
    """Where a stage's model comes from: the model-source flags (`add_model_args`) resolved once, to one folder and
    step, and handed as this value to every consumer (the trainers' policy, KL reference and SFT init, chat_eval's
    report naming, the chat UIs). Build it with `from_args` or `resolve`; `load` reads the model."""
    dir: str                   # the checkpoint folder (normalised), or the Hugging Face model folder
    step: int | None           # the checkpoint step; None for a Hugging Face folder (it has no steps)
    stage: str = "custom"      # "base" | "sft" | "rl" for <base>/checkpoints/<stage>/<tag>, "custom" elsewhere
    tokenizer_dir: str | None = None  # meta["tokenizer_dir"], its own tokenizer; None: <base_dir>/tokenizer
    base_dir: str | None = None  # the run folder: the tokenizer's fallback (None: $REASONING_BASE_DIR)
    hf: bool = False           # a local Hugging Face folder, converted on load by reasoning/hf.py

    @property
    def tag(self) -> str:
        """The folder's name: the default output tag of a stage that fine-tunes this model."""
        return os.path.basename(self.dir)

    @property
    def label(self) -> str:
        """A short name (the chat API's model id): "sft:d12@500", "d12@500" for a folder elsewhere, "hf:PATH"."""
        if self.hf:
            return f"hf:{self.dir}"
        name = f"{self.stage}:{self.tag}" if self.stage in STAGES else self.tag
        return f"{name}@{self.step}"

    @classmethod
    def resolve(cls, where: str, tag: str | None = None, step: int | None = None,
                base_dir: str | None = None) -> ModelSource:
        """`where` = a stage name (its newest tag unless `tag`), a checkpoint directory or hf:PATH; `step` None =
        the last complete one. UserError when there is no such checkpoint."""
        if step is not None and step < 0:
            raise UserError(f"--step {step}: expected a step >= 0")
        if where.startswith("hf:"):
            folder = os.path.normpath(_hf_folder(where))
            return cls(folder, None, "custom", os.path.abspath(folder), base_dir, hf=True)
        ckpt_dir = os.path.normpath(resolve_checkpoint_dir(where, tag, base_dir))
        step = _resolve_step(ckpt_dir, step)
        tokenizer_dir = load_meta(ckpt_dir, step).get("tokenizer_dir")
        stage = os.path.basename(os.path.dirname(ckpt_dir))
        return cls(ckpt_dir, step, stage if stage in STAGES else "custom", tokenizer_dir, base_dir)

    @classmethod
    def from_args(cls, args, base_dir: str | None = None) -> ModelSource:
        """The source the `add_model_args` flags name; --init-from wins over --stage/--tag/--step."""
        if args.init_from:
            return cls.resolve(*parse_init_from(args.init_from), base_dir=base_dir)
        return cls.resolve(args.stage, args.tag, args.step, base_dir)

    def load(self, device="cpu", phase: str = "eval"):
        """(model, tokenizer, meta). meta["model_config"] rebuilds the GPT; the tokenizer comes from `tokenizer_dir`
        when that folder exists, else `<base_dir>/tokenizer/`. phase "train" leaves the model in train mode."""
        if phase not in ("eval", "train"):
            raise ValueError(f"phase={phase!r}: expected 'eval' or 'train'")
        if self.hf:  # a local Hugging Face folder (Qwen3, Llama): converted on load by reasoning/hf.py
            from reasoning.hf import load_hf_model

            return load_hf_model(self.dir, device=device, phase=phase)
        model, meta = _load_gpt(self.dir, self.step, device)
        model.train(phase == "train")
        tokenizer = _load_tokenizer(self.tokenizer_dir, self.base_dir)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but checkpoint {self.dir} was trained with "
                            f"vocab_size {model.config.vocab_size}: wrong tokenizer for this checkpoint")
        return model, tokenizer, meta


def _load_gpt(ckpt_dir: str, step: int, device):
    """(GPT with the step's weights, meta); a model_config that does not build the saved model is a UserError."""
    # imported here: checkpoint I/O does not depend on the model code
    from reasoning.gpt import GPT, GPTConfig

    model_state, _, meta = load_checkpoint(ckpt_dir, step, device=device)
    if "model_config" not in meta:
        raise UserError(f"checkpoint {ckpt_dir} step {meta.get('step')} has no model_config in its meta file")
    device = torch.device(device)
    if device.type == "cpu":  # bf16 weights from a GPU run: CPU matmuls want fp32
        model_state = {k: v.float() if v.is_floating_point() else v for k, v in model_state.items()}
    try:  # a hand-edited model_config (wrong keys or types) fails here, not as a traceback from inside GPT
        config = GPTConfig.from_dict(meta["model_config"])
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()  # non-persistent buffers (rotary tables) are not in the state dict
        model.load_state_dict(model_state, strict=True, assign=True)
    except (TypeError, ValueError, RuntimeError, AssertionError, AttributeError, KeyError) as e:
        raise UserError(f"checkpoint {_meta_path(ckpt_dir, meta['step'])}: its model_config does not build the "
                        f"saved model ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") \
            from None
    return model, meta


def _load_tokenizer(tokenizer_dir: str | None, base_dir: str | None):
    from reasoning.tokenizer import Tokenizer, get_tokenizer

    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        from reasoning.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir

        # a model fine-tuned from --init-from hf:PATH keeps PATH's own tokenizer (and chat format)
        return (HFTokenizer if is_hf_tokenizer_dir(tokenizer_dir) else Tokenizer).load(tokenizer_dir)
    return get_tokenizer(base_dir)


def load_model(where: str, tag: str | None = None, step: int | None = None, device="cpu", phase: str = "eval",
               base_dir: str | None = None):
    """(model, tokenizer, meta) from a stage name, checkpoint directory or hf:PATH: `ModelSource.resolve(...).load`
    in one call, for tools and tests."""
    return ModelSource.resolve(where, tag, step, base_dir).load(device, phase)


# ----------------------------------------------------------------------------------------------- script flags

def add_model_args(parser, default_stage: str = "base") -> None:
    """The model-source flags every stage that reads a checkpoint shares (see INTERFACES.md, Script conventions);
    `ModelSource.from_args` resolves them."""
    if default_stage not in STAGES:
        raise ValueError(f"default_stage={default_stage!r}: expected one of {STAGES}")
    group = parser.add_argument_group("model source")
    group.add_argument("--stage", choices=STAGES, default=default_stage,
                       help=f"which stage's checkpoints to load (default {default_stage})")
    group.add_argument("--tag", default=None, help="checkpoint tag (default: the newest tag of that stage)")
    group.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    group.add_argument("--init-from", default=None, metavar="SPEC",
                       help="overrides --stage/--tag/--step: STAGE, STAGE:TAG, STAGE:TAG@STEP (e.g. sft:d12@500), "
                            "a checkpoint directory, or hf:PATH")


def parse_init_from(spec: str) -> tuple[str, str | None, int | None]:
    """`--init-from` SPEC -> (stage name or checkpoint directory, tag or None, step or None)."""
    if spec.startswith("hf:"):
        _hf_folder(spec)
        return spec, None, None
    stage, sep, rest = spec.partition(":")
    if stage in STAGES:
        tag, at, step_text = rest.partition("@")
        if (sep and not tag) or (at and not step_text.isdigit()):
            raise UserError(f"--init-from {spec}: expected {stage}:TAG or {stage}:TAG@STEP with a numeric STEP")
        return stage, tag or None, int(step_text) if at else None
    if os.path.isdir(spec):
        return spec, None, None
    raise UserError(f"--init-from {spec}: expected STAGE[:TAG[@STEP]] with STAGE one of {', '.join(STAGES)}, "
                    f"a checkpoint directory, or hf:PATH (no such directory)")
