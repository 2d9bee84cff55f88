"""Sampling values at their limits and a stalled client (issue 17, items 6 and 9): tiny temperatures are greedy,
the most likely token survives any top_p, booleans are not integers in the API, a half-sent request body is
answered 408 and dropped within a bound, and `chat_web --port 0` prints the port it really listens on."""

import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from helpers_models import save_tiny_checkpoint, train_small_tokenizer
from reasoning.chat_server import ServerThread, create_app
from reasoning.engine import GREEDY_BELOW_TEMPERATURE, Engine, sample_from_logits
from test_chat_api import assert_openai_error, chat_model, one_torch_thread, small_tokenizer  # noqa: F401 (fixture)

TINY_TEMPERATURES = [1e-39, 1e-30, 1e-8, GREEDY_BELOW_TEMPERATURE / 2]
TINY_TOP_P = [1e-46, 1e-45, 1e-300, 1e-9]  # the first ones round to 0 in float32


# ----------------------------------------------------------------------------------------------- the sampler

@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_tiny_temperature_is_greedy_in_the_sampler(temperature):
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)) * 5
    uniforms = torch.rand(64, generator=torch.Generator().manual_seed(1))
    tokens, logprobs = sample_from_logits(logits, uniforms, temperature=temperature, top_p=0.9)
    greedy, greedy_logprobs = sample_from_logits(logits, uniforms, temperature=0.0)
    assert torch.equal(tokens, greedy) and torch.equal(logprobs, greedy_logprobs)
    assert torch.isfinite(logprobs).all()


@pytest.mark.parametrize("top_p", TINY_TOP_P)
def test_most_likely_token_survives_any_top_p(top_p):
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(2))
    uniforms = torch.rand(64, generator=torch.Generator().manual_seed(3))
    for top_k, min_p in [(None, None), (50, None), (None, 0.5)]:
        tokens, logprobs = sample_from_logits(logits, uniforms, temperature=1.0, top_p=top_p, top_k=top_k,
                                              min_p=min_p)
        assert torch.equal(tokens, logits.argmax(dim=-1)), (top_p, top_k, min_p)
        assert torch.isfinite(logprobs).all()


def test_engine_tiny_temperature_equals_greedy():
    tokenizer = small_tokenizer()
    engine = Engine(chat_model(tokenizer), tokenizer)
    prompts = [tokenizer.encode("Problem 3: what is"), tokenizer.encode("The quick brown")]
    greedy = engine.generate(prompts, num_samples=2, max_tokens=12, temperature=0.0, seed=1)
    tiny = engine.generate(prompts, num_samples=2, max_tokens=12, temperature=1e-39, seed=1)
    assert [g.tokens for g in tiny] == [g.tokens for g in greedy]
    tiny_p = engine.generate(prompts, num_samples=2, max_tokens=12, temperature=1.0, top_p=1e-46, seed=1)
    assert [g.tokens for g in tiny_p] == [g.tokens for g in greedy]


# ----------------------------------------------------------------------------------------------- the API

@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    app = create_app(chat_model(tokenizer), tokenizer, workers=1, max_queue=8, default_max_tokens=16,
                     body_timeout=1.0)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


MESSAGES = [{"role": "user", "content": "question 3: what is 3 times 7?"}]


def _reply(http, **fields):
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 16, **fields})
    assert response.status_code == 200, response.text[:300]
    message = response.json()["choices"][0]["message"]
    return message.get("reasoning_content"), message["content"]


@pytest.mark.parametrize("field, value", [("n", True), ("n", False), ("max_tokens", True), ("seed", False),
                                          ("seed", True), ("max_completion_tokens", True), ("top_k", True),
                                          ("temperature", True), ("top_p", True), ("min_p", False)])
def test_booleans_are_not_numbers(http, field, value):
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES, field: value})
    assert assert_openai_error(response, 400)["param"] == field


def test_api_tiny_temperature_and_top_p_are_greedy(http):
    greedy = _reply(http, temperature=0)
    assert greedy[1] or greedy[0]  # a non-empty reply, or the comparison below would pass vacuously
    for temperature in TINY_TEMPERATURES:
        assert _reply(http, temperature=temperature, seed=5) == greedy, temperature
    for top_p in TINY_TOP_P:
        assert _reply(http, temperature=1.0, top_p=top_p, seed=5) == greedy, top_p


# ----------------------------------------------------------------------------------------------- a stalled client

def _read_until_closed(sock, limit_s):
    sock.settimeout(limit_s)
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_half_sent_body_gets_408_and_the_connection_is_dropped(server, http):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        body = b'{"messages": [{"role": "user", "content": "hi"}]}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (len(body) + 100) + body)  # 100 bytes never come
        data = _read_until_closed(sock, 20)  # the server closes: recv returns b"" (a timeout here fails the test)
    elapsed = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"request_timeout" in data
    assert 0.9 <= elapsed < 15, elapsed  # the 1 s bound, generously above on a loaded box
    assert http.get("/health").status_code == 200  # the server is fine
    assert http.get("/stats").json()["requests_failed"] == 0


def test_slow_but_complete_body_within_the_bound_is_served(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.3)
        sock.sendall(body[10:])
        data = _read_until_closed(sock, 30)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


# ----------------------------------------------------------------------------------------------- the banner

def test_chat_web_port_0_prints_the_bound_port(tmp_path):
    tokenizer_dir = str(tmp_path / "tokenizer")
    train_small_tokenizer(tokenizer_dir)
    ckpt = save_tiny_checkpoint(str(tmp_path / "base"), tokenizer_dir, stage="sft", depth=1, n_embd=32,
                                max_seq_len=128)
    env = dict(os.environ, REASONING_BASE_DIR=str(tmp_path / "base"), PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--init-from", ckpt, "--port", "0",
                                "--device", "cpu", "--workers", "1"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline, banner = time.monotonic() + 120, None
        while banner is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            banner = re.search(r"API http://127\.0\.0\.1:(\d+)/v1", line)
        assert banner is not None, "no banner"
        port = int(banner.group(1))
        assert port != 0
        for _ in range(200):  # the banner comes just before uvicorn starts accepting
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"nothing answers on the printed port {port}")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_chat_web_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--port", str(port)],
                                env=dict(os.environ, REASONING_BASE_DIR=str(tmp_path)), capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: --host 127.0.0.1 --port") and "in use" in result.stderr
