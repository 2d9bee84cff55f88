"""The files of an evaluation run in its out_dir: predictions.jsonl (one record per problem x sample, appended
every round, sorted at the end), protocol.json (what the predictions were made under) and summary.json.

Resume: on start rank 0 keeps the complete problems of an existing predictions file (all samples present, written
under the same protocol) and drops anything else (a torn last line, a partly sampled problem); a file made under
another protocol is set aside as predictions.old<N>.jsonl (+ protocol.old<N>.json) and the run starts over.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

from reasoning.common import atomic_write, atomic_write_json, read_jsonl

PREDICTIONS_FILE = "predictions.jsonl"
PROTOCOL_FILE = "protocol.json"
SUMMARY_FILE = "summary.json"


def read_predictions(path: str) -> list[dict]:
    """Records of a predictions file (none if absent); a torn line (unterminated, undecodable, unparsable or
    absurdly nested) ends the readable part: the problems from there on are generated again."""
    return read_jsonl(path, stop_at_torn_line=True) if os.path.exists(path) else []


def write_predictions(path: str, records: list[dict]) -> None:
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records), mode="w")


def append_predictions(out_file, records: list[dict]) -> None:
    """One round's records onto the open predictions file, flushed: a killed run loses at most that round."""
    out_file.write("".join(json.dumps(r) + "\n" for r in records))
    out_file.flush()


def set_aside(pred_path: str, protocol_path: str | None) -> str:
    """Rename predictions.jsonl (and its protocol.json) to the first free predictions.old<N>.jsonl; returns it."""
    stem, ext = os.path.splitext(pred_path)
    n = 1
    while os.path.exists(f"{stem}.old{n}{ext}"):
        n += 1
    os.replace(pred_path, f"{stem}.old{n}{ext}")
    if protocol_path is not None:
        pstem, pext = os.path.splitext(protocol_path)
        os.replace(protocol_path, f"{pstem}.old{n}{pext}")
    return f"{stem}.old{n}{ext}"


def complete_problems(records: list[dict], num_samples: int, allowed: set[int]) -> list[dict]:
    """Records of the problems in `allowed` that have every sample 0..num_samples-1 exactly once."""
    by_problem: dict[int, dict[int, dict]] = defaultdict(dict)
    for r in records:
        by_problem[r["index"]].setdefault(r["sample"], r)
    kept = []
    for index in sorted(by_problem):
        samples = by_problem[index]
        if index in allowed and sorted(samples) == list(range(num_samples)):
            kept.extend(samples[s] for s in range(num_samples))
    return kept


def _read_protocol(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            return None


def start_predictions(out_dir: str, protocol: dict, num_problems: int, num_samples: int, log=None) -> list[dict]:
    """Rank 0 at the start of a run: the records it can keep (see the module docstring). Leaves out_dir holding
    exactly those records (the clean prefix new rounds append to) and this run's protocol."""
    os.makedirs(out_dir, exist_ok=True)
    pred_path, protocol_path = os.path.join(out_dir, PREDICTIONS_FILE), os.path.join(out_dir, PROTOCOL_FILE)
    previous = _read_protocol(protocol_path)
    kept: list[dict] = []
    if previous == json.loads(json.dumps(protocol)):
        kept = complete_problems(read_predictions(pred_path), num_samples, set(range(num_problems)))
    elif os.path.exists(pred_path) and os.path.getsize(pred_path) > 0:
        # other settings: start over, but keep the old predictions (and their protocol) beside the new ones
        old = set_aside(pred_path, protocol_path if previous is not None else None)
        if log is not None:
            log(f"{pred_path}: made under other settings; kept as {old}, starting over")
    write_predictions(pred_path, kept)
    atomic_write_json(protocol_path, protocol, indent=1)
    return kept


def finish_predictions(out_dir: str, records: list[dict], summary: dict) -> None:
    """The sorted predictions (an interrupted and an uninterrupted run give equal files) and the summary."""
    write_predictions(os.path.join(out_dir, PREDICTIONS_FILE), records)
    atomic_write_json(os.path.join(out_dir, SUMMARY_FILE), summary, indent=1)
