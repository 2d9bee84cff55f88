"""Every collective of the project goes through here, so that no tensor can meet the wrong backend.

Why: `common.init_distributed` creates an NCCL process group on CUDA, and NCCL only moves CUDA tensors; a CPU tensor
(a metric vector, a minibatch normaliser built with torch.tensor(...)) handed to it fails at runtime with "No backend
type associated with device type cpu" -- on the first GPU run, never in the gloo tests. Each helper here puts its
tensor on the group's device (`group_device()`: the current CUDA device for NCCL, the CPU for gloo), runs the
collective and copies the result back into the caller's tensor, so callers may pass tensors from any device.
The alternative, a group created as "cpu:gloo,cuda:nccl", would also accept CPU tensors, but it opens a second set
of connections on every rank and hides where small host tensors cross the bus; one rule (the helper moves it) is
testable on CPU. tests/test_distributed.py scans the code base: a direct `torch.distributed` collective outside
this module fails it.

All helpers are no-ops in a single process (no group, or world size 1). Object collectives (pickled Python
objects) are torch's own; they pick the device from the backend themselves after `torch.cuda.set_device`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """A process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_device() -> torch.device:
    """The device the default group's backend moves tensors on: CUDA (current device) for NCCL, else CPU."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Pending:
    """An async collective whose result is copied back into the caller's tensors once it completes."""

    def __init__(self, work, copies: list[tuple[torch.Tensor, torch.Tensor]]):
        self.work, self.copies = work, copies

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        for original, moved in self.copies:
            original.copy_(moved)
        self.copies = []


def _on_group_device(tensor: torch.Tensor) -> tuple[torch.Tensor, list]:
    device = group_device()
    if tensor.device == device:
        return tensor, []
    moved = tensor.to(device)
    return moved, [(tensor, moved)]


def _run(collective, tensor: torch.Tensor, async_op: bool, copy_back: bool = True, **kwargs):
    moved, copies = _on_group_device(tensor)
    work = collective(moved, async_op=async_op, **kwargs)
    pending = _Pending(work if async_op else None, copies if copy_back else [])
    if async_op:
        return pending
    pending.wait()
    return None


def all_reduce(tensor: torch.Tensor, async_op: bool = False):
    """Sum `tensor` over the ranks, in place (any device). async_op: returns a handle; call .wait() before reading."""
    if not is_distributed():
        return _Pending(None, []) if async_op else None
    return _run(dist.all_reduce, tensor, async_op)


def reduce(tensor: torch.Tensor, dst: int, async_op: bool = False):
    """Sum `tensor` over the ranks into rank `dst` (in place there; other ranks' tensors are unspecified)."""
    if not is_distributed():
        return _Pending(None, []) if async_op else None
    return _run(dist.reduce, tensor, async_op, dst=dst)


def broadcast(tensor: torch.Tensor, src: int, async_op: bool = False):
    """Rank `src`'s `tensor` into every rank's `tensor`, in place."""
    if not is_distributed():
        return _Pending(None, []) if async_op else None
    return _run(dist.broadcast, tensor, async_op, src=src)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, async_op: bool = False):
    """output (world_size * n,) <- every rank's `tensor` (n,) in rank order."""
    if not is_distributed():
        output.copy_(tensor.reshape(output.shape))
        return _Pending(None, []) if async_op else None
    moved_in, _ = _on_group_device(tensor)
    moved_out, copies = _on_group_device(output)
    work = dist.all_gather_into_tensor(moved_out, moved_in, async_op=async_op)
    pending = _Pending(work if async_op else None, copies)
    if async_op:
        return pending
    pending.wait()
    return None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (a no-op in a single process); returns it."""
    all_reduce(tensor)
    return tensor


def barrier() -> None:
    """Every rank waits for the others (a no-op in a single process)."""
    if is_distributed():
        if "nccl" in str(dist.get_backend()).lower():
            dist.barrier(device_ids=[torch.cuda.current_device()])  # tells NCCL which device: no guessing
        else:
            dist.barrier()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list | None:
    """Every rank's `obj` on rank `dst` (a list in rank order); None on the other ranks."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def node_leader_first():
    """Run the body on each node's local rank 0 first, then on the other ranks of the node.

    For downloads into a cache (HF hub data sets): the leader fetches, the others then read the cache instead of
    all hitting the hub at once. The leader reaches the barrier even if its body raises, so the others are never
    left waiting: they then try themselves (and fail with their own message if the cause is shared)."""
    if not is_distributed():
        yield
        return
    leader = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    if not leader:
        barrier()
    try:
        yield
    finally:
        if leader:
            barrier()
