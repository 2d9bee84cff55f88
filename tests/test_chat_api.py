"""reasoning.chat_server over real HTTP: the official `openai` client must complete plain and streamed requests
whose text equals the engine's own greedy generation; stop strings, history and auth behave as documented; and
hundreds of malformed or hostile requests each get a 4xx with an OpenAI-shaped JSON error, never a 5xx.

A live uvicorn on 127.0.0.1 (ServerThread) serves a tiny random GPT (depth 1, width 32) with a small BPE trained
here. The helpers at the top are shared with test_chat_load / test_chat_browser / test_chat_cli.
"""

import json
import time
import random

import httpx
import openai
import pytest
import torch

from helpers_models import tiny_model
from reasoning.chat import ReplyDecoder, RequestError, assistant_parts, conversation_from_messages
from reasoning.chat_server import ServerThread, create_app
from reasoning.engine import Engine
from reasoning.tokenizer import train_tokenizer

CORPUS = [f"Problem {i}: what is {i} + {2 * i}? Think step by step. The answer is \\boxed{{{3 * i}}}. "
          "The quick brown fox jumps over the lazy dog; thinking about numbers, sums and products." for i in range(400)]
STOP_NAMES = ("<|assistant_end|>", "<|bos|>")


# ----------------------------------------------------------------------------------------------- shared helpers

def small_tokenizer():
    return train_tokenizer(CORPUS, 320)


def chat_model(tokenizer, max_seq_len=256, seed=0, endless=False):
    """A random depth-1 GPT for `tokenizer`. endless=True: stop tokens get -inf logits, so every reply runs to
    its max_tokens (fixed-length generations for load tests)."""
    model = tiny_model(tokenizer.vocab_size, depth=1, n_embd=32, n_head=2, max_seq_len=max_seq_len, seed=seed)
    model.eval()
    if endless:
        banned = [tokenizer.encode_special(name) for name in STOP_NAMES]
        plain_logits = model.compute_logits

        def compute_logits(hidden):
            logits = plain_logits(hidden)
            logits[..., banned] = float("-inf")
            return logits

        model.compute_logits = compute_logits
    return model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # tiny matmuls on a shared 2-core box: more intra-op threads only add contention (~20x slower here)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_segments(model, tokenizer, prompt_ids, **sampling):
    """([(channel, text), ...], finish_reason, n_tokens) straight from Engine.generate, each think / answer span
    decoded whole: the independent reference for what the server and the CLI must show."""
    generation = Engine(model, tokenizer).generate([prompt_ids], **sampling)[0]
    think_start, think_end = tokenizer.encode_special("<|think_start|>"), tokenizer.encode_special("<|think_end|>")
    ends = [tokenizer.encode_special(name) for name in STOP_NAMES]
    spans, channel, current = [], "content", []
    for token in generation.tokens + [ends[0]]:
        if token in (think_start, think_end) or token in ends:
            spans.append((channel, tokenizer.decode(current)))
            current = []
            channel = "reasoning" if token == think_start else "content"
            if token in ends:
                break
        else:
            current.append(token)
    segments = []
    for channel, text in spans:  # drop empty spans, merge neighbours on the same channel
        if text and segments and segments[-1][0] == channel:
            segments[-1] = (channel, segments[-1][1] + text)
        elif text:
            segments.append((channel, text))
    finish = "stop" if generation.stop_reason == "stop" else "length"
    return segments, finish, len(generation.tokens)


def reference_reply(model, tokenizer, prompt_ids, **sampling):
    """(reasoning, content, finish_reason, n_tokens) of reference_segments."""
    segments, finish, n_tokens = reference_segments(model, tokenizer, prompt_ids, **sampling)
    text = {"reasoning": "", "content": ""}
    for channel, part in segments:
        text[channel] += part
    return text["reasoning"], text["content"], finish, n_tokens


def assert_openai_error(response, status=None):
    """A 4xx whose body is {"error": {"message", "type", "param", "code"}} with a readable message."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and len(body["error"]["message"]) > 5
    return body["error"]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return chat_model(tokenizer)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    app = create_app(model, tokenizer, workers=2, max_queue=64, default_max_tokens=32, model_name="tiny")
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def user(text):
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------------------------- contract

def find_prompt(model, tokenizer, want, max_tokens=40):
    """A prompt whose greedy reply satisfies want(reasoning, content): tests should not pass vacuously."""
    for i in range(60):
        messages = user(f"question {i}: what is {i} times 7?")
        ids = tokenizer.render_for_completion({"messages": messages})
        reference = reference_reply(model, tokenizer, ids, max_tokens=max_tokens, temperature=0.0, seed=0)
        if want(*reference[:2]):
            return messages, ids, reference
    pytest.fail("no prompt among 60 gives the reply this test needs")


def test_openai_client_non_streamed_equals_engine(client, model, tokenizer):
    messages, ids, (reasoning, content, finish, n_tokens) = find_prompt(model, tokenizer,
                                                                        lambda r, c: len(c) >= 8)
    completion = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                seed=0)
    assert completion.object == "chat.completion" and completion.model == "tiny"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == content
    assert (getattr(choice.message, "reasoning_content", None) or "") == reasoning
    assert choice.finish_reason == finish
    assert completion.usage.prompt_tokens == len(ids)
    assert completion.usage.completion_tokens == n_tokens
    assert completion.usage.total_tokens == len(ids) + n_tokens


def test_openai_client_streamed_chunks(client, model, tokenizer):
    messages, ids, (reasoning, content, finish, n_tokens) = find_prompt(model, tokenizer,
                                                                        lambda r, c: len(c) >= 8)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0, seed=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)  # the client parses every chunk; a malformed one raises here
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert (text, thought) == (content, reasoning)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # streamed, not one lump
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_sampled_reply_is_reproducible_with_seed_and_matches_engine(client, model, tokenizer):
    messages = user("tell me a story")
    ids = tokenizer.render_for_completion({"messages": messages})
    reasoning, content, _, _ = reference_reply(model, tokenizer, ids, max_tokens=30, temperature=0.9, top_p=0.9,
                                               seed=1234)
    replies = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0.9,
                                              top_p=0.9, seed=1234).choices[0].message for _ in range(2)]
    assert [r.content for r in replies] == [content, content]
    other = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0.9,
                                           top_p=0.9, seed=99).choices[0].message
    assert (other.content, getattr(other, "reasoning_content", None)) != (content, reasoning or None)


def test_stop_string_cuts_the_answer_streamed_and_not(client, model, tokenizer):
    messages, _, (_, content, _, _) = find_prompt(model, tokenizer, lambda r, c: len(c.strip()) >= 12)
    stop = content.strip()[5:8]  # occurs in the answer; the reply must end right before its first occurrence
    expected = content[:content.index(stop)]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                           seed=0, stop=[stop, "never-happens-xyz"])
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                 seed=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_history_with_reasoning_is_rendered_as_the_model_wrote_it(client, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 plus 2"},
                {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "text", "text": "3+3?"}]}]
    expected = tokenizer.render_for_completion({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [{"type": "think", "text": "2 plus 2"}, {"type": "text", "text": "It is 4."}]},
        {"role": "user", "content": "and\n3+3?"}]})
    completion = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert completion.usage.prompt_tokens == len(expected)
    assert conversation_from_messages(messages)["messages"][2]["content"][0] == {"type": "think", "text": "2 plus 2"}


def test_assistant_parts_turn_tool_spans_back_into_parts():
    text = "So <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> gives 84."
    assert assistant_parts(text, "hmm") == [
        {"type": "think", "text": "hmm"}, {"type": "text", "text": "So "}, {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"}, {"type": "text", "text": " gives 84."}]
    assert assistant_parts("plain") == [{"type": "text", "text": "plain"}]


def test_decoder_channels_utf8_and_stop_strings_across_tokens(tokenizer):
    think_start, think_end = tokenizer.encode_special("<|think_start|>"), tokenizer.encode_special("<|think_end|>")
    end = tokenizer.encode_special("<|assistant_end|>")
    answer = "héllo wörld 🙂 done"
    # one byte per token: multi-byte characters arrive split, and must never be emitted half-done
    byte_tokens = [tokenizer.mergeable_ranks[bytes([b])] for b in answer.encode("utf-8")]
    decoder = ReplyDecoder(tokenizer)
    deltas = []
    for token in [think_start, *tokenizer.encode("so"), think_end, *byte_tokens, end, *tokenizer.encode("after")]:
        deltas += decoder.feed(token)
    assert all("\ufffd" not in text for _, text in deltas)
    assert decoder.reasoning == "so" and decoder.content == answer and decoder.finish_reason == "stop"
    channels = [channel for channel, _ in deltas]
    assert channels == sorted(channels, reverse=True)  # all reasoning deltas, then all content deltas

    decoder = ReplyDecoder(tokenizer, stop=["wör", "zzz"])
    shown = []
    for token in byte_tokens:
        shown += decoder.feed(token)
        # held-back text: nothing shown so far may end inside a possible stop string
        assert not "".join(t for _, t in shown).endswith(("w", "wö"))
        if decoder.finish_reason:
            break
    assert "".join(t for _, t in shown) == "héllo " and decoder.finish_reason == "stop"


def test_models_health_stats(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == 256
    assert http.get("/health").json() == {"status": "ok"}
    stats = http.get("/stats").json()
    for key in ("queue_depth", "busy_workers", "requests_served", "requests_rejected", "tokens_generated",
                "tokens_per_second", "workers"):
        assert key in stats
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere


def test_reply_length_fits_the_room_the_context_leaves(tokenizer):
    """Unset max_tokens: the smaller of the server's default and what the context leaves after the prompt (vLLM's
    rule); an explicit one that does not fit is refused with 400 naming the field (as vLLM and OpenAI do)."""
    context = 64
    app = create_app(chat_model(tokenizer, max_seq_len=context, endless=True), tokenizer, default_max_tokens=512)
    messages = user("what is 3 plus 4?")
    room = context - len(tokenizer.render_for_completion({"messages": messages}))
    with ServerThread(app) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        card = http.get("/v1/models").json()["data"][0]
        assert (card["max_model_len"], card["default_max_tokens"]) == (context, 512)
        for stream in (False, True):
            body = {"messages": messages, "stream": stream, "stream_options": {"include_usage": True}} if stream \
                else {"messages": messages}
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text[:300]
            if stream:
                events = [json.loads(line[6:]) for line in response.text.splitlines()
                          if line.startswith("data: {")]
                usage, finish = events[-1]["usage"], events[-2]["choices"][0]["finish_reason"]
            else:
                usage, finish = response.json()["usage"], response.json()["choices"][0]["finish_reason"]
            assert usage["completion_tokens"] == room and usage["total_tokens"] == context and finish == "length"
            exact = http.post("/v1/chat/completions", json={**body, "max_tokens": room})
            assert exact.status_code == 200, exact.text[:300]
            for name in ("max_tokens", "max_completion_tokens"):
                error = assert_openai_error(http.post("/v1/chat/completions", json={**body, name: room + 1}), 400)
                assert (error["param"], error["code"]) == (name, "context_length_exceeded"), error
                assert f"at most {room}" in error["message"] and error["message"].startswith(f"{name}: "), error
            beyond_context = assert_openai_error(http.post("/v1/chat/completions",
                                                           json={**body, "max_tokens": context + 1}), 400)
            assert beyond_context["message"].startswith(f"max_tokens: expected an integer in [1, {context}]")
        assert http.get("/stats").json()["requests_served"] == 4


def test_api_key_is_required_when_set(model, tokenizer):
    app = create_app(model, tokenizer, api_key="s3cret", default_max_tokens=2)
    with ServerThread(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        body = {"messages": user("hi")}
        assert_openai_error(http.post("/v1/chat/completions", json=body), 401)
        assert_openai_error(http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}),
                            401)
        assert_openai_error(http.get("/stats"), 401)
        assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
        good = openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="x", messages=user("hi")).choices[0].finish_reason
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_create_app_rejects_bad_arguments(model, tokenizer):
    for kwargs in ({"workers": 0}, {"max_queue": -1}, {"max_body_bytes": 0}, {"api_key": ""}):
        with pytest.raises(ValueError):
            create_app(model, tokenizer, **kwargs)


# ----------------------------------------------------------------------------------------------- fuzz

def malformed_requests():
    """(description, method, path, headers, body bytes) that must each get a 4xx JSON error."""
    valid = {"model": "tiny", "messages": user("hi"), "max_tokens": 4}
    cases = []

    def add(name, body, headers=None, method="POST", path="/v1/chat/completions", raw=False):
        data = body if raw else json.dumps(body).encode()  # ASCII escapes: "\ud800" reaches the server as such
        cases.append((name, method, path, {"content-type": "application/json", **(headers or {})}, data))

    # every field against values of the wrong type or out of range, in plain and streaming requests
    bad_values = {
        "temperature": [-0.01, 2.01, "0.5", True, [], {}, 1e300, 10 ** 400],
        "top_p": [0, -0.5, 1.0001, "1", False, [1], -(10 ** 400)],
        "max_tokens": [0, -1, 1.5, "8", 10 ** 30, 257, True, [4]],
        "max_completion_tokens": [0, 3.0, "x", 10 ** 12],
        "seed": [1.5, "7", 2 ** 70, -(2 ** 64), [], True],
        "n": [2, 0, -1, "1", 1.5],
        "stop": ["", [""], ["a", "b", "c", "d", "e"], [1], {"a": 1}, 5, ["ok", None]],
        "stream": ["yes", 1, [], {}],
        "stream_options": ["x", [], {"include_usage": "yes"}],
        "model": [5, [], {}],
        "messages": [None, [], {}, "hi", 5, [None], [[]], ["hi"]],
        "tools": [[{"type": "function", "function": {"name": "f"}}]],
        "logprobs": [True],
        "response_format": [{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}, "text"],
        "tool_choice": ["required", {"type": "function", "function": {"name": "f"}}],
        "top_k": [-5, 1.5, "3"],
        "min_p": [-0.1, 1.5, "0.1"],
    }
    for stream in (False, True):
        for field_name, values in bad_values.items():
            for value in values:
                add(f"{field_name}={value!r:.30} stream={stream}", {**valid, "stream": stream, field_name: value}
                    if field_name != "stream" else {**valid, field_name: value})
    # messages that break the chat format
    bad_messages = [
        [{"role": "wizard", "content": "hi"}], [{"role": "tool", "content": "hi"}], [{"content": "hi"}],
        [{"role": "user"}], [{"role": "user", "content": None}], [{"role": "user", "content": 5}],
        [{"role": "user", "content": {"text": "hi"}}], [{"role": "user", "content": []}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "user", "content": ""}],
        [{"role": "assistant", "content": "hi"}], [{"role": "system", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "c"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": 3},
         {"role": "user", "content": "c"}],
        [{"role": "user", "content": "bad \ud800 surrogate"}], [{"role": None, "content": "x"}],
        [{"role": ["user"], "content": "x"}], [{"role": "user", "content": "word " * 2000}],  # beyond the context
        [{"role": "user", "content": "x" * 900_000}],
    ]
    for i, messages in enumerate(bad_messages):
        add(f"messages case {i}", {**valid, "messages": messages})
    add("no messages field", {"model": "tiny", "max_tokens": 4})
    add("empty object", {})
    # broken bodies
    for i, raw in enumerate([b"", b"{", b"null", b"[]", b"42", b'"str"', b"{'single': 1}", b'{"messages": [}',
                             b'{"messages": NaN}', b'{"temperature": Infinity, "messages": []}',
                             b"\xff\xfe\x00\x00", b"\xc3\x28", "{\"messages\": \"\u2028\"}".encode(),
                             b"[" * 100_000 + b"]" * 100_000, b'{"max_tokens": ' + b"9" * 5000 + b"}",
                             b'{"a": 1e999999, "messages": []}', b"\x00" * 1000, b"\xef\xbb\xbf{}",
                             b"x" * (1 << 20), b" " * ((1 << 20) + 1), json.dumps(
                                 {**valid, "pad": "y" * (1 << 20)}).encode()]):
        add(f"raw body {i}", raw, raw=True)
    rng = random.Random(0)
    for i in range(40):  # random junk bytes and random unicode
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        add(f"junk bytes {i}", junk, raw=True)
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0xd7ff),
                                       rng.randrange(0xe000, 0x10ffff)])) for _ in range(rng.randrange(1, 60)))
        add(f"junk unicode {i}", text.encode("utf-8", "surrogatepass"), raw=True)
    # wrong content types, methods, paths
    body = json.dumps(valid).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/xml", "image/png"):
        add(f"content-type {content_type}", body, headers={"content-type": content_type}, raw=True)
    add("GET on the completions endpoint", b"", method="GET", raw=True)
    add("PUT on the completions endpoint", body, method="PUT", raw=True)
    add("unknown path", body, path="/v1/completions", raw=True)
    add("unknown path 2", body, path="/v1/chat/completions/../../etc/passwd", raw=True)
    add("DELETE models", b"", method="DELETE", path="/v1/models", raw=True)
    return cases


def hostile_but_valid_requests():
    """Odd yet legal requests: each must succeed (200), not be refused and not crash the server."""
    junk = "\u0000\u202e\ufeff🙂 <|assistant_end|><|user_start|> \\ud800 \"'<script>alert(1)</script>"
    return [
        {"messages": user(junk), "max_tokens": 3},
        {"messages": user("hi"), "max_tokens": 1, "temperature": 0},
        {"messages": user("hi"), "max_tokens": 3, "temperature": 2, "top_p": 1e-9, "seed": -(2 ** 63)},
        {"messages": user("hi"), "max_tokens": 3, "stop": ["<|assistant_end|>", "\n"], "n": 1, "logprobs": False},
        {"messages": [{"role": "developer", "content": "x"}] + user("y"), "max_tokens": 2, "unknown_field": [1]},
        {"messages": user("hi"), "max_completion_tokens": 200, "stream": False, "user": "me", "top_k": -1},
        {"messages": user("hi"), "max_tokens": 2, "response_format": {"type": "text"}, "tool_choice": "none"},
    ]


def test_fuzz_malformed_requests_get_4xx_json_errors_and_never_5xx(http, capsys):
    cases = malformed_requests()
    assert len(cases) >= 200
    statuses = {}
    for name, method, path, headers, body in cases:
        response = http.request(method, path, headers=headers, content=body)
        assert response.status_code < 500, (name, response.status_code, response.text[:300])
        error = assert_openai_error(response)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert "Traceback" not in error["message"], name
    for body in hostile_but_valid_requests():
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, (body, response.text[:300])
        assert response.json()["choices"][0]["message"]["role"] == "assistant"
    # still alive and serving
    assert http.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 3}).status_code == 200
    assert http.get("/stats").json()["requests_failed"] == 0
    with capsys.disabled():
        print(f"\nchat fuzz: {len(cases)} malformed requests -> status counts {dict(sorted(statuses.items()))}, "
              f"{len(hostile_but_valid_requests())} hostile-but-valid -> 200, 0 5xx")


def test_specific_errors_name_the_field(http):
    def error_of(body):
        return assert_openai_error(http.post("/v1/chat/completions", json=body))

    assert error_of({"messages": user("hi"), "temperature": 3})["param"] == "temperature"
    assert error_of({"messages": user("hi"), "top_p": 0})["param"] == "top_p"
    assert error_of({"messages": user("hi"), "max_tokens": 0})["param"] == "max_tokens"
    assert error_of({"messages": [{"role": "wizard", "content": "x"}]})["param"] == "messages[0].role"
    assert error_of({"messages": user("word " * 2000)})["code"] == "context_length_exceeded"
    assert error_of({"messages": user("a") + [{"role": "assistant", "content": "b"}]})["param"] == "messages[1].role"
    too_big = http.post("/v1/chat/completions", content=b"{" + b" " * (1 << 20) + b"}",
                        headers={"content-type": "application/json"})
    assert assert_openai_error(too_big, 413)["code"] == "request_too_large"
    wrong_type = http.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"})
    assert_openai_error(wrong_type, 415)
    with pytest.raises(RequestError):  # the validator is a ValueError for library callers too
        conversation_from_messages([])


def test_a_failing_generation_is_a_json_500_and_frees_the_worker(tokenizer):
    model = chat_model(tokenizer)

    def broken(hidden):
        raise RuntimeError("simulated device failure")

    model.compute_logits = broken
    with ServerThread(create_app(model, tokenizer, workers=1)) as running, \
            httpx.Client(base_url=running.url, timeout=30) as http:
        plain = http.post("/v1/chat/completions", json={"messages": user("hi")})
        assert plain.status_code == 500
        assert plain.json()["error"]["type"] == "server_error" and "simulated" in plain.json()["error"]["message"]
        streamed = http.post("/v1/chat/completions", json={"messages": user("hi"), "stream": True})
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        # the worker is released just after the error reaches the client: poll briefly (a loaded box lags)
        deadline = time.monotonic() + 10
        while (stats := http.get("/stats").json())["busy_workers"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats["requests_failed"] == 2 and stats["busy_workers"] == 0
