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
"""

from __future__ import annotations

import base64
import glob
import json
import os
import random
import re

import torch

from reasoning.common import UserError, atomic_write, atomic_write_text, get_base_dir

STAGES = ("base", "sft", "rl")
_META_RE = re.compile(r"meta_(\d{6,})\.json$")
_STEP_FILE_RE = re.compile(r"(?:model|optim|meta)_(\d{6,})(?:_rank\d+)?\.(?:pt|json)$")


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


def save_checkpoint(ckpt_dir: str, step: int, model_state: dict | None, optimizer_state: dict | None = None,
                    meta: dict | None = None, rank: int = 0, keep_last: int | None = None) -> None:
    """Save one step. Rank 0 writes the model and (last) the meta JSON; every rank writes its optimizer state.

    `meta` must be JSON-serialisable; "step" is filled in. `keep_last=N` (rank 0) then deletes all but the N
    newest complete checkpoints, plus leftovers of older crashed saves."""
    if step < 0:
        raise ValueError(f"step={step}: expected >= 0")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: expected >= 1 or None")
    meta = dict(meta or {})
    meta["step"] = step
    # serialise before writing anything: a meta that is not JSON fails here, not after the weights hit the disk
    payload = json.dumps(meta, indent=2, sort_keys=True)
    os.makedirs(ckpt_dir, exist_ok=True)
    if optimizer_state is not None:
        atomic_write(_optim_path(ckpt_dir, step, rank), lambda f: torch.save(optimizer_state, f))
    if rank != 0:
        return
    if model_state is not None:
        state = _strip_compile_prefix(model_state)
        atomic_write(_model_path(ckpt_dir, step), lambda f: torch.save(state, f))
    atomic_write_text(_meta_path(ckpt_dir, step), payload)
    if keep_last is not None:
        _prune(ckpt_dir, keep_last)


def _complete_steps(ckpt_dir: str) -> list[int]:
    steps = []
    for path in glob.glob(os.path.join(ckpt_dir, "meta_*.json")):
        match = _META_RE.search(os.path.basename(path))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def _prune(ckpt_dir: str, keep_last: int):
    complete = _complete_steps(ckpt_dir)
    if not complete:
        return
    kept = complete[-keep_last:]
    oldest_kept = kept[0]
    doomed = []
    for path in glob.glob(os.path.join(ckpt_dir, "*")):
        match = _STEP_FILE_RE.search(os.path.basename(path))
        if match and int(match.group(1)) < oldest_kept:
            doomed.append(path)
    # meta files first: a half-pruned step then looks incomplete instead of looking loadable with files missing
    doomed.sort(key=lambda p: not os.path.basename(p).startswith("meta_"))
    for path in doomed:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def find_last_step(ckpt_dir: str) -> int:
    """Largest step with a meta file (i.e. a complete checkpoint) in ckpt_dir; -1 when there is none."""
    if not os.path.isdir(ckpt_dir):
        return -1
    steps = _complete_steps(ckpt_dir)
    return steps[-1] if steps else -1


# ----------------------------------------------------------------------------------------------- loading

def _torch_load(path: str, device):
    if not os.path.exists(path):
        raise UserError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated/garbled files surface as many different exception types
        raise UserError(f"checkpoint file {path} is corrupt or unreadable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _resolve_step(ckpt_dir: str, step: int | None) -> int:
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"checkpoint directory {ckpt_dir} does not exist")
    if step is None:
        step = find_last_step(ckpt_dir)
        if step < 0:
            raise UserError(f"no complete checkpoint (meta_*.json) in {ckpt_dir}")
    return step


def load_meta(ckpt_dir: str, step: int | None = None) -> dict:
    """Only the metadata of a step (default: the last complete one)."""
    step = _resolve_step(ckpt_dir, step)
    path = _meta_path(ckpt_dir, step)
    if not os.path.exists(path):
        raise UserError(f"checkpoint step {step} not found: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint metadata {path} is corrupt ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint metadata {path} is corrupt (expected a JSON object)")
    return meta


def load_checkpoint(ckpt_dir: str, step: int | None = None, device="cpu", load_optimizer: bool = False,
                    rank: int = 0) -> tuple[dict, dict | None, dict]:
    """(model_state, optimizer_state or None, meta) of `step` (default: the last complete step)."""
    step = _resolve_step(ckpt_dir, step)
    meta = load_meta(ckpt_dir, step)
    model_state = _torch_load(_model_path(ckpt_dir, step), device)
    optim_state = _torch_load(_optim_path(ckpt_dir, step, rank), device) if load_optimizer else None
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


# ----------------------------------------------------------------------------------------------- model loading

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


def load_model(source: str, tag: str | None = None, step: int | None = None, device="cpu", phase: str = "eval",
               base_dir: str | None = None):
    """(model, tokenizer, meta) from a stage name or checkpoint directory. meta["model_config"] rebuilds the GPT;
    the tokenizer comes from meta["tokenizer_dir"] when recorded, else `<base>/tokenizer/`."""
    if phase not in ("eval", "train"):
        raise ValueError(f"phase={phase!r}: expected 'eval' or 'train'")
    if source.startswith("hf:"):  # a local Hugging Face folder (Qwen3, Llama): converted on load by reasoning/hf.py
        from reasoning.hf import load_hf_model

        return load_hf_model(source[len("hf:"):], device=device, phase=phase)
    # imported here: checkpoint I/O must not depend on the model code (and the model code imports this module)
    from reasoning.gpt import GPT, GPTConfig
    from reasoning.tokenizer import Tokenizer, get_tokenizer

    ckpt_dir = resolve_checkpoint_dir(source, tag, base_dir)
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device=device)
    if "model_config" not in meta:
        raise UserError(f"checkpoint {ckpt_dir} step {meta.get('step')} has no model_config in its meta file")
    device = torch.device(device)
    if device.type == "cpu":  # bf16 weights from a GPU run: CPU matmuls want fp32
        model_state = {k: v.float() if v.is_floating_point() else v for k, v in model_state.items()}
    config = GPTConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # non-persistent buffers (rotary tables) are not in the state dict
    model.load_state_dict(model_state, strict=True, assign=True)
    model.train(phase == "train")

    tokenizer_dir = meta.get("tokenizer_dir")
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        from reasoning.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir

        # a model fine-tuned from --init-from hf:PATH keeps PATH's own tokenizer (and chat format)
        tokenizer = (HFTokenizer if is_hf_tokenizer_dir(tokenizer_dir) else Tokenizer).load(tokenizer_dir)
    else:
        tokenizer = get_tokenizer(base_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but checkpoint {ckpt_dir} was trained with "
                        f"vocab_size {config.vocab_size}: wrong tokenizer for this checkpoint")
    return model, tokenizer, meta


# ----------------------------------------------------------------------------------------------- script flags

def add_model_args(parser, default_stage: str = "base") -> None:
    """The model-source flags every stage that reads a checkpoint shares (see INTERFACES.md, Script conventions)."""
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


def load_model_from_args(args, device="cpu", phase: str = "eval", base_dir: str | None = None):
    """(model, tokenizer, meta) for the flags of `add_model_args`; --init-from wins over --stage/--tag/--step."""
    if args.step is not None and args.step < 0:
        raise UserError(f"--step {args.step}: expected a step >= 0")
    if args.init_from:
        source, tag, step = parse_init_from(args.init_from)
    else:
        source, tag, step = args.stage, args.tag, args.step
    return load_model(source, tag=tag, step=step, device=device, phase=phase, base_dir=base_dir)
