"""Benchmark: generation throughput of reasoning.engine, batched vs one prompt at a time vs HF `generate`.

A Llama-shaped model (dim 256, 4 layers, 4 heads, SwiGLU 704, vocab 8192, ~7.4M params) with random weights,
built once as a transformers LlamaForCausalLM and copied name by name into our GPT (interop switches), so both
implementations run the same network. 64 prompts with lengths uniform in [20, 200], 128 new tokens, greedy, stop
tokens disabled (every row runs all 128 tokens), CPU fp32 by default (--device cuda: see "On a GPU" below):

  (a) Engine.generate on the whole batch (ragged right-padded prefill, KV cache, one row per prompt);
  (b) Engine.generate one prompt at a time (first --sequential-prompts prompts; tokens/s is per generated token,
      so it extrapolates to the full set);
  (c) HF LlamaForCausalLM.generate on the whole batch: left padding + attention mask, greedy, use_cache=True.

Throughput = generated tokens / time of the call (prefill included), by wall clock and by this process's CPU
time: on the shared 2-core dev box wall time swings 2x with other people's jobs, while with --threads 1 CPU time
is the work done (still inflated somewhat by memory-bandwidth contention). The three run interleaved in each round
and the table reports medians over --rounds. Because both models hold the same weights, the bench also reports
how many greedy tokens (a) and (c) agree on — a correctness check of the engine against an established library.

Retirement (CPU time): (1) 64 rows, max_tokens 128, half of which must stop after 16 tokens (their 200-token
prompts reach a 216-token context), timed per decode step through generate_stream with retire on and off: with
retirement the step time after step 16 should follow the 32 live rows. (2) "staggered": rows stop at every step
between 16 and 128 (one at a time), whole-call CPU time with retire on vs off: what compactions cost vs save.

    python -m dev.bench_engine                    # defaults: 3 rounds, torch's thread count
    python -m dev.bench_engine --threads 1 --rounds 3
    python -m dev.bench_engine --skip throughput  # only the retirement cases
    python -m dev.bench_engine --profile --skip throughput --skip retirement  # where the time goes
    python -m dev.bench_engine --kv-heads 2       # grouped-query attention (2 kv heads for 4 query heads)
    python -m dev.bench_engine --baseline HEAD    # adds (a0): the committed engine, interleaved, same weights
    python -m dev.bench_engine --device cuda      # on a GPU, in reasoning.common's compute dtype (bf16 on sm80+)

On a GPU (--device cuda): both models' weights are cast to --dtype (default: get_compute_dtype, bf16 where
supported; HF's rotary inv_freq buffers stay fp32, as from_pretrained(dtype=...) leaves them) and the engine
autocasts to the same dtype ($REASONING_DTYPE is set to it); every timing is wall clock between
torch.cuda.synchronize() calls. Process CPU time measures only the host there, so the CPU-time columns and the
cpu_* RESULT keys are left out, and the retirement cases time by wall clock. --profile is CPU-only.
Last line: RESULT vs_hf=<(a)/(c)> vs_sequential=<(a)/(b)> batched_tok_s=<(a)> (wall-clock medians), then the same
ratios from CPU time (cpu_vs_hf, cpu_vs_sequential), with --baseline vs_baseline / cpu_vs_baseline = (a)/(a0) and
paired_cpu_vs_baseline (median over rounds of the ratio of the two back-to-back runs, which cancels slow drifts of
the box's load), and the retirement ratios. On a GPU: vs_hf vs_sequential batched_tok_s [vs_baseline
paired_vs_baseline] and the retirement ratios, all by wall clock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from reasoning.common import UserError, get_compute_dtype, get_device
from reasoning.engine import Engine, kv_bytes_per_token
from reasoning.gpt import FP8_KV_DTYPE, GPT, GPTConfig

DIM, LAYERS, HEADS, MLP_WIDTH, VOCAB = 256, 4, 4, 704, 8192
SECTIONS = ["throughput", "retirement", "longtail", "fp8", "compiled"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_models(max_seq_len: int, seed: int = 0, kv_heads: int = HEADS, device=torch.device("cpu"),
                 dtype: torch.dtype = torch.float32):
    """The same random Llama network as (our GPT, HF LlamaForCausalLM), on `device` with weights in `dtype`.
    The weights are drawn on CPU in fp32 whatever the device, so every device runs the same network."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=MLP_WIDTH, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                            max_position_embeddings=max_seq_len,
                            rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
                            eos_token_id=None)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_config).eval()
    ours = GPT(llama_shaped_config(max_seq_len, kv_heads))
    ours.load_state_dict(hf_to_ours(hf.state_dict()))
    ours.to(device=device, dtype=dtype)  # GPT rebuilds its rotary tables in fp32
    hf.to(device)
    for p in hf.parameters():  # parameters only: a whole-module .to(dtype) would round HF's rotary inv_freq too
        p.data = p.data.to(dtype)
    return ours.eval(), hf


def placed_like(model, ours: GPT):
    """`model` (same weights as ours, built on CPU) moved to ours' device and dtype."""
    weight = ours.lm_head.weight
    return model.to(device=weight.device, dtype=weight.dtype)


def llama_shaped_config(max_seq_len: int, kv_heads: int = HEADS) -> GPTConfig:
    return GPTConfig(max_seq_len=max_seq_len, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_kv_head=kv_heads,
                     n_embd=DIM, softcap=None, mlp="swiglu", intermediate_size=MLP_WIDTH, norm_weight=True,
                     qk_norm=False)


def hf_to_ours(hf_state: dict) -> dict:
    names = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "norm_f.weight",
             "lm_head.weight": "lm_head.weight"}
    per_layer = {"self_attn.q_proj": "attn.c_q", "self_attn.k_proj": "attn.c_k", "self_attn.v_proj": "attn.c_v",
                 "self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.gate_proj": "mlp.c_gate",
                 "mlp.down_proj": "mlp.c_proj", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    for i in range(LAYERS):
        for hf_name, our_name in per_layer.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blocks.{i}.{our_name}.weight"
    return {names[k]: v for k, v in hf_state.items() if k in names}


def make_prompts(n: int, low: int, high: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (L,), generator=g).tolist() for L in lengths]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it counts that work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device = torch.device("cpu")):
    """(wall seconds, CPU seconds of this process, result). With one thread, CPU time is the work done and is
    far less disturbed than wall time by other jobs on a shared box. On a GPU only the wall time means anything:
    it is read between synchronizes."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def work_clock(device: torch.device):
    """(name, clock) the retirement cases time with: this process's CPU time on CPU; on a GPU, where the host
    mostly waits, wall time read after a synchronize."""
    if device.type == "cpu":
        return "CPU", time.process_time

    def wall() -> float:
        synchronize(device)
        return time.perf_counter()
    return "wall", wall


def hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token is in the last column
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    with torch.inference_mode():
        out = hf.generate(input_ids=ids.to(hf.device), attention_mask=mask.to(hf.device), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return out[:, longest:].tolist()


def step_times(engine: Engine, prompts, max_tokens: int, retire: bool, clock=time.process_time):
    """Time (by `clock`) of each decode step (between the events of consecutive steps) and the rows live in each
    step."""
    times, live, last_step, last_time, count = [], [], 0, None, 0
    produced = [0] * len(prompts)
    for row, _, _ in engine.generate_stream(prompts, max_tokens=max_tokens, temperature=0.0, stop_tokens=[],
                                            retire=retire):
        produced[row] += 1
        step = produced[row] - 1
        if step != last_step:  # first event of a new step: the previous step's events are complete
            now = clock()
            if last_time is not None:
                times.append(now - last_time)
                live.append(count)
            last_time, last_step, count = now, step, 0
        count += 1
    return times, live


def engine_at_revision(rev: str, ours: GPT):
    """An Engine running the reasoning/ package as of git revision `rev`, on the same weights: the package is
    read with `git archive` and imported under another name next to the current one, so before/after runs
    interleave in one process (this box's noise swamps comparisons across runs)."""
    import atexit
    import dataclasses
    import importlib
    import io
    import re
    import shutil
    import subprocess
    import sys
    import tarfile
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        archive = subprocess.run(["git", "archive", rev, "reasoning"], cwd=root, capture_output=True,
                                 check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline {rev}: git archive failed: {e.stderr.decode().strip()}")
    name = "reasoning_at_baseline"
    folder = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    atexit.register(shutil.rmtree, folder, True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".py"):
                text = re.sub(r"\b(from|import) reasoning\b", rf"\1 {name}", tar.extractfile(member).read().decode())
                target = folder / name / Path(member.name).relative_to("reasoning")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    sys.path.insert(0, str(folder))
    gpt_module = importlib.import_module(f"{name}.gpt")
    engine_module = importlib.import_module(f"{name}.engine")
    known = {f.name for f in dataclasses.fields(gpt_module.GPTConfig)}
    model = gpt_module.GPT(gpt_module.GPTConfig(**{k: v for k, v in ours.config.to_dict().items() if k in known}))
    model.load_state_dict(ours.state_dict())
    return engine_module.Engine(placed_like(model, ours).eval())


def throughput(args, ours: GPT, hf) -> dict:
    device = args.device
    on_cpu = device.type == "cpu"  # CPU time is reported only there (see the module docstring)
    engine = Engine(ours)
    baseline = engine_at_revision(args.baseline, ours) if args.baseline else None
    prompts = make_prompts(args.prompts, args.min_len, args.max_len, seed=1)
    sequential = prompts[: args.sequential_prompts]

    def run_batched():
        return engine.generate(prompts, max_tokens=args.new_tokens, temperature=0.0, stop_tokens=[])

    def run_baseline():
        return baseline.generate(prompts, max_tokens=args.new_tokens, temperature=0.0, stop_tokens=[])

    def run_sequential():
        return [engine.generate([p], max_tokens=args.new_tokens, temperature=0.0, stop_tokens=[])[0] for p in sequential]

    def run_hf():
        return hf_generate(hf, prompts, args.new_tokens)

    hf_generate(hf, prompts[:2], 4)  # warm-ups: first calls pay one-off costs (allocator, lazy init)
    engine.generate(prompts[:2], max_tokens=4, temperature=0.0, stop_tokens=[])
    keys = ["batched", "sequential", "hf"] + (["baseline"] if baseline else [])
    if baseline:
        baseline.generate(prompts[:2], max_tokens=4, temperature=0.0, stop_tokens=[])

    rates = {key: [] for key in keys}
    cpu_rates = {key: [] for key in keys}
    paired = []  # per round (CPU on CPU, else wall) time of (a0) / (a): the two run back to back, alternating

    def seconds(wall: float, cpu: float) -> str:
        return f"{wall:.2f} ({cpu:.2f})" if on_cpu else f"{wall:.2f}"

    for r in range(args.rounds):
        if baseline and r % 2:
            t_0, c_0, before = timed(run_baseline, device)
        t_a, c_a, batched = timed(run_batched, device)
        runs = [("batched", t_a, c_a, len(prompts))]
        if baseline:
            if r % 2 == 0:
                t_0, c_0, before = timed(run_baseline, device)
            runs.append(("baseline", t_0, c_0, len(prompts)))
            paired.append(c_0 / c_a if on_cpu else t_0 / t_a)
        t_b, c_b, _ = timed(run_sequential, device)
        t_c, c_c, hf_tokens = timed(run_hf, device)
        runs += [("sequential", t_b, c_b, len(sequential)), ("hf", t_c, c_c, len(prompts))]
        for key, wall, cpu, n in runs:
            rates[key].append(n * args.new_tokens / wall)
            cpu_rates[key].append(n * args.new_tokens / cpu)  # reported on CPU only
        print(f"round {r}: wall{' (cpu)' if on_cpu else ''} seconds: batched {seconds(t_a, c_a)}  "
              + (f"baseline {seconds(t_0, c_0)}  " if baseline else "")
              + f"sequential, {len(sequential)} prompts {seconds(t_b, c_b)}  hf {seconds(t_c, c_c)}")
    assert all(len(g.tokens) == args.new_tokens for g in batched)

    # agreement with HF (same weights, greedy): identical tokens until a float near-tie flips an argmax
    prefix_match = [next((i for i, (x, y) in enumerate(zip(g.tokens, h)) if x != y), len(h))
                    for g, h in zip(batched, hf_tokens)]
    identical_rows = sum(m == args.new_tokens for m in prefix_match)

    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_rates.items()}
    print()
    print(f"{'variant':<34}{'tokens/s wall':>14}{'tokens/CPU-s' if on_cpu else '':>14}   wall runs")
    labels = {"batched": "(a) engine, batched", "sequential": "(b) engine, one prompt at a time",
              "hf": "(c) HF generate, batched"}
    if baseline:
        labels["baseline"] = f"(a0) engine at {args.baseline}, batched"
    for key, label in labels.items():
        cpu_cell = f"{cpu_med[key]:.0f}" if on_cpu else ""
        print(f"{label:<34}{med[key]:>14.0f}{cpu_cell:>14}   {'  '.join(f'{x:.0f}' for x in rates[key])}")
    if on_cpu:
        print(f"ratios (wall | CPU): (a)/(c) {med['batched'] / med['hf']:.2f} | "
              f"{cpu_med['batched'] / cpu_med['hf']:.2f}   (a)/(b) {med['batched'] / med['sequential']:.2f} | "
              f"{cpu_med['batched'] / cpu_med['sequential']:.2f}")
    else:
        print(f"ratios (wall): (a)/(c) {med['batched'] / med['hf']:.2f}   "
              f"(a)/(b) {med['batched'] / med['sequential']:.2f}")
    print(f"agreement with HF greedy: {identical_rows}/{len(prompts)} rows identical over all {args.new_tokens} "
          f"tokens; median first-divergence position {statistics.median(prefix_match):.0f}")
    results = dict(vs_hf=med["batched"] / med["hf"], vs_sequential=med["batched"] / med["sequential"],
                   batched_tok_s=med["batched"])
    if on_cpu:
        results.update(cpu_vs_hf=cpu_med["batched"] / cpu_med["hf"],
                       cpu_vs_sequential=cpu_med["batched"] / cpu_med["sequential"])
    if baseline:
        same = sum(g.tokens == b.tokens for g, b in zip(batched, before))
        cpu_ratio = f" | {cpu_med['batched'] / cpu_med['baseline']:.2f}" if on_cpu else ""
        print(f"(a)/(a0) {med['batched'] / med['baseline']:.2f}{cpu_ratio}; "
              f"median of the per-round {'CPU' if on_cpu else 'wall'} ratios {statistics.median(paired):.2f} "
              f"({' '.join(f'{x:.2f}' for x in paired)}); {same}/{len(prompts)} rows token-identical to {args.baseline}")
        results["vs_baseline"] = med["batched"] / med["baseline"]
        if on_cpu:
            results.update(cpu_vs_baseline=cpu_med["batched"] / cpu_med["baseline"],
                           paired_cpu_vs_baseline=statistics.median(paired))
        else:
            results["paired_vs_baseline"] = statistics.median(paired)
    return results


def retirement(args, ours: GPT) -> dict:
    """Two cases, each with retire on and off (CPU seconds on CPU, wall seconds on a GPU; medians over rounds).

    half: half the rows have max_len-token prompts and a max_len+16 context, so they stop after 16 tokens; the
          step time after that should follow the live rows.
    staggered: prompt lengths spread so that rows stop at every step from 16 to new_tokens (one compaction per
          finishing step): shows what the compactions cost against what they save.
    """
    def engine_with_context(context: int) -> Engine:
        model = GPT(llama_shaped_config(context, ours.config.n_kv_head))
        model.load_state_dict(ours.state_dict())
        return Engine(placed_like(model, ours).eval())

    clock_name, clock = work_clock(args.device)

    half = args.prompts // 2
    long_prompts = make_prompts(half, args.max_len, args.max_len, seed=2)
    short_prompts = make_prompts(args.prompts - half, args.min_len, 16 + args.max_len - args.new_tokens, seed=3)
    mixed = [p for pair in zip(long_prompts, short_prompts) for p in pair]
    engine = engine_with_context(args.max_len + 16)
    print()
    print(f"retirement, half: {len(mixed)} rows, {half} stop after 16 tokens; mean decode step {clock_name} ms "
          f"(median)")
    print(f"{'':<14}{'steps 1-15':>12}{'steps 17+':>12}{'ratio':>8}")
    ratios = {}
    for retire in (True, False):
        before, after = [], []
        for _ in range(args.rounds):
            times, live = step_times(engine, mixed, args.new_tokens, retire, clock)
            before.append(statistics.mean(times[:15]))  # times[i] is step i+1
            after.append(statistics.mean(times[16:]))
            assert live[0] == len(mixed) and live[-1] == len(mixed) - half
        b, a = statistics.median(before) * 1e3, statistics.median(after) * 1e3
        ratios[retire] = a / b
        print(f"{'retire=' + str(retire):<14}{b:>12.2f}{a:>12.2f}{a / b:>8.2f}")

    context = args.max_len + args.new_tokens
    staggered = make_prompts(args.prompts, args.max_len, context - 16, seed=4)  # budgets 16..new_tokens
    engine = engine_with_context(context)
    totals = {}
    for retire in (True, False):
        runs = []
        for _ in range(args.rounds):
            wall, cpu, out = timed(lambda: engine.generate(staggered, max_tokens=args.new_tokens, temperature=0.0,
                                                           stop_tokens=[], retire=retire), args.device)
            runs.append(cpu if clock_name == "CPU" else wall)
        totals[retire] = statistics.median(runs)
    finish_steps = len({len(g.tokens) for g in out})
    print(f"retirement, staggered: rows finish at {finish_steps} different steps; generate {clock_name} s: "
          f"retire=True {totals[True]:.2f}, retire=False {totals[False]:.2f} "
          f"(ratio {totals[True] / totals[False]:.2f})")
    return dict(retire_step_ratio=ratios[True], keep_step_ratio=ratios[False],
                staggered_ratio=totals[True] / totals[False])


# profiler op names -> the categories of the engine's cost model
PROFILE_CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::_flash_attention_forward", "aten::_efficient_attention_forward"),
    "cache writes": ("aten::_index_put_impl_",),
    "sampling": ("aten::argmax", "aten::_log_softmax", "aten::logsumexp", "aten::gather"),
}


def profile_split(args, ours: GPT) -> None:
    """Self CPU time of the batched call by category, prefill (a max_tokens=1 call) and decode (the rest)."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(ours)
    prompts = make_prompts(args.prompts, args.min_len, args.max_len, seed=1)
    engine.generate(prompts[:2], max_tokens=4, temperature=0.0, stop_tokens=[])
    split = {}
    for phase, max_tokens in (("prefill", 1), ("total", args.new_tokens)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(prompts, max_tokens=max_tokens, temperature=0.0, stop_tokens=[])
        events = prof.key_averages()
        times = {e.key: e.self_cpu_time_total / 1e6 for e in events}
        # sampling ops with their children (logsumexp runs as max/sub/exp/sum), the rest by self time
        times.update({e.key: e.cpu_time_total / 1e6 for e in events if e.key in PROFILE_CATEGORIES["sampling"]})
        split[phase] = {name: sum(times.get(op, 0.0) for op in ops) for name, ops in PROFILE_CATEGORIES.items()}
        split[phase]["other"] = sum(e.self_cpu_time_total / 1e6 for e in events) - sum(split[phase].values())
    split["decode"] = {name: split["total"][name] - split["prefill"][name] for name in split["total"]}
    print("profile (torch.profiler, self CPU s of aten ops in one batched call; 'other': elementwise, norms, "
          "rotary, indexing, allocation)")
    print(f"{'':<10}" + "".join(f"{name:>14}" for name in split["total"]) + f"{'sum':>10}")
    for phase in ("prefill", "decode", "total"):
        total = sum(split[phase].values())
        cells = "".join(f"{t:>8.2f} {100 * t / total:>3.0f}%" for t in split[phase].values())
        print(f"{phase:<10}{cells}{total:>10.2f}")
    print()


# ---------------------------------------------------------------------------------------------------------------
# the growing (paged) KV cache on a long-tailed batch, continuous batching, compiled decode, FP8 KV cache

def qwen_shaped_model(args) -> GPT:
    """Qwen3's layout (16 heads, 8 kv heads, head_dim 128, hidden 1024, SwiGLU 3072, q/k-norm gains, tied
    embeddings) with --qwen-layers layers and --qwen-vocab ids, random weights; the stop token's logit is pinned to
    --stop-logit, so every row stops with about the same probability at every step: geometric lengths, a long tail."""
    config = GPTConfig(max_seq_len=args.longtail_prompt_max + args.longtail_max_tokens, vocab_size=args.qwen_vocab,
                       n_layer=args.qwen_layers, n_head=16, n_kv_head=8, head_dim=128, n_embd=1024, mlp="swiglu",
                       intermediate_size=3072, norm_weight=True, qk_norm=True, qk_norm_weight=True,
                       tie_embeddings=True, softcap=None, rope_theta=1e6)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.blocks:  # the zero-initialised output projections would make every layer the identity
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
    return pin_stop_logit(model.eval(), args.stop_logit)


def pin_stop_logit(model, value: float):
    import types

    original = type(model).compute_logits

    def compute_logits(self, hidden):
        logits = original(self, hidden)
        logits[..., STOP_TOKEN] = value
        return logits
    model.compute_logits = types.MethodType(compute_logits, model)
    return model


STOP_TOKEN = 1


def longtail(args) -> dict:
    """(1) peak KV memory, growing paged cache vs the committed engine's up-front cache, same tokens; (2) a queue
    of prompts decoded with continuous batching (one call, --longtail-rows slots) vs batch after batch."""
    model = qwen_shaped_model(args)
    g = torch.Generator().manual_seed(1)
    n, rows, L = args.longtail_prompts, args.longtail_rows, args.longtail_max_tokens
    lengths = torch.randint(args.longtail_prompt_max // 2, args.longtail_prompt_max + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(2, args.qwen_vocab, (k,), generator=g).tolist() for k in lengths]
    # one seed per prompt: a prompt's samples do not depend on which call or batch it is in
    seeds = list(range(n))
    kwargs = dict(max_tokens=L, temperature=1.0, stop_tokens=[STOP_TOKEN])
    token_bytes = kv_bytes_per_token(model.config, torch.float32)
    print(f"long-tailed batch: Qwen3-shaped ({args.qwen_layers} layers, 16 heads, 8 kv heads, head_dim 128, hidden 1024, "
          f"vocab {args.qwen_vocab}), {n} prompts of {min(lengths)}-{max(lengths)} tokens, max_tokens {L}, "
          f"sampled, stop-token logit {args.stop_logit}")
    batches = [(prompts[i:i + rows], seeds[i:i + rows]) for i in range(0, n, rows)]
    engine = Engine(model)
    Engine(model).generate(prompts[:2], max_tokens=4, temperature=0.0)  # warm-up

    def batch_after_batch(engine=engine):
        out, peak = [], 0
        for batch, batch_seeds in batches:
            out += engine.generate(batch, seed=batch_seeds, **kwargs)
            peak = max(peak, engine.last_stats["peak_kv_bytes"])
        return out, peak

    def continuous():
        cb = Engine(model, max_batch_rows=rows)
        return cb.generate(prompts, seed=seeds, **kwargs), cb.last_stats["peak_kv_bytes"]

    results = {}
    timings = {"batches": [], "continuous": []}
    for r in range(args.longtail_rounds):
        for name, fn in (("batches", batch_after_batch), ("continuous", continuous)):
            wall, cpu, result = timed(fn)
            timings[name].append((wall, cpu, result))
    (out_batches, peak_default), (out_cb, peak_cb) = timings["batches"][0][2], timings["continuous"][0][2]
    # the paged pool alone (what a GPU holds): on a CPU the engine's default adds a dense mirror of the batch
    out_paged, peak_growing = batch_after_batch(Engine(model, kv_mirror=False))
    assert [a.tokens for a in out_paged] == [b.tokens for b in out_batches], "kv_mirror changed the tokens"
    lens = sorted(len(o.tokens) for o in out_batches)
    tokens = sum(lens)
    print(f"  completion lengths: median {lens[len(lens) // 2]}, 90th pct {lens[int(0.9 * len(lens))]}, "
          f"max {lens[-1]} of {L}; {sum(x == L for x in lens)} rows hit max_tokens; {tokens} tokens")
    # the committed engine allocates rows x (longest prompt + max_tokens) for each call
    up_front_bytes = max(len(batch) * (max(len(p) for p in batch) + L) for batch, _ in batches) * token_bytes
    same = [a.tokens == b.tokens for a, b in zip(out_batches, out_cb)]
    print(f"  continuous batching gives the batch-by-batch tokens: {sum(same)}/{len(same)} rows identical")
    if args.baseline:
        old = engine_at_revision(args.baseline, model)
        pin_stop_logit(old.model, args.stop_logit)
        old_out = [gen for batch, batch_seeds in batches for gen in old.generate(batch, seed=batch_seeds, **kwargs)]
        identical = sum(a.tokens == b.tokens for a, b in zip(out_batches, old_out))
        print(f"  vs the engine at {args.baseline} (up-front cache): {identical}/{len(old_out)} rows token-identical")
        results["identical_to_baseline"] = identical / len(old_out)
    ratio = up_front_bytes / peak_growing
    print(f"  peak KV memory per call: up-front {up_front_bytes / 2**20:.1f} MiB (rows x (longest prompt + max_tokens)), "
          f"growing {peak_growing / 2**20:.1f} MiB (x{ratio:.2f} less); continuous batching, {rows} slots: "
          f"{peak_cb / 2**20:.1f} MiB")
    print(f"  with the CPU default's dense mirror (kv_mirror, same tokens): {peak_default / 2**20:.1f} MiB "
          f"(x{up_front_bytes / peak_default:.2f} less than up-front)")
    med = lambda name, i: statistics.median(t[i] for t in timings[name])
    print(f"  {n} prompts, {rows} rows at a time: batch after batch {med('batches', 0):.1f} s wall / "
          f"{med('batches', 1):.1f} s CPU, continuous batching {med('continuous', 0):.1f} s / {med('continuous', 1):.1f} s "
          f"-> {tokens / med('continuous', 1):.0f} vs {tokens / med('batches', 1):.0f} tok/s (CPU time)")
    results.update(kv_peak_ratio=ratio, kv_peak_ratio_cpu_mirror=up_front_bytes / peak_default,
                   longtail_speedup=med("batches", 1) / med("continuous", 1),
                   longtail_wall_speedup=med("batches", 0) / med("continuous", 0))
    return results


def compiled_decode(args) -> dict:
    """Decode tokens/s of one batch (no stops: a fixed bucket), eager vs torch.compile (inductor) on this device."""
    model = qwen_shaped_model(args)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, args.qwen_vocab, (64,), generator=g).tolist() for _ in range(args.compile_rows)]
    kwargs = dict(max_tokens=args.compile_tokens, temperature=0.0, stop_tokens=[])
    eager, compiled = Engine(model), Engine(model, compile_decode=True)
    wall, cpu, _ = timed(lambda: compiled.generate(prompts, **kwargs))
    print(f"compiled decode: first call (compiles) {wall:.1f} s")
    prefill = lambda engine: timed(lambda: engine.generate(prompts, **{**kwargs, "max_tokens": 1}))[1]
    times = {"eager": [], "compiled": []}
    outs = {}
    for _ in range(args.rounds):
        for name, engine in (("eager", eager), ("compiled", compiled)):
            wall, cpu, outs[name] = timed(lambda: engine.generate(prompts, **kwargs))
            times[name].append(cpu - prefill(engine))
    decoded = args.compile_rows * (args.compile_tokens - 1)
    rate = {name: decoded / statistics.median(t) for name, t in times.items()}
    same = sum(a.tokens == b.tokens for a, b in zip(outs["eager"], outs["compiled"]))
    print(f"  {args.compile_rows} rows x {args.compile_tokens} tokens, decode only (CPU time): eager {rate['eager']:.0f} "
          f"tok/s, compiled {rate['compiled']:.0f} tok/s (x{rate['compiled'] / rate['eager']:.2f}); "
          f"{same}/{len(prompts)} rows token-identical")
    return dict(compiled_vs_eager=rate["compiled"] / rate["eager"], compiled_identical=same / len(prompts))


def fp8_agreement(args) -> dict:
    """Greedy agreement of FP8 and bf16 KV caches with the fp32 cache (rows identical, share of tokens before the
    first divergence) on the bench's Qwen-shaped model (random weights: flatter logits than a trained model's, so
    near-ties make this a pessimistic figure)."""
    model = qwen_shaped_model(args)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, args.qwen_vocab, (int(k),), generator=g).tolist()
               for k in torch.randint(16, 128, (args.fp8_prompts,), generator=g)]
    kwargs = dict(max_tokens=args.fp8_tokens, temperature=0.0, stop_tokens=[])
    reference = Engine(model).generate(prompts, **kwargs)
    results = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp8", FP8_KV_DTYPE)):
        out = Engine(model, kv_dtype=dtype).generate(prompts, **kwargs)
        rows = sum(a.tokens == b.tokens for a, b in zip(reference, out)) / len(out)
        prefix = [next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
                  for a, b in zip(reference, out)]
        agree = sum(prefix) / sum(len(a.tokens) for a in reference)
        print(f"greedy vs fp32 KV cache, {name}: {rows:.0%} rows identical, {agree:.1%} of tokens before the first "
              f"divergence ({len(prompts)} prompts x {args.fp8_tokens} tokens)")
        results[f"{name}_rows_identical"] = rows
        results[f"{name}_token_agreement"] = agree
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--sequential-prompts", type=int, default=16, help="prompts timed one at a time in (b)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--kv-heads", type=int, default=HEADS, help=f"key/value heads (GQA below {HEADS})")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also time the engine of git revision REV (e.g. HEAD) in every round: (a0)")
    parser.add_argument("--skip", choices=SECTIONS, action="append", default=[])
    parser.add_argument("--only", choices=SECTIONS, action="append", default=[], help="run only these sections")
    parser.add_argument("--qwen-layers", type=int, default=4, help="layers of the Qwen3-shaped model")
    parser.add_argument("--qwen-vocab", type=int, default=32768, help="its vocabulary (Qwen3: 151936)")
    parser.add_argument("--stop-logit", type=float, default=6.7,
                        help="the stop token's pinned logit: sets the per-step stop probability")
    parser.add_argument("--longtail-prompts", type=int, default=24)
    parser.add_argument("--longtail-rows", type=int, default=8, help="rows decoded at a time")
    parser.add_argument("--longtail-max-tokens", type=int, default=512)
    parser.add_argument("--longtail-prompt-max", type=int, default=128)
    parser.add_argument("--longtail-rounds", type=int, default=1)
    parser.add_argument("--compile-rows", type=int, default=16)
    parser.add_argument("--compile-tokens", type=int, default=48)
    parser.add_argument("--fp8-prompts", type=int, default=16)
    parser.add_argument("--fp8-tokens", type=int, default=48)
    parser.add_argument("--profile", action="store_true",
                        help="also print where the batched engine's CPU time goes (torch.profiler, one call; "
                             "--device cpu only)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weights and compute dtype of both models (default: fp32 on CPU, on a GPU "
                             "reasoning.common's compute dtype: bf16 where supported)")
    args = parser.parse_args()
    try:
        args.device = get_device(args.device)
    except UserError as e:
        parser.error(str(e))
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if args.profile and args.device.type != "cpu":
        parser.error("--profile times CPU ops: run it with --device cpu")
    if args.dtype == "auto":
        dtype = get_compute_dtype(args.device) if args.device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    dtype_name = next(name for name, d in DTYPES.items() if d == dtype)
    if args.device.type == "cuda":
        os.environ["REASONING_DTYPE"] = dtype_name  # the engine's autocast then computes in the weights' dtype
        if args.device.index is not None:  # library code that allocates on "cuda" then lands on this one
            torch.cuda.set_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    run = lambda section: section not in args.skip and (not args.only or section in args.only)
    results = {}
    if run("throughput") or run("retirement") or args.profile:
        ours, hf = build_models(args.max_len + args.new_tokens, kv_heads=args.kv_heads, device=args.device,
                                dtype=dtype)
        n_params = sum(p.numel() for p in ours.parameters())
        where = "CPU" if args.device.type == "cpu" else f"{torch.cuda.get_device_name(args.device)} ({args.device})"
        print(f"model: Llama-shaped dim {DIM}, {LAYERS} layers, {HEADS} heads ({args.kv_heads} kv), vocab {VOCAB}, "
              f"{n_params / 1e6:.2f}M params; "
              f"{args.prompts} prompts of {args.min_len}-{args.max_len} tokens, {args.new_tokens} new tokens, greedy, "
              f"{where} {dtype_name}, {torch.get_num_threads()} threads")
    if args.profile:
        profile_split(args, ours)
    if run("throughput"):
        results.update(throughput(args, ours, hf))
    if run("retirement"):
        results.update(retirement(args, ours))
    if (run("longtail") or run("compiled") or run("fp8")) and args.device.type != "cpu":
        raise SystemExit("the longtail, compiled and fp8 sections run on the CPU (--skip them with --device cuda)")
    if run("longtail"):
        results.update(longtail(args))
    if run("fp8"):
        results.update(fp8_agreement(args))
    if run("compiled"):
        results.update(compiled_decode(args))
    print("RESULT " + " ".join(f"{k}={v:.0f}" if k.endswith("tok_s") else f"{k}={v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
