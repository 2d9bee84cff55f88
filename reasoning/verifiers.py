"""Answer extraction, answer equivalence and reward functions: the grader behind RL rewards and MATH-500.

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
     is killed and replaced, the pair is False. math-verify's own SIGALRM timeout only works on the main thread
     and cannot interrupt sympy inside C code (`10^{10^{10}}`); killing a process always works.

The workers (DEFAULT_WORKERS, forkserver context preloaded with sympy, so a replacement is forked warm) live
for the whole process and are killed at exit. Their start-up is not charged to any pair (`warm_up_grader()`
gets it out of the way). The bound is wall-clock, so on a badly overloaded CPU a slow but legitimate
comparison can time out and grade False: evaluation may pass a larger `timeout` than the RL loop does.

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

Rewards are named, batch-first callables (`RewardFn`) composed by `combine_rewards`, which keeps each part's
value so the RL loop can log them separately. References: math-verify (HuggingFace), the MATH grader of
Hendrycks et al. (normalisation rules), DAPO (overlong soft penalty).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import multiprocessing
import os
import re
import sys
import threading
import time
import types
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import wait as wait_for_connections
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("REASONING_GRADER_TIMEOUT", "1.5"))
NUMERIC_REL_TOL = Fraction(1, 10**6)
MAX_ANSWER_CHARS = 1_000     # a longer "answer" is not a final answer; rejected before any regex touches it
MAX_BRACE_DEPTH = 32
WORKER_STARTUP_S = 60.0      # waiting for a (re)started worker is not charged to the per-pair timeout
# Four workers even on small machines: idle ones cost only memory, and a killed worker's replacement needs
# ~1 s to warm up, so back-to-back timeouts still find a ready worker.
DEFAULT_WORKERS = 4
# If the parent dies mid-job nobody is left to kill a worker stuck in sympy; the kernel ends it after this much CPU.
ORPHAN_CPU_BUDGET_S = float(os.environ.get("REASONING_GRADER_ORPHAN_CPU_S", "60"))

THINK_START, THINK_END = "<|think_start|>", "<|think_end|>"

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


def _scan_boxes(text: str) -> list[str | None]:
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


def _unbox(content: str) -> str | None:
    content = content.strip()
    match = _BOX_RE.match(content)  # `\boxed{\boxed{5}}` → 5
    if match and content.startswith("{", match.end()) and _match_brace(content, match.end()) == len(content) - 1:
        return _unbox(content[match.end() + 1:-1])
    return content or None


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
    boxes = _scan_boxes(text)
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
_MIXED_RE = re.compile(r"([+-]?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")


def _brace_arg(s: str, pos: int) -> tuple[str, int] | None:
    """A LaTeX macro argument at pos (after spaces): `{...}`, `\\cmd` or a single char → (text, end)."""
    while pos < len(s) and s[pos] == " ":
        pos += 1
    if pos >= len(s) or s[pos] == "}":
        return None
    if s[pos] == "{":
        close = _match_brace(s, pos)
        return None if close < 0 else (s[pos + 1:close], close + 1)
    if s[pos] == "\\":
        cmd = re.match(r"\\[a-zA-Z]+|\\.", s[pos:]).group(0)
        return cmd, pos + len(cmd)
    return s[pos], pos + 1


def _brace_macro_args(s: str, macro: str, nargs: int) -> str:
    """Rewrite shorthand `\\frac12`, `\\frac 59`, `\\sqrt2` into the braced form `\\frac{1}{2}`, `\\sqrt{2}`."""
    out, pos = [], 0
    pattern = re.compile(re.escape(macro) + r"(?![a-zA-Z])")
    while (match := pattern.search(s, pos)) is not None:
        out.append(s[pos:match.end()])
        pos = match.end()
        if macro == "\\sqrt" and s[pos:pos + 1] == "[":  # \sqrt[3]{x}: keep the index
            close = s.find("]", pos)
            if close < 0:
                break
            out.append(s[pos:close + 1])
            pos = close + 1
        for _ in range(nargs):
            arg = _brace_arg(s, pos)
            if arg is None:
                break
            out.append("{" + _brace_macro_args(arg[0], macro, nargs) + "}")
            pos = arg[1]
    out.append(s[pos:])
    return "".join(out)


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
    s = s.replace("\\$", " ").replace("\\%", " ").replace("%", " ")
    s = re.sub(r"\\[()\[\]]", " ", s).replace("$", " ")
    s = re.sub(r"\\!\s*", "", s).replace("{,}", ",")  # `10,\!080`, `11,\! 111`: no gap intended
    s = re.sub(r"\\[,;: >]|~", " ", s)
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


# ------------------------------------------------------------------------ math-verify in a worker process

def _math_verify_equal(gold: str, pred: str, timeout_s: float) -> bool:
    """The sympy-backed comparison (runs inside a worker's main thread, so its SIGALRM guard works too)."""
    from math_verify import LatexExtractionConfig, parse, verify

    # LaTeX only: the plain-text extractor would pull any number out of an unparsable prediction
    # ("5 \\foo 6" → 5), a free second guess. Plain math such as "1/2" parses as LaTeX anyway.
    config = [LatexExtractionConfig()]
    alarm_s = max(1, math.ceil(timeout_s))
    parsed_gold = parse(f"${gold}$", extraction_config=config, parsing_timeout=alarm_s)
    parsed_pred = parse(f"${pred}$", extraction_config=config, parsing_timeout=alarm_s)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=alarm_s))


_WARM_UP_PAIRS = (("\\frac{x}{2}+\\sqrt{3}", "\\sqrt{3}+x/2"), ("\\cot x", "\\frac{\\cos x}{\\sin x}"),
                  ("(\\frac{3}{5},2]", "(0.6,2]"))


def _arm_cpu_limit(budget_s: float) -> None:
    """RLIMIT_CPU counts the whole process, so re-arm it before every job: this job may burn budget_s more."""
    try:
        import resource

        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used + budget_s), hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or a finite hard limit below the target
        pass


def _worker_main(conn) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us at exit
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU (see _arm_cpu_limit) must not dump core
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    # First uses compile math-verify's regexes and load sympy's lazy modules (~1 s in all): pay that before
    # announcing readiness so that it is never charged to a job's deadline.
    for gold, pred in _WARM_UP_PAIRS:
        _math_verify_equal(gold, pred, 5.0)
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if job is None:
            return
        gold, pred, timeout_s = job
        _arm_cpu_limit(ORPHAN_CPU_BUDGET_S)
        try:
            result = _math_verify_equal(gold, pred, timeout_s)
        except BaseException:  # math-verify's TimeoutException is a BaseException
            result = False
        conn.send(result)


class _Worker:
    def __init__(self, ctx):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="grader")
        with _start_lock, _main_module_hidden():  # the lock: concurrent swaps of __main__ would lose it
            self.process.start()
        child_conn.close()
        self.ready = False
        self.started_at = time.monotonic()

    def check_ready(self, timeout: float = 0.0) -> bool:
        """Consume the start-up message if it has arrived. Raises EOFError if the worker died."""
        if not self.ready and self.conn.poll(timeout):
            self.ready = self.conn.recv() == "ready"
        return self.ready

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(timeout=5)
            self.conn.close()
        except Exception:
            pass


_start_lock = threading.Lock()


@contextlib.contextmanager
def _main_module_hidden():
    """Workers need nothing from __main__, but spawn/forkserver children re-import the caller's script unless
    told otherwise (slow, and it re-runs unguarded top-level code). Hide it while a worker is being started."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _mp_context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that already imported sympy and math-verify: a replacement skips that
        # ~1-2 s and only pays its warm-up (_WARM_UP_PAIRS, ~0.5-1 s).
        ctx.set_forkserver_preload(["math_verify", __name__])
        return ctx
    return multiprocessing.get_context("spawn")


class _GraderPool:
    """A few long-lived worker processes; a job that overruns its deadline gets its worker killed and replaced."""

    def __init__(self, num_workers: int):
        self._ctx = _mp_context()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = [_Worker(self._ctx) for _ in range(num_workers)]
        self._all: set[_Worker] = set(self._idle)
        self.owner_pid = os.getpid()  # a forked child must not talk to its parent's workers
        self.kills = 0

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self._ctx)
        with self._cond:  # re-entrant (Condition's default RLock): also called with it held
            self._all.discard(worker)
            self._all.add(fresh)
        return fresh

    def run(self, jobs: list[tuple[str, str]], timeout_s: float) -> list[bool]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._idle, timeout=WORKER_STARTUP_S):
                logger.warning("verifier: no grader worker free for %.0f s; grading False", WORKER_STARTUP_S)
                return [False] * len(jobs)
            for i, worker in enumerate(self._idle):
                try:
                    alive = worker.process.is_alive()
                    if alive:
                        worker.check_ready()
                except (EOFError, OSError):
                    alive = False
                if not alive:  # died while idle (OOM killer, a stray signal): start its replacement now
                    self._idle[i] = self._replace(worker)
            self._idle.sort(key=lambda w: not w.ready)  # ready workers first
            take = min(len(jobs), len(self._idle))
            workers, self._idle = self._idle[:take], self._idle[take:]
        results = [False] * len(jobs)
        pending = deque(range(len(jobs)))
        busy: dict[_Worker, tuple[int, float]] = {}
        try:
            while pending or busy:
                for i, worker in enumerate(workers):
                    if worker.ready and worker not in busy and pending:
                        index = pending.popleft()
                        try:
                            worker.conn.send((*jobs[index], timeout_s))
                        except (OSError, ValueError):  # it died while idle: requeue the job on a fresh worker
                            pending.appendleft(index)
                            workers[i] = self._replace(worker)
                            continue
                        busy[worker] = (index, time.monotonic() + timeout_s)
                starting = [w for w in workers if not w.ready]
                now = time.monotonic()
                deadlines = [d for _, d in busy.values()] + [w.started_at + WORKER_STARTUP_S for w in starting]
                readable = wait_for_connections([w.conn for w in busy] + [w.conn for w in starting],
                                                timeout=max(0.0, min(deadlines) - now))
                for i, worker in enumerate(list(workers)):
                    if worker.conn in readable:
                        try:
                            message = worker.conn.recv()
                        except (EOFError, OSError):  # the worker crashed (segfault, OOM kill)
                            message = None
                        if message == "ready":
                            worker.ready = True
                            continue
                        if worker in busy:
                            results[busy.pop(worker)[0]] = message is True
                        if message is None:
                            workers[i] = self._replace(worker)
                    elif worker in busy and time.monotonic() >= busy[worker][1]:
                        busy.pop(worker)
                        self.kills += 1
                        workers[i] = self._replace(worker)
                    elif not worker.ready and time.monotonic() >= worker.started_at + WORKER_STARTUP_S:
                        logger.warning("verifier: grader worker did not start; restarting it")
                        workers[i] = self._replace(worker)
        except Exception:
            logger.exception("verifier: grader pool failure; remaining pairs graded False")
            for worker in list(busy):
                workers[workers.index(worker)] = self._replace(worker)
        finally:
            with self._cond:
                self._idle.extend(workers)
                self._cond.notify_all()
        return results

    def wait_ready(self) -> None:
        """Block until every idle worker has finished starting (bounded by WORKER_STARTUP_S)."""
        deadline = time.monotonic() + WORKER_STARTUP_S
        with self._cond:
            workers, self._idle = self._idle, []
        try:
            for i, worker in enumerate(workers):
                try:
                    worker.check_ready(timeout=max(0.0, deadline - time.monotonic()))
                except (EOFError, OSError):
                    workers[i] = self._replace(worker)
        finally:
            with self._cond:
                self._idle.extend(workers)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            workers, self._idle = list(self._all), []
            self._all = set()
        for worker in workers:
            worker.kill()


_pool: _GraderPool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _GraderPool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.owner_pid != os.getpid():
            _pool = _GraderPool(int(os.environ.get("REASONING_GRADER_WORKERS", DEFAULT_WORKERS)))
        return _pool


@atexit.register
def shutdown_grader() -> None:
    """Kill the grader workers (also runs at interpreter exit); the next call starts new ones."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.owner_pid == os.getpid():  # never the workers of the process we forked from
        pool.close()


def warm_up_grader() -> None:
    """Start the workers and wait until they are ready (the first grading otherwise pays ~1-3 s of start-up;
    worker start-up is never charged to a pair's timeout, but a caller may want it out of the way)."""
    _get_pool().wait_ready()


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
            job_results = iter(_get_pool().run(jobs, timeout_s))
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


# ------------------------------------------------------------------------------------------------ rewards

@dataclass(frozen=True)
class Completion:
    """One sampled completion as the reward functions see it.

    `text` is the decoded completion. If it still holds the literal `<|think_start|>`/`<|think_end|>` markers,
    the think span is found from them; if the caller stripped them, pass `think_closed` and put only the
    visible answer (what follows the think span) in `text`.
    """
    text: str
    think_closed: bool | None = None
    num_tokens: int | None = None
    truncated: bool = False  # generation stopped at the token limit (stop_reason "length"/"context")


def answer_text(completion: Completion) -> str | None:
    """The part of a completion after its think span; None while thinking never ended (nothing to grade)."""
    text = completion.text
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1]
    if THINK_START in text or completion.think_closed is False:
        return None
    return text


def _as_completion(item) -> Completion:
    if isinstance(item, Completion):
        return item
    if isinstance(item, str):
        return Completion(text=item)
    raise ValueError(f"completion {item!r:.60}: expected a Completion or a str")


@dataclass(frozen=True)
class RewardFn:
    """A named reward: `fn(completions, examples) -> list[float]`, one value per completion (batch-first, so
    correctness can grade a whole rollout batch in parallel)."""
    name: str
    fn: Callable[[list[Completion], list], list[float]]

    def __call__(self, completions: Sequence, examples: Sequence) -> list[float]:
        completions = [_as_completion(c) for c in completions]
        if len(completions) != len(examples):
            raise ValueError(f"{self.name}: {len(completions)} completions but {len(examples)} examples")
        return [float(v) for v in self.fn(completions, list(examples))]

    def score(self, completion, example=None) -> float:
        return self([completion], [example])[0]


def correctness_reward(gold_fn: Callable[[dict], str], timeout: float | None = None) -> RewardFn:
    """1.0 when the last box of the answer part equals gold_fn(example) under math_equal, else 0.0."""
    def fn(completions, examples):
        answers = [extract_answer(a, strict=True) if (a := answer_text(c)) is not None else None
                   for c in completions]
        graded = [i for i, answer in enumerate(answers) if answer is not None]
        verdicts = math_equal_batch([(str(gold_fn(examples[i])), answers[i]) for i in graded], timeout)
        rewards = [0.0] * len(completions)
        for i, ok in zip(graded, verdicts):
            rewards[i] = float(ok)
        return rewards
    return RewardFn("correctness", fn)


def format_reward(require_think: bool = True) -> RewardFn:
    """1.0 when the think span was closed (if required) and the answer part holds exactly one closed box."""
    def one(completion: Completion) -> float:
        answer = answer_text(completion)
        if answer is None:
            return 0.0
        closed = completion.think_closed if completion.think_closed is not None else THINK_END in completion.text
        if require_think and not closed:
            return 0.0
        boxes = _scan_boxes(answer)
        return float(len(boxes) == 1 and boxes[0] is not None and boxes[0].strip() != "")
    return RewardFn("format", lambda completions, examples: [one(c) for c in completions])


def overlong_penalty(max_tokens: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong penalty: 0 up to max_tokens - buffer, then linear down to -1 at max_tokens;
    a truncated completion gets -1 whatever its length."""
    if not (isinstance(max_tokens, int) and isinstance(buffer, int) and 0 < buffer <= max_tokens):
        raise ValueError(f"overlong_penalty(max_tokens={max_tokens!r}, buffer={buffer!r}): "
                         f"expected integers with 0 < buffer <= max_tokens")

    def one(completion: Completion) -> float:
        if completion.truncated:
            return -1.0
        if completion.num_tokens is None:
            raise ValueError("overlong_penalty: Completion.num_tokens is required")
        over = completion.num_tokens - (max_tokens - buffer)
        return -min(1.0, max(0, over) / buffer)
    return RewardFn("overlong", lambda completions, examples: [one(c) for c in completions])


@dataclass(frozen=True)
class RewardBreakdown:
    total: list[float]              # weighted sum, one per completion
    parts: dict[str, list[float]]   # each reward's unweighted values, keyed by its name


@dataclass(frozen=True)
class CombinedReward:
    reward_fns: tuple[RewardFn, ...]
    weights: tuple[float, ...]

    def __call__(self, completions: Sequence, examples: Sequence) -> RewardBreakdown:
        parts = {r.name: r(completions, examples) for r in self.reward_fns}
        total = [sum(w * parts[r.name][i] for r, w in zip(self.reward_fns, self.weights))
                 for i in range(len(completions))]
        return RewardBreakdown(total=total, parts=parts)


def combine_rewards(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None = None) -> CombinedReward:
    """Weighted sum of named rewards that keeps every part for logging."""
    reward_fns = tuple(reward_fns)
    if not reward_fns or not all(isinstance(r, RewardFn) for r in reward_fns):
        raise ValueError(f"combine_rewards: expected a non-empty list of RewardFn, got {reward_fns!r:.100}")
    names = [r.name for r in reward_fns]
    if len(set(names)) != len(names):
        raise ValueError(f"combine_rewards: reward names must be unique, got {names}")
    weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * len(reward_fns)))
    if len(weights) != len(reward_fns):
        raise ValueError(f"combine_rewards: {len(weights)} weights for {len(reward_fns)} rewards")
    return CombinedReward(reward_fns, weights)
