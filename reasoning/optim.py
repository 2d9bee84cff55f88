"""One optimizer for the whole model: Muon for the hidden weight matrices, AdamW for everything else.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") keeps a Nesterov momentum of
the gradient and replaces it by its nearest semi-orthogonal matrix U V^T (all singular values pushed to ~1) before
stepping, so every direction of the update moves at the same rate. The orthogonalisation is a fixed odd matrix
polynomial iterated a few times (Newton-Schulz), which is only matmuls, so it runs fast in bf16 on a GPU:
  - "quintic": the same (a, b, c) every step, tuned for speed over accuracy; singular values end in a band around 1
    (roughly [0.7, 1.2] for a well-conditioned input -- the tests use [0.5, 1.5]);
  - "polar_express": a per-iteration schedule (Amsel et al. 2025, "The Polar Express", coefficients for 5
    iterations, safety factor 2e-2, cushion 2 as published) that lands closer to 1 in the same number of steps.
The step is scaled by sqrt(max(1, rows/cols)) so tall matrices (more output rows than input columns) get
per-element updates of comparable RMS to wide ones. Weight decay is decoupled: p <- p * (1 - lr * wd).

Embeddings, the lm_head and scalar gains are not "hidden matrices" (their rows are looked up or scored
independently) and use AdamW. `build_optimizer` scales their lrs by (model_dim / 768) ** -0.5, as nanochat does:
the lrs were tuned at width 768 and the logit/embedding update size grows with width. Scalars are per-element gains
whose effect does not grow with width, so their lr is not scaled.

Scheduling: every group keeps `initial_lr`; the trainer sets `group["lr"] = group["initial_lr"] * multiplier`
(and `group["momentum"]` for Muon warmup) as plain Python floats every step. The per-tensor math lives in two
kernels that take every hyperparameter as a 0-d float32 CPU tensor refilled each step, so when the kernels are
compiled (`compile_backend="inductor"`, meant for GPUs) a changing lr or momentum never triggers a recompile;
eagerly (the default) the same kernels run as ordinary ops.

Distributed (torchrun): with `distributed=True` (auto when a process group with >1 rank is up) `step()` averages
the gradients across ranks itself, so the model must NOT also be wrapped in DDP. Trainers that need the averaged
gradients before stepping (gradient clipping, logging the grad norm) call `reduce_gradients()` first; `step()` then
skips its own reduction. Gradients travel in a few large flat buckets (`bucket_bytes` each, one collective per
bucket) rather than one collective per tensor: per-call latency dominates for the many small tensors of a model.
Every parameter has one owner rank (size-balanced assignment). Unsharded (default), every rank keeps the whole
optimizer state and does the cheap elementwise work (momentum, AdamW) itself, but Muon's Newton-Schulz -- the
expensive part, a few matmuls per matrix -- runs only on each matrix's owner; the orthogonalised updates are then
all-gathered in one collective and every rank applies them. With `shard=True` (ZeRO-2 style) a gradient bucket is
reduced only to its owner, only the owner keeps the state and computes the update, then broadcasts the new values.
Each rank does the same arithmetic on the same averaged gradient as a single process, so the results are identical;
a sharded `state_dict()` holds only the rank's own state (save one file per rank, resume with the same world size).
All collectives go through reasoning.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from reasoning import distributed as reasoning_distributed

# Polar Express (arXiv:2505.16932), degree-5 odd polynomials a*x + b*x^3 + c*x^5, one per iteration.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Jordan et al.'s quintic: a steep slope at 0 (a ~ 3.4) pulls small singular values up quickly, at the price of
# oscillating around 1 instead of converging to it.
QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)
NS_METHODS = ("polar_express", "quintic")
KINDS = ("muon", "adamw")

MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5, ns_method="polar_express")
ADAMW_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
BUCKET_BYTES = 64 * 2**20  # gradient bucket size: a handful of collectives per step even for a 1B model


def orthogonalize(G: torch.Tensor, steps: int = 5, method: str = "polar_express") -> torch.Tensor:
    """G (..., rows, cols) -> approximately U V^T of its SVD, same shape and dtype as G.

    Runs in bf16 on CUDA (the iteration is self-correcting, so low precision is fine and twice as fast) and in
    float32 elsewhere (CPU bf16 matmuls are slow and the tests want tight numbers).
    """
    if method not in NS_METHODS:
        raise ValueError(f"method={method!r}: expected one of {NS_METHODS}")
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix, got shape {tuple(G.shape)}")
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation so the Gram matrix X X^T is the smaller one
        X = X.mT
    norm = X.norm(dim=(-2, -1), keepdim=True)  # Frobenius >= spectral norm, so all singular values start <= 1
    if method == "polar_express":
        X = X / (norm * 1.02 + 1e-6)  # the schedule was derived with this 2% safety margin
        coeffs = [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    else:
        X = X / (norm + 1e-7)
        coeffs = [QUINTIC_COEFFS] * steps
    for a, b, c in coeffs:
        A = X @ X.mT  # (..., r, r), r = min(rows, cols)
        X = a * X + (b * A + c * (A @ A)) @ X  # odd polynomial applied to the singular values of X
    if tall:
        X = X.mT
    return X.to(G.dtype)


# ---- per-tensor update kernels: hyperparameters arrive as 0-d float32 tensors (see module docstring) ----

def _muon_direction_kernel(grad, momentum_buffer, momentum, *, nesterov: bool, ns_steps: int, ns_method: str,
                           orthogonalise: bool = True):
    """Momentum step (in place) -> the update direction, orthogonalised unless a sharded step leaves that to
    the matrix's owner."""
    momentum_buffer.mul_(momentum).add_(grad * (1 - momentum))  # EMA of gradients
    # Nesterov: look ahead along the momentum, (1-m)*g + m*buf
    update = grad * (1 - momentum) + momentum_buffer * momentum if nesterov else momentum_buffer
    return orthogonalize(update, ns_steps, ns_method) if orthogonalise else update


def _muon_apply_kernel(p, ortho, lr, weight_decay, *, shape_scale: float):
    p.mul_(1 - lr * weight_decay)
    p.sub_(ortho.to(p.dtype) * (lr * shape_scale))


def _adamw_kernel(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step_size, bias2_sqrt):
    p.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad * (1 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
    denom = exp_avg_sq.sqrt() / bias2_sqrt + eps
    p.sub_(exp_avg / denom * step_size)  # step_size = lr / (1 - beta1^t)


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW over tagged param groups.

    Each group is a dict with `params` and `kind` ("muon" | "adamw"), optionally `name` (for logs) and its own
    hyperparameters -- muon: lr, momentum, nesterov, weight_decay, ns_steps, ns_method; adamw: lr, betas, eps,
    weight_decay (missing ones come from MUON_DEFAULTS / ADAMW_DEFAULTS). Every group gets `initial_lr`.
    Muon groups must hold 2-D tensors only.
    """

    def __init__(self, param_groups: Iterable[dict], *, distributed: bool | None = None, shard: bool = False,
                 compile_backend: str | Callable | None = None, bucket_bytes: int = BUCKET_BYTES):
        if distributed is None:
            distributed = reasoning_distributed.is_distributed()
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed to be initialised first (torchrun)")
        self.distributed = distributed
        self.shard = shard and distributed  # sharding over a single process is a no-op, not an error
        self.bucket_bytes = bucket_bytes
        self._owners_cache: list[int] | None = None
        self._grads_reduced = False
        # one set of reusable 0-d tensors; refilled before every kernel call
        self._hyper = {k: torch.zeros((), dtype=torch.float32) for k in
                       ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "step_size", "bias2_sqrt")}
        kernels = (_muon_direction_kernel, _muon_apply_kernel, _adamw_kernel, orthogonalize)
        if compile_backend is not None:
            kernels = [torch.compile(k, backend=compile_backend, dynamic=False, fullgraph=True) for k in kernels]
        self._muon_direction_kernel, self._muon_apply_kernel, self._adamw_kernel, self._orthogonalize = kernels
        super().__init__(list(param_groups), defaults={})

    def add_param_group(self, param_group: dict):
        group = dict(param_group)
        kind = group.get("kind")
        if kind not in KINDS:
            raise ValueError(f"param group kind={kind!r}: expected one of {KINDS}")
        for key, value in (MUON_DEFAULTS if kind == "muon" else ADAMW_DEFAULTS).items():
            group.setdefault(key, value)
        group.setdefault("initial_lr", group["lr"])
        if kind == "muon":
            if group["ns_method"] not in NS_METHODS:
                raise ValueError(f"ns_method={group['ns_method']!r}: expected one of {NS_METHODS}")
            params = group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            bad = [tuple(p.shape) for p in params if p.ndim != 2]
            if bad:
                raise ValueError(f"Muon group {group.get('name', '')!r} holds non-matrix params of shapes {bad}: "
                                 "expected 2-D weights only (use an adamw group for the rest)")
            group["params"] = params
        super().add_param_group(group)
        self._owners_cache = None

    # ---- state: a sharded state names its owner assignment, checked on load ----

    def state_dict(self):
        state = super().state_dict()
        if self.shard:
            state["owners"] = list(self._owners())
        return state

    def load_state_dict(self, state_dict):
        if self.shard:
            saved = state_dict.get("owners")
            if saved != self._owners():
                # another assignment means this rank's file holds other parameters' moments: loading it would
                # silently restart (or mix up) optimizer state, so refuse
                raise ValueError("sharded optimizer state was saved with another assignment of parameters to ranks "
                                 "(another world size, model or optimizer version); resume it with the same ones")
            state_dict = {k: v for k, v in state_dict.items() if k != "owners"}
        super().load_state_dict(state_dict)

    # ---- distributed helpers ----

    def _entries(self) -> list[tuple[dict, torch.Tensor]]:
        return [(group, p) for group in self.param_groups for p in group["params"]]

    def _owners(self) -> list[int]:
        """Owner rank of every parameter (in `_entries` order): largest first onto the least-loaded rank, Muon
        matrices and the rest balanced separately (the Muon share is what costs compute)."""
        if self._owners_cache is None:
            entries = self._entries()
            owners = [0] * len(entries)
            for kind in KINDS:
                load = [0] * dist.get_world_size()
                mine = [i for i, (group, _) in enumerate(entries) if group["kind"] == kind]
                for i in sorted(mine, key=lambda i: (-entries[i][1].numel(), i)):
                    rank = min(range(len(load)), key=lambda r: (load[r], r))
                    owners[i] = rank
                    load[rank] += entries[i][1].numel()
            self._owners_cache = owners
        return self._owners_cache

    def _active_mask(self, entries) -> list[bool]:
        """Which params have a gradient on at least one rank (all ranks must agree on what to reduce)."""
        has_grad = [p.grad is not None for _, p in entries]
        if not self.distributed:
            return has_grad
        flags = torch.tensor(has_grad, dtype=torch.float32, device=entries[0][1].device)
        reasoning_distributed.all_reduce(flags)
        return (flags > 0).tolist()

    @staticmethod
    def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:  # this rank did not touch p but another did: contribute zeros
            p.grad = torch.zeros_like(p)
        return p.grad

    def _buckets(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Consecutive runs of tensors of one dtype and device, each at most bucket_bytes (or one larger tensor)."""
        buckets, size = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            last = buckets[-1][-1] if buckets else None
            if last is None or (last.dtype, last.device) != (t.dtype, t.device) or size + nbytes > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += nbytes
        return buckets

    def _bucketed(self, tensors: list[torch.Tensor], collective) -> None:
        """Run `collective(flat) -> handle` on each bucket flattened, then copy the results back into `tensors`.
        All buckets are launched before the first wait, so communication of one overlaps the copies of the next."""
        launched = []
        for bucket in self._buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            launched.append((bucket, flat, collective(flat)))
        for bucket, flat, handle in launched:
            handle.wait()
            for t, piece in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(piece.view_as(t))

    @torch.no_grad()
    def reduce_gradients(self):
        """Average every gradient across ranks now (in place), e.g. before clipping; the next step() won't again."""
        if not self.distributed or self._grads_reduced:
            return
        entries = self._entries()
        active = self._active_mask(entries)
        grads = [self._grad_or_zeros(p) for (_, p), on in zip(entries, active) if on]
        self._bucketed(grads, lambda flat: reasoning_distributed.all_reduce(flat, async_op=True))
        world = dist.get_world_size()
        for g in grads:
            g.div_(world)  # SUM then divide: gloo has no AVG op, and this keeps every backend bit-identical
        self._grads_reduced = True

    # ---- the step ----

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._entries()
        if not self.distributed:
            for group, p in entries:
                if p.grad is not None:
                    self._update(group, p, p.grad)
            return loss
        if self.shard:
            self._sharded_step(entries)
        else:
            self._replicated_step(entries)
        self._grads_reduced = False
        return loss

    def _sharded_step(self, entries):
        """ZeRO-2: each gradient reduced to its owner (bucketed per owner), the owner updates, then broadcasts."""
        rank, world = dist.get_rank(), dist.get_world_size()
        owners = self._owners()
        active = self._active_mask(entries)
        indices = [i for i in range(len(entries)) if active[i]]
        grads = {i: self._grad_or_zeros(entries[i][1]) for i in indices}
        if not self._grads_reduced:
            for owner in range(world):
                owned = [grads[i] for i in indices if owners[i] == owner]
                self._bucketed(owned, lambda flat, dst=owner: reasoning_distributed.reduce(flat, dst=dst,
                                                                                          async_op=True))
            for i in indices:
                if owners[i] == rank:
                    grads[i].div_(world)
        for i in indices:
            if owners[i] == rank:
                self._update(entries[i][0], entries[i][1], grads[i])
        for owner in range(world):
            params = [entries[i][1].data for i in indices if owners[i] == owner]
            self._bucketed(params, lambda flat, src=owner: reasoning_distributed.broadcast(flat, src=src,
                                                                                         async_op=True))

    def _replicated_step(self, entries):
        """Every rank keeps all state; Muon's orthogonalisation is divided between ranks, then all-gathered."""
        rank, world = dist.get_rank(), dist.get_world_size()
        self.reduce_gradients()
        owners = self._owners()
        muon = []  # (entry index, direction) of every Muon matrix with a gradient
        for i, (group, p) in enumerate(entries):
            if p.grad is None:
                continue
            if group["kind"] == "muon":
                muon.append((i, self._muon_direction(group, p, p.grad, orthogonalise=False)))
            else:
                self._update(group, p, p.grad)
        if not muon:
            return
        # this rank orthogonalises its share; one all-gather of padded equal-length buffers brings the rest
        share = [[(i, d) for i, d in muon if owners[i] == r] for r in range(world)]
        length = max(sum(d.numel() for _, d in mine) for mine in share)
        dtype, device = muon[0][1].dtype, muon[0][1].device
        local = torch.zeros(length, dtype=dtype, device=device)
        offset = 0
        for i, direction in share[rank]:
            group = entries[i][0]
            ortho = self._orthogonalize(direction, int(group["ns_steps"]), group["ns_method"])
            local[offset:offset + ortho.numel()] = ortho.reshape(-1)
            offset += ortho.numel()
        gathered = torch.empty(world * length, dtype=dtype, device=device)
        reasoning_distributed.all_gather_into_tensor(gathered, local)
        for r in range(world):
            offset = r * length
            for i, direction in share[r]:
                ortho = gathered[offset:offset + direction.numel()].view_as(direction)
                offset += direction.numel()
                self._muon_apply(entries[i][0], entries[i][1], ortho)

    def _muon_direction(self, group: dict, p: torch.Tensor, grad: torch.Tensor, orthogonalise: bool = True):
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        self._hyper["momentum"].fill_(group["momentum"])
        return self._muon_direction_kernel(grad, state["momentum_buffer"], self._hyper["momentum"],
                                           nesterov=bool(group["nesterov"]), ns_steps=int(group["ns_steps"]),
                                           ns_method=group["ns_method"], orthogonalise=orthogonalise)

    def _muon_apply(self, group: dict, p: torch.Tensor, ortho: torch.Tensor):
        h = self._hyper
        h["lr"].fill_(group["lr"])
        h["weight_decay"].fill_(group["weight_decay"])
        rows, cols = p.shape
        self._muon_apply_kernel(p, ortho, h["lr"], h["weight_decay"], shape_scale=max(1.0, rows / cols) ** 0.5)

    def _update(self, group: dict, p: torch.Tensor, grad: torch.Tensor):
        h = self._hyper
        state = self.state[p]
        h["lr"].fill_(group["lr"])
        h["weight_decay"].fill_(group["weight_decay"])
        if group["kind"] == "muon":
            self._muon_apply(group, p, self._muon_direction(group, p, grad))
        else:
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            t = state["step"]
            # bias corrections in Python double precision, like torch.optim.AdamW
            h["beta1"].fill_(beta1)
            h["beta2"].fill_(beta2)
            h["eps"].fill_(group["eps"])
            h["step_size"].fill_(group["lr"] / (1 - beta1 ** t))
            h["bias2_sqrt"].fill_(math.sqrt(1 - beta2 ** t))
            self._adamw_kernel(p, grad, state["exp_avg"], state["exp_avg_sq"], h["lr"], h["beta1"], h["beta2"],
                               h["eps"], h["weight_decay"], h["step_size"], h["bias2_sqrt"])


GROUP_KEYS = ("matrix", "embedding", "lm_head", "scalar")


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer's hyperparameters, as a trainer's config sets them (reasoning.training.TrainerConfig.
    optimizer_settings). `weight_decay` applies to the Muon matrices; the AdamW groups use `adamw_weight_decay`
    (0: decaying embeddings and gains toward zero is not what a language model wants)."""
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    lm_head_lr: float = 0.004
    scalar_lr: float = 0.5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.8, 0.95)  # AdamW
    muon_momentum: float = 0.95
    adamw_weight_decay: float = 0.0
    adamw_eps: float = 1e-10
    ns_method: str = "polar_express"
    ns_steps: int = 5


def build_optimizer(model_param_groups: dict[str, list[torch.Tensor]],
                    settings: OptimizerSettings = OptimizerSettings(), model_dim: int = 768, *,
                    distributed: bool | None = None, shard: bool = False,
                    compile_backend: str | Callable | None = None) -> MuonAdamW:
    """MuonAdamW from `GPT.param_groups()`: {"matrix", "embedding", "lm_head" (absent when tied), "scalar"}.

    `settings` are the hyperparameters; `model_dim` the model's width: the embedding and lm_head lrs are multiplied
    by (model_dim / 768) ** -0.5 (see the module docstring); `distributed`, `shard` and `compile_backend` are how
    the run executes it (MuonAdamW). Empty groups are left out.
    """
    unknown = sorted(set(model_param_groups) - set(GROUP_KEYS))
    if unknown:
        raise ValueError(f"model_param_groups has unknown keys {unknown}: expected a subset of {GROUP_KEYS}")
    if model_dim <= 0:
        raise ValueError(f"model_dim={model_dim}: expected a positive width")
    width_scale = (model_dim / 768) ** -0.5
    adamw = dict(kind="adamw", betas=tuple(settings.betas), eps=settings.adamw_eps,
                 weight_decay=settings.adamw_weight_decay)
    specs = {
        "matrix": dict(kind="muon", lr=settings.matrix_lr, momentum=settings.muon_momentum,
                       weight_decay=settings.weight_decay, ns_method=settings.ns_method, ns_steps=settings.ns_steps),
        "embedding": dict(adamw, lr=settings.embedding_lr * width_scale),
        "lm_head": dict(adamw, lr=settings.lm_head_lr * width_scale),
        "scalar": dict(adamw, lr=settings.scalar_lr),
    }
    groups = [dict(specs[key], name=key, params=list(model_param_groups[key]))
              for key in GROUP_KEYS if model_param_groups.get(key)]
    if not groups:
        raise ValueError("model_param_groups holds no parameters")
    return MuonAdamW(groups, distributed=distributed, shard=shard, compile_backend=compile_backend)
