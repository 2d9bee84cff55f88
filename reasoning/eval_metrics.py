"""Metrics of sampled evaluation over prediction records (one per problem x sample): accuracy with its standard
error, unbiased pass@k (Chen et al. 2021), maj@k over answer-equivalence classes, accuracy by level and subject.

accuracy = mean over problems of c/n (= pass@1); pass@k for k = 1, 2, 4, ... n; maj@n is the majority over
equivalence classes of extracted answers under math_equal (ties to the class seen first); also the fraction of
completions without an extractable answer, mean completion length and the truncated fraction.
"""

from __future__ import annotations

import math
from collections import defaultdict

from reasoning.verifiers import math_equal_batch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge
    binomials, no cancellation)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): expected 0 <= c <= n and 1 <= k <= n")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def answer_classes(answers: list[str | None]) -> list[int | None]:
    """Class id per answer: equal answers (math_equal against each class's first member) share an id;
    None (no answer) gets None. Class ids are numbered in order of first appearance."""
    representatives: list[str] = []
    classes: list[int | None] = []
    for answer in answers:
        if answer is None:
            classes.append(None)
            continue
        found = None
        for cid, rep in enumerate(representatives):
            if rep == answer:  # exact match: no need to ask the grader
                found = cid
                break
        if found is None and representatives:
            verdicts = math_equal_batch([(rep, answer) for rep in representatives])
            found = next((cid for cid, ok in enumerate(verdicts) if ok), None)
        if found is None:
            representatives.append(answer)
            found = len(representatives) - 1
        classes.append(found)
    return classes


def majority_index(answers: list[str | None]) -> int | None:
    """Index of the first sample of the largest answer class (ties: the class seen first); None if no answers."""
    classes = answer_classes(answers)
    counts: dict[int, int] = defaultdict(int)
    first: dict[int, int] = {}
    for i, cid in enumerate(classes):
        if cid is not None:
            counts[cid] += 1
            first.setdefault(cid, i)
    if not counts:
        return None
    best = max(counts, key=lambda cid: (counts[cid], -first[cid]))
    return first[best]


def majority_correct(samples: list[dict]) -> bool:
    """Whether the majority answer of one problem's samples (records in sample order) is correct."""
    winner = majority_index([s["extracted"] for s in samples]) if len(samples) > 1 else 0
    return bool(winner is not None and samples[winner]["correct"])


def _ks(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def standard_error(scores: list[float]) -> float | None:
    """Standard error of the mean of per-problem scores (sample std / sqrt(n)); None below two problems.

    With greedy decoding a score is 0 or 1 and this is the binomial sqrt(p(1-p)/(n-1)): about 1.6 points at
    p = 0.5 on 1000 problems, which is why a gain is only reported beside it."""
    n = len(scores)
    if n < 2:
        return None
    mean = sum(scores) / n
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)


def summarize(records: list[dict], num_samples: int) -> dict:
    """Metrics over prediction records (one per problem × sample)."""
    by_problem: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_problem[r["index"]].append(r)
    problems = [sorted(by_problem[i], key=lambda r: r["sample"]) for i in sorted(by_problem)]
    n_problems = len(problems)
    metrics: dict = {"num_problems": n_problems, "num_samples": num_samples, "num_completions": len(records)}
    if not n_problems:
        return metrics
    ks = _ks(num_samples)
    pass_sums = dict.fromkeys(ks, 0.0)
    maj_correct = 0
    scores = []  # per problem: c/n, whose mean is the accuracy
    groups: dict[str, dict] = {"level": defaultdict(list), "subject": defaultdict(list)}
    for samples in problems:
        n, c = len(samples), sum(bool(s["correct"]) for s in samples)
        scores.append(c / n)
        for k in ks:
            pass_sums[k] += pass_at_k(n, c, min(k, n))
        if "majority_correct" in samples[0]:  # graded where the samples were made (generate_records)
            maj_correct += bool(samples[0]["majority_correct"])
        else:  # records of an older predictions file
            maj_correct += majority_correct(samples)
        for field in ("level", "subject"):
            value = samples[0].get(field)
            if value is not None:
                groups[field][value].append(c / n)
    metrics["accuracy"] = pass_sums[1] / n_problems
    metrics["accuracy_se"] = standard_error(scores)
    for k in ks:
        metrics[f"pass@{k}"] = pass_sums[k] / n_problems
    metrics[f"maj@{num_samples}"] = maj_correct / n_problems
    metrics["no_answer_frac"] = sum(r["extracted"] is None for r in records) / len(records)
    metrics["mean_completion_tokens"] = sum(r["num_tokens"] for r in records) / len(records)
    metrics["truncated_frac"] = sum(r["stop_reason"] != "stop" for r in records) / len(records)
    for field in ("level", "subject"):
        table = [{field: key, "n": len(vals), "accuracy": sum(vals) / len(vals)}
                 for key, vals in sorted(groups[field].items(), key=lambda kv: str(kv[0]))]
        metrics[f"by_{field}"] = table
    return metrics


def format_table(rows: list[dict]) -> str:
    """A small markdown table of row dicts (accuracy by level / subject)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
