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
  - **Resume.** On start rank 0 keeps the complete problems of an existing predictions file (all samples present,
    written under the same protocol), drops anything else (a torn last line, another protocol), and every rank
    skips those problems. A rerun with everything done only recomputes the summary. Batches are formed from each
    rank's remaining problems in order; its predictions equal an uninterrupted run's (sampling is keyed per
    problem: see below).
  - **Metrics** (`summarize`): accuracy = mean over problems of c/n (= pass@1) with its standard error
    (`accuracy_se`, over problems), unbiased pass@k (Chen et al. 2021)
    for k = 1, 2, 4, ... n, maj@n (majority over equivalence classes of extracted answers under math_equal, ties to
    the class seen first), accuracy by level and by subject, fraction of completions without an extractable
    answer, mean completion length, tokens/s.

Sampling randomness: every problem gets its own engine seed, derived from `seed` and the problem's index in the
task (`problem_seed`), and the engine keys a row's random stream by (that seed, sample index). So sampled
completions (k > 1, temperature > 0) do not depend on the batch size, the number of ranks, or where a resumed run
picks up; greedy decoding (the default) never did.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

from reasoning.common import atomic_write, atomic_write_json, get_rank, get_world_size
from reasoning.distributed import broadcast_object, gather_object
from reasoning.verifiers import math_equal_batch

PROMPT_MODES = ("chat", "base")
BASE_TEMPLATE = "Problem: {problem}\nSolution:"
BASE_STOP_TEXT = "\nProblem:"
PREDICTIONS_FILE = "predictions.jsonl"
PROTOCOL_FILE = "protocol.json"
SUMMARY_FILE = "summary.json"


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


# ----------------------------------------------------------------------------------------------- prompts

TEMPLATE_SLOT = {"base": "{problem}", "chat": "{user message}"}


def template_text(prompt_mode: str, tokenizer=None) -> str:
    """The exact prompt text of `prompt_mode` for this tokenizer (ours or a Hugging Face model's chat format), with
    the problem as a placeholder slot; saved with the results, since MATH-500 scores swing with the template."""
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode={prompt_mode!r}: expected one of {PROMPT_MODES}")
    slot = TEMPLATE_SLOT[prompt_mode]
    if tokenizer is None:
        prompt = ("<|bos|>" + BASE_TEMPLATE if prompt_mode == "base"
                  else "<|bos|><|user_start|>" + slot + "<|user_end|><|assistant_start|>")
    else:
        placeholder = {"problem": slot, "messages": [{"role": "user", "content": slot}]}
        prompt = tokenizer.decode(build_prompt(tokenizer, placeholder, prompt_mode))
    if prompt_mode == "base":
        return prompt + f"   (completion cut at {BASE_STOP_TEXT!r})"
    return prompt + "   (the task's user message in the slot; graded after the last think-end marker, if any)"


def problem_text(example: dict) -> str:
    if example.get("problem"):
        return example["problem"]
    return next(m["content"] for m in example["messages"] if m["role"] == "user")


def build_prompt(tokenizer, example: dict, prompt_mode: str) -> list[int]:
    if prompt_mode == "base":
        return tokenizer.encode(BASE_TEMPLATE.format(problem=problem_text(example)), prepend=tokenizer.bos_token_id)
    if prompt_mode == "chat":
        return tokenizer.render_for_completion({"messages": example["messages"]})
    raise ValueError(f"prompt_mode={prompt_mode!r}: expected one of {PROMPT_MODES}")


def completion_text(tokenizer, tokens: list[int], stop_reason: str | None, prompt_mode: str) -> str:
    """Decoded completion without its stop token; base mode also drops everything from the next "Problem:"."""
    if stop_reason == "stop" and tokens:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    if prompt_mode == "base":
        text = text.split(BASE_STOP_TEXT, 1)[0]
    return text


# ----------------------------------------------------------------------------------------------- metrics

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


# ----------------------------------------------------------------------------------------------- generation

def grade_completion(task, example: dict, text: str) -> dict:
    """{"extracted": the answer the completion commits to (None: none), "correct": task.evaluate(...)}."""
    extract = getattr(task, "extract", None)
    if extract is None:
        from tasks.math import final_answer  # the default convention: last box after the think span
        extract = final_answer
    return {"extracted": extract(text), "correct": bool(task.evaluate(example, text))}


def grader_description(task) -> str:
    """What decides correctness, for the saved protocol."""
    if getattr(task, "extract", None) is not None:
        from tasks.math import GRADER_DESCRIPTION
        return GRADER_DESCRIPTION
    owner = getattr(task, "parent", task)  # a slice of a task grades like the task
    return f"{type(owner).__module__}.{type(owner).__name__}.evaluate"


def problem_seed(seed: int, problem_index: int) -> int:
    """The engine seed of one problem: depends only on the run's seed and the problem's index in the task."""
    return (seed * 1_000_003 + problem_index) % (2**63)


def generate_records(engine, tokenizer, task, indices: list[int], settings: EvalSettings) -> list[dict]:
    """Generate and grade num_samples completions for each problem in `indices` (one engine call)."""
    examples = [task[i] for i in indices]
    prompts = [build_prompt(tokenizer, ex, settings.prompt_mode) for ex in examples]
    context = engine.model.config.max_seq_len
    runnable = [j for j, p in enumerate(prompts) if len(p) < context]
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


# ----------------------------------------------------------------------------------------------- files

def _read_predictions(path: str) -> list[dict]:
    """Records of a predictions file; a torn (unterminated, undecodable, unparsable or absurdly nested) line ends
    the readable part: the problems from there on are generated again."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                break
    return records


def _write_lines_atomic(path: str, records: list[dict]) -> None:
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records), mode="w")


def _set_aside(pred_path: str, protocol_path: str | None) -> str:
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


def _complete_problems(records: list[dict], num_samples: int, allowed: set[int]) -> list[dict]:
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


def _broadcast(obj, world_size: int):
    return broadcast_object(obj, src=0)


def _gather(obj, world_size: int, rank: int):
    return gather_object(obj, dst=0)


# ----------------------------------------------------------------------------------------------- the loop

def evaluate_task(model, tokenizer, task, settings: EvalSettings, max_problems: int | None = None,
                  out_dir: str | None = None, protocol: dict | None = None, progress: bool = False,
                  stop_after_rounds: int | None = None, log=None) -> dict | None:
    """Evaluate `task` (first `max_problems` problems) on every rank of the process group; returns the summary
    on rank 0 (None on other ranks, or when `stop_after_rounds` stopped early: a simulated kill for tests).

    With `out_dir`, predictions are appended to out_dir/predictions.jsonl as they are made, a run resumes from
    them, and summary.json + protocol.json are written there; without it everything stays in memory.
    `protocol` (template, sampling, grader, checkpoint...) decides whether existing predictions can be reused."""
    from reasoning.engine import Engine

    settings.validate()
    rank, world_size = get_rank(), get_world_size()
    total = len(task) if max_problems is None else min(len(task), max_problems)
    k = settings.num_samples
    protocol = dict(protocol or {})
    protocol.update(template=template_text(settings.prompt_mode, tokenizer), prompt_mode=settings.prompt_mode,
                    num_samples=k, temperature=settings.temperature, top_k=settings.top_k,
                    max_tokens=settings.max_tokens, seed=settings.seed)
    if settings.latent_steps is not None:
        protocol["latent_steps"] = settings.latent_steps
    pred_path = os.path.join(out_dir, PREDICTIONS_FILE) if out_dir else None

    # ---- resume (rank 0 decides, everyone learns the finished problems)
    done_records: list[dict] = []
    if rank == 0 and out_dir:
        os.makedirs(out_dir, exist_ok=True)
        protocol_path = os.path.join(out_dir, PROTOCOL_FILE)
        previous = None
        if os.path.exists(protocol_path):
            with open(protocol_path, encoding="utf-8") as f:
                try:
                    previous = json.load(f)
                except json.JSONDecodeError:
                    previous = None
        if previous == json.loads(json.dumps(protocol)):
            done_records = _complete_problems(_read_predictions(pred_path), k, set(range(total)))
        elif os.path.exists(pred_path) and os.path.getsize(pred_path) > 0:
            # other settings: start over, but keep the old predictions (and their protocol) beside the new ones
            kept = _set_aside(pred_path, protocol_path if previous is not None else None)
            if log is not None:
                log(f"{pred_path}: made under other settings; kept as {kept}, starting over")
        _write_lines_atomic(pred_path, done_records)  # the clean prefix new rounds append to
        atomic_write_json(protocol_path, protocol, indent=1)
    done = _broadcast(sorted({r["index"] for r in done_records}), world_size)
    done_set = set(done)
    todo = [[i for i in range(r, total, world_size) if i not in done_set] for r in range(world_size)]
    B = settings.batch_size
    rounds = max(math.ceil(len(t) / B) for t in todo)
    remaining = sum(len(t) for t in todo)
    if rank == 0 and log is not None and done:
        log(f"resuming: {len(done)}/{total} problems already evaluated, {remaining} to go")

    engine = Engine(model, tokenizer)
    was_training = model.training
    model.eval()
    bar = None
    if rank == 0 and progress and remaining:
        from tqdm import tqdm
        bar = tqdm(total=remaining, desc=f"eval {getattr(task, 'name', 'task')}", unit="problem", dynamic_ncols=True)
    new_records: list[dict] = []
    generated_tokens, t0 = 0, time.perf_counter()
    out_file = open(pred_path, "a", encoding="utf-8") if rank == 0 and pred_path else None
    try:
        for round_index in range(rounds):
            if stop_after_rounds is not None and round_index >= stop_after_rounds:
                return None
            mine = todo[rank][round_index * B:(round_index + 1) * B]
            records = generate_records(engine, tokenizer, task, mine, settings) if mine else []
            gathered = _gather(records, world_size, rank)
            if rank != 0:
                continue
            batch = [r for part in gathered for r in part]
            new_records.extend(batch)
            generated_tokens += sum(r["num_tokens"] for r in batch)
            if out_file is not None:
                out_file.write("".join(json.dumps(r) + "\n" for r in batch))
                out_file.flush()
            if bar is not None:
                bar.update(len(batch) // k)
    finally:
        if out_file is not None:
            out_file.close()
        if bar is not None:
            bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0

    if rank != 0:
        return None
    records = sorted(done_records + new_records, key=lambda r: (r["index"], r["sample"]))
    if pred_path:
        _write_lines_atomic(pred_path, records)  # sorted: an interrupted and an uninterrupted run give equal files
    summary = summarize(records, k)
    summary["tokens_per_s"] = generated_tokens / seconds if generated_tokens and seconds > 0 else None
    summary["seconds"] = seconds
    summary["world_size"] = world_size
    summary["protocol"] = protocol
    summary["settings"] = asdict(settings)
    if out_dir:
        atomic_write_json(os.path.join(out_dir, SUMMARY_FILE), summary, indent=1)
    return summary


def broadcast_summary(summary: dict | None) -> dict:
    """Rank 0's summary on every rank (the SFT/RL loops branch on it)."""
    return _broadcast(summary, get_world_size())


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


def section_name(task_name: str, stage: str, num_samples: int = 1) -> str:
    """Report section of an eval: chat_eval_<stage> (synthetic), math500_<stage>, gsm8k_<stage>, ...;
    a sampled eval (k > 1) gets its own section `<...>_k<k>` so it never replaces the greedy one."""
    from tasks.registry import task_label

    label = task_label(task_name)
    suffix = f"_k{num_samples}" if num_samples > 1 else ""
    if label == "synthetic":
        return f"chat_eval_{stage}{suffix}"
    return f"{label.lower().replace('-', '')}_{stage}{suffix}"



def resolve_source(args, base_dir: str | None = None) -> dict:
    """Where the flags of reasoning.checkpoint.add_model_args point: {"dir", "step", "tag", "stage"}.
    stage is the checkpoint's stage folder (checkpoints/<stage>/<tag>), "custom" for a directory elsewhere."""
    from reasoning import checkpoint as ckpt

    if args.init_from:
        where, tag, step = ckpt.parse_init_from(args.init_from)
    else:
        where, tag, step = args.stage, args.tag, args.step
    ckpt_dir = os.path.normpath(ckpt.resolve_checkpoint_dir(where, tag, base_dir))
    step = ckpt.find_last_step(ckpt_dir) if step is None else step
    stage = os.path.basename(os.path.dirname(ckpt_dir))
    return {"dir": ckpt_dir, "step": step, "tag": os.path.basename(ckpt_dir),
            "stage": stage if stage in ckpt.STAGES else "custom"}
