"""Chatting with a trained model over HTTP: an OpenAI-compatible server with a worker pool and a bounded queue.

Why a server of our own rather than vLLM: the model is our GPT with our chat format (think spans, calculator
tool calls), and the engine is reasoning.engine. The HTTP surface follows OpenAI's Chat Completions API so the
official `openai` client, curl scripts and the bundled single-file UI (ui.html) all work unchanged:

- `POST /v1/chat/completions`: plain JSON or SSE streaming (`chat.completion.chunk`, then `data: [DONE]`). The think
  span is returned apart from the answer as `reasoning_content` (the vLLM / DeepSeek convention), so clients that
  do not know the field simply see the answer. Stop strings apply to the answer, not to the thinking.
- `GET /v1/models`, `GET /health`, `GET /stats`, `GET /` (the UI).

Serving model: a pool of workers, each an Engine (one per device on GPU; on CPU several may share one model's
weights). A request waits in a bounded queue for a free worker and is refused with 429 + Retry-After when the
queue is full, instead of piling up latency. Generation runs on a worker thread so the event loop keeps
answering; a client that disconnects stops its generation at the next token and frees the worker.

Every client mistake becomes a 4xx with OpenAI's error shape {"error": {message, type, param, code}}. Checking a
request and decoding a reply are shared with the terminal chat and live in reasoning/chat.py.
"""

import asyncio
import collections
import hmac
import json
import math
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from reasoning.chat import (DEFAULT_MAX_TOKENS, REASONING, ChatRequest, ReplyDecoder, RequestError, is_int,
                            parse_chat_request, stream_reply)
from reasoning.engine import Engine

UI_PATH = Path(__file__).with_name("ui.html")
DEFAULT_MAX_BODY_BYTES = 1 << 20
# A request body must arrive within this many seconds of the headers: a client that sends half a body and stalls
# would otherwise hold its connection (and a slot of the server's) forever. 1 MB in 30 s is a 35 KB/s line.
DEFAULT_BODY_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------------------------
# workers, queue, statistics

class QueueFull(Exception):
    pass


class WorkerPool:
    """Engines lent to one request at a time; up to `max_queue` requests wait for one, first come first served.

    Used from the event loop only (no locks); generations themselves run on `executor`, one thread per engine.
    """

    def __init__(self, engines: list[Engine], max_queue: int):
        self.engines = list(engines)
        self.idle = list(self.engines)
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="chat-worker")

    @property
    def busy(self) -> int:
        return len(self.engines) - len(self.idle)

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self.waiting)

    def reserve(self) -> Engine | asyncio.Future:
        """An idle engine now, or a future of one; QueueFull when the queue is full."""
        if self.idle:
            return self.idle.pop()
        if self.queued >= self.max_queue:
            raise QueueFull
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return future

    def release(self, engine: Engine):
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(engine)
                return
        self.idle.append(engine)

    def abandon(self, future: asyncio.Future):
        """A waiting request gave up; an engine it was handed in the meantime goes to the next one."""
        if future.done() and not future.cancelled():
            self.release(future.result())
        else:
            future.cancel()
        if future in self.waiting:
            self.waiting.remove(future)


class ServerStats:
    """Counters for /stats. Updated from worker threads, hence the lock."""

    OUTCOMES = ("served", "cancelled", "rejected", "invalid", "failed")

    def __init__(self, window_seconds: float = 10.0):
        self.started = time.monotonic()
        self.window = window_seconds
        self.requests = dict.fromkeys(self.OUTCOMES, 0)
        self.tokens_generated = 0
        self._recent_tokens: collections.deque[tuple[float, int]] = collections.deque()
        self._durations: collections.deque[float] = collections.deque(maxlen=32)
        self._lock = threading.Lock()

    def count(self, outcome: str, duration: float | None = None):
        with self._lock:
            self.requests[outcome] += 1
            if duration is not None:
                self._durations.append(duration)

    def add_tokens(self, n: int):
        if n <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self.tokens_generated += n
            self._recent_tokens.append((now, n))
            self._prune(now)

    def _prune(self, now: float):
        while self._recent_tokens and self._recent_tokens[0][0] < now - self.window:
            self._recent_tokens.popleft()

    def tokens_per_second(self) -> float:
        """All workers together, over the last `window` seconds (or since start, if sooner)."""
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            recent = sum(n for _, n in self._recent_tokens)
        return recent / max(1e-9, min(self.window, now - self.started))

    def typical_duration(self) -> float:
        with self._lock:
            durations = sorted(self._durations)
        return durations[len(durations) // 2] if durations else 1.0


class _Job:
    """One generation on a worker thread, handing its events to the event loop through an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, event):  # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancelled.set()

    def cancel(self):
        self.cancelled.set()


class _ClientGone(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# the app

class ChatService:
    """What the endpoints share: tokenizer, worker pool, limits, statistics."""

    def __init__(self, models: list, tokenizer, workers: int, max_queue: int, api_key: str | None,
                 max_body_bytes: int, default_max_tokens: int, model_name: str,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S, latent_steps: int | None = None):
        self.tokenizer = tokenizer
        self.body_timeout = body_timeout
        self.max_seq_len = models[0].config.max_seq_len
        self.pool = WorkerPool([Engine(models[i % len(models)], tokenizer, latent_steps=latent_steps)
                                for i in range(workers)], max_queue)
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.model_name = model_name
        self.stats = ServerStats()
        self.created = int(time.time())
        self.active: set[_Job] = set()

    # -- request intake ------------------------------------------------------------------------------------------

    def check_auth(self, request):
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1", "replace"),
                                                                 self.api_key.encode("utf-8")):
            raise RequestError("invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", status=401, headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request):
        from starlette.requests import ClientDisconnect

        content_type = request.headers.get("content-type")
        if content_type is not None:
            media_type = content_type.split(";")[0].strip().lower()
            if media_type != "application/json" and not media_type.endswith("+json"):
                raise RequestError(f"Content-Type {media_type[:60]!r}: expected application/json",
                                   code="unsupported_media_type", status=415)
        limit = self.max_body_bytes
        too_large = RequestError(f"request body is larger than {limit} bytes (--max-body-bytes)",
                                 code="request_too_large", status=413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > 16 * limit:
            raise too_large  # not worth reading: answer now, the connection is closed after
        body = bytearray()
        size = 0

        async def receive_body():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    body.extend(chunk)
                elif size > 16 * limit:
                    raise too_large

        try:
            await asyncio.wait_for(receive_body(), self.body_timeout)
        except ClientDisconnect:  # hung up halfway through the body: nobody will read the answer
            raise RequestError("client disconnected while sending the request body", code="client_disconnected",
                               status=400) from None
        except asyncio.TimeoutError:  # a stalled client: answer and close, its connection is not reusable
            raise RequestError(f"request body not received within {self.body_timeout:g} s", code="request_timeout",
                               status=408, headers={"Connection": "close"}) from None
        if size > limit:  # read to the end (discarding) so the client gets to see the 413
            raise too_large
        try:
            return json.loads(body.decode("utf-8"), parse_constant=_reject_json_constant)
        except UnicodeDecodeError:
            raise RequestError("request body is not valid UTF-8", code="invalid_json") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN/Infinity, absurdly long integers
            raise RequestError(f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None

    async def acquire(self, request) -> Engine:
        try:
            reserved = self.pool.reserve()
        except QueueFull:
            self.stats.count("rejected")
            retry = max(1, min(60, math.ceil(self.stats.typical_duration())))
            raise RequestError(f"server busy: all {len(self.pool.engines)} workers are generating and "
                               f"{self.pool.max_queue} requests are queued; retry later",
                               code="queue_full", status=429, error_type="rate_limit_error",
                               headers={"Retry-After": str(retry)}) from None
        if isinstance(reserved, Engine):
            return reserved
        try:
            while True:  # wait for a worker, but not for a client that has gone
                done, _ = await asyncio.wait({reserved}, timeout=0.25)
                if done:
                    return reserved.result()
                if await request.is_disconnected():
                    raise _ClientGone
        except BaseException:
            self.pool.abandon(reserved)
            raise

    # -- generation ----------------------------------------------------------------------------------------------

    def start(self, engine: Engine, chat: ChatRequest) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(loop)
        self.active.add(job)
        loop.run_in_executor(self.pool.executor, self._generate, engine, job, chat)
        return job

    def _generate(self, engine: Engine, job: _Job, chat: ChatRequest):
        """Worker thread: run the engine, post ("delta", channel, text) events, then ("done", decoder, error)."""
        decoder = ReplyDecoder(self.tokenizer, chat.stop)
        started = time.perf_counter()
        counted, error = 0, None
        try:
            for channel, text in stream_reply(engine, chat.prompt_ids, decoder, should_stop=job.cancelled.is_set,
                                              **chat.sampling()):
                self.stats.add_tokens(decoder.num_tokens - counted)
                counted = decoder.num_tokens
                job.put(("delta", channel, text))
        except Exception as e:  # a server fault (not client input): reported to this client, the server lives on
            error = e
        finally:
            self.stats.add_tokens(decoder.num_tokens - counted)
            outcome = "failed" if error is not None else "cancelled" if job.cancelled.is_set() else "served"
            self.stats.count(outcome, time.perf_counter() - started)
            job.put(("done", decoder, error))
            try:
                job.loop.call_soon_threadsafe(self._finished, engine, job)
            except RuntimeError:  # the loop is closed (shutdown): nobody needs the engine back
                pass

    def _finished(self, engine: Engine, job: _Job):
        self.active.discard(job)
        self.pool.release(engine)

    def shutdown(self):
        for job in list(self.active):
            job.cancel()
        self.pool.executor.shutdown(wait=False, cancel_futures=True)

    # -- responses -----------------------------------------------------------------------------------------------

    def _usage(self, chat: ChatRequest, decoder: ReplyDecoder) -> dict:
        return {"prompt_tokens": len(chat.prompt_ids), "completion_tokens": decoder.num_tokens,
                "total_tokens": len(chat.prompt_ids) + decoder.num_tokens}

    async def complete(self, job: _Job, chat: ChatRequest, request, response_id: str, created: int) -> dict:
        """The whole reply as one `chat.completion` object."""
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise _ClientGone from None
                continue
            if event[0] == "done":
                break
        _, decoder, error = event
        if error is not None:
            raise _server_error(error)
        message = {"role": "assistant", "content": decoder.content}
        if decoder.reasoning:
            message["reasoning_content"] = decoder.reasoning
        return {"id": response_id, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": decoder.finish_reason}],
                "usage": self._usage(chat, decoder)}

    async def stream(self, job: _Job, chat: ChatRequest, response_id: str, created: int):
        """Server-sent events: a role chunk, content / reasoning_content deltas, the finish chunk, [DONE]."""

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            payload = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                       "model": self.model_name,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if chat.include_usage:
                payload["usage"] = None
            return _sse(payload)

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    _, channel, text = event
                    yield chunk({"reasoning_content" if channel == REASONING else "content": text})
                    continue
                _, decoder, error = event
                if error is not None:  # headers are gone already: the error travels as an event
                    yield _sse(_server_error(error).body())
                else:
                    yield chunk({}, decoder.finish_reason)
                    if chat.include_usage:
                        yield _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model_name, "choices": [], "usage": self._usage(chat, decoder)})
                yield "data: [DONE]\n\n"
                return
        finally:  # also on client disconnect (Starlette cancels the response task)
            job.cancel()

    def stats_body(self) -> dict:
        requests = dict(self.stats.requests)
        return {"model": self.model_name, "workers": len(self.pool.engines), "busy_workers": self.pool.busy,
                "queue_depth": self.pool.queued, "max_queue": self.pool.max_queue,
                **{f"requests_{k}": v for k, v in requests.items()},
                "tokens_generated": self.stats.tokens_generated,
                "tokens_per_second": round(self.stats.tokens_per_second(), 2),
                "uptime_seconds": round(time.monotonic() - self.stats.started, 1)}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _reject_json_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _server_error(error: Exception) -> RequestError:
    return RequestError(f"internal error: {type(error).__name__}: {str(error)[:200]}", code="internal_error",
                        status=500, error_type="server_error")


_UI_HEADERS = {  # the page loads nothing from elsewhere, and the browser is told to enforce that
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def create_app(model, tokenizer, *, workers: int = 1, max_queue: int = 16, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               model_name: str = "reasoning", body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
               latent_steps: int | None = None):
    """The FastAPI app serving `model` (a GPT, or a list of them, one per device) with `tokenizer`.

    `workers` engines are spread round-robin over the models (on CPU several share one model's weights);
    at most `max_queue` requests wait for a free worker, more get 429. `api_key` (if set) is required as a
    bearer token on /v1/* and /stats. A request that sets no max_tokens gets `default_max_tokens` or what the
    context leaves after its prompt, whichever is smaller; one whose max_tokens does not fit is refused (as vLLM).
    A request body that has not fully arrived `body_timeout` seconds after its headers is answered with 408.
    `latent_steps`: a latent (Coconut) checkpoint's count; replies then show "[N latent steps]" as their reasoning.
    """
    # Imported here so that importing this module (for ServerThread, serve) costs nothing until an app is built.
    # (Also why this module has no `from __future__ import annotations`: FastAPI must see these classes in the
    # annotations.)
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask

    models = list(model) if isinstance(model, (list, tuple)) else [model]
    _check_app_settings(models, workers=workers, max_queue=max_queue, max_body_bytes=max_body_bytes,
                        default_max_tokens=default_max_tokens, api_key=api_key, body_timeout=body_timeout)
    service = ChatService(models, tokenizer, max(workers, len(models)), max_queue, api_key, max_body_bytes,
                          default_max_tokens, model_name, body_timeout, latent_steps)
    ui_html = UI_PATH.read_text(encoding="utf-8") if UI_PATH.exists() else "<p>reasoning/ui.html is missing</p>"

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.shutdown()

    app = FastAPI(title="reasoning chat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.chat = service
    _add_error_handlers(app, service)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(ui_html, headers=_UI_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(request: Request):
        service.check_auth(request)
        return service.stats_body()

    @app.get("/v1/models")
    async def list_models(request: Request):
        service.check_auth(request)
        # max_model_len as vLLM names it; default_max_tokens is ours (the UI shows what an unset length gets)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": service.created,
                                            "owned_by": "reasoning", "max_model_len": service.max_seq_len,
                                            "default_max_tokens": service.default_max_tokens}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        service.check_auth(request)
        body = await service.read_json(request)
        # tokenising up to max_body_bytes of text takes a while: keep the event loop free meanwhile
        chat = await asyncio.to_thread(parse_chat_request, body, tokenizer, service.max_seq_len, default_max_tokens)
        try:
            engine = await service.acquire(request)
        except _ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        job = service.start(engine, chat)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return StreamingResponse(service.stream(job, chat, response_id, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(job.cancel))  # even if streaming never began
        try:
            return await service.complete(job, chat, request, response_id, created)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            job.cancel()

    return app


def _check_app_settings(models: list, *, workers, max_queue, max_body_bytes, default_max_tokens, api_key,
                        body_timeout) -> None:
    """ValueError naming the first create_app argument that is out of range."""
    if not models:
        raise ValueError("model: expected a GPT or a non-empty list of GPTs")
    for name, value, low in (("workers", workers, 1), ("max_queue", max_queue, 0),
                             ("max_body_bytes", max_body_bytes, 1), ("default_max_tokens", default_max_tokens, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key: expected a non-empty string or None")
    if not (isinstance(body_timeout, (int, float)) and not isinstance(body_timeout, bool) and body_timeout > 0
            and math.isfinite(body_timeout)):
        raise ValueError(f"body_timeout={body_timeout!r}: expected a positive number of seconds")


def _add_error_handlers(app, service: "ChatService") -> None:
    """Every error leaves as OpenAI's JSON error shape; client mistakes (4xx but 429/499) are counted "invalid"."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error_response(error: RequestError) -> JSONResponse:
        if 400 <= error.status < 500 and error.status not in (429, 499):
            service.stats.count("invalid")
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestError)
    async def on_request_error(request, error: RequestError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, error: HTTPException):  # 404 unknown path, 405 wrong method, ...
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(RequestError(f"{request.method} {request.url.path}: {error.detail}", code=code,
                                           status=error.status_code, headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def on_unexpected_error(request, error: Exception):  # a bug, never client input: still JSON-shaped
        service.stats.count("failed")
        return error_response(_server_error(error))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, error):
        return error_response(RequestError(f"invalid request: {str(error)[:300]}"))


# ---------------------------------------------------------------------------------------------------------------
# running it

def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to (host, port), for `serve` / ServerThread; port 0 takes a free port, which
    `sock.getsockname()[1]` then tells (so a banner can print the real address). Raises OSError (port in use...)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio only sets TCP_NODELAY on sockets whose proto is IPPROTO_TCP, and
    # without it every response waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def serve(app, sock: socket.socket, log_level: str = "info"):
    """Serve `app` on a socket from bind_socket until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


class ServerThread:
    """uvicorn serving `app` from a background thread on a free port: for tests and notebooks.

        with ServerThread(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server = self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        import uvicorn

        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0):
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
