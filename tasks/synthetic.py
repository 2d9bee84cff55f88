"""Synthetic multi-step arithmetic reasoning: the offline world the CPU pipeline and the tests stand on.

Two problem kinds, both with integer answers that a program can check:
  - expressions:   "Compute (17 + 5) * 3 - 8."
  - word problems: a dozen story templates (shopping, ages, a train's daily distances, a bus route, ...) where
                   each sentence applies one operation to a running quantity.
Only + - * and exact division appear, and every intermediate value stays in [0, max_value], so no negative
numbers and no fractions ever need to be written. Each problem comes with a worked solution, one equation per
line ("17 + 5 = 22"), ending with "The answer is \\boxed{N}." (the MATH convention the graders look for).

Difficulty knobs: `num_steps` (number of operations, 1..6) and `max_operand` (largest number written in a
problem; intermediate values are capped at max_operand**2). `DIFFICULTY` holds named presets.

Train/test are disjoint by construction: a stable hash of the problem's *computation* (its list of operations,
commutative operands sorted) decides its split, and a generator asked for one split rejects problems of the
other. Keying on the computation rather than the surface text is stricter than text-level disjointness: renaming
the people in a test problem, or asking it as an expression instead of a story, still lands it in the test split.

`write_synthetic_corpus` writes parquet shards of train-split problems with solutions mixed with templated prose,
so that a tokenizer and a tiny LM can be pretrained with no network. CLI: `python -m tasks.synthetic --out DIR`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re

from tasks.common import Task

OPS = "+-*/"
KINDS = ("expression", "word")
SPLITS = ("train", "test")
TEST_PERCENT = 10  # share of computations that belong to the test split

# Presets for SyntheticReasoning. "easy" is the default: the CPU pipeline (depth-2..4 model, a few minutes of
# pretraining + SFT) gets part of it right, leaving the RL stage room to improve; "medium"/"hard" are for GPU runs.
# Measurements behind the choice are in dev/LOG.md ("synthetic task difficulty").
DIFFICULTY = {
    "easy": dict(num_steps=(1, 2), max_operand=10),
    "medium": dict(num_steps=(2, 4), max_operand=20),
    "hard": dict(num_steps=(3, 6), max_operand=50),
    # A CPU setting where RL on clean SFT data beats SFT (dev/rl_learning.py --difficulty twostep): exactly two
    # operations on operands <= 5, so every arithmetic fact a test problem needs also occurs in train problems and
    # an under-trained SFT model's errors are ones RL on the train split can fix (on "easy" RL mostly sharpened
    # train-split recall; dev/LOG.md, "RL loop ... the RL sweep"). Not in the pretraining corpus.
    "twostep": dict(num_steps=(2, 2), max_operand=5),
}
DEFAULT_DIFFICULTY = "easy"
CORPUS_DIFFICULTIES = ("easy", "medium", "hard")  # presets the pretraining corpus mixes (its content is pinned)

INSTRUCTION = "Put your final answer in \\boxed{}."


# ----------------------------------------------------------------------------------------------- arithmetic

def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not an exact division")
        return a // b
    raise ValueError(f"unknown operation {op!r}")


def format_step(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b} = {apply_op(a, op, b)}"


def _pick_right(rng: random.Random, op: str, left: int, max_operand: int, max_value: int,
                lo: int = 1) -> int | None:
    """An operand x for `left op x` keeping the result an integer in [0, max_value]; None if there is none.
    `lo` is the smallest addend/subtrahend (stories use 2: "eats 1 apples" reads badly)."""
    if op == "+":
        hi = min(max_operand, max_value - left)
        return rng.randint(lo, hi) if hi >= lo else None
    if op == "-":
        hi = min(max_operand, left)
        return rng.randint(lo, hi) if hi >= lo else None
    if op == "*":  # x >= 2: multiplying by 1 (or 0) teaches nothing
        hi = min(max_operand, max_value // left) if left > 0 else 0
        return rng.randint(2, hi) if hi >= 2 else None
    divisors = [d for d in range(2, min(max_operand, left) + 1) if left % d == 0]
    return rng.choice(divisors) if divisors else None


def _pick_left(rng: random.Random, op: str, right: int, max_operand: int, max_value: int) -> int | None:
    """An operand x for `x op right` keeping the result an integer in [0, max_value]; None if there is none."""
    if op == "+":
        hi = min(max_operand, max_value - right)
        return rng.randint(1, hi) if hi >= 1 else None
    if op == "-":
        return rng.randint(max(1, right), max_operand) if right <= max_operand else None
    if op == "*":
        hi = min(max_operand, max_value // right) if right > 0 else 0
        return rng.randint(2, hi) if hi >= 2 else None
    if right < 2 or right > max_operand:
        return None
    return right * rng.randint(1, max_operand // right)


def _valid(a: int, op: str, b: int, max_value: int) -> bool:
    if op == "/":
        return b >= 2 and a % b == 0
    if op == "*" and (a < 2 or b < 2):
        return False
    return 0 <= apply_op(a, op, b) <= max_value


def computation_key(steps: list[str]) -> str:
    """Canonical form of a solution's computation: the split key. Commutative operands are sorted so that
    "3 * 22" and "22 * 3" (e.g. an expression and its mirrored story) are the same computation."""
    parts = []
    for line in steps:
        a, op, b = line.split(" = ")[0].split(" ")
        if op in "+*" and int(a) > int(b):
            a, b = b, a
        parts.append(f"{a}{op}{b}")
    return ";".join(parts)


_KEY_RE = re.compile(r"\d+[-+*/]\d+(?:;\d+[-+*/]\d+)*")


def split_of(key: str) -> str:
    """'train' or 'test' from a stable hash (blake2b, not Python's salted hash()) of a computation key.

    The key is `computation_key(problem["steps"])`, not the problem text: the text alone does not determine
    the split, so passing it is rejected rather than answered with a meaningless hash."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"split_of({key!r:.60}): expected a computation key like '3+4;7*2' "
                         "(use computation_key(problem['steps']))")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % 100 < TEST_PERCENT else "train"


# ----------------------------------------------------------------------------------------------- expressions
# A node is (value, text, precedence); leaves have precedence 3, * / have 2, + - have 1.

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _build_expression(rng, num_ops, max_operand, max_value, steps):
    """Random expression tree with `num_ops` operations; appends its evaluation steps (post-order) to `steps`.
    Returns (value, text, precedence), or None when no valid operation fits (the caller retries)."""
    if num_ops == 0:
        value = rng.randint(1, max_operand)
        return value, str(value), 3
    num_left = rng.randint(0, num_ops - 1)
    left = _build_expression(rng, num_left, max_operand, max_value, steps)
    if left is None:
        return None
    right = _build_expression(rng, num_ops - 1 - num_left, max_operand, max_value, steps)
    if right is None:
        return None
    ops = list(OPS)
    rng.shuffle(ops)
    for op in ops:
        (a, a_text, a_prec), (b, b_text, b_prec) = left, right
        if b_prec == 3:  # a leaf operand can be redrawn to fit the operation
            b = _pick_right(rng, op, a, max_operand, max_value)
            b_text = str(b)
        elif a_prec == 3:
            a = _pick_left(rng, op, b, max_operand, max_value)
            a_text = str(a)
        if a is None or b is None or not _valid(a, op, b, max_value):
            continue
        prec = _PREC[op]
        # Parenthesise the left child only when it binds looser, the right child whenever it is not a leaf of
        # higher precedence: the text's natural left-to-right reading then matches the order of the steps.
        if a_prec < prec:
            a_text = f"({a_text})"
        if b_prec <= prec:
            b_text = f"({b_text})"
        steps.append(format_step(a, op, b))
        return apply_op(a, op, b), f"{a_text} {op} {b_text}", prec
    return None


_EXPRESSION_PROMPTS = ["Compute {e}.", "What is {e}?", "Evaluate {e}.", "Calculate {e}.", "Find the value of {e}."]


def _make_expression(rng, num_steps, max_operand, max_value):
    steps = []
    node = _build_expression(rng, num_steps, max_operand, max_value, steps)
    if node is None:
        return None
    return rng.choice(_EXPRESSION_PROMPTS).format(e=node[1]), steps, node[0]


# ----------------------------------------------------------------------------------------------- word problems
# Each theme tells a story about one running quantity; every event sentence applies one operation to it.
# Placeholders: {name} {He} {he} {him} {his} {His} {other} (people), {x} (operand), {start}, {times} ("twice",
# "3 times"), {part} ("half", "a third", "1/12"), {prev}/{cur} (the previous/current label in relational themes:
# people for ages, days for daily amounts).

_POSSESSION_THEMES = [
    dict(setup=["{name} has {start} apples.", "{name} picks {start} apples in the orchard."],
         add=["{He} picks {x} more apples.", "{other} gives {him} {x} apples."],
         sub=["{He} eats {x} of them.", "{He} gives {x} apples to {other}."],
         mul=["After a good harvest {he} has {times} as many apples as before."],
         div=["{He} puts the apples into {x} baskets, the same number in each, and keeps one basket."],
         question=["How many apples does {name} have now?", "How many apples does {name} end up with?"]),
    dict(setup=["{name} has {start} dollars.", "{name} starts the week with {start} dollars."],
         add=["{He} earns {x} dollars walking dogs.", "{His} aunt gives {him} {x} dollars."],
         sub=["{He} spends {x} dollars on a book.", "{He} pays {x} dollars for lunch."],
         mul=["{His} savings grow to {times} that amount."],
         div=["{He} splits the money equally among {x} envelopes and keeps only one envelope."],
         question=["How many dollars does {name} have at the end?", "How much money does {name} have left?"]),
    dict(setup=["{name} has {start} candies.", "There are {start} candies in {name}'s jar."],
         add=["{other} adds {x} candies to the jar.", "{He} buys {x} more candies."],
         sub=["{He} eats {x} candies.", "{He} gives {x} candies to {other}."],
         mul=["At the party {he} collects {times} as many candies as {he} had."],
         div=["{He} shares the candies equally among {x} friends, including {him}self."],
         question=["How many candies does {name} have now?"]),
    dict(setup=["{name} bakes {start} cookies.", "{name} has a tray of {start} cookies."],
         add=["{He} bakes {x} more cookies.", "{other} brings {x} cookies."],
         sub=["The family eats {x} cookies.", "{He} sells {x} cookies at the fair."],
         mul=["By the end of the day {he} has baked {times} as many cookies as that."],
         div=["{He} packs the cookies equally into {x} boxes and keeps one box."],
         question=["How many cookies does {name} have?", "How many cookies are left for {name}?"]),
    dict(setup=["A library shelf holds {start} books.", "There are {start} books on the library cart."],
         add=["Readers return {x} books.", "The librarian adds {x} new books."],
         sub=["Students borrow {x} books.", "{x} books are sent away for repair."],
         mul=["After a donation there are {times} as many books."],
         div=["The books are split equally into {x} piles and only one pile stays."],
         question=["How many books are there now?", "How many books remain?"]),
    dict(setup=["{name} plants {start} tulips.", "{name}'s garden has {start} tulips."],
         add=["{He} plants {x} more tulips.", "{x} more tulips bloom."],
         sub=["Rabbits eat {x} tulips.", "{He} picks {x} tulips for {other}."],
         mul=["By summer there are {times} as many tulips."],
         div=["{He} divides the tulips equally among {x} flower beds and gives away all beds but one."],
         question=["How many tulips does {name} have now?"]),
    dict(setup=["A bus leaves the station with {start} passengers."],
         add=["At the next stop {x} people get on.", "{x} passengers board at the market."],
         sub=["At the next stop {x} people get off.", "{x} passengers leave at the school."],
         mul=["At the stadium the number of passengers becomes {times} as large."],
         div=["At the square the passengers form {x} equal groups and only one group stays on the bus."],
         question=["How many passengers are on the bus now?", "How many people are on the bus at the end?"]),
    dict(setup=["{name} has {start} coins in a piggy bank.", "{name}'s piggy bank holds {start} coins."],
         add=["{He} drops in {x} more coins.", "{other} gives {him} {x} coins."],
         sub=["{He} takes out {x} coins.", "{He} spends {x} coins at the shop."],
         mul=["After a year {he} has {times} as many coins."],
         div=["{He} sorts the coins into {x} equal stacks and keeps one stack."],
         question=["How many coins does {name} have now?"]),
    dict(setup=["A teacher has {start} pencils.", "There are {start} pencils in the classroom box."],
         add=["The school delivers {x} more pencils.", "{name} brings {x} pencils."],
         sub=["The teacher hands out {x} pencils.", "{x} pencils break."],
         mul=["After a new order there are {times} as many pencils."],
         div=["The pencils are shared equally among {x} tables; count the pencils on one table."],
         question=["How many pencils are there now?", "How many pencils are left?"]),
]

_RELATIONAL_THEMES = [
    dict(labels="people",
         setup=["{cur} is {start} years old."],
         add=["{cur} is {x} years older than {prev}."],
         sub=["{cur} is {x} years younger than {prev}."],
         mul=["{cur} is {times} as old as {prev}."],
         div=["{prev} is {times} as old as {cur}."],
         question=["How old is {cur}?"]),
    dict(labels="days",
         setup=["A train travels {start} kilometers on {cur}."],
         add=["On {cur} it travels {x} kilometers more than on {prev}."],
         sub=["On {cur} it travels {x} kilometers less than on {prev}."],
         mul=["On {cur} it travels {times} as far as on {prev}."],
         div=["On {cur} it travels {part} of the distance it covered on {prev}."],
         question=["How many kilometers does the train travel on {cur}?"]),
    dict(labels="days",
         setup=["A factory makes {start} toys on {cur}."],
         add=["On {cur} it makes {x} more toys than on {prev}."],
         sub=["On {cur} it makes {x} fewer toys than on {prev}."],
         mul=["On {cur} it makes {times} as many toys as on {prev}."],
         div=["On {cur} it makes {part} as many toys as on {prev}."],
         question=["How many toys does the factory make on {cur}?"]),
    dict(labels="days",
         setup=["{name} reads {start} pages on {cur}."],
         add=["On {cur} {he} reads {x} pages more than on {prev}."],
         sub=["On {cur} {he} reads {x} pages fewer than on {prev}."],
         mul=["On {cur} {he} reads {times} as many pages as on {prev}."],
         div=["On {cur} {he} reads {part} as many pages as on {prev}."],
         question=["How many pages does {name} read on {cur}?"]),
]

NAMES = [("Mia", "f"), ("Leo", "m"), ("Ava", "f"), ("Noah", "m"), ("Zoe", "f"), ("Omar", "m"), ("Lena", "f"),
         ("Ivan", "m"), ("Sara", "f"), ("Ben", "m"), ("Nora", "f"), ("Kai", "m"), ("Emma", "f"), ("Tom", "m"),
         ("Aisha", "f"), ("Raj", "m"), ("Yuki", "f"), ("Luca", "m"), ("Ines", "f"), ("Sam", "m"), ("Maya", "f"),
         ("Hugo", "m"), ("Lily", "f"), ("Theo", "m")]
_PRONOUNS = {"f": dict(He="She", he="she", him="her", his="her", His="Her"),
             "m": dict(He="He", he="he", him="him", his="his", His="His")}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}
_PARTS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth", 10: "a tenth"}
_OP_FIELD = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


def _times(x: int) -> str:
    return _TIMES.get(x, f"{x} times")


def _part(x: int) -> str:
    return _PARTS.get(x, f"1/{x}")


def _make_word_problem(rng, num_steps, max_operand, max_value):
    relational = rng.random() < len(_RELATIONAL_THEMES) / (len(_RELATIONAL_THEMES) + len(_POSSESSION_THEMES))
    theme = rng.choice(_RELATIONAL_THEMES if relational else _POSSESSION_THEMES)
    people = rng.sample(NAMES, num_steps + 2)
    (name, gender), (other, _) = people[0], people[1]
    if theme.get("labels") == "people":
        labels = [n for n, _ in people[:num_steps + 1]]
    else:
        first_day = rng.randint(0, len(DAYS) - 1 - num_steps) if num_steps < len(DAYS) else 0
        labels = DAYS[first_day:first_day + num_steps + 1]
    fields = dict(_PRONOUNS[gender], name=name, other=other)
    value = rng.randint(2, max_operand)
    sentences = [rng.choice(theme["setup"]).format(start=value, cur=labels[0], **fields)]
    steps = []
    for i in range(num_steps):
        ops = list(OPS)
        rng.shuffle(ops)
        for op in ops:
            x = _pick_right(rng, op, value, max_operand, max_value, lo=2)
            if x is not None:
                break
        else:
            return None
        template = rng.choice(theme[_OP_FIELD[op]])
        sentences.append(template.format(x=x, times=_times(x), part=_part(x), prev=labels[i], cur=labels[i + 1],
                                         **fields))
        steps.append(format_step(value, op, x))
        value = apply_op(value, op, x)
    sentences.append(rng.choice(theme["question"]).format(cur=labels[num_steps], **fields))
    return " ".join(sentences), steps, value


# ----------------------------------------------------------------------------------------------- problems

def make_problem(rng: random.Random, num_steps: int, max_operand: int, kind: str | None = None,
                 split: str | None = None, max_value: int | None = None) -> dict:
    """One verifiable problem: dict(problem, steps, answer, solution, kind, split).

    `kind` is "expression", "word" or None (either, at random). `split` ("train"/"test") rejects problems of the
    other split; None accepts both (the returned "split" field says which). `max_value` caps every intermediate
    value (default max_operand**2)."""
    if not 1 <= num_steps <= 6:
        raise ValueError(f"num_steps={num_steps}: expected 1..6")
    if max_operand < 2:
        raise ValueError(f"max_operand={max_operand}: expected >= 2")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS} or None")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    max_value = max_operand * max_operand if max_value is None else max_value
    for _ in range(10_000):
        chosen_kind = kind or rng.choice(KINDS)
        maker = _make_expression if chosen_kind == "expression" else _make_word_problem
        made = maker(rng, num_steps, max_operand, max_value)
        if made is None:
            continue
        text, steps, answer = made
        problem_split = split_of(computation_key(steps))
        if split is not None and problem_split != split:
            continue
        solution = "\n".join(steps + [f"The answer is \\boxed{{{answer}}}."])
        return dict(problem=text, steps=steps, answer=str(answer), solution=solution, kind=chosen_kind,
                    split=problem_split)
    raise ValueError(f"could not generate a {split or ''} problem with num_steps={num_steps}, "
                     f"max_operand={max_operand}, max_value={max_value}")


# ----------------------------------------------------------------------------------------------- grading

def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (braces balanced). Local fallback for reasoning.verifiers."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for pos in range(begin - 1, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:pos]
    return None


def _extract_boxed(text: str) -> str | None:
    try:
        from reasoning.verifiers import extract_answer
    except ImportError:  # FALLBACK: verifiers.py missing or incomplete; the local extractor does the same job
        return _last_boxed(text)
    return extract_answer(text, strict=True)


_INTEGER = re.compile(r"[+-]?\d+(?:\.0*)?")
MAX_INTEGER_CHARS = 1_000  # no answer is this long; int() refuses > 4300 digits, so a longer one would raise


def parse_integer(text: str | None) -> int | None:
    """'1,234', ' 42 ', '$7$', '12.0' -> int; anything else (also absurdly long numerals) -> None."""
    if text is None:
        return None
    cleaned = text.strip().strip("$").replace(",", "").replace(" ", "").replace("\\!", "")
    if len(cleaned) > MAX_INTEGER_CHARS or not _INTEGER.fullmatch(cleaned):
        return None
    return int(cleaned.split(".")[0])


# ----------------------------------------------------------------------------------------------- task

def resolve_difficulty(difficulty: str, num_steps=None, max_operand=None) -> tuple[tuple[int, int], int]:
    """Preset values, overridden by explicit knobs. num_steps may be an int or a (lo, hi) range."""
    if difficulty not in DIFFICULTY:
        raise ValueError(f"difficulty={difficulty!r}: expected one of {sorted(DIFFICULTY)}")
    preset = DIFFICULTY[difficulty]
    num_steps = preset["num_steps"] if num_steps is None else num_steps
    if isinstance(num_steps, int):
        num_steps = (num_steps, num_steps)
    lo, hi = num_steps
    if not 1 <= lo <= hi <= 6:
        raise ValueError(f"num_steps={num_steps}: expected a range within 1..6")
    return (lo, hi), preset["max_operand"] if max_operand is None else max_operand


class SyntheticReasoning(Task):
    """`size` seeded synthetic problems of one split, as chat examples with the worked steps in the think span.

    Example i is generated from its own RNG (seeded by seed, split, i), so indexing is O(1) and lazy and any
    slice of the task is reproducible on its own."""

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, num_steps=None,
                 max_operand: int | None = None, difficulty: str = DEFAULT_DIFFICULTY, kinds=KINDS,
                 answer_only_frac: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if size < 0:
            raise ValueError(f"size={size}: expected >= 0")
        kinds = tuple(kinds)
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds={kinds}: expected a non-empty subset of {KINDS}")
        if not 0.0 <= answer_only_frac <= 1.0:
            raise ValueError(f"answer_only_frac={answer_only_frac}: expected a fraction in [0, 1]")
        self.split, self.size, self.seed, self.kinds = split, size, seed, kinds
        # Fraction of examples whose assistant turn skips the worked steps and states the answer directly, the way
        # distillation data mixes careful traces with bare answers. A small model imitating such a mixture often
        # prefers the shortcut when decoding greedily; RL with a verifiable reward can learn that working the steps
        # out in the think span pays. The choice uses its own RNG stream, so problems are identical for any fraction.
        self.answer_only_frac = answer_only_frac
        self.num_steps, self.max_operand = resolve_difficulty(difficulty, num_steps, max_operand)

    def __len__(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"synthetic/{self.seed}/{self.split}/{index}")  # str seeds hash with sha512: stable
        num_steps = rng.randint(*self.num_steps)
        p = make_problem(rng, num_steps, self.max_operand, kind=rng.choice(self.kinds), split=self.split)
        answer_part = {"type": "text", "text": f"The answer is \\boxed{{{p['answer']}}}."}
        answer_only = (self.answer_only_frac > 0 and
                       random.Random(f"synthetic-answer-only/{self.seed}/{self.split}/{index}").random()
                       < self.answer_only_frac)
        assistant = [answer_part] if answer_only else [{"type": "think", "text": "\n".join(p["steps"])}, answer_part]
        messages = [
            {"role": "user", "content": f"{p['problem']}\n{INSTRUCTION}"},
            {"role": "assistant", "content": assistant},
        ]
        # "steps" (one equation each) serve the latent curriculum (reasoning/latent.py), as GSM8K-iCoT's do
        return dict(messages=messages, answer=p["answer"], problem=p["problem"], num_steps=num_steps,
                    kind=p["kind"], steps=p["steps"])

    def evaluate(self, example: dict, completion: str) -> bool:
        predicted = parse_integer(_extract_boxed(completion))
        return predicted is not None and predicted == int(example["answer"])


# ----------------------------------------------------------------------------------------------- prose
# Templated, mostly true sentences: enough structure (names, places, numbers, simple facts) for a tokenizer and
# a tiny LM to learn something language-like besides the arithmetic.

_CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
             ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Norway", "Oslo"),
             ("Portugal", "Lisbon"), ("India", "New Delhi"), ("Brazil", "Brasilia"), ("Germany", "Berlin"),
             ("Mexico", "Mexico City"), ("Greece", "Athens"), ("Chile", "Santiago")]
_JOBS = ["teacher", "baker", "doctor", "farmer", "pilot", "nurse", "painter", "engineer", "cook", "librarian"]
_HOBBIES = ["reading", "chess", "swimming", "painting", "running", "gardening", "music", "cooking", "hiking"]
_ANIMALS = [("cat", 4), ("dog", 4), ("spider", 8), ("bird", 2), ("ant", 6), ("horse", 4), ("duck", 2)]
_COLORS = [("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("a banana", "yellow"),
           ("a tomato", "red"), ("coal", "black")]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                 "twenty"]
_PLACES = ["market", "park", "library", "station", "school", "museum", "harbor", "bakery"]


def _prose_sentence(rng: random.Random) -> str:
    pick = rng.randrange(9)
    name, gender = rng.choice(NAMES)
    p = _PRONOUNS[gender]
    if pick == 0:
        country, capital = rng.choice(_CAPITALS)
        return rng.choice([f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}."])
    if pick == 1:
        country, capital = rng.choice(_CAPITALS)
        return f"{name} lives in {capital}. {p['He']} works as a {rng.choice(_JOBS)} and likes {rng.choice(_HOBBIES)}."
    if pick == 2:
        animal, legs = rng.choice(_ANIMALS)
        return f"A {animal} has {_NUMBER_WORDS[legs]} legs."
    if pick == 3:
        thing, color = rng.choice(_COLORS)
        return f"The color of {thing} is {color}."
    if pick == 4:
        n = rng.randint(0, 20)
        return rng.choice([f"{_NUMBER_WORDS[n].capitalize()} is written as {n}.",
                           f"The number after {n} is {n + 1}.",
                           f"{n} is an {'even' if n % 2 == 0 else 'odd'} number."])
    if pick == 5:
        a, b = rng.sample(range(100), 2)
        return f"{max(a, b)} is greater than {min(a, b)}."
    if pick == 6:
        i = rng.randrange(7)
        return f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    if pick == 7:
        return (f"On {rng.choice(DAYS)}, {name} walked {rng.randint(1, 9)} kilometers to the "
                f"{rng.choice(_PLACES)} with {rng.choice(NAMES)[0]}.")
    # a small arithmetic fact in words, kept to the train split like every problem in the corpus
    for _ in range(100):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        if split_of(computation_key([format_step(a, "+", b)])) == "train":
            return f"{_NUMBER_WORDS[a].capitalize()} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}."
    return "Numbers can be added."


def _corpus_document(rng: random.Random) -> str:
    """One document: prose, worked problems (plain or Question/Solution layout), or a mix of both."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.4:
            parts.append(" ".join(_prose_sentence(rng) for _ in range(rng.randint(2, 6))))
            continue
        difficulty = DIFFICULTY[rng.choice(CORPUS_DIFFICULTIES)]
        p = make_problem(rng, rng.randint(*difficulty["num_steps"]), difficulty["max_operand"], split="train")
        if rng.random() < 0.5:
            parts.append(f"{p['problem']}\n{p['solution']}")
        else:
            parts.append(f"Question: {p['problem']}\nSolution: {p['solution']}")
    return "\n\n".join(parts)


def write_synthetic_corpus(out_dir: str, num_shards: int = 8, docs_per_shard: int = 2000, seed: int = 0) -> list[str]:
    """Write `shard_00000.parquet`... (one `text` column) into out_dir; returns the shard paths.

    Deterministic in (seed, shard index) and independent of num_shards, so asking for more shards later
    extends the corpus instead of reshuffling it. Only train-split problems appear. Each shard is written
    atomically (reasoning.dataset.write_shard), so a reader never sees a half-written shard."""
    from reasoning.dataset import write_shard

    if num_shards < 1 or docs_per_shard < 1:
        raise ValueError(f"num_shards={num_shards}, docs_per_shard={docs_per_shard}: expected both >= 1")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        rng = random.Random(f"synthetic-corpus/{seed}/{shard}")
        texts = [_corpus_document(rng) for _ in range(docs_per_shard)]
        path = os.path.join(out_dir, f"shard_{shard:05d}.parquet")
        # several row groups per shard so distributed readers can split a shard between ranks
        write_shard(path, texts, row_group_size=max(1, docs_per_shard // 8))
        paths.append(path)
    return paths


def main():
    from reasoning.common import UserError

    parser = argparse.ArgumentParser(description="Write the offline synthetic pretraining corpus (parquet shards).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--docs-per-shard", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="also print this many sample problems")
    args = parser.parse_args()
    if args.num_shards < 1 or args.docs_per_shard < 1:
        raise UserError(f"--num-shards {args.num_shards} --docs-per-shard {args.docs_per_shard}: expected >= 1")
    paths = write_synthetic_corpus(args.out, args.num_shards, args.docs_per_shard, args.seed)
    size = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {len(paths)} shards ({size / 1e6:.1f} MB) to {args.out}")
    rng = random.Random(args.seed)
    for _ in range(args.show):
        p = make_problem(rng, rng.randint(1, 4), 20)
        print(f"\n[{p['kind']}, {p['split']}] {p['problem']}\n{p['solution']}")


if __name__ == "__main__":
    from reasoning.common import run_main

    run_main(main)
