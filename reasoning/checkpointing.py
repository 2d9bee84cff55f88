"""Activation checkpointing per transformer block, optionally with the saved block inputs offloaded to host memory.

Why: without it, the backward of a training pass needs every intermediate tensor of every block (attention
projections, MLP hidden, norms): for Qwen3-0.6B that is ~190 MB per layer per 2k-token row, 5.4 GiB per row over 28
layers, which is what limits RL on long reasoning traces (issue 16). A checkpointed block keeps only its input
(one (B, T, d) tensor) and re-runs its forward during the backward; with offload that input waits in CPU memory
(Unsloth's "offloaded gradient checkpointing"), so the device holds one block's activations at a time.

Modes (`GPT.activation_checkpointing`, set with `set_activation_checkpointing`):
  off      autograd keeps every block's intermediates (the default; bit-for-bit the plain forward);
  on       torch.utils.checkpoint, non-reentrant: the block's input is the only tensor kept for its backward;
  offload  "on", and that input is copied to host memory when saved and back when the backward needs it: pinned
           memory and non_blocking copies on CUDA (stream-ordered, so no explicit synchronisation is needed), a
           plain copy on CPU (which saves nothing there, but runs the same code the planner and tests check).
"auto" is a config value (reasoning.training.FinetuneConfig): off on CPU, the memory planner's choice on CUDA.

Only the training forward is checkpointed: a forward under no_grad or with a KV cache (engine) runs plainly.
Recomputation re-runs the same kernels on the same inputs, so gradients equal the plain backward's (exactly on
CPU in fp32, tests/test_checkpointing.py). The block input reaches the outer saved-tensor hooks through
torch.utils.checkpoint's own input saver (the block's intermediates go to checkpoint's inner hooks), which is
why offload is a `saved_tensors_hooks` around the checkpoint call.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("off", "on", "offload")
AUTO = "auto"
CHECKPOINTING_CHOICES = (AUTO, *MODES)

_host_copies = 0  # > 0 while a block input is being copied to host memory (memplan counts those bytes as host)


def copying_to_host() -> bool:
    """True while `offload` writes a host copy: the memory planner's tracker files such storages as host memory."""
    return _host_copies > 0


@contextlib.contextmanager
def _host_copy():
    global _host_copies
    _host_copies += 1
    try:
        yield
    finally:
        _host_copies -= 1


def _to_host(tensor: torch.Tensor):
    with _host_copy():
        if tensor.device.type == "cuda":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)  # queued on the current stream, after the kernel that made it
        else:
            host = tensor.detach().clone()
    return tensor.device, host


def _from_host(packed) -> torch.Tensor:
    device, host = packed
    if device.type == "cpu":
        return host.clone()  # what the device copy would be: a fresh tensor on the compute device
    return host.to(device, non_blocking=True)


_recompute_contexts = []  # factories of context managers each recomputation also runs under (recompute_under)


@contextlib.contextmanager
def recompute_under(factory):
    """While active, blocks checkpointed from now on recompute under factory() as well: for state a backward does
    not carry, such as the memory planner's Python function mode that gives CPU autocast CUDA's fp32 list
    (torch.utils.checkpoint restores autocast itself, not Python modes)."""
    _recompute_contexts.append(factory)
    try:
        yield
    finally:
        _recompute_contexts.remove(factory)


@contextlib.contextmanager
def _entered(factories):
    with contextlib.ExitStack() as stack:
        for factory in factories:
            stack.enter_context(factory())
        yield


def set_activation_checkpointing(model, mode: str) -> None:
    """Set how `model` (a reasoning.gpt.GPT) runs its blocks in a training forward: one of MODES."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: expected one of {', '.join(MODES)} "
                         f"({AUTO!r} must be resolved first)")
    model.activation_checkpointing = mode


def checkpointed_block(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offload: bool) -> torch.Tensor:
    """block(x, cos, sin) keeping only x for the backward (in host memory with offload). cos/sin are views of the
    model's rotary tables (or small casts of them): the closure holds them, only x goes through the saver."""
    run = lambda h: block(h, cos, sin)  # noqa: E731
    hooks = torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host) if offload else contextlib.nullcontext()
    extra = {}
    if _recompute_contexts:
        factories = list(_recompute_contexts)
        extra["context_fn"] = lambda: (contextlib.nullcontext(), _entered(factories))
    with hooks:
        # blocks draw no random numbers: no RNG state to save and restore
        return checkpoint(run, x, use_reentrant=False, preserve_rng_state=False, **extra)
