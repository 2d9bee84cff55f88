"""GSM8K (Cobbe et al. 2021): grade-school word problems whose solutions call a calculator.

The reference solutions mark every computation as `<<48/2=24>>`. Those annotations become tool calls in the
assistant turn, so SFT teaches the model to use the engine's python tool instead of doing arithmetic in its head:
    "Natalia sold 48/2 = <<48/2=24>>24 clips"  ->  text "Natalia sold 48/2 = ", python "48/2",
                                                   python_output "24", text "24 clips"
(python_output is masked out of the loss: the tool writes it, see reasoning/tokenizer.py). The final line
`#### 72` becomes "The answer is \\boxed{72}." so every math source ends the same way. Graded like MATH:
math_equal on the extracted final answer (tasks.math.grade_math).

Rows come from `openai/gsm8k` ("main") on the hub, or a local JSONL with question/answer per line
(gsm8k_train.jsonl / gsm8k_test.jsonl, e.g. ../shared/data).
"""

from __future__ import annotations

import re

from tasks.common import GRADER_DESCRIPTION, Task
from tasks.math import INSTRUCTION, grade_math
from tasks.sources import load_rows

HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
_CALCULATION_RE = re.compile(r"<<([^<>]*)>>")


def parse_gsm8k_answer(answer: str) -> tuple[list[dict], str]:
    """Reference solution -> (assistant parts with tool calls, gold answer). ValueError without `#### N`."""
    body, marker, final = answer.rpartition("####")
    if not marker:
        raise ValueError(f"GSM8K answer has no '#### N' final line: {answer[-80:]!r}")
    gold = final.strip().replace(",", "")
    if not gold:
        raise ValueError(f"GSM8K answer has an empty final answer after '####': {answer[-80:]!r}")
    parts: list[dict] = []

    def add_text(text: str):
        if not text:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += text
        else:
            parts.append({"type": "text", "text": text})

    position = 0
    for match in _CALCULATION_RE.finditer(body):
        add_text(body[position:match.start()])
        expression, equals, result = match.group(1).rpartition("=")
        # an annotation without "=" (a handful exist) has no result to show: it is dropped, the prose stays
        if equals and expression.strip():
            parts.append({"type": "python", "text": expression.strip()})
            parts.append({"type": "python_output", "text": result.strip()})
        position = match.end()
    add_text(body[position:].rstrip() + ("\n" if body.strip() else "") + f"The answer is \\boxed{{{gold}}}.")
    return parts, gold


class GSM8K(Task):
    grader_description = GRADER_DESCRIPTION

    def __init__(self, split: str = "train", data_path: str | None = None, hub_id: str = HUB_ID,
                 hub_config: str = HUB_CONFIG):
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: expected 'train' or 'test'")
        self.split = split
        self.rows = load_rows("GSM8K", data_path=data_path, hub_id=hub_id, hub_config=hub_config, split=split,
                              filenames=[f"gsm8k_{split}{s}" for s in (".jsonl", ".json", ".parquet")],
                              expected="JSONL with question/answer")

    def __len__(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError(f"GSM8K row {index}: expected string fields 'question' and 'answer'")
        parts, gold = parse_gsm8k_answer(answer)
        messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"},
                    {"role": "assistant", "content": parts}]
        return dict(messages=messages, problem=question, answer=gold, id=f"gsm8k/{self.split}/{index}")

    def evaluate(self, example: dict, completion: str) -> bool:
        return grade_math(example["answer"], completion)
