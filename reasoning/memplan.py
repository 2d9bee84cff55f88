"""Memory planner: the peak memory of a stage's real code at its real shapes, computed without a GPU.

The planner builds the real `GPT` under torch's fake-tensor machinery (`FakeTensorMode`: tensors carry shape,
dtype and device but no data, so a depth-26 step at 32 × 2048 tokens costs seconds of Python on a CPU) and runs
the stage's own code paths on it — `training.accumulate_gradients` + the Muon/AdamW step (pretraining, SFT),
`scripts.chat_rl.update_policy` with the chunked log-prob pass (RL), the engine's admission (prefill) and decode
steps with its paged KV pool at the budget the engine takes on a GPU (rollouts, evaluation). A `MemoryTracker` (a
TorchDispatchMode) counts every tensor storage from its
allocation to its release and records the breakdown at the peak: parameters, gradients, optimizer state (and its
update temporaries), activations (saved tensors + temporaries), logits (any tensor whose last dim is the vocabulary)
and the engine's KV cache. `torch.distributed._tools.mem_tracker.MemTracker` works on this CPU build too, but has
no notion of logits or KV cache; our tracker is small and does the same storage accounting.

Target "cuda" models what a GPU run would do: fp32 master weights (the project stores fp32 everywhere), bf16
autocast with CUDA's casting policy (matmuls in bf16; rms_norm, softmax, log_softmax, pow, exp, log and the losses
in fp32 — CPU autocast passes bf16 through those, so `cuda_autocast` imposes CUDA's list on top of it), the engine's
KV cache in bf16. Attention runs through the CPU's fused SDPA kernel, which keeps the same tensors for backward as
FlashAttention-3 (output + log-sum-exp). Target "cpu" is the CPU stage's own fp32 run, which is what the
validation (tests/test_memplan.py, dev/plan_validate.py) measures against the CPU allocator.

Not modelled (say so when reading a plan): the CUDA caching allocator's fragmentation and the CUDA context
(~0.5-1 GiB, folded into the headroom), torch.compile's fusions (which can only lower activation memory), NCCL
buffers. Data-dependent values are answered conservatively under fake tensors: every `.item()` is 1, every boolean
mask is all-true (so RL plans every position as a completion token: its log-prob pass is an upper bound).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from reasoning.checkpointing import copying_to_host, recompute_under
from reasoning.gpt import GPT, GPTConfig

GIB = 2 ** 30
PLANNED_GPU_GIB: float | None = None  # scripts/plan_memory sets its --gpu-memory-gib here (the engine's KV budget)
CATEGORIES = ("params", "grads", "optimizer", "activations", "logits", "kv_cache")
HOST = "host"  # block inputs offloaded to CPU memory by activation checkpointing: tracked, not device memory
TARGETS = ("cuda", "cpu")
DEFAULT_HEADROOM = 0.10  # share of the GPU kept free: CUDA context, allocator fragmentation, NCCL buffers


@dataclass
class PhasePlan:
    """Peak memory of one phase of one stage, per rank, in bytes by category (at the moment of the peak)."""
    stage: str
    phase: str
    settings: dict
    breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    def fits(self, gpu_memory_gib: float, headroom: float = DEFAULT_HEADROOM) -> bool:
        return self.total <= (1 - headroom) * gpu_memory_gib * GIB

    def row(self) -> dict:
        return {"stage": self.stage, "phase": self.phase, **{k: self.breakdown[k] / GIB for k in CATEGORIES},
                "total": self.total / GIB}


# ------------------------------------------------------------------------------------------- accounting

class MemoryTracker(TorchDispatchMode):
    """Counts tensor storages from allocation to release; keeps the category breakdown at the peak total.

    With `fake=True` it also answers the data-dependent ops that fake tensors cannot (`.item()`, boolean-mask
    indexing), conservatively: scalars read 1, masks are all-true.
    """

    def __init__(self, vocab_size: int, n_layer: int, fake: bool):
        super().__init__()
        self.vocab_size, self.n_layer, self.fake = vocab_size, n_layer, fake
        self.live: dict[int, list] = {}  # id(storage) -> [nbytes, category]
        self.totals = dict.fromkeys((*CATEGORIES, HOST), 0)  # HOST: offloaded copies, outside the device total
        self.peak_total, self.peak, self.host_peak = 0, dict.fromkeys(CATEGORIES, 0), 0
        self.working_peak = 0  # the largest activations + logits at any moment (a pass's own memory)
        self.context: str | None = None  # "optimizer" while an optimizer step runs

    # -- bookkeeping
    def register(self, tensor: torch.Tensor, category: str, move: bool = True) -> None:
        """Count `tensor`'s storage under `category` (moves it there if already counted, unless move=False: an
        op's output that shares a storage, e.g. an in-place update of a parameter, keeps its category)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self.live.get(key)
        if entry is not None:
            if move and entry[1] != category:
                self.totals[entry[1]] -= entry[0]
                self.totals[category] += entry[0]
                entry[1] = category
            return
        nbytes = storage.nbytes()
        self.live[key] = [nbytes, category]
        weakref.finalize(storage, self._release, key)
        self.totals[category] += nbytes
        self._update_peak()

    def _release(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]

    def _device_total(self) -> int:
        return sum(self.totals[c] for c in CATEGORIES)

    def _update_peak(self) -> None:
        total = self._device_total()
        if total > self.peak_total:
            self.peak_total, self.peak = total, {c: self.totals[c] for c in CATEGORIES}
        self.host_peak = max(self.host_peak, self.totals[HOST])
        self.working_peak = max(self.working_peak, self.totals["activations"] + self.totals["logits"])

    def reset_peak(self) -> None:
        self.peak_total, self.peak = self._device_total(), {c: self.totals[c] for c in CATEGORIES}
        self.host_peak = self.totals[HOST]
        self.working_peak = self.totals["activations"] + self.totals["logits"]

    def _category(self, t: torch.Tensor) -> str:
        if copying_to_host():  # an offloaded block input: host memory, not the device's
            return HOST
        if self.context is not None:
            return self.context
        if t.dim() == 5 and t.shape[0] == self.n_layer:  # KVCache.k / .v: (n_layer, B, ..., ..., head_dim)
            return "kv_cache"
        if t.dim() >= 1 and t.shape[-1] == self.vocab_size:
            return "logits"
        return "activations"

    def track_model(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            self.register(p, "params")
            p.register_post_accumulate_grad_hook(lambda param: self.register(param.grad, "grads"))
        for b in model.buffers():
            self.register(b, "params")

    def track_optimizer(self, optimizer) -> None:
        def enter(*_):
            self.context = "optimizer"

        def leave(*_):
            self.context = None
        optimizer.register_step_pre_hook(enter)
        optimizer.register_step_post_hook(leave)

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._data_dependent(func, args, kwargs) if self.fake else NotImplemented
        if out is NotImplemented:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.register(t, self._category(t), move=False)
        return out

    @staticmethod
    def _data_dependent(func, args, kwargs):
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        if func is aten.nonzero.default:
            t = args[0]
            return t.new_empty((t.numel(), t.dim()), dtype=torch.long)
        bool_index = lambda ix: len(ix) == 1 and isinstance(ix[0], torch.Tensor) and ix[0].dtype == torch.bool
        if func is aten.index.Tensor and bool_index(args[1]):
            src, mask = args[0], args[1][0]
            return src.new_empty((mask.numel(), *src.shape[mask.dim():]))
        if func in (aten.index_put_.default, aten.index_put.default) and bool_index(args[1]):
            return args[0] if func is aten.index_put_.default else args[0].clone()
        return NotImplemented


# ------------------------------------------------------------------------------------------- CUDA's autocast policy

# CUDA autocast runs these in fp32 whatever the input; CPU autocast lets bf16 through (torch autocast_mode.cpp)
_FP32_FUNCTIONS = {
    F.rms_norm, F.layer_norm, F.softmax, F.log_softmax, F.cross_entropy, F.nll_loss, torch.softmax,
    torch.log_softmax, torch.pow, torch.exp, torch.log, torch.logsumexp, torch.square, torch.rsqrt,
    torch.Tensor.softmax, torch.Tensor.log_softmax, torch.Tensor.pow, torch.Tensor.square, torch.Tensor.exp,
    torch.Tensor.log, torch.Tensor.logsumexp, torch.Tensor.rsqrt,
}


class _CudaFp32Policy(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FP32_FUNCTIONS and torch.is_autocast_enabled("cpu"):
            up = lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16,
                                                                                     torch.float16) else x
            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16):
    """CPU autocast with CUDA's fp32 list imposed: the dtypes a CUDA bf16 autocast forward produces."""
    with torch.autocast("cpu", dtype=dtype), _CudaFp32Policy(), recompute_under(_CudaFp32Policy):
        yield


def autocast_for(target: str):
    """The autocast factory a stage on `target` uses (None: plain fp32, as on CPU)."""
    return cuda_autocast if target == "cuda" else None


# ------------------------------------------------------------------------------------------- a planning session

class Session:
    """A model (fake or real) + tracker; phases run one after the other and each gets its own peak."""

    def __init__(self, model_config: GPTConfig, target: str = "cuda", fake: bool = True,
                 fp8_min_dim: int | None = None, gpu_memory_gib: float | None = None):
        if target not in TARGETS:
            raise ValueError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
        self.target, self.fake, self.config = target, fake, model_config
        # the GPU the engine's KV budget is planned for (it takes a share of the device's memory)
        self.gpu_memory_gib = gpu_memory_gib or PLANNED_GPU_GIB or detected_gpu_memory(
            "cuda" if torch.cuda.is_available() else "cpu") or 80.0
        self._stack = contextlib.ExitStack()
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            self._stack.enter_context(FakeTensorMode())
        self.tracker = MemoryTracker(model_config.vocab_size, model_config.n_layer, fake)
        with torch.random.fork_rng(devices=[]):  # a stage plans at startup: its own RNG stream stays untouched
            torch.manual_seed(0)
            self.model = GPT(model_config)
            self.model.init_weights()  # real values for the real-tensor validation run (non-finite checks)
        if fp8_min_dim is not None:  # the stage's --fp8: its hidden linears as Float8Linear
            from reasoning.fp8 import convert_to_float8

            convert_to_float8(self.model, min_dim=fp8_min_dim)
        self.optimizer = None
        self._stack.enter_context(self.tracker)
        self.tracker.track_model(self.model)

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add_frozen_copy(self) -> GPT:
        """A second copy of the weights without gradients (RL's reference model for the KL penalty)."""
        with torch.random.fork_rng(devices=[]):
            copy = GPT(self.config)
        for p in copy.parameters():
            p.requires_grad_(False)
            self.tracker.register(p, "params")
        return copy

    @property
    def autocast(self):
        return autocast_for(self.target)

    def build_optimizer(self, **kwargs):
        self.optimizer = self.model.setup_optimizer(**kwargs)
        self.tracker.track_optimizer(self.optimizer)
        return self.optimizer

    def phase(self, stage: str, phase: str, settings: dict, run) -> PhasePlan:
        """Run `run()` and return the peak breakdown it reached (the state it started from included)."""
        self.tracker.reset_peak()
        run()
        if self.tracker.host_peak:  # offloaded block inputs: CPU memory, shown beside the device plan
            settings = {**settings, "host_gib": round(self.tracker.host_peak / GIB, 2)}
        return PhasePlan(stage, phase, settings, dict(self.tracker.peak))

    # -- the phases, each calling the stage's own code
    def train_steps(self, micro_batches: list[tuple[int, int]], steps: int = 2):
        """`steps` optimizer steps of the pretraining/SFT step (accumulate_gradients + clip norm + step)."""
        from reasoning.training import accumulate_gradients

        model, optimizer = self.model, self.optimizer
        model.train()
        for _ in range(steps):
            batches = [(torch.zeros((b, t), dtype=torch.long), torch.zeros((b, t), dtype=torch.long))
                       for b, t in micro_batches]
            accumulate_gradients(model, batches, self.autocast)
            optimizer.reduce_gradients()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            model.zero_grad(set_to_none=True)

    def eval_forward(self, rows: int, width: int):
        """A no-grad forward with per-token losses (val bpb / base_eval)."""
        self.model.eval()
        with torch.no_grad(), (self.autocast or contextlib.nullcontext)():
            x = torch.zeros((rows, width), dtype=torch.long)
            self.model(x, x, loss_reduction="none")

    def generate(self, num_prompts: int, prompt_tokens: int, num_samples: int, max_tokens: int):
        """The engine's paged KV pool at its default budget, its first admission (the prefill of every prompt the
        budget admits) and two decode steps with sampling.

        On "cuda" the pool is allocated at once at the budget the engine takes on a GPU (engine.kv_budget_tokens:
        KV_MEMORY_FRACTION of `gpu_memory_gib`, minus what is allocated now and the call's activation reserve),
        so the plan fits by construction when the reserve covers the real activations, which the plan checks;
        prompts beyond the budget wait for freed blocks. On "cpu" the pool grows with the rows (planned: all
        prompts admitted, each row holding its prompt)."""
        from reasoning.engine import (BLOCK_SIZE, Engine, _Rollout, counter_uniforms, keys_tensor, kv_budget_tokens,
                                      sample_from_logits)

        self.model.eval()
        prompt_tokens = min(prompt_tokens, self.config.max_seq_len - 1)
        prompts = [[1] * prompt_tokens for _ in range(num_prompts)]
        budget = None
        if self.target == "cuda":
            in_use = sum(self.tracker.totals.values())
            budget = kv_budget_tokens(self.config, int(self.gpu_memory_gib * GIB), in_use, num_prompts * num_samples,
                                      torch.bfloat16)
            # at least one prompt's rows (where the engine would refuse to start, the plan shows what it needs)
            budget = max(budget, num_samples * (-(-(prompt_tokens + 1) // BLOCK_SIZE) + 1) * BLOCK_SIZE)
        engine = Engine(self.model, max_kv_tokens=budget)
        rollout = _Rollout(engine, prompts, num_samples, max_tokens, 1.0, None, None, None, 0, [], True)
        if self.target == "cuda":  # what the engine picks on a bf16 GPU: bf16 keys/values under autocast
            rollout.autocast_dtype = rollout.dtype = rollout.kv_dtype = torch.bfloat16
            rollout._compute = cuda_autocast
            rollout.preallocate = True
        rollout.waiting.extend(("prompt", p) for p in range(num_prompts))
        rollout._open_cache()
        logits = rollout._admit()
        self.kv_budget_tokens = rollout.stats["max_kv_tokens"]
        self.admitted_rows = len(rollout.resident)
        for step in range(2):
            keys = keys_tensor([rollout.keys[row] for row in rollout.resident], "cpu")
            with torch.inference_mode():
                sample_from_logits(logits, counter_uniforms(keys, step), **rollout.sampling)
            for row in rollout.resident:
                rollout.generations[row].tokens.append(1)
            logits = rollout._decode()
        del logits
        rollout.release()


# ------------------------------------------------------------------------------------------- stage plans

def micro_steps(accumulation: int) -> int:
    """Micro-batches a plan runs per optimizer step: two show the steady state (the gradients of the first live
    through the second's forward and backward); more add nothing to the peak."""
    return 2 if accumulation > 1 else 1


def plan_base_eval(device_batch_size: int, max_seq_len: int, model_config: GPTConfig, target: str = "cuda",
                   fake: bool = True) -> list[PhasePlan]:
    """base_eval per rank: a no-grad forward of device_batch_size × max_seq_len with per-token losses."""
    with Session(model_config, target, fake) as s:
        return [s.phase("base_eval", "eval", {"device_batch_size": device_batch_size, "max_seq_len": max_seq_len},
                        lambda: s.eval_forward(device_batch_size, max_seq_len))]


def plan_chat_eval(batch_size: int, num_samples: int, max_tokens: int, model_config: GPTConfig,
                   target: str = "cuda", fake: bool = True, prompt_tokens: int = 256,
                   gpu_memory_gib: float | None = None) -> list[PhasePlan]:
    """chat_eval per rank: one engine call of batch_size problems × num_samples rows (KV pool at the budget)."""
    with Session(model_config, target, fake, gpu_memory_gib=gpu_memory_gib) as s:
        settings = {"rows": batch_size * num_samples, "max_tokens": max_tokens}
        plan = s.phase("chat_eval", "eval", settings, lambda: s.generate(batch_size, prompt_tokens, num_samples,
                                                                         max_tokens))
        settings.update(kv_budget_tokens=s.kv_budget_tokens, first_admitted_rows=s.admitted_rows)
        return [plan]


# ------------------------------------------------------------------------------------------- choosing and checking

AUTO = -1  # --device-batch-size -1: chosen by the planner on CUDA, the stage's default elsewhere
ENV_SWITCH = "REASONING_MEMORY_PLAN"  # =0 turns the startup plan off (e.g. a GPU shared with something else)


def detected_gpu_memory(device) -> float | None:
    """GiB of the CUDA device a stage runs on; None (no planning) off CUDA or with REASONING_MEMORY_PLAN=0."""
    import os

    if torch.device(device).type != "cuda" or os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB


def check_fits(plans: list[PhasePlan], gpu_memory_gib: float, flag_hint: str,
               headroom: float = DEFAULT_HEADROOM) -> None:
    """Raise UserError (one line) naming the worst phase and `flag_hint` when a plan does not fit."""
    from reasoning.common import UserError

    worst = max(plans, key=lambda p: p.total)
    if not worst.fits(gpu_memory_gib, headroom):
        raise UserError(f"memory plan: {worst.stage} {worst.phase} needs {worst.total / GIB:.1f} GiB per GPU, "
                        f"more than {(1 - headroom) * gpu_memory_gib:.1f} of {gpu_memory_gib:.1f} GiB "
                        f"({headroom:.0%} headroom); lower {flag_hint} (python -m scripts.plan_memory shows the plan)")


def summary_line(plans: list[PhasePlan], gpu_memory_gib: float) -> str:
    return "memory plan: " + ", ".join(f"{p.phase} {p.total / GIB:.1f} GiB" for p in plans) + \
        f" of {gpu_memory_gib:.0f} GiB per GPU"


def resolve_device_batch_size(requested: int, default: int, plan_of, gpu: float | None,
                              flag: str = "--device-batch-size", allowed=lambda b: True, other_flags: str = "") -> int:
    """The device batch size a stage runs with; plan_of(b) -> [PhasePlan] plans the stage at batch size b.

    `gpu`: GiB per device to fit (detected_gpu_memory), None to not plan (off CUDA). `requested` AUTO: without a
    GPU the stage's default; with one the largest power of two <= default (and `allowed`) whose plans all fit with
    headroom. An explicit value is used as given, and with a GPU it must fit. A configuration that cannot fit is
    refused with one line naming the flag(s) to change.
    """
    from reasoning.common import UserError, print0

    if requested != AUTO and requested < 1:
        raise UserError(f"{flag} {requested}: expected a positive number of rows or -1 (auto)")
    if gpu is None:
        return default if requested == AUTO else requested
    hint = flag + (f" (or {other_flags})" if other_flags else "")
    if requested != AUTO:
        plans = plan_of(requested)
        check_fits(plans, gpu, hint)
        print0(summary_line(plans, gpu))
        return requested
    tried = []
    candidates = [2 ** i for i in range(int(math.log2(default)) + 1)]
    for b in sorted((c for c in candidates if allowed(c)), reverse=True):
        plans = plan_of(b)
        if all(p.fits(gpu) for p in plans):
            why = f"the largest that fits; {', '.join(tried)} did not" if tried else "the default fits"
            print0(f"{flag} {b} (auto: {why}) | " + summary_line(plans, gpu))
            return b
        tried.append(str(b))
    raise UserError(f"memory plan: even {flag} 1 does not fit {gpu:.0f} GiB per GPU with "
                    f"{DEFAULT_HEADROOM:.0%} headroom; change {other_flags or 'the model size'} "
                    "(python -m scripts.plan_memory shows the plan)")


def resolve_training_memory(requested_rows: int, default_rows: int, requested_mode: str, plan_of, gpu: float | None,
                            flag: str = "--device-batch-size", allowed=lambda b: True,
                            other_flags: str = "") -> tuple[int, str]:
    """(device batch size, activation checkpointing mode) of a training stage; plan_of(rows, mode) -> [PhasePlan].

    Checkpointing "auto" is off without a GPU (gpu None), so CPU runs are unchanged. On a GPU it is the first of
    off, on, offload under which the requested micro-batch (the default one when the batch is auto) fits: keeping
    the micro-batch costs one extra block forward in the backward, where shrinking it would cost more passes of
    small matmuls (and in RL the update is the small part of a step, the rollout the large one). When no mode fits
    that batch, offload with the largest batch that fits (resolve_device_batch_size). An explicit mode is kept and
    only the batch is resolved."""
    from reasoning.checkpointing import AUTO as AUTO_MODE
    from reasoning.checkpointing import MODES
    from reasoning.common import UserError, print0

    if gpu is None or requested_mode != AUTO_MODE:
        mode = "off" if requested_mode == AUTO_MODE else requested_mode
        rows = resolve_device_batch_size(requested_rows, default_rows, lambda b: plan_of(b, mode), gpu, flag,
                                         allowed, other_flags)
        return rows, mode
    if requested_rows != AUTO and requested_rows < 1:
        raise UserError(f"{flag} {requested_rows}: expected a positive number of rows or -1 (auto)")
    rows = default_rows if requested_rows == AUTO else requested_rows
    refused = []
    for mode in MODES:
        plans = plan_of(rows, mode)
        if all(p.fits(gpu) for p in plans):
            why = f"{', '.join(refused)} did not fit" if refused else "fits without it"
            print0(f"--activation-checkpointing {mode} (auto: {why}) | {flag} {rows} | " + summary_line(plans, gpu))
            return rows, mode
        refused.append(mode)
    print0(f"--activation-checkpointing offload (auto: {flag} {rows} does not fit in any mode)")
    return resolve_device_batch_size(requested_rows, default_rows, lambda b: plan_of(b, "offload"), gpu, flag,
                                     allowed, other_flags), "offload"


def planned_mode(mode: str) -> str:
    """The checkpointing mode a plan runs with: "auto" unresolved (a plan asked for directly) counts as off."""
    return "off" if mode == "auto" else mode


def check_stage(plan, device, flag_hint: str) -> None:
    """On CUDA: plan the stage (plan() -> [PhasePlan]) and refuse, naming flag_hint, what would not fit."""
    from reasoning.common import print0

    gpu = detected_gpu_memory(device)
    if gpu is not None:
        plans = plan()
        check_fits(plans, gpu, flag_hint)
        print0(summary_line(plans, gpu))


def measure_cpu_peak(fn) -> int:
    """Peak bytes of tensors allocated while fn() runs on the CPU, from the allocator events torch.profiler records
    (profile_memory=True): the measurement the planner's CPU predictions are validated against."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def format_table(plans: list[PhasePlan], gpu_memory_gib: float | None = None,
                 headroom: float = DEFAULT_HEADROOM) -> str:
    head = ["stage", "phase", *CATEGORIES, "total GiB"] + (["fits"] if gpu_memory_gib else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in plans:
        cells = [p.stage, p.phase] + [f"{p.breakdown[k] / GIB:.2f}" for k in CATEGORIES] + [f"{p.total / GIB:.2f}"]
        if gpu_memory_gib:
            cells.append("yes" if p.fits(gpu_memory_gib, headroom) else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
