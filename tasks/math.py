"""MATH (Hendrycks et al. 2021): the competition-math train split for SFT/RL and the MATH-500 test subset.

MATH-500 is the 500-problem test subset of "Let's Verify Step by Step" (Lightman et al. 2023), the headline eval:
rows carry problem, solution (ending in \\boxed{}), answer, subject, level (1-5) and unique_id. The train split
comes from a configurable hub copy (`DigitalLearningGmbH/MATH-lighteval` by default; `EleutherAI/hendrycks_math`,
whose subjects are separate configs, works too), whose rows have problem, solution, "Level N" and type; the
gold answer is then the last \\boxed{} of the solution.

Grading (shared with GSM8K and custom data): `final_answer(completion)` takes the text after the think span
(None while thinking never closed) and extracts the answer with reasoning.verifiers.extract_answer(strict=False):
the last \\boxed{}, else "#### N", else "The answer is X"; `math_equal(gold, answer)` decides. The chat format puts
the reference solution in the think span and "The answer is \\boxed{...}." in the visible text, like the
synthetic task, so SFT teaches one output shape for every math source.
"""

from __future__ import annotations

import re

from reasoning.verifiers import extract_answer, math_equal
from tasks.common import GRADER_DESCRIPTION, Task, final_answer
from tasks.sources import find_local_file, load_rows

INSTRUCTION = "Put your final answer in \\boxed{}."
MATH_HUB_ID = "DigitalLearningGmbH/MATH-lighteval"
MATH_HUB_CONFIG = "default"
MATH500_HUB_ID = "HuggingFaceH4/MATH-500"
# EleutherAI/hendrycks_math keeps each subject in its own config; listed here so that hub id works unchanged
HENDRYCKS_SUBJECT_CONFIGS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                             "number_theory", "prealgebra", "precalculus")

def grade_math(gold: str, completion: str) -> bool:
    answer = final_answer(completion)
    return answer is not None and math_equal(str(gold), answer)


def math_chat_messages(problem: str, solution: str | None, answer: str) -> list[dict]:
    """User asks (with the boxing instruction); the assistant reasons in the think span, then boxes the answer."""
    user = {"role": "user", "content": f"{problem}\n{INSTRUCTION}"}
    text = {"type": "text", "text": f"The answer is \\boxed{{{answer}}}."}
    parts = [{"type": "think", "text": solution.strip()}, text] if solution and solution.strip() else [text]
    return [user, {"role": "assistant", "content": parts}]


_LEVEL_RE = re.compile(r"(\d+)")


def parse_level(value) -> int | None:
    """5, "5", "Level 5" -> 5; "Level ?" / None -> None."""
    if isinstance(value, int):
        return value
    match = _LEVEL_RE.search(str(value or ""))
    return int(match.group(1)) if match else None


class MathProblems(Task):
    """Rows of a MATH-style data set as chat examples graded by math_equal."""

    grader_description = GRADER_DESCRIPTION

    def __init__(self, rows, name: str, split: str):
        self.rows, self._name, self.split = rows, name, split

    @property
    def name(self) -> str:
        return self._name

    def __len__(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        problem, solution = row.get("problem"), row.get("solution")
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{self.name} row {index}: no 'problem' text")
        answer = row.get("answer")
        if not answer:
            answer = extract_answer(solution or "", strict=True)
        if not answer:
            raise ValueError(f"{self.name} row {index}: no 'answer' and no \\boxed{{}} in the solution")
        return dict(messages=math_chat_messages(problem, solution, answer), problem=problem, answer=str(answer),
                    solution=solution, level=parse_level(row.get("level")),
                    subject=row.get("subject") or row.get("type"),
                    id=row.get("unique_id") or f"{self.name.lower()}/{self.split}/{index}")

    def evaluate(self, example: dict, completion: str) -> bool:
        return grade_math(example["answer"], completion)


def MATH(split: str = "train", data_path: str | None = None, hub_id: str = MATH_HUB_ID,
         hub_config: str | None = MATH_HUB_CONFIG) -> MathProblems:
    """The MATH train (or full test) split. Local files: math_<split>.jsonl / .json / .parquet."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    filenames = [f"math_{split}{suffix}" for suffix in (".jsonl", ".json", ".parquet")]
    expected = "JSON/JSONL/parquet rows with problem and solution"
    configs = (hub_config,)
    if hub_id == "EleutherAI/hendrycks_math" and hub_config in (None, "default", "all") and \
            find_local_file("MATH", data_path, filenames) is None:
        configs = HENDRYCKS_SUBJECT_CONFIGS
    parts = [load_rows("MATH", data_path=data_path, filenames=filenames, hub_id=hub_id, hub_config=config,
                       split=split, expected=expected) for config in configs]
    rows = parts[0] if len(parts) == 1 else [row for part in parts for row in part]
    return MathProblems(rows, "MATH", split)


def MATH500(data_path: str | None = None, hub_id: str = MATH500_HUB_ID) -> MathProblems:
    """MATH-500 (test only). Local files: math500_test.json / .jsonl / .parquet (e.g. ../shared/data)."""
    filenames = [f"math500_test{suffix}" for suffix in (".json", ".jsonl", ".parquet")]
    rows = load_rows("MATH-500", data_path=data_path, filenames=filenames, hub_id=hub_id, hub_config=None,
                     split="test", expected="JSON/JSONL with problem, solution, answer, subject, level, unique_id")
    return MathProblems(rows, "MATH-500", "test")
