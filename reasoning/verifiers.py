"""Answer extraction and answer equivalence: the grader behind RL rewards and MATH-500.

Why this file exists: a reward the policy can fool, or a grader that hangs on `9^{9^{9^{9}}}`, silently ruins an
RL run, and a sloppy comparison moves the MATH-500 headline by points. Everything that decides "is this answer
right?" lives here, time-bounded and never raising.

Pipeline for `math_equal(gold, pred)`:
  1. cheap pre-checks (length / brace-depth caps) — absurd inputs are False at once;
  2. `normalize_answer` on both sides (our rules, below) and exact string equality → True (fast path);
  3. in-process exact comparisons that need no sympy: plain numbers (ints, decimals, fractions, mixed numbers,
     scientific notation), numbers with a base subscript (`52_8`), multiple-choice letters, text answers;
  4. otherwise math-verify (`parse` + `verify(gold, pred)`: gold first, the call is not symmetric; LaTeX
     extraction only) in a worker process with a hard wall-clock bound (default 1.5 s): a worker that overruns
     is killed and replaced, the pair is False (reasoning/grader_pool.py says why a process, and how).

Grading conventions (MATH-style; each is a decision, tested in tests/test_verifiers.py):
  - units, `^\\circ`/degrees, `\\$`/dollars and `\\%`/percent are dropped: "50\\%" == "50", "90^\\circ" == "90",
    "5 \\text{ cm}" == "5". A percentage is NOT its fraction: "50\\%" != "0.5".
  - "1,000" is one thousand (a comma followed by exactly three digits, throughout); "1,2" stays a list.
  - a bare comma list ("1, -2") is an unordered set of solutions; parentheses make an ordered tuple "(6,31,-1)";
    "(a,b)" is both an open interval and an ordered pair, so it equals "(a,b)" (or a bare "a, b"), never
    "[a,b]" or "(b,a)".
  - a leading `x =`, `y =`, `f(x) =`, `x \\in` is dropped.
  - numbers: ints and fractions compare exactly; when a decimal is involved the prediction must be within a
    relative 1e-6 of the gold (so 0.333333 == 1/3 but 0.33 != 1/3); math-verify also rounds floats to 6 places.
  - `52_8` (a base subscript) equals `52_{8}` and a bare `52`, never `52_9`.
  - text answers compare case-insensitively without `\\text{}`; "(C)", "\\text{(C)}", "C" are one choice.
  - a plain number never equals a list, tuple, interval, set, matrix or word (decided without sympy).

The reward functions built on this grader (correctness, format, overlong; `Completion`, `combine_rewards`) live
in reasoning/rewards.py. References: math-verify (HuggingFace), the MATH
grader of Hendrycks et al. (normalisation rules).
"""

from __future__ import annotations

import logging
import os
import re
from fractions import Fraction
from typing import Sequence

from reasoning.grader_pool import get_pool

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("REASONING_GRADER_TIMEOUT", "1.5"))
NUMERIC_REL_TOL = Fraction(1, 10**6)
MAX_ANSWER_CHARS = 1_000     # a longer "answer" is not a final answer; rejected before any regex touches it
MAX_BRACE_DEPTH = 32

# ------------------------------------------------------------------------------------------ extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*")
_BOX_TOKEN_RE = re.compile(r"[^\s$]*")


def _match_brace(text: str, open_pos: int) -> int:
    """Index of the `}` closing the `{` at open_pos (escaped `\\{ \\}` skipped), or -1 if unclosed."""
    depth, pos, n = 0, open_pos, len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return pos
        pos += 1
    return -1


def scan_boxes(text: str) -> list[str | None]:
    """Contents of the top-level \\boxed/\\fbox groups in order; None marks an unclosed box (always last)."""
    boxes: list[str | None] = []
    pos = 0
    while True:
        match = _BOX_RE.search(text, pos)
        if match is None:
            return boxes
        start = match.end()
        if text.startswith("{", start):
            close = _match_brace(text, start)
            if close < 0:
                boxes.append(None)
                return boxes
            boxes.append(text[start + 1:close])
            pos = close + 1
        else:  # `\boxed 5`: the argument is the next token
            token = _BOX_TOKEN_RE.match(text, start).group(0)
            boxes.append(token.rstrip(".,;"))
            pos = start + max(len(token), 1)


def _closing_braces(text: str) -> dict[int, int]:
    """{index of each `{`: index of its closing `}`} in one pass (escaped `\\{ \\}` skipped; unclosed ones absent).
    Agrees with _match_brace for every unescaped `{`, without rescanning the text per brace."""
    closing, stack, pos, n = {}, [], 0, len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == "{":
            stack.append(pos)
        elif ch == "}" and stack:
            closing[stack.pop()] = pos
        pos += 1
    return closing


def _unbox(content: str) -> str | None:
    """Peel boxes that wrap the whole content (`\\boxed{\\boxed{5}}` → 5). Iterative with one brace pass, so a
    box nested thousands deep costs linear time and no recursion."""
    start, end, closing = 0, len(content), None
    while True:
        while start < end and content[start].isspace():
            start += 1
        while end > start and content[end - 1].isspace():
            end -= 1
        match = _BOX_RE.match(content, start, end)
        if match is None or match.end() >= end or content[match.end()] != "{":
            break
        if closing is None:
            closing = _closing_braces(content)
        if closing.get(match.end()) != end - 1:
            break
        start, end = match.end() + 1, end - 1
    return content[start:end] or None


_GSM8K_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_PHRASE_RE = re.compile(r"answer\s*(?:is\b\s*:?|:)\s*([^\n]+)", re.IGNORECASE)


def extract_answer(text: str, strict: bool = True) -> str | None:
    """The final answer in a completion, or None.

    strict=True (RL rewards): only the LAST top-level \\boxed{...} / \\fbox{...} / `\\boxed 5` counts.
    strict=False (evaluation, gold fields): the last box if any, else the last GSM8K `#### N`, else the last
    "The answer is X" / "Answer: X". An unclosed last box (a truncated answer) gives None in both modes.
    """
    if not isinstance(text, str):
        return None
    boxes = scan_boxes(text)
    if boxes:
        return None if boxes[-1] is None else _unbox(boxes[-1])
    if strict:
        return None
    for pattern in (_GSM8K_RE, _ANSWER_PHRASE_RE):
        found = pattern.findall(text)
        if found:
            answer = found[-1].strip()
            answer = re.split(r"\.\s", answer)[0].strip().rstrip(".").strip()  # end of the sentence
            return answer.strip("$ ").strip() or None
    return None


# ---------------------------------------------------------------------------------------- normalisation

_UNICODE = {"π": "\\pi", "∞": "\\infty", "√": "\\sqrt", "°": "^\\circ", "−": "-", "–": "-", "×": "\\times",
            "·": "\\cdot", "≤": "\\le", "≥": "\\ge", "\u00a0": " "}
_UNIT_WORDS = set("""
    cm km mm ft yd mi mph kg lb lbs oz sq square cubic units unit inch inches feet foot yard yards mile miles
    meter meters metre metres centimeter centimeters kilometer kilometers millimeter millimeters
    degree degrees cent cents dollar dollars hour hours hr hrs minute minutes min mins second seconds sec secs
    day days week weeks month months year years pound pounds ounce ounces gram grams kilogram kilograms
    liter liters litre litres ml gallon gallons percent
""".split())
_TEXT_CMD_RE = re.compile(r"\\(?:text|textrm|textbf|textit|textnormal|mbox|mathrm|mathbf|mathit|operatorname)\s*\{")
_LHS_RE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?\s*(?:=|\\in(?![a-zA-Z]))\s*(.+)$")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d{1,3}(?: \d{3})+")
# A space survives only where it separates tokens: after a control word (`\cot x`, `\lor 6`), between letters.
_SPACE_RE = re.compile(r"(?P<cmd>\\[a-zA-Z]+)\s+|(?P<between>(?<=[a-zA-Z])\s+(?=[a-zA-Z]))|\s+")
# A line break (`\\` protected as \x00, or `\newline`, with an optional length `[2pt]`, never an interval `[0,1]`)
# before or after the whole answer
_LINE_BREAK = r"(?:\x00|\\newline(?![a-zA-Z]))(?:\s*\[\s*-?[\d.]+\s*(?:pt|em|ex|mm|cm|in|mu|bp)\s*\])?"
_EDGE_BREAK_RE = re.compile(rf"^(?:\s*{_LINE_BREAK})+|(?:{_LINE_BREAK}\s*)+$")
_ROW_BEFORE_END_RE = re.compile(r"\x00\s*(?=\\end\{)")
_SPACING_CMD_RE = re.compile(r"\\(?:q?quad|enspace|thinspace|medspace|thickspace|negthinspace|negmedspace|"
                             r"negthickspace|hfill)(?![a-zA-Z])|\\hspace\*?\s*\{[^{}]*\}")
_MIXED_RE = re.compile(r"([+-]?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")


_CONTROL_RE = re.compile(r"\\[a-zA-Z]+|\\.")


def _brace_macro_args(s: str, macro: str, nargs: int) -> str:
    """Rewrite shorthand `\\frac12`, `\\frac 59`, `\\sqrt2` into the braced form `\\frac{1}{2}`, `\\sqrt{2}`, inside
    arguments too. An argument (after spaces) is `{...}`, `\\cmd` or one character, and is rewritten in turn: a stack
    of (start, end) spans of `s` instead of recursion, braces matched in one pass, so any nesting costs linear time."""
    pattern = re.compile(re.escape(macro) + r"(?![a-zA-Z])")
    closing = None  # _closing_braces(s), computed at the first braced argument
    stack = [[len(s), 0, [], 0]]  # frames: [end of the span, position, output pieces, arguments left to read]
    while True:
        frame = stack[-1]
        end, pos, out, args_left = frame
        if args_left == 0:  # look for the next macro in this span
            match = pattern.search(s, pos, end)
            if match is not None:
                out.append(s[pos:match.end()])
                pos, args_left = match.end(), nargs
                if macro == "\\sqrt" and s.startswith("[", pos, end):  # \sqrt[3]{x}: keep the index
                    close = s.find("]", pos, end)
                    if close < 0:
                        match = None  # no closing bracket: the rest of the span stays as it is
                    else:
                        out.append(s[pos:close + 1])
                        pos = close + 1
            if match is None:  # the span is done: hand it to the frame whose argument it is
                out.append(s[pos:end])
                stack.pop()
                text = "".join(out)
                if not stack:
                    return text
                stack[-1][2].append("{" + text + "}")
                continue
        start = pos
        while start < end and s[start] == " ":
            start += 1
        if start >= end or s[start] == "}":  # no argument: look for the next macro from here
            frame[1], frame[3] = pos, 0
            continue
        if s[start] == "{":
            if closing is None:
                closing = _closing_braces(s)
            close = closing.get(start, end)
            if close >= end:  # unclosed
                frame[1], frame[3] = pos, 0
                continue
            frame[1], frame[3] = close + 1, args_left - 1
            stack.append([close, start + 1, [], 0])
            continue
        control = _CONTROL_RE.match(s, start, end) if s[start] == "\\" else None
        arg_end = control.end() if control else start + 1
        frame[1], frame[3] = arg_end, args_left - 1
        stack.append([arg_end, start, [], 0])


def _strip_text_groups(s: str) -> str:
    """Drop unit words in \\text{}/\\mbox{} after a value ("5 \\text{ cm}^2"), unwrap the rest ("\\text{(C)}")."""
    out, pos = [], 0
    while (match := _TEXT_CMD_RE.search(s, pos)) is not None:
        close = _match_brace(s, match.end() - 1)
        if close < 0:
            break
        content = s[match.end():close].strip()
        out.append(s[pos:match.start()])
        before = "".join(out)
        pos = close + 1
        if content.lower() in ("and", "or", ","):
            out.append(",")
        elif before.strip() and re.fullmatch(r"[a-zA-Z ]+\.?", content) and not re.search(r"[,(=]\s*$", before):
            pos += len(re.match(r"\s*(?:\^\s*\{?\d\}?)?", s[pos:]).group(0))  # a unit: drop it and its ^2
        else:
            out.append(content)
    out.append(s[pos:])
    return "".join(out)


_TRAILING_WORD_RE = re.compile(r"(.*[\d}a-zA-Z])\s+([a-zA-Z]+)(?:\^\{?\d\}?)?|(.*\d)([a-zA-Z]+)(?:\^\{?\d\}?)?")


def _strip_unit_words(s: str) -> str:
    """'12 square feet' → '12', '5cm' → '5'; only when what remains holds a digit (never 'x units')."""
    while (match := _TRAILING_WORD_RE.fullmatch(s)) is not None:
        rest, word = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        if word.lower() not in _UNIT_WORDS or not re.search(r"\d", rest):
            break
        s = rest.strip()
    return s


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer under the conventions in the module docstring."""
    s = answer.strip()
    for old, new in _UNICODE.items():
        s = s.replace(old, new)
    unboxed = extract_answer(s, strict=True) if _BOX_RE.search(s) else None
    s = unboxed if unboxed is not None else s
    s = s.replace("\\\\", "\x00")  # protect matrix row breaks `\\` from the single-backslash rules below
    s = _EDGE_BREAK_RE.sub("", s).rstrip("\\")  # `7 \\`, `\\[2pt] 7`, `7\ ` (control space, space stripped): 7
    s = _ROW_BEFORE_END_RE.sub("", s)  # a row break before `\end{pmatrix}` ends no row
    s = s.replace("\\$", " ").replace("\\%", " ").replace("%", " ")
    s = re.sub(r"\\[()\[\]]", " ", s).replace("$", " ")
    s = re.sub(r"\\!\s*", "", s).replace("{,}", ",")  # `10,\!080`, `11,\! 111`: no gap intended
    s = re.sub(r"\\[,;: >]|~", " ", s)
    s = _SPACING_CMD_RE.sub(" ", s)  # `\quad`, `\hspace{1em}`: layout, never part of the value
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?:\.|(?![a-zA-Z]))", "", s)
    s = re.sub(r"\\displaystyle(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\{(?:bmatrix|matrix)\}", "{pmatrix}", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<![\\a-zA-Z])(?:infinity|inf)(?![a-zA-Z])", r"\\infty", s)
    s = _strip_text_groups(s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = _strip_unit_words(s)
    if (lhs := _LHS_RE.match(s)) is not None and "=" not in lhs.group(1):
        s = lhs.group(1).strip()
    s = _brace_macro_args(_brace_macro_args(s, "\\frac", 2), "\\sqrt", 1)
    if (mixed := _MIXED_RE.fullmatch(s)) is not None:  # MATH writes 1\frac{4}{5} for 9/5
        whole, num, den = (int(g) for g in mixed.groups()[1:])
        s = f"{mixed.group(1)}\\frac{{{whole * den + num}}}{{{den}}}"
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    s = _SPACE_RE.sub(lambda m: m.group("cmd") + " " if m.group("cmd") else " " if m.group("between") else "", s)
    s = re.sub(r"^\(([A-E])\)$", r"\1", s)  # "(C)" → "C"
    return s.replace("\x00", "\\\\")


# ------------------------------------------------------------------------------ in-process comparisons

_NUMBER_RE = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)(?:(?:[eE]|\\times10\^|\\cdot10\^|\*10\^)\{?([+-]?\d+)\}?)?")
_FRACTION_RE = re.compile(r"([+-]?)(?:\\frac\{(\d+)\}\{(\d+)\}|(\d+)/(\d+))")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(exact value, written-as-decimal) for plain numerals; None for anything sympy would be needed for."""
    if len(s) > 200:
        return None
    if (m := _NUMBER_RE.fullmatch(s)) is not None:
        exponent = int(m.group(3) or 0)
        if abs(exponent) > 1000:
            return None
        value = Fraction(m.group(2)) * Fraction(10) ** exponent
        return (-value if m.group(1) == "-" else value), ("." in m.group(2) or m.group(3) is not None)
    if (m := _FRACTION_RE.fullmatch(s)) is not None:
        num, den = int(m.group(2) or m.group(4)), int(m.group(3) or m.group(5))
        if den == 0:
            return None
        return (-1 if m.group(1) == "-" else 1) * Fraction(num, den), False
    return None


_BASE_RE = re.compile(r"((?=[0-9A-F]*\d)[0-9A-F]+)_\{?(\d+)\}?")


def _is_text_answer(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z ']{2,}", s))


def _is_compound(s: str) -> bool:
    """Several values (tuple, interval, set, list, matrix): never equal to one plain number."""
    depth = 0
    for ch in s:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth <= 1:  # top level, or directly inside one bracket pair
            return True
    return "\\begin{" in s


def _quick_equal(gold: str, pred: str) -> bool | None:
    """A definitive verdict when no sympy is needed (both normalised), else None."""
    gold_num, pred_num = _as_number(gold), _as_number(pred)
    if gold_num is not None and pred_num is not None:
        (g, g_decimal), (p, p_decimal) = gold_num, pred_num
        if g == p:
            return True
        if not (g_decimal or p_decimal):
            return False
        return abs(g - p) <= NUMERIC_REL_TOL * abs(g)
    if gold_num is not None or pred_num is not None:  # a number against a shape sympy cannot make a number
        other = pred if gold_num is not None else gold
        if _is_compound(other) or _is_text_answer(other):
            return False
    gold_base, pred_base = _BASE_RE.fullmatch(gold), _BASE_RE.fullmatch(pred)
    if gold_base is not None:
        if pred_base is not None:
            return gold_base.groups() == pred_base.groups()
        return gold_base.group(1) == pred.upper()
    if len(gold) == 1 and gold in "ABCDE":  # a multiple-choice letter ("(C)", "\\text{(C)}" normalise to "C")
        return pred.upper() == gold
    if _is_text_answer(gold):
        return gold.replace(" ", "").lower() == pred.replace(" ", "").lower()
    return None


def _precheck_failed(text: str) -> bool:
    """Answers no grader should spend time on: huge, or braces nested absurdly deep."""
    if len(text) > MAX_ANSWER_CHARS:
        return True
    depth = deepest = 0
    for ch in text:
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth -= 1
    return deepest > MAX_BRACE_DEPTH


def _prepare(gold, pred) -> tuple[bool | None, str, str]:
    """Everything before math-verify: (verdict or None, normalised gold, normalised pred). Never raises."""
    try:
        if not isinstance(gold, str) or not isinstance(pred, str):
            return False, "", ""
        if _precheck_failed(gold) or _precheck_failed(pred):
            return False, "", ""
        g, p = normalize_answer(gold), normalize_answer(pred)
        if not g or not p:
            return False, g, p
        if g == p:
            return True, g, p
        return _quick_equal(g, p), g, p
    except Exception:  # a grader bug must cost one sample, not the run
        logger.exception("verifier: normalisation failed")
        return False, "", ""


# --------------------------------------------------------------------------------------------- public API

def math_equal_batch(pairs: Sequence[tuple[str, str]], timeout: float | None = None) -> list[bool]:
    """math_equal over many (gold, pred) pairs; the sympy-bound ones run in parallel across the workers.

    `timeout` bounds each pair's comparison (seconds, default DEFAULT_TIMEOUT_S); a slow pair is False.
    """
    timeout_s = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    if not timeout_s > 0:
        raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
    verdicts: list[bool | None] = []
    jobs: list[tuple[str, str]] = []
    for gold, pred in pairs:
        verdict, g, p = _prepare(gold, pred)
        verdicts.append(verdict)
        if verdict is None:
            jobs.append((g, p))
    if jobs:
        try:
            job_results = iter(get_pool().run(jobs, timeout_s))
        except Exception as e:  # e.g. a daemonic process may not have children
            # No in-process fallback: sympy stuck in C code ignores signals, so it could hang the caller.
            logger.error("verifier: grader workers unavailable (%r); %d pairs needing sympy graded False", e, len(jobs))
            job_results = iter([False] * len(jobs))
        verdicts = [next(job_results) if v is None else v for v in verdicts]
    return [bool(v) for v in verdicts]


def math_equal(gold: str, pred: str, timeout: float | None = None) -> bool:
    """Is `pred` the same answer as `gold`? Gold first (the comparison is not symmetric). Never raises,
    returns within ~`timeout` seconds (default DEFAULT_TIMEOUT_S) on any thread."""
    return math_equal_batch([(gold, pred)], timeout)[0]

