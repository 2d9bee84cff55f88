"""One chat turn between OpenAI's wire format and our model: request checks, prompt rendering, reply decoding.

Why this file exists: the HTTP server (reasoning/chat_server.py) and the terminal chat (scripts/chat_cli.py) must
accept the same requests and show the same replies, so both go through here. `parse_chat_request` checks a Chat
Completions request body by hand (not by a schema), so that each RequestError names the field and what was
expected, and renders its prompt. `ReplyDecoder` / `stream_reply` turn the engine's tokens into (channel, text)
deltas: the think span on the "reasoning" channel (served as `reasoning_content`, the vLLM / DeepSeek
convention), the answer on "content", stop strings applied to the answer only. Imports neither FastAPI nor torch.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reasoning.engine import Engine

MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0  # the sampling temperatures a request (or the terminal chat) may ask for: [0, 2], 0 = greedy
# A reply's length when the request sets none, capped by the room the context leaves after the prompt (the CLI's
# --max-tokens default, the server's default_max_tokens); an explicit max_tokens that does not fit is refused.
DEFAULT_MAX_TOKENS = 512
REASONING, CONTENT = "reasoning", "content"
_TEXT_ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for "system"


# ---------------------------------------------------------------------------------------------------------------
# request validation

class RequestError(ValueError):
    """A bad request, with what the HTTP layer needs to answer it in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status
        self.error_type, self.headers = error_type, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked chat completion request, ready for a worker."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def sampling(self) -> dict:
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_p=self.min_p, seed=self.seed)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x) -> bool:
    """An integer, JSON-wise: True/False are not integers."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_text(text: str, param: str) -> str:
    try:  # a lone surrogate ("\ud800" in JSON) is a valid Python str but not encodable text
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{param}: invalid Unicode (unpaired surrogate)", param) from None
    return text


def _message_text(content, param: str) -> str:
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts (joined by newlines)."""
    if isinstance(content, str):
        return _check_text(content, param)
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            where = f"{param}[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}: expected a text part {{\"type\": \"text\", \"text\": \"...\"}} "
                                   "(only text is supported)", where)
            texts.append(_check_text(part["text"], where))
        return "\n".join(texts)
    raise RequestError(f"{param}: expected a string or a non-empty list of text parts, got "
                       f"{_json_type(content)}", param)


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


# The calculator tool call as it appears in streamed answer text, so a returned answer renders back into
# the model's own tokens when a client sends it as history.
_TOOL_SPAN = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>(?:<\|output_start\|>(.*?)<\|output_end\|>)?",
                        re.DOTALL)


def assistant_parts(content: str, reasoning: str = "") -> list[dict]:
    """An assistant turn as our tokenizer's parts: the think span first, then text with its tool calls."""
    parts = [{"type": "think", "text": reasoning}] if reasoning else []
    position = 0
    for match in _TOOL_SPAN.finditer(content):
        if match.start() > position:
            parts.append({"type": "text", "text": content[position:match.start()]})
        if match.group(1):
            parts.append({"type": "python", "text": match.group(1)})
            if match.group(2) is not None:
                parts.append({"type": "python_output", "text": match.group(2)})
        position = match.end()
    if position < len(content):
        parts.append({"type": "text", "text": content[position:]})
    return parts


def conversation_from_messages(messages) -> dict:
    """OpenAI chat messages -> our conversation dict (reasoning.tokenizer); RequestError names the bad field."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty array of {role, content} objects", "messages")
    converted = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: expected an object with 'role' and 'content', got {_json_type(message)}",
                               where)
        role = message.get("role")
        if role not in _TEXT_ROLES:
            raise RequestError(f"{where}.role: {str(role)[:40]!r} is not supported; expected one of "
                               f"{', '.join(_TEXT_ROLES)}", f"{where}.role")
        if "content" not in message:
            raise RequestError(f"{where}.content: missing", f"{where}.content")
        text = _message_text(message["content"], f"{where}.content")
        if role == "assistant":
            reasoning = message.get("reasoning_content") or ""
            if not isinstance(reasoning, str):
                raise RequestError(f"{where}.reasoning_content: expected a string", f"{where}.reasoning_content")
            parts = assistant_parts(text, _check_text(reasoning, f"{where}.reasoning_content"))
            if not parts:
                raise RequestError(f"{where}.content: an assistant message needs text (or reasoning_content)",
                                   f"{where}.content")
            converted.append({"role": "assistant", "content": parts})
        else:
            if not text:
                raise RequestError(f"{where}.content: empty", f"{where}.content")
            converted.append({"role": "system" if role == "developer" else role, "content": text})
    if converted[-1]["role"] != "user":
        raise RequestError(f"messages[{len(messages) - 1}]: the last message must be from the user, got "
                           f"{converted[-1]['role']!r}", f"messages[{len(messages) - 1}].role")
    return {"messages": converted}


# Parameters this server cannot honour: accepted only with their "off" value, so a client is never silently
# given something other than what it asked for.
_UNSUPPORTED = ("tools", "functions", "logprobs", "top_logprobs", "logit_bias", "frequency_penalty",
                "presence_penalty", "audio", "prediction")


def _optional_number(body: dict, name: str, low: float, high: float, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    # ints are compared exactly: 10**400 is a valid JSON number that float() cannot hold
    in_range = _is_number(value) and (is_int(value) or math.isfinite(value)) \
        and (value > low if low_open else value >= low) and value <= high
    if not in_range:
        bracket = "(" if low_open else "["
        raise RequestError(f"{name}: expected a number in {bracket}{low:g}, {high:g}], got {json.dumps(value)[:40]}",
                           name, "invalid_value")
    return float(value)


def _optional_int(body: dict, name: str, low: int, high: int):
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or not low <= value <= high:
        raise RequestError(f"{name}: expected an integer in [{low}, {high}], got {json.dumps(value)[:40]}",
                           name, "invalid_value")
    return int(value)


def parse_chat_request(body: dict, tokenizer, max_seq_len: int, default_max_tokens: int) -> ChatRequest:
    """Check a decoded JSON request body and render its prompt. Raises RequestError (a ValueError)."""
    if not isinstance(body, dict):
        raise RequestError(f"request body: expected a JSON object, got {_json_type(body)}")
    if "messages" not in body:
        raise RequestError("messages: missing (expected an array of {role, content} objects)", "messages")
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(f"{name}: expected a string", name)
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise RequestError(f"{name}: not supported by this server (leave it unset)", name, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("response_format: only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
                           "response_format", "unsupported_parameter")
    if body.get("tool_choice") not in (None, "none", "auto"):  # with no tools, "auto" means no tool call: honoured
        raise RequestError("tool_choice: not supported by this server (leave it unset, or \"none\")", "tool_choice",
                           "unsupported_parameter")
    if body.get("n") is not None and not (is_int(body["n"]) and body["n"] == 1):  # `true == 1` in Python: not n
        raise RequestError(f"n: only n=1 is supported, got {json.dumps(body.get('n'))[:40]}", "n", "invalid_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream: expected true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise RequestError("stream_options: expected {\"include_usage\": true|false}", "stream_options")
    temperature = _optional_number(body, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = _optional_number(body, "top_p", 0.0, 1.0, low_open=True)
    min_p = _optional_number(body, "min_p", 0.0, 1.0)
    top_k = body.get("top_k")
    top_k = None if top_k in (None, -1, 0) else _optional_int(body, "top_k", 1, 1 << 31)  # vLLM: -1/0 = off
    seed = _optional_int(body, "seed", -(1 << 63), (1 << 64) - 1)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional_int(body, name, 1, max_seq_len)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop: expected a non-empty string or an array of at most {MAX_STOP_STRINGS} non-empty "
                           "strings", "stop")
    stops = [_check_text(s, "stop") for s in stops]

    conversation = conversation_from_messages(body["messages"])
    prompt_ids, max_tokens = fit_prompt(conversation, tokenizer, max_seq_len, max_tokens, default_max_tokens, name)
    return ChatRequest(prompt_ids=prompt_ids, max_tokens=max_tokens,
                       temperature=1.0 if temperature is None else temperature, top_p=top_p, top_k=top_k,
                       min_p=min_p, seed=seed, stop=stops, stream=bool(stream),
                       include_usage=bool(options and options.get("include_usage")))


def fit_prompt(conversation: dict, tokenizer, max_seq_len: int, max_tokens: int | None, default_max_tokens: int,
               name: str = "max_tokens") -> tuple[list[int], int]:
    """(prompt ids, reply length) of a conversation, or a RequestError when it leaves no room for the reply or for
    `max_tokens` (named `name`); an unset `max_tokens` gets the room left, up to `default_max_tokens`."""
    text_bytes = sum(len(part["text"].encode("utf-8")) for m in conversation["messages"]
                     for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
    # Cheap early refusal: no token covers more bytes than the longest one, so this many bytes cannot fit.
    longest_token = max(1, int(tokenizer.token_bytes.max()))
    if text_bytes / longest_token >= max_seq_len:
        raise _context_error(f"at least {text_bytes // longest_token}", max_seq_len)
    try:
        prompt_ids = tokenizer.render_for_completion(conversation)
    except ValueError as e:  # the chat format's own rules (roles alternate, system message first)
        raise RequestError(f"messages: {e}", "messages") from None
    if len(prompt_ids) >= max_seq_len:
        raise _context_error(str(len(prompt_ids)), max_seq_len)
    room = max_seq_len - len(prompt_ids)  # what the context leaves for the reply
    if max_tokens is None:  # as vLLM: an unset length gets the room left (up to the default)
        max_tokens = min(default_max_tokens, room)
    elif max_tokens > room:  # as vLLM and OpenAI: refused (400), never silently shortened
        raise RequestError(f"{name}: {max_tokens} does not fit: the conversation takes {len(prompt_ids)} of this "
                           f"model's {max_seq_len} context tokens and leaves {room} for the reply; ask for at most "
                           f"{room}, or leave {name} unset to get what is left", name, "context_length_exceeded")
    return prompt_ids, max_tokens


def _context_error(count: str, max_seq_len: int) -> RequestError:
    return RequestError(f"messages: the conversation takes {count} tokens but this model's context is {max_seq_len} "
                        "tokens and the reply needs at least one; shorten the conversation", "messages",
                        "context_length_exceeded")


# ---------------------------------------------------------------------------------------------------------------
# turning the engine's tokens into text on two channels

class ReplyDecoder:
    """Tokens of one assistant turn -> (channel, text) deltas; channel is "reasoning" inside the think span.

    Byte-level BPE splits multi-byte characters across tokens, so undecodable tails are held until the next
    token completes them. Answer text that might be the start of a stop string is held back too, so a stop
    string is never shown. `finish_reason` becomes "stop" at <|assistant_end|> (or <|bos|>) or a stop string.
    """

    MAX_PENDING_TOKENS = 8  # bytes that stay undecodable this long are not UTF-8: show them as U+FFFD

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        from reasoning.engine import special_token_id  # here: importing this module stays free of torch

        self.tokenizer = tokenizer
        # a Hugging Face vocabulary may lack some (Llama has no think tokens: its thinking stays in the answer)
        self.think_start = special_token_id(tokenizer, "<|think_start|>")
        self.think_end = special_token_id(tokenizer, "<|think_end|>")
        self.end_tokens = {special_token_id(tokenizer, name) for name in ("<|assistant_end|>", "<|bos|>")} - {None}
        self.stop = list(stop)
        self.channel = CONTENT
        self.pending: list[int] = []  # tokens of the current channel not yet decoded to whole characters
        self.held = ""  # answer text that may begin a stop string
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.text = {REASONING: [], CONTENT: []}

    @property
    def content(self) -> str:
        return "".join(self.text[CONTENT])

    @property
    def reasoning(self) -> str:
        return "".join(self.text[REASONING])

    def feed(self, token: int) -> list[tuple[str, str]]:
        if self.finish_reason is not None:
            return []
        self.num_tokens += 1
        if token in self.end_tokens:
            self.finish_reason = "stop"
            return self.flush()
        if token in (self.think_start, self.think_end):
            deltas = self.flush()
            self.channel = REASONING if token == self.think_start else CONTENT
            return deltas
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.MAX_PENDING_TOKENS:
            return []
        self.pending = []
        return self._emit(text)

    def note_latent_steps(self, count: int) -> list[tuple[str, str]]:
        """A latent span (Coconut) has no tokens to show: its length stands for it in the reasoning channel."""
        return self._record(REASONING, f"[{count} latent steps]")

    def flush(self) -> list[tuple[str, str]]:
        """Everything held back, e.g. at the end of the reply or of a channel."""
        deltas = self._emit(self.tokenizer.decode(self.pending)) if self.pending else []
        self.pending = []
        if self.held:  # no stop string matched, and none can now: it is answer text after all
            deltas += self._record(CONTENT, self.held)
            self.held = ""
        return deltas

    def _emit(self, text: str) -> list[tuple[str, str]]:
        if self.channel == REASONING or not self.stop:
            return self._record(self.channel, text)
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            self.finish_reason = "stop"
            return self._record(CONTENT, buffer[:min(hits)])
        keep = 0  # the longest tail of buffer that is a proper prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buffer)), keep, -1):
                if s.startswith(buffer[-k:]):
                    keep = k
                    break
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return self._record(CONTENT, buffer[:len(buffer) - keep])

    def _record(self, channel: str, text: str) -> list[tuple[str, str]]:
        if not text:
            return []
        self.text[channel].append(text)
        return [(channel, text)]


def stream_reply(engine: Engine, prompt_ids: list[int], decoder: ReplyDecoder, should_stop=None, **sampling):
    """Generate one reply and yield its (channel, text) deltas; the engine stops as soon as the reply is done,
    a stop string matched, `should_stop()` turned true, or the consumer closed this generator."""
    tokens = engine.generate_stream([prompt_ids], **sampling)
    latent_steps = sampling.get("latent_steps", engine.latent_steps)
    try:
        if latent_steps is not None:
            yield from decoder.note_latent_steps(latent_steps)
        for _, token, _ in tokens:
            yield from decoder.feed(token)
            if decoder.finish_reason is not None or (should_stop is not None and should_stop()):
                break
        yield from decoder.flush()
        if decoder.finish_reason is None:
            decoder.finish_reason = "length"  # budget or context exhausted
    finally:
        tokens.close()  # frees the KV cache now, also when we were interrupted
