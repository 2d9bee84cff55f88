"""reasoning.engine: batched generation must equal one-prompt-at-a-time generation and the model's own full
forward, token for token; sampling must respect its filters and be reproducible per row; tool calls force their
output with mask 0. Tiny fp32 models on CPU."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reasoning import engine as engine_module
from reasoning.engine import Engine, _length_groups, counter_uniforms, keys_tensor, row_key, sample_from_logits
from reasoning.gpt import GPT, GPTConfig
from reasoning.tokenizer import Tokenizer

VOCAB = 300
CONTEXT = 80


def build_model(seed=0, **overrides):
    fields = dict(max_seq_len=CONTEXT, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=48)
    fields.update(overrides)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(**fields))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # noise everywhere so attention and the zero-initialised projections matter
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
        model.lm_head.weight.mul_(2.5)  # peakier next-token distributions than a fresh init (logits up to ~8)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a shared, oversubscribed box OpenMP workers
    waiting on each other made this file ~15x slower. Restored afterwards for the rest of the suite."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer({bytes([i]): i for i in range(256)})  # a real tokenizer over a byte vocabulary (269 ids)


def ragged_prompts(n, min_len=1, max_len=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(min_len, max_len, n).round().long()[torch.randperm(n, generator=g)]
    return [torch.randint(0, VOCAB, (int(L),), generator=g).tolist() for L in lengths]


@torch.no_grad()
def full_forward_logits(model, sequence):
    """Next-token logits after `sequence`, from a plain forward without any cache (the reference)."""
    return model(torch.tensor([sequence]))[0, -1]


@torch.no_grad()
def sequence_logits(model, prompt, completion):
    """(len(completion), V): the cache-free logits that predicted each completion token."""
    logits = model(torch.tensor([prompt + completion]))[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)]


def record_step_logits(monkeypatch):
    """Capture (resident rows, logits) of every sampling step of the engine."""
    records = []
    original = engine_module._Rollout._take_step

    def recording(self, logits):
        records.append((list(self.resident), logits.clone()))
        return original(self, logits)

    monkeypatch.setattr(engine_module._Rollout, "_take_step", recording)
    return records


def pick_stop_tokens(model, prompts, max_tokens=48, how_many=3):
    """A few stop tokens that only some greedy continuations emit, so rows finish at different steps
    (and some never stop)."""
    free = Engine(model).generate(prompts, max_tokens=max_tokens, temperature=0.0, stop_tokens=[])
    rows_with = {}
    for g in free:
        for token in set(g.tokens):
            rows_with[token] = rows_with.get(token, 0) + 1
    rare = sorted(t for t, n in rows_with.items() if 1 <= n <= max(1, len(prompts) // 6))
    return rare[:how_many]


# ----------------------------------------------------------------------------------------------------------
# exactness

def test_batched_greedy_equals_sequential_with_and_without_retirement(model):
    prompts = ragged_prompts(16, 1, 60)
    stop_tokens = pick_stop_tokens(model, prompts, max_tokens=24)
    engine = Engine(model)
    kwargs = dict(max_tokens=24, temperature=0.0, stop_tokens=stop_tokens)  # 60 + 24 > 80: some hit the context
    batched = engine.generate(prompts, **kwargs)
    kept = engine.generate(prompts, retire=False, **kwargs)
    paged = Engine(model, block_size=3)  # many blocks per row, rows crossing block boundaries at different steps
    compacted = paged.generate(prompts, **kwargs)
    reasons = {g.stop_reason for g in batched}
    assert reasons == {"stop", "length", "context"}, reasons  # every way of finishing is exercised
    assert len({len(g.tokens) for g in batched}) >= 4  # rows really finish at different steps
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], **kwargs)[0]
        for other in (batched[i], kept[i], compacted[i]):
            assert other.tokens == alone.tokens, f"prompt {i} (length {len(prompt)})"
            assert other.stop_reason == alone.stop_reason
            assert other.mask == [1] * len(alone.tokens)
            torch.testing.assert_close(torch.tensor(other.logprobs), torch.tensor(alone.logprobs),
                                       rtol=0, atol=1e-5)
        if alone.stop_reason == "context":
            assert len(prompt) + len(alone.tokens) == CONTEXT
        elif alone.stop_reason == "length":
            assert len(alone.tokens) == 24
        else:
            assert alone.tokens[-1] in stop_tokens and not set(alone.tokens[:-1]) & set(stop_tokens)


@pytest.mark.parametrize("retire, block_size", [(True, 16), (True, 4), (False, 16)])
def test_decode_logits_equal_full_forward_at_every_step(model, monkeypatch, retire, block_size):
    """Grouped ragged prefill + block copies for G samples + retirement + per-row decode through the paged cache
    give the logits of a cache-free forward."""
    prompts = ragged_prompts(6, 1, 70, seed=1)  # spread enough for several prefill groups
    stop_tokens = pick_stop_tokens(model, prompts)
    records = record_step_logits(monkeypatch)
    engine = Engine(model, block_size=block_size)
    out = engine.generate(prompts, num_samples=3, max_tokens=20, temperature=1.0, seed=3,
                          stop_tokens=stop_tokens, retire=retire)
    assert len({len(g.tokens) for g in out}) > 2
    # reference: one cache-free forward over prompt + completion per row gives the logits before every token
    references = [sequence_logits(model, prompts[g.prompt_index], g.tokens) for g in out]
    checked, riders = 0, 0
    for step, (rows, logits) in enumerate(records):
        assert len(rows) == logits.shape[0]
        finished = sum(len(out[row].tokens) <= step for row in rows)  # rows riding along in the batch
        riders += finished
        if retire:  # finished rows leave at once (their blocks go back to the pool)
            assert finished == 0
        else:
            assert len(rows) == 18
        for i, row in enumerate(rows):
            if len(out[row].tokens) <= step:
                continue  # its logits are junk: it writes nothing and its samples are dropped
            torch.testing.assert_close(logits[i], references[row][step], rtol=0, atol=1e-5)
            checked += 1
    assert checked == sum(len(g.tokens) for g in out)
    assert (len(records[-1][0]) < 18) == retire  # the batch did shrink, or finished rows rode along
    assert (riders > 0) == (not retire)


@pytest.mark.parametrize("temperature, filters", [(1.0, {}), (0.7, dict(top_k=20, top_p=0.9)),
                                                   (1.3, dict(min_p=0.05)), (0.0, {})])
def test_sampler_logprobs_are_the_trainers_logprobs(model, temperature, filters):
    """logprobs[t] = log_softmax(logits / T)[token] over the full vocabulary (T = 1 when greedy)."""
    prompts = ragged_prompts(4, 3, 30, seed=2)
    out = Engine(model).generate(prompts, num_samples=2, max_tokens=10, temperature=temperature, seed=11,
                                 stop_tokens=[], **filters)
    for g in out:
        logits = sequence_logits(model, prompts[g.prompt_index], g.tokens)  # (n, V)
        scale = temperature if temperature > 0 else 1.0
        reference = F.log_softmax(logits.double() / scale, dim=-1).gather(1, torch.tensor(g.tokens)[:, None])
        got = torch.tensor(g.logprobs, dtype=torch.float64)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, reference.squeeze(1), rtol=0, atol=1e-4)
        if temperature == 0:
            assert g.tokens == logits.argmax(-1).tolist()


def test_samples_of_one_prompt_share_the_first_step_distribution(model, monkeypatch):
    prompts = ragged_prompts(3, 5, 25, seed=4)
    records = record_step_logits(monkeypatch)
    out = Engine(model).generate(prompts, num_samples=5, max_tokens=6, temperature=1.5, seed=0, stop_tokens=[])
    rows, first = records[0]
    assert sorted(rows) == list(range(15))
    for p, prompt in enumerate(prompts):
        group = first[[i for i, row in enumerate(rows) if out[row].prompt_index == p]]
        assert len(group) == 5
        assert torch.equal(group, group[:1].expand_as(group))  # identical, not merely close
        torch.testing.assert_close(group[0], full_forward_logits(model, prompt), rtol=0, atol=1e-5)
        samples = [tuple(g.tokens) for g in out[5 * p: 5 * p + 5]]
        assert len(set(samples)) == 5  # the samples themselves differ
    assert [(g.prompt_index, g.sample_index) for g in out] == [(p, s) for p in range(3) for s in range(5)]


def test_prefill_groups_partition_sorted_lengths_with_bounded_padding(monkeypatch):
    monkeypatch.setattr(engine_module, "PREFILL_GROUP_TOKENS", 1000)
    g = torch.Generator().manual_seed(0)
    for lengths in ([5], [300, 1], [7] * 50, sorted(torch.randint(1, 400, (200,), generator=g).tolist(), reverse=True)):
        groups = _length_groups(lengths)
        assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(groups, groups[1:]))  # contiguous, non-empty
        for start, stop in groups:
            width = lengths[start]
            assert stop - start == 1 or (stop - start) * width <= 1000  # padded tokens per forward
            assert width - lengths[stop - 1] <= max(0.25 * width, 32)  # padding per row
    assert len(_length_groups([7] * 50)) == 1 and len(_length_groups([300, 1])) == 2


# ----------------------------------------------------------------------------------------------------------
# randomness

def test_seeded_samples_are_reproducible_and_independent_of_the_batch(model):
    engine = Engine(model)
    a, b, c, d = ragged_prompts(4, 2, 50, seed=5)
    stop_tokens = pick_stop_tokens(model, [a, b, c, d])
    kwargs = dict(num_samples=3, max_tokens=16, temperature=1.0, top_k=50, seed=7, stop_tokens=stop_tokens)

    def tokens_of(gens, prompt_index):
        return [g.tokens for g in gens if g.prompt_index == prompt_index]

    alone = engine.generate([a], **kwargs)
    assert tokens_of(engine.generate([a], **kwargs), 0) == tokens_of(alone, 0)  # reproducible
    assert tokens_of(engine.generate([a, b, c], **kwargs), 0) == tokens_of(alone, 0)  # other rows after it
    assert tokens_of(engine.generate([a, d], retire=False, **kwargs), 0) == tokens_of(alone, 0)
    # same position, different neighbours (and different retirement timing)
    assert tokens_of(engine.generate([b, c], **kwargs), 1) == tokens_of(engine.generate([d, c], **kwargs), 1)
    # per-prompt seeds: a prompt's samples follow its own seed wherever it sits in the call
    per_prompt = {k: v for k, v in kwargs.items() if k != "seed"}
    first = engine.generate([a, b], seed=[11, 12], **per_prompt)
    swapped = engine.generate([c, b, a], seed=[13, 12, 11], **per_prompt)
    assert tokens_of(first, 0) == tokens_of(swapped, 2) and tokens_of(first, 1) == tokens_of(swapped, 1)
    assert tokens_of(first, 0) != tokens_of(engine.generate([a], seed=[12], **per_prompt), 0)
    other_seed = engine.generate([a], **{**kwargs, "seed": 8})
    assert tokens_of(other_seed, 0) != tokens_of(alone, 0)
    assert len({tuple(t) for t in tokens_of(alone, 0)}) == 3  # samples of one prompt differ from each other


def test_counter_uniforms_are_uniform_and_uncorrelated():
    keys = keys_tensor([row_key(123, p, s) for p in range(64) for s in range(8)], "cpu")  # 512 rows
    draws = torch.stack([counter_uniforms(keys, step) for step in range(200)])  # (steps, rows)
    assert draws.dtype == torch.float64 and draws.min() >= 0 and draws.max() < 1
    n = draws.numel()
    counts = torch.histc(draws.float(), bins=32, min=0, max=1)
    chi2 = ((counts - n / 32) ** 2 / (n / 32)).sum().item()
    assert chi2 < 70  # 31 degrees of freedom: P(chi2 > 70) ~ 1e-4 for a uniform source
    assert abs(draws.mean().item() - 0.5) < 0.005
    for a, b in ((draws[1:], draws[:-1]), (draws[:, 1:], draws[:, :-1])):  # successive steps, adjacent rows
        correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(correlation) < 0.02
    # a pure function of (key, step): the same row gives the same draw in any batch
    assert torch.equal(counter_uniforms(keys[37:38], 5), draws[5, 37:38])


def _allowed_sets(logits, temperature, top_k, top_p, min_p):
    """Reference filter in float64, written independently from the sampler (sets, not masks)."""
    allowed = []
    for row in logits.double() / temperature:
        order = row.argsort(descending=True).tolist()
        if top_k:
            order = order[:top_k]
        probs = torch.softmax(row[order], dim=0).tolist()
        if top_p is not None:
            kept, mass = [], 0.0
            for token, p in zip(order, probs):
                kept.append(token)
                mass += p
                if mass >= top_p:
                    break
            probs = torch.softmax(row[kept], dim=0).tolist()
            order = kept
        if min_p is not None:
            order = [t for t, p in zip(order, probs) if p >= min_p * max(probs)]
        allowed.append(order)
    return allowed


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 5, None, None), (1.0, None, 0.5, None), (0.8, None, None, 0.2), (1.2, 10, 0.7, None),
    (1.0, 8, 0.9, 0.1), (1.0, None, 1e-6, None), (1.0, None, None, 1.0), (2.0, 1, None, None),
])
def test_filters_never_sample_outside_their_set_and_match_its_distribution(temperature, top_k, top_p, min_p):
    # crafted logits: well-separated values so the reference sets have no ties or borderline masses
    g = torch.Generator().manual_seed(0)
    V, rows = 40, 4
    logits = torch.stack([torch.randperm(V, generator=g).float() * (0.25 + 0.1 * r) - 5 for r in range(rows)])
    allowed = _allowed_sets(logits, temperature, top_k, top_p, min_p)
    draws = 3000
    keys = keys_tensor([row_key(0, r, s) for s in range(draws) for r in range(rows)], "cpu")
    tokens, logprobs = sample_from_logits(logits.repeat(draws, 1), counter_uniforms(keys, 0), temperature,
                                          top_k, top_p, min_p)
    tokens = tokens.view(draws, rows)
    full = F.log_softmax(logits / temperature, dim=-1)
    torch.testing.assert_close(logprobs.view(draws, rows), full.gather(1, tokens.t()).t())
    for r in range(rows):
        counts = torch.bincount(tokens[:, r], minlength=V).double()
        assert set(torch.nonzero(counts).flatten().tolist()) <= set(allowed[r])
        expected = torch.zeros(V, dtype=torch.float64)
        expected[allowed[r]] = torch.softmax(logits[r].double()[allowed[r]] / temperature, dim=0)
        # frequencies within 5 standard errors of the filtered, renormalised distribution
        tolerance = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-9
        assert ((counts / draws - expected).abs() <= tolerance).all(), (r, allowed[r])


def test_filters_reach_the_engine(model):
    """top_k=1 and min_p=1 leave only the argmax: sampling at any temperature must then be greedy decoding."""
    prompts = ragged_prompts(5, 2, 30, seed=9)
    engine = Engine(model)
    greedy = engine.generate(prompts, max_tokens=8, temperature=0.0, stop_tokens=[])
    for filters in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-9)):
        sampled = engine.generate(prompts, num_samples=2, max_tokens=8, temperature=1.7, seed=4, stop_tokens=[],
                                  **filters)
        assert [g.tokens for g in sampled] == [g.tokens for g in greedy for _ in range(2)], filters


def test_greedy_and_sampling_never_pick_impossible_tokens():
    logits = torch.full((3, 10), -1e4)
    logits[0, 7] = 0.0
    logits[1, [2, 3]] = 1.0
    logits[2] = torch.linspace(0, 1, 10)
    uniforms = torch.tensor([0.0, 1.0 - 2 ** -53, 0.5], dtype=torch.float64)
    tokens, logprobs = sample_from_logits(logits, uniforms, temperature=1.0)
    assert tokens[0] == 7 and tokens[1] in (2, 3)
    assert torch.isfinite(logprobs).all()
    tokens, _ = sample_from_logits(logits, uniforms, temperature=0.0)
    assert tokens.tolist() == [7, 2, 9]


# ----------------------------------------------------------------------------------------------------------
# tool calls, stop reasons, streaming, bad input (a scripted model makes the token sequence exact)

class BigramStub(nn.Module):
    """A 'model' whose next token is a fixed function of the previous one (ties to token 0 elsewhere).

    It honours the KV-cache contract (reserve/advance, per-row lengths) without attending to anything, so the
    engine's bookkeeping — not the network — decides what gets fed back.
    """

    def __init__(self, next_of: dict[int, int], vocab_size: int, max_seq_len: int = 64):
        super().__init__()
        self.config = GPTConfig(max_seq_len=max_seq_len, vocab_size=vocab_size, n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=8)
        self.lm_head = nn.Linear(8, vocab_size, bias=False)
        table = torch.zeros(vocab_size, vocab_size)
        for token, nxt in next_of.items():
            table[token, nxt] = 30.0
        self.register_buffer("table", table)
        self.fed = []  # every token fed, per forward call

    def forward_hidden(self, idx, kv_cache=None, new_lengths=None):
        if kv_cache is not None:
            kv_cache.reserve(idx.shape[1])
            kv_cache.advance(idx.shape[1], new_lengths)
        self.fed.append(idx.tolist())
        return F.one_hot(idx, self.config.vocab_size).float()

    def compute_logits(self, hidden):
        return hidden @ self.table


def chain(*tokens):
    return {a: b for a, b in zip(tokens, tokens[1:])}


def test_tool_call_output_is_forced_with_mask_zero(tokenizer):
    s = tokenizer.encode_special
    start, py, py_end, out, out_end, end = (s("<|assistant_start|>"), s("<|python_start|>"), s("<|python_end|>"),
                                            s("<|output_start|>"), s("<|output_end|>"), s("<|assistant_end|>"))
    two, plus, three, times, x = (tokenizer.encode(c)[0] for c in "2+3*x")
    five = tokenizer.encode("5")
    # <|python_start|>2+3<|python_end|>, then (after the forced output) <|assistant_end|>
    script = {start: py, py: two, two: plus, plus: three, three: py_end, out_end: end}
    model = BigramStub(script, tokenizer.vocab_size)
    prompt = tokenizer.encode("hi") + [start]
    result = Engine(model, tokenizer).generate([prompt], max_tokens=20, temperature=0.0)[0]
    assert result.tokens == [py, two, plus, three, py_end, out, *five, out_end, end]
    assert result.mask == [1, 1, 1, 1, 1, 0, 0, 0, 1]
    assert all(lp == 0.0 for lp, m in zip(result.logprobs, result.mask) if m == 0)
    assert result.stop_reason == "stop"
    # the forced tokens were fed to the model one per step, in order, right after <|python_end|>
    assert [fed[0][0] for fed in model.fed[1:]] == result.tokens[:-1]

    # a rejected expression (2+3*x) forces an empty output block; a row without a tool call beside it is untouched
    model = BigramStub({**script, three: times, times: x, x: py_end}, tokenizer.vocab_size)
    rejected, plain = Engine(model, tokenizer).generate([prompt, tokenizer.encode("ab")], max_tokens=12,
                                                        temperature=0.0)
    assert rejected.tokens == [py, two, plus, three, times, x, py_end, out, out_end, end]
    assert rejected.mask == [1] * 7 + [0, 0, 1]
    assert plain.tokens == [0] * 12 and plain.mask == [1] * 12 and plain.stop_reason == "length"

    # the stream reports the same tokens with the same masks
    model = BigramStub(script, tokenizer.vocab_size)
    events = list(Engine(model, tokenizer).generate_stream([prompt], max_tokens=20, temperature=0.0))
    assert [(token, mask) for _, token, mask in events] == list(zip(result.tokens, result.mask))

    # ids the model has but the tokenizer cannot decode (a padded vocabulary) are a rejected expression
    model = BigramStub({**script, py: VOCAB - 1, VOCAB - 1: py_end}, VOCAB)
    odd = Engine(model, tokenizer).generate([prompt], max_tokens=6, temperature=0.0)[0]
    assert odd.tokens == [py, VOCAB - 1, py_end, out, out_end, end] and odd.mask == [1, 1, 1, 0, 0, 1]

    # the budget can run out in the middle of a forced output
    model = BigramStub(script, tokenizer.vocab_size)
    cut = Engine(model, tokenizer).generate([prompt], max_tokens=7, temperature=0.0)[0]
    assert cut.tokens == [py, two, plus, three, py_end, out, *five] and cut.stop_reason == "length"
    assert cut.mask == [1, 1, 1, 1, 1, 0, 0]


def test_tools_and_default_stops_come_from_the_tokenizer(tokenizer):
    s = tokenizer.encode_special
    py, py_end, out, out_end, end = (s("<|python_start|>"), s("<|python_end|>"), s("<|output_start|>"),
                                     s("<|output_end|>"), s("<|assistant_end|>"))
    seven = tokenizer.encode("7")[0]
    model = BigramStub(chain(1, py, seven, py_end, end, 2), tokenizer.vocab_size)
    plain = Engine(model).generate([[1]], max_tokens=6, temperature=0.0)[0]  # no tokenizer: plain tokens
    assert plain.tokens == [py, seven, py_end, end, 2, 0] and plain.mask == [1] * 6
    assert plain.stop_reason == "length"
    tooled = Engine(model, tokenizer).generate([[1]], max_tokens=6, temperature=0.0)[0]
    assert tooled.tokens == [py, seven, py_end, out, seven, out_end] and tooled.mask == [1, 1, 1, 0, 0, 0]
    model = BigramStub(chain(1, 2, end, 3), tokenizer.vocab_size)
    stopped = Engine(model, tokenizer).generate([[1]], max_tokens=6, temperature=0.0)[0]
    assert (stopped.tokens, stopped.stop_reason) == ([2, end], "stop")  # <|assistant_end|> stops by default


def test_stop_reasons(tokenizer):
    bos = tokenizer.bos_token_id
    model = BigramStub(chain(1, 2, 3, 4, bos), tokenizer.vocab_size, max_seq_len=10)
    engine = Engine(model, tokenizer)
    stopped, long_, ctx, full = engine.generate([[1], [5], [5] * 7, [5] * 10], max_tokens=5, temperature=0.0)
    assert (stopped.tokens, stopped.stop_reason) == ([2, 3, 4, bos], "stop")  # <|bos|> is a default stop
    assert (len(long_.tokens), long_.stop_reason) == (5, "length")
    assert (len(ctx.tokens), ctx.stop_reason) == (3, "context")  # clamped: 7 + 3 = max_seq_len
    assert (full.tokens, full.stop_reason) == ([], "context")  # the prompt already fills the context
    exact = engine.generate([[5] * 5], max_tokens=5, temperature=0.0)[0]
    assert (len(exact.tokens), exact.stop_reason) == (5, "length")  # the budget, not the context, ran out
    custom = engine.generate([[1]], max_tokens=5, temperature=0.0, stop_tokens=[3])[0]
    assert (custom.tokens, custom.stop_reason) == ([2, 3], "stop")
    none = engine.generate([[1]], max_tokens=5, temperature=0.0, stop_tokens=[])[0]
    assert none.tokens == [2, 3, 4, bos, 0] and none.stop_reason == "length"


def test_stream_matches_generate_and_stops_when_the_consumer_does(model):
    prompts = ragged_prompts(3, 4, 20, seed=6)
    kwargs = dict(num_samples=2, max_tokens=10, temperature=1.0, seed=1,
                  stop_tokens=pick_stop_tokens(model, prompts, max_tokens=10))
    engine = Engine(model)
    full = engine.generate(prompts, **kwargs)
    rebuilt = {row: [] for row in range(6)}
    for row, token, mask in engine.generate_stream(prompts, **kwargs):
        assert mask == 1
        rebuilt[row].append(token)
    assert [rebuilt[row] for row in range(6)] == [g.tokens for g in full]

    calls = []
    original = model.forward_hidden
    model.forward_hidden = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        stream = engine.generate_stream(prompts, **{**kwargs, "max_tokens": 50, "stop_tokens": []})
        assert not calls  # lazy: nothing runs before the first event is asked for
        for n, _ in enumerate(stream):
            if n == 13:  # 6 rows per step: the 14th event belongs to step 2 (0-based)
                break
        stream.close()
        assert len(calls) == 3  # prefill + 2 decode steps, and nothing after the consumer stopped
    finally:
        del model.forward_hidden


def test_bad_input_is_rejected_with_a_clear_message(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="non-empty list"):
        engine.generate([])
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([[1, 2], []])
    with pytest.raises(ValueError, match=f"prompt 0 has {CONTEXT + 1} tokens.*{CONTEXT}"):
        engine.generate([[1] * (CONTEXT + 1)])
    with pytest.raises(ValueError, match="prompt 0 token 1"):
        engine.generate([[1, VOCAB]])
    with pytest.raises(ValueError, match="prompt 0 token 0"):
        engine.generate([[-1]])
    for bad, message in ((dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan), "temperature"),
                         (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                         (dict(min_p=-0.1), "min_p"), (dict(num_samples=0), "num_samples"),
                         (dict(max_tokens=0), "max_tokens"), (dict(stop_tokens=[VOCAB]), "stop token"),
                         (dict(seed=1.5), "seed"), (dict(seed=[1, 2]), "one integer per prompt")):
        with pytest.raises(ValueError, match=message):
            engine.generate([[1, 2]], **bad)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate_stream([[1]], top_p=2.0)  # checked when called, not on first iteration
