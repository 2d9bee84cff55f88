"""reasoning.chat_server under load: 32 concurrent streaming clients all complete; with a small queue the excess
gets 429 + Retry-After at once (not after waiting); clients that vanish mid-stream free their workers.

Models here never emit a stop token (test_chat_api.chat_model(endless=True)), so every reply is exactly
max_tokens long and the timings are predictable.
"""

import asyncio
import json
import time

import httpx
import pytest

from reasoning.chat_server import ServerThread, create_app
from test_chat_api import chat_model, one_torch_thread, small_tokenizer  # noqa: F401 (fixture)

PROMPT = [{"role": "user", "content": "count for me"}]


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


@pytest.fixture(scope="module")
def endless_model(tokenizer):
    return chat_model(tokenizer, max_seq_len=1024, endless=True)


def stats(url):
    return httpx.get(url + "/stats", timeout=10).json()


def wait_until_idle(url, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        current = stats(url)
        if current["busy_workers"] == 0 and current["queue_depth"] == 0:
            return current
        if time.monotonic() > deadline:
            pytest.fail(f"workers still busy {timeout} s after the clients finished or left: {current}")
        time.sleep(0.05)


async def stream_completion(client, max_tokens, read_events=None):
    """POST a streaming request; read it whole (or only `read_events` events, then hang up).
    Returns (status, content events, finish_reason, usage, seconds until the status line)."""
    started = time.monotonic()
    body = {"messages": PROMPT, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 1.0, "seed": 0}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        first_byte = time.monotonic() - started
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response, None, None, first_byte
        events, finish, usage, done = 0, None, None, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                events += 1
                finish = chunk["choices"][0]["finish_reason"] or finish
            else:
                usage = chunk["usage"]
            if read_events is not None and events >= read_events:
                return 200, events, None, None, first_byte  # leaving the block closes the connection mid-stream
        assert done, "stream ended without [DONE]"
        return 200, events, finish, usage, first_byte


def run_clients(url, coroutines_of_client):
    async def main():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*coroutines_of_client(client))

    return asyncio.run(main())


def test_32_concurrent_streaming_clients_all_complete(endless_model, tokenizer, capsys):
    app = create_app(endless_model, tokenizer, workers=4, max_queue=64)
    with ServerThread(app) as server:
        before = stats(server.url)
        started = time.monotonic()
        results = run_clients(server.url, lambda client: [stream_completion(client, 24) for _ in range(32)])
        seconds = time.monotonic() - started
        after = wait_until_idle(server.url)
    assert [status for status, *_ in results] == [200] * 32
    assert all(finish == "length" and usage["completion_tokens"] == 24 for _, _, finish, usage, _ in results)
    assert after["requests_served"] - before["requests_served"] == 32
    assert after["requests_rejected"] == after["requests_failed"] == after["requests_cancelled"] == 0
    assert after["tokens_generated"] - before["tokens_generated"] == 32 * 24
    with capsys.disabled():
        print(f"\nchat load: 32 concurrent streams x 24 tokens, 4 workers: {seconds:.2f} s, "
              f"{32 * 24 / seconds:.0f} tok/s aggregate, 0 errors")


def test_full_queue_answers_429_promptly(endless_model, tokenizer, capsys):
    async def timed(client):
        started = time.monotonic()
        result = await stream_completion(client, 200)
        return result, time.monotonic() - started  # seconds until the reply was read whole (or refused)

    app = create_app(endless_model, tokenizer, workers=1, max_queue=4)
    with ServerThread(app) as server:
        timed_results = run_clients(server.url, lambda client: [timed(client) for _ in range(12)])
        after = wait_until_idle(server.url)
    accepted = [(r, total) for r, total in timed_results if r[0] == 200]
    rejected = [(r, total) for r, total in timed_results if r[0] != 200]
    assert len(accepted) == 5, [r[0] for r, _ in timed_results]  # one generating + four waiting
    assert len(rejected) == 7 and all(r[0] == 429 for r, _ in rejected)
    for (_, response, _, _, _), _ in rejected:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
    # "promptly": every refusal was complete before even the first accepted reply (200 tokens) had been
    # generated; a server that held the excess until a worker or queue slot freed up would refuse later than that.
    # (Time to the status line is no measure for accepted requests: a streaming 200 may be sent while queued.)
    first_full_reply = min(total for _, total in accepted)
    slowest_refusal = max(total for _, total in rejected)
    assert slowest_refusal < first_full_reply, (slowest_refusal, first_full_reply)
    assert all(finish == "length" and usage["completion_tokens"] == 200
               for (_, _, finish, usage, _), _ in accepted)
    assert after["requests_rejected"] == 7 and after["requests_served"] == 5
    with capsys.disabled():
        print(f"\nchat queue: 12 at once, 1 worker + queue 4: 5 served, 7 x 429 (slowest refusal "
              f"{slowest_refusal * 1000:.0f} ms; the first full 200-token reply took {first_full_reply:.2f} s)")


def test_clients_disconnecting_mid_stream_free_their_workers(endless_model, tokenizer, capsys):
    app = create_app(endless_model, tokenizer, workers=4, max_queue=16)
    max_tokens = 1000
    with ServerThread(app) as server:
        before = stats(server.url)
        results = run_clients(server.url, lambda client: [stream_completion(client, max_tokens, read_events=3)
                                                          for _ in range(10)])
        assert [r[0] for r in results] == [200] * 10
        after = wait_until_idle(server.url)
        # the server is still fine afterwards
        reply = httpx.post(server.url + "/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 5},
                           timeout=30).json()
        assert reply["usage"]["completion_tokens"] == 5
    assert after["requests_cancelled"] - before["requests_cancelled"] == 10
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert generated < 10 * max_tokens / 4  # generation stopped soon after each hang-up, not at max_tokens
    with capsys.disabled():
        print(f"\nchat disconnect: 10 clients left after 3 events; {generated} tokens generated in all "
              f"(vs {10 * max_tokens} if run to the end); busy workers 0")
