"""reasoning/distributed.py: the only door to torch.distributed collectives, and it puts tensors on the group's device.

The NCCL failure this guards against (a CPU tensor all-reduced on an NCCL group) cannot happen on this CPU-only box,
so the device choice is checked with the backend mocked to "nccl", and the code base is scanned so that no module
can call a collective around the helpers.
"""

import ast
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from reasoning import distributed as rd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "barrier", "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
}
HELPERS = os.path.join("reasoning", "distributed.py")


def _python_files():
    for folder in ("reasoning", "scripts", "tasks", "dev"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(root, name), REPO)


def direct_collectives(source: str) -> list[str]:
    """Names of torch.distributed collectives a module calls or imports directly (any alias of the module)."""
    tree = ast.parse(source)
    aliases = set()  # names bound to torch.distributed: `import torch.distributed as dist`, `from torch import ...`
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch" and any(a.name == "distributed" for a in node.names):
                aliases.update(a.asname or a.name for a in node.names if a.name == "distributed")
            if node.module and node.module.startswith("torch.distributed"):
                found += [a.name for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = node.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(node.attr)
            elif (isinstance(base, ast.Attribute) and base.attr == "distributed" and isinstance(base.value, ast.Name)
                  and base.value.id == "torch"):
                found.append(node.attr)  # torch.distributed.all_reduce(...) spelled out
    return found


def test_the_scanner_finds_every_spelling():
    code = ("import torch\nimport torch.distributed as dist\nfrom torch import distributed as D\n"
            "from torch.distributed import barrier\n"
            "dist.all_reduce(t)\nD.broadcast(t, 0)\ntorch.distributed.all_gather_object(o, x)\n"
            "dist.get_rank()\nother.all_reduce(t)\n")
    assert sorted(direct_collectives(code)) == ["all_gather_object", "all_reduce", "barrier", "broadcast"]


def test_no_module_calls_a_collective_around_the_helpers():
    offenders = {}
    for path in _python_files():
        if path == HELPERS:
            continue
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            names = direct_collectives(f.read())
        if names:
            offenders[path] = names
    assert not offenders, f"call these through reasoning.distributed instead: {offenders}"


def test_group_device_follows_the_backend():
    with mock.patch.object(dist, "get_backend", return_value="nccl"), \
            mock.patch.object(torch.cuda, "current_device", return_value=3):
        assert rd.group_device() == torch.device("cuda", 3)
    with mock.patch.object(dist, "get_backend", return_value="gloo"):
        assert rd.group_device() == torch.device("cpu")


class FakeGroup:
    """Stands in for a 2-rank group whose backend moves tensors on `device`: records what each collective got
    and doubles the tensor (as a SUM over two equal ranks would)."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.seen = []

    def collective(self, name):
        def run(tensor, *args, async_op=False, **kwargs):
            self.seen.append((name, tensor.device))
            tensor.mul_(2)
            return None
        return run


@pytest.mark.parametrize("name,kwargs", [("all_reduce", {}), ("reduce", {"dst": 0}), ("broadcast", {"src": 0})])
def test_helpers_run_a_cpu_tensor_on_the_group_device_and_copy_back(name, kwargs):
    # the "GPU" of this CPU box is a second CPU device object: the helper must hand the collective the tensor on
    # the device group_device() names, whatever the caller's tensor was on; `meta` shows the move (no data)
    group = FakeGroup("cpu")
    moved_to = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        moved_to.append(args[0] if args else kwargs.get("device"))
        return real_to(self, *args, **kwargs)

    t = torch.ones(3)
    with mock.patch.object(rd, "is_distributed", return_value=True), \
            mock.patch.object(rd, "group_device", return_value=torch.device("cpu", 0)), \
            mock.patch.object(dist, name, group.collective(name)), \
            mock.patch.object(torch.Tensor, "to", recording_to):
        getattr(rd, name)(t, **kwargs)
    assert group.seen == [(name, torch.device("cpu"))]
    assert moved_to == [torch.device("cpu", 0)]  # moved because cpu != cpu:0, the group's device
    assert torch.equal(t, torch.full((3,), 2.0))  # the result is back in the caller's tensor


def test_under_nccl_a_cpu_tensor_is_sent_to_cuda():
    """The RL bug: a CPU metric vector all-reduced on an NCCL group. The helper asks for cuda:<current>."""
    requested = []

    def fake_to(self, device, *args, **kwargs):
        requested.append(torch.device(device))
        raise RuntimeError("stop here: no CUDA on this box")

    t = torch.zeros(4, dtype=torch.float64)
    with mock.patch.object(rd, "is_distributed", return_value=True), \
            mock.patch.object(dist, "get_backend", return_value="nccl"), \
            mock.patch.object(torch.cuda, "current_device", return_value=1), \
            mock.patch.object(dist, "all_reduce", side_effect=AssertionError("reached with a CPU tensor")), \
            mock.patch.object(torch.Tensor, "to", fake_to):
        with pytest.raises(RuntimeError, match="stop here"):
            rd.all_reduce_sum(t)
    assert requested == [torch.device("cuda", 1)]


def test_helpers_are_no_ops_alone():
    t = torch.arange(3.0)
    assert rd.all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    assert rd.all_gather_object({"a": 1}) == [{"a": 1}]
    assert rd.gather_object(5) == [5] and rd.broadcast_object("x") == "x"
    out = torch.empty(3)
    rd.all_gather_into_tensor(out, t)
    assert torch.equal(out, t)
    rd.barrier()
    with rd.node_leader_first():
        pass


def _leader_worker(rank, init_file, out_dir):
    import time

    os.environ["LOCAL_RANK"] = str(rank)  # one node of two ranks: rank 0 is its leader
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with rd.node_leader_first():
            start = time.monotonic()
            if rank == 0:
                time.sleep(0.5)  # the "download": the follower must not start before it ends
            end = time.monotonic()
        with open(os.path.join(out_dir, f"times_{rank}"), "w") as f:
            f.write(f"{start} {end}")
        try:  # a leader that fails still releases the others (who then try themselves)
            with rd.node_leader_first():
                if rank == 0:
                    raise RuntimeError("hub unreachable")
        except RuntimeError:
            pass
        t = torch.full((3,), float(rank + 1))
        rd.all_reduce_sum(t)  # and the group still works: both ranks met at every barrier
        with open(os.path.join(out_dir, f"sum_{rank}"), "w") as f:
            f.write(str(t.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_node_leader_goes_first_on_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_leader_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    (_, leader_end), (follower_start, _) = (map(float, (tmp_path / f"times_{r}").read_text().split()) for r in (0, 1))
    assert follower_start >= leader_end
    assert [(tmp_path / f"sum_{r}").read_text() for r in (0, 1)] == ["[3.0, 3.0, 3.0]"] * 2
