"""Run checkpoints of a resumable, time-sliced trainer: what --resume reads and every save writes.

Pretraining, SFT and RL save the same way: the weights, every rank's optimizer share, every process's RNG state and
the trainer's own meta (its data position, metric history, training seconds), so a resumed CPU run is bitwise
identical to one that never stopped. `start_run` decides the run id (a tag belongs to one run unless --overwrite).
The checkpoint files themselves are reasoning.checkpoint's.
"""

from __future__ import annotations

import os

from reasoning import checkpoint as ckpt
from reasoning.common import UserError, get_rank, get_world_size, make_dir, print0
from reasoning.distributed import all_gather_object, barrier

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
    return all_gather_object(ckpt.new_run_id())[0]  # rank 0's id, everywhere


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
    meta = {"model_config": model.config.to_dict(), **meta, "rng": all_gather_object(ckpt.rng_state())}
    optim_rank = _optimizer_rank(optimizer)
    written = {}
    if optim_rank != 0:
        written = ckpt.save_checkpoint(ckpt_dir, step, None, optimizer.state_dict(), rank=optim_rank, run_id=run_id)
    # a collective: every optimizer file exists before rank 0 writes meta, which records their checksums
    other_files = {name: entry for files in all_gather_object(written) for name, entry in files.items()}
    if get_rank() == 0:
        ckpt.save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta=meta, rank=0,
                             keep_last=keep_last or None, run_id=run_id, other_files=other_files,
                             replace_other_runs=replace_other_runs)
    if get_world_size() > 1:
        barrier()
