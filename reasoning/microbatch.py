"""Micro-batch formation for the training passes (RL and SFT): rows grouped by length under a row cap and an
optional token budget.

Why its own module: RL rollouts and SFT conversations are ragged (a reasoning trace may be 300 or 8000 tokens), and
a micro-batch is padded to its own longest row. A fixed number of rows per micro-batch makes memory follow the
longest row of the step times the row count; a token budget (tokens including padding, the unit the activations
scale with) lets a micro-batch hold many short rows or few long ones. Sorting by length keeps neighbours alike, so
little of each micro-batch is padding. The grouping never changes the optimisation: the trainers normalise the loss
by totals of the whole optimizer step (reasoning.training.accumulate_gradients, scripts/chat_rl.py's update_policy),
not per micro-batch.

    groups = micro_batches(lengths, rows, max_rows=8, max_tokens=16384)   # lists of row indices
    padding_waste(lengths, groups)                                         # padded slots / all slots
"""

from __future__ import annotations


def micro_batches(lengths, rows, max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Split `rows` (indices into `lengths`) into micro-batches of similar length.

    Rows are taken in order of length (a stable sort: ties keep their order in `rows`). A micro-batch holds at most
    `max_rows` rows and, when `max_tokens` > 0, at most `max_tokens` tokens once padded to its longest row
    (rows x longest); a row longer than the budget forms a micro-batch of its own. max_tokens 0 = rows only, which
    is exactly `max_rows`-sized slices of the sorted rows (the fixed-row-count path).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: expected a positive number of rows")
    if max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens}: expected 0 (no budget) or a positive number of tokens")
    order = sorted(rows, key=lambda i: lengths[i])
    if not max_tokens:
        return [order[i:i + max_rows] for i in range(0, len(order), max_rows)]
    groups, current = [], []
    for i in order:  # ascending: the row being added is the longest of its micro-batch so far
        if current and (len(current) == max_rows or (len(current) + 1) * lengths[i] > max_tokens):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def padding_waste(lengths, groups) -> float:
    """Share of the slots of `groups` (each padded to its longest row) that are padding: padded / total."""
    total = sum(len(g) * max(lengths[i] for i in g) for g in groups if g)
    real = sum(lengths[i] for g in groups for i in g)
    return (total - real) / total if total else 0.0
