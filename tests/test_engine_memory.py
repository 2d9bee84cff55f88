"""reasoning.engine's memory side: the paged KV cache, continuous batching, the KV budget with preemption and
recompute, compiled static-shape decode and the FP8 cache. Every way of constraining memory or batching must give
the tokens of the unconstrained engine (which tests/test_engine.py ties to a cache-free forward). Tiny CPU models."""

import pytest
import torch

from reasoning import engine as engine_module
from reasoning.engine import Engine
from reasoning.gpt import FP8_KV_DTYPE, PagedKVCache
from tests.test_engine import BigramStub, build_model, pick_stop_tokens, ragged_prompts


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return build_model()


def assert_same_generations(got, expected, atol=1e-5):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.tokens == b.tokens, f"row {i}"
        assert (a.mask, a.stop_reason) == (b.mask, b.stop_reason), f"row {i}"
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=atol)


def resident_sizes(monkeypatch):
    sizes = []
    original = engine_module._Rollout._take_step

    def recording(self, logits):
        sizes.append(len(self.resident))
        return original(self, logits)

    monkeypatch.setattr(engine_module._Rollout, "_take_step", recording)
    return sizes


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_budget_preemption_and_continuous_batching_keep_the_tokens(model, monkeypatch, temperature):
    """A KV budget far below what the rows need forces preemptions (the youngest row is dropped and later
    recomputed from its prompt + tokens); a row limit forces admissions into freed slots. Same tokens."""
    prompts = ragged_prompts(8, 2, 50, seed=3)
    kwargs = dict(num_samples=2, max_tokens=30, temperature=temperature, seed=5,
                  stop_tokens=pick_stop_tokens(model, prompts, max_tokens=30))
    reference = Engine(model).generate(prompts, **kwargs)
    up_front = sum(len(prompts[g.prompt_index]) + 30 for g in reference)
    assert len({len(g.tokens) for g in reference}) >= 3  # rows finish at different steps

    tight = Engine(model, max_kv_tokens=240, block_size=8)
    assert_same_generations(tight.generate(prompts, **kwargs), reference)
    stats = tight.last_stats
    assert stats["preemptions"] > 0  # the budget really forced recomputes
    assert stats["peak_kv_tokens"] <= 240 < up_front / 3

    sizes = resident_sizes(monkeypatch)
    narrow = Engine(model, max_batch_rows=4)
    assert_same_generations(narrow.generate(prompts, **kwargs), reference)
    assert max(sizes) <= 4 and narrow.last_stats["admissions"] == 8  # one prompt (2 rows) admitted at a time
    assert len(sizes) < sum(len(g.tokens) for g in reference) / 2  # slots were refilled, not run one by one

    streamed = {}
    for row, token, _ in Engine(model, max_kv_tokens=240, block_size=8).generate_stream(prompts, **kwargs):
        streamed.setdefault(row, []).append(token)  # a preempted row's tokens are not streamed twice
    assert [streamed.get(row, []) for row in range(len(reference))] == [g.tokens for g in reference]


def test_preempted_rows_keep_their_tool_state(monkeypatch):
    """A row preempted in the middle of a forced tool output resumes it where it was (same tokens and masks)."""
    from reasoning.tokenizer import Tokenizer

    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    s = tokenizer.encode_special
    start, py, py_end, out, out_end, end = (s("<|assistant_start|>"), s("<|python_start|>"), s("<|python_end|>"),
                                            s("<|output_start|>"), s("<|output_end|>"), s("<|assistant_end|>"))
    two, plus, three = (tokenizer.encode(c)[0] for c in "2+3")
    script = {start: py, py: two, two: plus, plus: three, three: py_end, out_end: end}
    model = BigramStub(script, tokenizer.vocab_size)
    prompts = [tokenizer.encode("hi") + [start], [start], tokenizer.encode("abc") + [start]]
    free = Engine(model, tokenizer).generate(prompts, num_samples=2, max_tokens=20, temperature=0.0)
    five = tokenizer.encode("5")
    assert all(g.tokens == [py, two, plus, three, py_end, out, *five, out_end, end] for g in free)
    preempting = Engine(model, tokenizer, max_kv_tokens=24, block_size=2)
    assert_same_generations(preempting.generate(prompts, num_samples=2, max_tokens=20, temperature=0.0), free)
    assert preempting.last_stats["preemptions"] > 0


def test_growing_cache_of_a_long_tailed_batch_holds_a_fraction_of_up_front():
    """Most rows stop early: the pool follows the tokens rows really hold (and retired rows' blocks are reused)."""
    model = BigramStub({t: t + 1 for t in range(250)}, 256, max_seq_len=256)
    starts = [200] * 28 + [0] * 4  # 28 rows stop after ~50 tokens, 4 after 240 (the stop token is 240)
    engine = Engine(model, block_size=8)
    out = engine.generate([[t] for t in starts], max_tokens=250, temperature=0.0, stop_tokens=[240])
    assert sorted({len(g.tokens) for g in out}) == [40, 240]
    up_front = len(starts) * (1 + 250)
    stats = engine.last_stats
    assert stats["peak_kv_tokens"] * 3 <= up_front, stats
    assert stats["peak_kv_bytes"] * 3 <= up_front * engine_module.kv_bytes_per_token(model.config, torch.float32)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_dense_mirror_gives_the_gathered_tokens(model, temperature):
    """The CPU default (a dense mirror of the batch, written incrementally) and the per-step gather of blocks read
    the same keys: same tokens and log-probs through retirement, admissions into freed slots and preemption."""
    prompts = ragged_prompts(8, 2, 50, seed=4)
    kwargs = dict(num_samples=2, max_tokens=30, temperature=temperature, seed=7,
                  stop_tokens=pick_stop_tokens(model, prompts, max_tokens=30))
    for limits in (dict(), dict(max_kv_tokens=240, block_size=8), dict(max_batch_rows=4)):
        gathered = Engine(model, kv_mirror=False, **limits).generate(prompts, **kwargs)
        mirrored = Engine(model, **limits)  # the default on CPU
        assert_same_generations(mirrored.generate(prompts, **kwargs), gathered, atol=1e-6)
        if "max_kv_tokens" in limits:
            assert mirrored.last_stats["preemptions"] > 0


def test_dense_mirror_gathers_once_per_batch_not_per_step(model, monkeypatch):
    """With the mirror, a decode step writes only its new tokens: a batch that never changes gathers each layer's
    blocks once (keys and values), not once per layer per step (the cost this removes)."""
    gathers = []
    original = PagedKVCache._gather
    monkeypatch.setattr(PagedKVCache, "_gather", lambda self, *a: gathers.append(1) or original(self, *a))
    prompts = ragged_prompts(6, 5, 40, seed=2)
    out = Engine(model).generate(prompts, max_tokens=12, temperature=0.0, stop_tokens=[])
    assert all(len(g.tokens) == 12 for g in out)
    assert len(gathers) == 2 * model.config.n_layer
    gathers.clear()
    Engine(model, kv_mirror=False).generate(prompts, max_tokens=12, temperature=0.0, stop_tokens=[])
    assert len(gathers) >= 2 * model.config.n_layer * 11  # the gather path: every decode step


def test_compiled_static_decode_gives_the_eager_tokens(model):
    """The static-shape decode (batch padded to a power of two, every row reading its whole block table) traced
    by torch.compile in one graph (fullgraph: what CUDA graphs need) gives the eager engine's tokens. Backend "eager":
    dynamo's capture without inductor's cost; the inductor-compiled decode is measured in dev/bench_engine.py."""
    prompts = ragged_prompts(3, 2, 40, seed=8)
    kwargs = dict(num_samples=2, max_tokens=12, temperature=1.0, seed=2,
                  stop_tokens=pick_stop_tokens(model, prompts, max_tokens=12))
    reference = Engine(model).generate(prompts, **kwargs)
    compiled = Engine(model, compile_decode="eager", block_size=8, max_kv_tokens=400)
    assert_same_generations(compiled.generate(prompts, **kwargs), reference)
    pool = compiled._static_pool
    assert_same_generations(compiled.generate(prompts, **kwargs), reference)  # the pool is reused, cleared
    assert compiled._static_pool is pool


def test_fp8_cache_is_close_to_the_full_precision_cache(model):
    """FP8 (e4m3, a scale per token and kv head) keys/values: logits close to the fp32 cache's, greedy tokens
    mostly equal on a tiny model (the measured agreement is in dev/LOG.md)."""
    cache = PagedKVCache(1, 2, 8, 4, 8, kv_dtype=FP8_KV_DTYPE)
    x = torch.randn(3, 5, 2, 8) * torch.tensor([1e-3, 50.0])[None, None, :, None]  # heads of very different scales
    values, scale = cache._quantize(x)
    assert values.dtype == FP8_KV_DTYPE and scale.shape == (3, 5, 2)
    error = (values.float() * scale[..., None] - x).abs() / x.abs().amax(dim=-1, keepdim=True)
    assert error.max() <= 2 ** -4  # e4m3: 3 mantissa bits, relative to each vector's largest entry

    prompts = ragged_prompts(6, 5, 40, seed=9)
    full = Engine(model).generate(prompts, max_tokens=12, temperature=0.0, stop_tokens=[])
    fp8 = Engine(model, kv_dtype=FP8_KV_DTYPE).generate(prompts, max_tokens=12, temperature=0.0, stop_tokens=[])
    differences = []
    for a, b in zip(full, fp8):
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
        # up to the first disagreement both caches saw the same sequence: their log-probs differ by FP8 noise only
        differences += (torch.tensor(b.logprobs[:n]) - torch.tensor(a.logprobs[:n])).abs().tolist()
    assert max(differences) < 0.25 and sum(differences) / len(differences) < 0.03
    agree = sum(a.tokens == b.tokens for a, b in zip(full, fp8))
    assert agree >= 4, agree


def test_budget_errors_are_one_line(model):
    with pytest.raises(ValueError, match="max_kv_tokens=0"):
        Engine(model, max_kv_tokens=0)
    with pytest.raises(ValueError, match="kv_dtype"):
        Engine(model, kv_dtype=torch.int8)
    with pytest.raises(ValueError, match="kv_mirror"):
        Engine(model, kv_mirror="yes")
    with pytest.raises(ValueError, match="max_kv_tokens=16: too small for 1 row"):
        Engine(model, max_kv_tokens=16, block_size=8).generate([[1] * 40], max_tokens=4)
