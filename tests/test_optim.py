"""MuonAdamW: orthogonalisation quality, Muon step vs a float64 reference, AdamW parity with torch.optim.AdamW,
state_dict resume, build_optimizer wiring, no recompiles under schedules, learning, and 2-rank gloo equality
(all-reduce, ZeRO-2 sharded, pre-reduced) with one process fed the averaged gradients."""

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reasoning.optim import MuonAdamW, OptimizerSettings, build_optimizer, orthogonalize

# Stated bands for the singular values of orthogonalize(G), 5 iterations, G with aspect ratio 2 (so its own
# singular values are bounded away from 0). Measured: quintic [0.68, 1.13], polar express [0.86, 1.14].
BANDS = {"quintic": (0.5, 1.5), "polar_express": (0.8, 1.2)}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("method", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_orthogonalize_singular_values_and_direction(method, shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    O = orthogonalize(G, steps=5, method=method)
    assert O.shape == G.shape and O.dtype == G.dtype
    s = torch.linalg.svdvals(O.double())
    lo, hi = BANDS[method]
    assert lo <= s.min().item() and s.max().item() <= hi, (s.min().item(), s.max().item())
    # same singular vectors as the exact polar factor U V^T: only the singular values were changed
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    cosine = (O.double() * polar).sum() / (O.double().norm() * polar.norm())
    assert cosine > 0.98
    assert (U.T @ O.double() @ Vh.T - torch.diag(torch.diagonal(U.T @ O.double() @ Vh.T))).abs().max() < 1e-4


def test_orthogonalize_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        orthogonalize(torch.randn(4, 4), method="cubic")
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.randn(4))


def reference_muon(params, grads_per_step, lr, momentum, weight_decay, nesterov=True):
    """Straight-line float64 Muon, calling only `orthogonalize` from the library."""
    params = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, buf, g in zip(params, bufs, grads):
            g = g.double()
            buf.copy_(momentum * buf + (1 - momentum) * g)
            direction = (1 - momentum) * g + momentum * buf if nesterov else buf
            rows, cols = p.shape
            p.mul_(1 - lr * weight_decay)
            p.sub_(lr * max(1.0, rows / cols) ** 0.5 * orthogonalize(direction.float()).double())
    return params


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_step_matches_reference(nesterov):
    torch.manual_seed(1)
    shapes = [(32, 64), (96, 32)]  # wide and tall (tall → lr scaled by sqrt(3))
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    grads_per_step = [[torch.randn(*s) for s in shapes] for _ in range(4)]
    expected = reference_muon(params, grads_per_step, lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    opt = MuonAdamW([dict(kind="muon", params=params, lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov,
                          ns_method="polar_express")])
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=2e-5)


def make_adamw_params(seed=2):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(50, 16)), torch.nn.Parameter(torch.randn(16)),
            torch.nn.Parameter(torch.randn(()))]


def test_adamw_groups_match_torch_adamw():
    ours, theirs = make_adamw_params(), make_adamw_params()
    initial = [p.detach().clone() for p in ours]
    hyper = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    opt = MuonAdamW([dict(kind="adamw", params=ours[:2], **hyper), dict(kind="adamw", params=ours[2:], **hyper)])
    ref = torch.optim.AdamW(theirs, **hyper)
    torch.manual_seed(3)
    for step in range(6):
        if step == 3:  # a schedule changing lr mid-run, the way the trainer does it
            for group in opt.param_groups + ref.param_groups:
                group["lr"] = 0.5 * group["lr"]
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b, a0 in zip(ours, theirs, initial):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
        assert (a.detach() - a0).abs().max() > 1e-2  # the comparison is about real movement


def mixed_setup(seed=4):
    torch.manual_seed(seed)
    matrices = [torch.nn.Parameter(torch.randn(32, 48)), torch.nn.Parameter(torch.randn(48, 32))]
    embedding = [torch.nn.Parameter(torch.randn(40, 32))]
    scalars = [torch.nn.Parameter(torch.ones(3))]
    return {"matrix": matrices, "embedding": embedding, "scalar": scalars}


def set_grads(groups, step, rank=0):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    for params in groups.values():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)


def test_state_dict_roundtrip_gives_identical_updates():
    groups = mixed_setup()
    opt = build_optimizer(groups, OptimizerSettings(weight_decay=0.05), model_dim=32)
    for step in range(3):
        set_grads(groups, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_groups = copy.deepcopy(groups)
    fresh_groups = copy.deepcopy(groups)
    for step in range(3, 6):
        set_grads(groups, step)
        opt.step()
    resumed = build_optimizer(resumed_groups, OptimizerSettings(weight_decay=0.05), model_dim=32)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for step in range(3, 6):
        set_grads(resumed_groups, step)
        resumed.step()
    for key in groups:
        for a, b in zip(groups[key], resumed_groups[key]):
            assert torch.equal(a, b)
    # the loaded state mattered: a fresh optimizer from the same weights ends elsewhere
    fresh = build_optimizer(fresh_groups, OptimizerSettings(weight_decay=0.05), model_dim=32)
    for step in range(3, 6):
        set_grads(fresh_groups, step)
        fresh.step()
    assert not torch.equal(fresh_groups["matrix"][0], groups["matrix"][0])
    assert not torch.equal(fresh_groups["embedding"][0], groups["embedding"][0])


def test_build_optimizer_groups_and_lr_scaling():
    groups = mixed_setup()
    groups["lm_head"] = [torch.nn.Parameter(torch.randn(64, 32))]
    settings = OptimizerSettings(matrix_lr=0.02, embedding_lr=0.2, lm_head_lr=0.004, scalar_lr=0.5, weight_decay=0.1,
                                 betas=(0.8, 0.95), muon_momentum=0.9)
    opt = build_optimizer(groups, settings, model_dim=3072)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"matrix", "embedding", "lm_head", "scalar"}
    assert by_name["matrix"]["kind"] == "muon" and by_name["matrix"]["momentum"] == 0.9
    assert by_name["matrix"]["lr"] == 0.02 and by_name["matrix"]["weight_decay"] == 0.1
    assert by_name["embedding"]["lr"] == pytest.approx(0.2 * 0.5)  # (3072/768)^-0.5 = 0.5
    assert by_name["lm_head"]["lr"] == pytest.approx(0.004 * 0.5)
    assert by_name["scalar"]["lr"] == 0.5
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "adamw":
            assert g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.0
    tied = mixed_setup()  # no lm_head key (tied embeddings) and an empty scalar list are fine
    tied["scalar"] = []
    assert {g["name"] for g in build_optimizer(tied).param_groups} == {"matrix", "embedding"}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        build_optimizer({"matrix": [torch.nn.Parameter(torch.randn(4, 4))], "bias": []})
    with pytest.raises(ValueError, match="non-matrix"):
        build_optimizer({"matrix": [torch.nn.Parameter(torch.randn(4))]})
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.randn(4))])])
    with pytest.raises(ValueError, match="ns_method"):
        MuonAdamW([dict(kind="muon", params=[torch.nn.Parameter(torch.randn(4, 4))], ns_method="x")])


def test_schedules_do_not_recompile_compiled_kernels():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    groups = mixed_setup()
    opt = build_optimizer(groups, model_dim=32, compile_backend=counter)
    set_grads(groups, 0)
    opt.step()
    compiled_after_first_step = counter.frame_count
    assert compiled_after_first_step >= 2  # the kernels really went through dynamo
    for step in range(1, 4):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * (1 - 0.2 * step)
            if g["kind"] == "muon":
                g["momentum"] = 0.85 + 0.03 * step
        set_grads(groups, step)
        opt.step()
    assert counter.frame_count == compiled_after_first_step
    # and the compiled path computes the same thing as the eager one
    eager_groups = mixed_setup()
    eager = build_optimizer(eager_groups, model_dim=32)
    for step in range(4):
        for g in eager.param_groups:
            g["lr"] = g["initial_lr"] * (1 - 0.2 * step)
            if g["kind"] == "muon":
                g["momentum"] = 0.85 + 0.03 * step if step else 0.95
        set_grads(eager_groups, step)
        eager.step()
    for key in groups:
        for a, b in zip(groups[key], eager_groups[key]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_muon_adamw_learns_a_linear_map():
    """End to end: a 2-matrix linear net with an embedding-like input table fits a random target map."""
    torch.manual_seed(5)
    table = torch.nn.Parameter(torch.randn(64, 32) * 0.5)
    w1, w2 = torch.nn.Parameter(torch.randn(64, 32) / 32 ** 0.5), torch.nn.Parameter(torch.randn(16, 64) / 8)
    gain = torch.nn.Parameter(torch.ones(16))
    target = torch.randn(64, 16)
    opt = build_optimizer({"matrix": [w1, w2], "embedding": [table], "scalar": [gain]},
                          OptimizerSettings(matrix_lr=0.02, embedding_lr=0.05, scalar_lr=0.01), model_dim=32)

    def loss_fn():
        return ((table @ w1.T @ w2.T * gain - target) ** 2).mean()

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.1 * first


# ---- distributed: 2 gloo ranks, different gradients per rank ----

WORLD = 2
STEPS = 3
MODES = ("allreduce", "shard", "prereduced", "per_tensor")  # per_tensor: buckets of one tensor each


def dist_params():
    groups = mixed_setup(seed=7)
    groups["matrix"].append(torch.nn.Parameter(torch.randn(16, 16)))  # gets a grad on rank 0 only
    groups["scalar"].append(torch.nn.Parameter(torch.randn(5)))  # never gets a grad
    return groups


def rank_grads(groups, step, rank):
    """Every param gets a rank-specific grad, except: matrix[-1] only on rank 0, scalar[-1] nowhere."""
    set_grads(groups, step, rank)
    if rank != 0:
        groups["matrix"][-1].grad = None
    groups["scalar"][-1].grad = None


def _dist_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from reasoning import distributed as rd

    calls = {"collectives": 0, "orthogonalize": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    try:
        for mode in MODES:
            groups = dist_params()
            opt = build_optimizer(groups, OptimizerSettings(weight_decay=0.1), model_dim=32, distributed=True,
                                  shard=mode in ("shard", "prereduced"))
            if mode == "per_tensor":
                opt.bucket_bytes = 1
            calls.update(collectives=0, orthogonalize=0)
            opt._orthogonalize = counted(opt._orthogonalize, "orthogonalize")
            originals = {name: getattr(rd, name) for name in ("all_reduce", "reduce", "broadcast",
                                                              "all_gather_into_tensor")}
            for name, fn in originals.items():
                setattr(rd, name, counted(fn, "collectives"))
            for step in range(STEPS):
                rank_grads(groups, step, rank)
                if mode == "prereduced":
                    opt.reduce_gradients()
                    for p in groups["embedding"]:  # the trainer sees averaged grads here (for clipping)
                        torch.save(p.grad.clone(), f"{out_dir}/grad_{rank}_{step}.pt")
                opt.step()
                opt.zero_grad(set_to_none=True)
            for name, fn in originals.items():
                setattr(rd, name, fn)
            state = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
            torch.save({"params": state, "num_state": len(opt.state), **calls}, f"{out_dir}/{mode}_{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_equals_one_process_with_averaged_grads(tmp_path):
    # fork, like DataLoader workers: the children skip re-importing torch (seconds on a loaded box)
    mp.start_processes(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="fork")

    # one process, gradients averaged by hand (a missing grad on one rank counts as zeros)
    groups = dist_params()
    opt = build_optimizer(groups, OptimizerSettings(weight_decay=0.1), model_dim=32, distributed=False)
    initial_never = groups["scalar"][-1].detach().clone()
    for step in range(STEPS):
        per_rank = []
        for rank in range(WORLD):
            rank_grads(groups, step, rank)
            per_rank.append([None if p.grad is None else p.grad.clone() for v in groups.values() for p in v])
        flat = [p for v in groups.values() for p in v]
        for i, p in enumerate(flat):
            grads = [g[i] for g in per_rank]
            if all(g is None for g in grads):
                p.grad = None
            else:
                p.grad = sum(torch.zeros_like(p) if g is None else g for g in grads) / WORLD
        expected_embedding_grad = groups["embedding"][0].grad.clone()
        for rank in range(WORLD):
            torch.testing.assert_close(torch.load(tmp_path / f"grad_{rank}_{step}.pt"), expected_embedding_grad,
                                       rtol=0, atol=1e-7)
        opt.step()

    num_params = sum(len(v) for v in groups.values())
    for mode in MODES:
        owned = 0
        for rank in range(WORLD):
            result = torch.load(tmp_path / f"{mode}_{rank}.pt")
            owned += result["num_state"]
            for key in groups:
                for got, want in zip(result["params"][key], groups[key]):
                    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
            assert torch.equal(result["params"]["scalar"][-1], initial_never)  # no grad anywhere: untouched
            if mode in ("allreduce", "per_tensor"):
                assert result["num_state"] == num_params - 1  # every rank holds all state
        if mode in ("shard", "prereduced"):
            assert owned == num_params - 1  # ZeRO: each param's state lives on exactly one rank

    # bucketed == one collective per tensor, bit for bit; and it takes far fewer collectives per step
    muon_matrices = len(groups["matrix"])
    for rank in range(WORLD):
        bucketed, per_tensor = (torch.load(tmp_path / f"{mode}_{rank}.pt") for mode in ("allreduce", "per_tensor"))
        for key in groups:
            assert all(torch.equal(a, b) for a, b in zip(bucketed["params"][key], per_tensor["params"][key]))
        # per step: the has-grad flags, one gradient bucket, one all-gather of the orthogonalised updates
        assert bucketed["collectives"] == 3 * STEPS
        assert per_tensor["collectives"] >= (num_params - 1) * STEPS
    # Muon's orthogonalisation is divided: each matrix is orthogonalised on exactly one rank, each rank does some
    ortho = [torch.load(tmp_path / f"allreduce_{rank}.pt")["orthogonalize"] for rank in range(WORLD)]
    assert sum(ortho) == muon_matrices * STEPS and min(ortho) > 0


def test_sharded_state_refuses_another_owner_assignment(monkeypatch):
    """A sharded rank's state file holds only its own parameters: loading it under another assignment (another world
    size, or the per-kind balancing that replaced the joint one) would silently reset moments, so it is refused."""
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    groups = mixed_setup()
    opt = build_optimizer(groups, model_dim=32, distributed=False)
    opt.shard = True  # as a 2-rank run would set it
    state = opt.state_dict()
    assert state["owners"] == opt._owners()
    opt.load_state_dict(state)  # same assignment: fine
    for bad in ({**state, "owners": [0] * len(state["owners"])}, {k: v for k, v in state.items() if k != "owners"}):
        with pytest.raises(ValueError, match="another assignment of parameters to ranks"):
            opt.load_state_dict(bad)
