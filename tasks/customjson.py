"""Your own conversations (including reasoning traces) as an SFT/eval task: one JSON object per line.

Two line formats, mixable in one file:
  1. chat:  {"messages": [{"role": "user", "content": "..."},
                          {"role": "assistant", "content": "...", "thinking": "..."}], "answer": "..."?}
     An assistant turn's optional `thinking` becomes a think part before its content; content may also already be
     a list of parts ({"type": "text"|"think"|"python"|"python_output", "text": ...}). An optional leading system
     message is allowed; roles then alternate user/assistant and the last message is the assistant's.
  2. distillation:  {"problem": "...", "thinking": "...", "answer": "..."}
     -> user: problem; assistant: think(thinking) + the answer. An answer that already contains \\boxed{} is used
     as the visible text; a bare answer ("42") is shown as "The answer is \\boxed{42}.".
A top-level "answer" makes the line gradable (math_equal on the final answer, as for MATH). Every line is checked
when the file is opened, and a bad line stops with `FILE:LINE: what is wrong` (a UserError), before any training.
"""

from __future__ import annotations

import os

from reasoning.common import UserError, iter_jsonl
from reasoning.tokenizer import ASSISTANT_PART_TYPES
from reasoning.verifiers import extract_answer
from tasks.common import GRADER_DESCRIPTION, Task
from tasks.math import grade_math


def _assistant_content(message: dict, where: str):
    content, thinking = message.get("content"), message.get("thinking")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}] if content else []
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ASSISTANT_PART_TYPES or \
                    not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: part {j} must be {{'type': one of {', '.join(ASSISTANT_PART_TYPES)}, "
                                 f"'text': str}}")
            if part["type"] == "python_output" and (not parts or parts[-1]["type"] != "python"):
                raise ValueError(f"{where}: part {j} (python_output) must follow a python part")
            if part["text"] or part["type"] == "python_output":
                parts.append({"type": part["type"], "text": part["text"]})
    else:
        raise ValueError(f"{where}: 'content' must be a string or a list of parts")
    if thinking is not None:
        if not isinstance(thinking, str):
            raise ValueError(f"{where}: 'thinking' must be a string")
        if thinking.strip():
            parts.insert(0, {"type": "think", "text": thinking})
    if not parts:
        raise ValueError(f"{where}: the assistant message is empty (no content, no thinking)")
    return parts if len(parts) > 1 or parts[0]["type"] != "text" else parts[0]["text"]


def _chat_record(record: dict) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    out = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: expected an object with 'role' and 'content'")
        turn = i - has_system
        expected = "system" if turn < 0 else ("user" if turn % 2 == 0 else "assistant")
        if message.get("role") != expected:
            raise ValueError(f"{where}: role {message.get('role')!r}, expected {expected!r} (an optional system "
                             f"message first, then user and assistant alternating)")
        if expected == "assistant":
            out.append({"role": "assistant", "content": _assistant_content(message, where)})
        else:
            content = message.get("content")
            if not isinstance(content, str) or not content:
                raise ValueError(f"{where} ({expected}): 'content' must be a non-empty string")
            out.append({"role": expected, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    return out


def _distill_record(record: dict) -> tuple[list[dict], str]:
    problem, thinking, answer = record.get("problem"), record.get("thinking", ""), record.get("answer")
    for field, value in (("problem", problem), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"'{field}' must be a non-empty string")
    if not isinstance(thinking, str):
        raise ValueError("'thinking' must be a string")
    visible = answer if "\\boxed" in answer else f"The answer is \\boxed{{{answer.strip()}}}."
    parts = ([{"type": "think", "text": thinking}] if thinking.strip() else []) + [{"type": "text", "text": visible}]
    gold = extract_answer(answer, strict=True) or answer.strip()
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": parts}], gold


def parse_record(record: dict) -> dict:
    """One line's object -> example dict (messages, problem, answer or None). ValueError says what is wrong."""
    if "messages" in record:
        messages = _chat_record(record)
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise ValueError("'answer' must be a string or a number")
        answer = None if answer is None else str(answer)
    elif "problem" in record:
        messages, answer = _distill_record(record)
    else:
        raise ValueError(f"expected a 'messages' list or problem/thinking/answer fields, got keys {sorted(record)}")
    problem = next(m["content"] for m in messages if m["role"] == "user")
    return dict(messages=messages, problem=problem, answer=answer)


class CustomJSON(Task):
    grader_description = GRADER_DESCRIPTION

    def __init__(self, path: str):
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise UserError(f"customjson file {path} does not exist")
        self.path = path
        self.examples = []
        for line_number, record in iter_jsonl(path):
            try:
                example = parse_record(record)
            except ValueError as e:
                raise UserError(f"{path}:{line_number}: {e}") from None
            example["id"] = f"{os.path.basename(path)}:{line_number}"
            self.examples.append(example)
        if not self.examples:
            raise UserError(f"customjson file {path} has no conversations")

    @property
    def name(self) -> str:
        return "customjson"

    def __len__(self) -> int:
        return len(self.examples)

    def get_example(self, index: int) -> dict:
        return self.examples[index]

    def evaluate(self, example: dict, completion: str) -> bool:
        if example.get("answer") is None:
            raise ValueError(f"customjson example {example.get('id')} has no 'answer' to grade against")
        return grade_math(example["answer"], completion)
