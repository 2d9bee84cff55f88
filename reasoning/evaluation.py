"""Generative evaluation: sample answers with the batched engine, grade them, aggregate pass@k / maj@k.

`evaluate_task` is the machinery behind scripts/chat_eval.py and the SFT/RL in-training evals:
  - **Prompts.** `prompt_mode="chat"`: the task's conversation up to the assistant turn
    (`tokenizer.render_for_completion`); the model thinks in the think span, then writes \\boxed{}.
    `prompt_mode="base"`: `BASE_TEMPLATE` ("Problem: {problem}\\nSolution:") after <|bos|>, for base checkpoints;
    the completion is cut at the first "\\nProblem:" (a base model happily writes the next problem). The exact
    template text goes into the protocol saved with the results.
  - **Sharding.** Problem i belongs to rank i mod world_size. Every round each rank generates one batch of up to
    `batch_size` problems (× num_samples rows, ragged prompts, one Engine call) and the records are gathered on
    rank 0, which appends them to `predictions.jsonl` and flushes: a killed evaluation loses at most one round.
  - **Resume** (the files: reasoning/predictions.py). Every rank skips the problems rank 0 kept from an existing
    predictions file; a rerun with everything done only recomputes the summary. Batches are formed from each
    rank's remaining problems in order; its predictions equal an uninterrupted run's (sampling is keyed per
    problem: see below).
  - **Metrics**: reasoning/eval_metrics.py (`summarize`), plus tokens/s; maj@k is graded on the rank that made
    the samples.

Sampling randomness: every problem gets its own engine seed, derived from `seed` and the problem's index in the
task (`problem_seed`), and the engine keys a row's random stream by (that seed, sample index). So sampled
completions (k > 1, temperature > 0) do not depend on the batch size, the number of ranks, or where a resumed run
picks up; greedy decoding (the default) never did.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

from reasoning.common import evaluating, get_rank, get_world_size
from reasoning.distributed import broadcast_object, gather_object
from reasoning.eval_metrics import majority_correct, summarize
from reasoning.prompts import PROMPT_MODES, build_prompt, completion_text, prompts_that_fit, template_text
from reasoning.predictions import PREDICTIONS_FILE, append_predictions, finish_predictions, start_predictions



@dataclass
class EvalSettings:
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int | None = None
    max_tokens: int = 512
    batch_size: int = 32
    prompt_mode: str = "chat"
    seed: int = 0
    latent_steps: int | None = None  # latent mode (Coconut checkpoints): continuous thoughts before the answer

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: expected >= 1")
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError(f"num_samples={self.num_samples} with temperature 0: greedy samples are all the same; "
                             "expected temperature > 0")
        if self.batch_size < 1 or self.max_tokens < 1:
            raise ValueError(f"batch_size={self.batch_size}, max_tokens={self.max_tokens}: expected both >= 1")
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}: expected one of {PROMPT_MODES}")
        if self.latent_steps is not None and (self.latent_steps < 0 or self.prompt_mode != "chat"):
            raise ValueError(f"latent_steps={self.latent_steps}: expected None, or >= 0 with prompt_mode 'chat'")
        from reasoning.engine import check_sampling_args  # before any file is touched, not at the first generate

        check_sampling_args(self.temperature, self.top_k, None, None)


# ----------------------------------------------------------------------------------------------- generation

def grade_completion(task, example: dict, text: str) -> dict:
    """{"extracted": the answer the completion commits to (None: none), "correct": task.evaluate(...)}."""
    return {"extracted": task.extract(text), "correct": bool(task.evaluate(example, text))}


def problem_seed(seed: int, problem_index: int) -> int:
    """The engine seed of one problem: depends only on the run's seed and the problem's index in the task."""
    return (seed * 1_000_003 + problem_index) % (2**63)


def generate_records(engine, tokenizer, task, indices: list[int], settings: EvalSettings) -> list[dict]:
    """Generate and grade num_samples completions for each problem in `indices` (one engine call)."""
    examples = [task[i] for i in indices]
    prompts = [build_prompt(tokenizer, ex, settings.prompt_mode) for ex in examples]
    runnable = prompts_that_fit(prompts, engine.model.config.max_seq_len)
    generations = {}
    if runnable:
        # one seed per problem, from its index in the task: a problem's samples are the same whichever batch,
        # rank or resumed run it lands in
        seeds = [problem_seed(settings.seed, indices[j]) for j in runnable]
        latent = {} if settings.latent_steps is None else {"latent_steps": settings.latent_steps}
        outs = engine.generate([prompts[j] for j in runnable], num_samples=settings.num_samples,
                               max_tokens=settings.max_tokens, temperature=settings.temperature,
                               top_k=settings.top_k, seed=seeds, **latent)
        for g in outs:
            generations[(runnable[g.prompt_index], g.sample_index)] = g
    records = []
    for j, (index, example) in enumerate(zip(indices, examples)):
        prompt_text = tokenizer.decode(prompts[j])
        first = len(records)
        for s in range(settings.num_samples):
            g = generations.get((j, s))
            tokens = g.tokens if g is not None else []
            stop_reason = g.stop_reason if g is not None else "prompt_too_long"
            text = completion_text(tokenizer, tokens, stop_reason, settings.prompt_mode)
            records.append({
                "index": index, "sample": s, "id": example.get("id", index), "prompt": prompt_text,
                "completion": text, **grade_completion(task, example, text), "gold": example.get("answer"),
                "level": example.get("level"),
                "subject": example.get("subject"), "num_tokens": len(tokens), "stop_reason": stop_reason,
                **({} if settings.latent_steps is None else {"latent_steps": settings.latent_steps}),
            })
        # maj@k graded here, on the rank that made the samples: the answer-equivalence checks are spread over
        # the ranks instead of all falling on rank 0 in summarize() while the others wait
        verdict = majority_correct(records[first:])
        for record in records[first:]:
            record["majority_correct"] = verdict
    return records


# ----------------------------------------------------------------------------------------------- the loop

def evaluate_task(model, tokenizer, task, settings: EvalSettings, max_problems: int | None = None,
                  out_dir: str | None = None, protocol: dict | None = None, progress: bool = False,
                  stop_after_rounds: int | None = None, log=None) -> dict | None:
    """Evaluate `task` (first `max_problems` problems) on every rank of the process group; returns the summary
    on rank 0 (None on other ranks, or when `stop_after_rounds` stopped early: a simulated kill for tests).

    With `out_dir`, predictions are appended to out_dir/predictions.jsonl as they are made, a run resumes from
    them, and summary.json + protocol.json are written there (reasoning/predictions.py); without it everything
    stays in memory. `protocol` (template, sampling, grader, checkpoint...) decides whether existing predictions
    can be reused."""
    settings.validate()
    rank, world_size = get_rank(), get_world_size()
    total = len(task) if max_problems is None else min(len(task), max_problems)
    protocol = dict(protocol or {})
    protocol.update(template=template_text(settings.prompt_mode, tokenizer), prompt_mode=settings.prompt_mode,
                    num_samples=settings.num_samples, temperature=settings.temperature, top_k=settings.top_k,
                    max_tokens=settings.max_tokens, seed=settings.seed)
    if settings.latent_steps is not None:
        protocol["latent_steps"] = settings.latent_steps
    # resume: rank 0 decides, every rank learns the finished problems
    done_records = start_predictions(out_dir, protocol, total, settings.num_samples, log) \
        if rank == 0 and out_dir else []
    done = set(broadcast_object(sorted({r["index"] for r in done_records}), src=0))
    todo = [[i for i in range(r, total, world_size) if i not in done] for r in range(world_size)]
    remaining = sum(len(t) for t in todo)
    if rank == 0 and log is not None and done:
        log(f"resuming: {len(done)}/{total} problems already evaluated, {remaining} to go")

    t0 = time.perf_counter()
    bar = _progress_bar(task, remaining) if rank == 0 and progress and remaining else None
    pred_path = os.path.join(out_dir, PREDICTIONS_FILE) if rank == 0 and out_dir else None
    new_records = _generate_rounds(model, tokenizer, task, settings, todo, pred_path, bar, stop_after_rounds)
    seconds = time.perf_counter() - t0
    if rank != 0 or new_records is None:
        return None
    records = sorted(done_records + new_records, key=lambda r: (r["index"], r["sample"]))
    generated_tokens = sum(r["num_tokens"] for r in new_records)
    summary = summarize(records, settings.num_samples)
    summary["tokens_per_s"] = generated_tokens / seconds if generated_tokens and seconds > 0 else None
    summary.update(seconds=seconds, world_size=world_size, protocol=protocol, settings=asdict(settings))
    if out_dir:
        finish_predictions(out_dir, records, summary)
    return summary


def _progress_bar(task, remaining: int):
    from tqdm import tqdm

    return tqdm(total=remaining, desc=f"eval {getattr(task, 'name', 'task')}", unit="problem", dynamic_ncols=True)


def _generate_rounds(model, tokenizer, task, settings: EvalSettings, todo: list[list[int]], pred_path: str | None,
                     bar, stop_after_rounds: int | None) -> list[dict] | None:
    """Every round each rank generates its next batch of `todo[rank]` and rank 0 gathers the records, appends them
    to `pred_path` and returns them all (other ranks: []); None when stopped after `stop_after_rounds`."""
    from reasoning.engine import Engine

    rank, B = get_rank(), settings.batch_size
    engine = Engine(model, tokenizer)
    new_records: list[dict] = []
    out_file = open(pred_path, "a", encoding="utf-8") if pred_path else None
    try:
        with evaluating(model):
            for round_index in range(max(math.ceil(len(t) / B) for t in todo)):
                if stop_after_rounds is not None and round_index >= stop_after_rounds:
                    return None
                mine = todo[rank][round_index * B:(round_index + 1) * B]
                gathered = gather_object(generate_records(engine, tokenizer, task, mine, settings) if mine else [],
                                         dst=0)
                if rank != 0:
                    continue
                batch = [r for part in gathered for r in part]
                new_records.extend(batch)
                if out_file is not None:
                    append_predictions(out_file, batch)
                if bar is not None:
                    bar.update(len(batch) // settings.num_samples)
    finally:
        if out_file is not None:
            out_file.close()
        if bar is not None:
            bar.close()
    return new_records


def broadcast_summary(summary: dict | None) -> dict:
    """Rank 0's summary on every rank (the SFT/RL loops branch on it)."""
    return broadcast_object(summary, src=0)
