"""Evaluate a checkpoint on generative tasks (machinery: reasoning.evaluation): batched, torchrun-sharded, resumable.

    python -m scripts.chat_eval -a synthetic                                   # newest sft checkpoint, greedy
    python -m scripts.chat_eval -a MATH-500 --data-path ../shared/data --stage rl --max-tokens 2048
    python -m scripts.chat_eval -a MATH-500 --num-samples 8 --temperature 0.7  # pass@1,2,4,8 and maj@8
    python -m scripts.chat_eval -a GSM8K --stage base --prompt-mode base       # plain "Problem: ...\\nSolution:"
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -a MATH-500 --batch-size 64

Outputs under <base>/eval/<task>_<stage>/ (or --out-dir): predictions.jsonl (one line per problem x sample: id,
prompt, completion, extracted answer, gold, correct, level, subject), summary.json (metrics + protocol: template
text, sampling parameters, grader, checkpoint), protocol.json. A killed run continues where it stopped when rerun
with the same settings (--fresh starts over). The report gets a section chat_eval_<stage> (synthetic),
math500_<stage>, gsm8k_<stage>, ... with accuracy by level. Last line: RESULT task=... accuracy=... pass@k=... maj@k=...
"""

import os
import shutil

from reasoning import memplan
from reasoning.checkpoint import ModelSource, add_model_args
from reasoning.cli import add_run_args, parse_script_args, print_result, script_parser
from reasoning.common import UserError, get_base_dir, init_distributed, is_master, print0, run_main
from reasoning.eval_metrics import format_table
from reasoning.evaluation import EvalSettings, evaluate_task
from reasoning.latent import serving_mode
from reasoning.prompts import PROMPT_MODES, template_text
from reasoning.report import log_stage
from tasks.registry import build_task, section_name, task_label
from tasks.synthetic import DIFFICULTY as SYNTHETIC_DIFFICULTY


def build_parser():
    parser = script_parser(__doc__)
    add_model_args(parser, default_stage="sft")
    parser.add_argument("-a", "--task", default="synthetic",
                        help="synthetic | GSM8K | MATH-500 | MATH | customjson:FILE (comma list: one after another)")
    parser.add_argument("--data-path", default=None, help="local data file/folder (default $REASONING_TASK_DATA_DIR, "
                                                          "else the HF hub)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--max-problems", type=int, default=-1, help="first N problems only (-1: all)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per problem (pass@k, maj@k)")
    parser.add_argument("--temperature", type=float, default=None, help="default 0 (greedy); 0.7 with samples > 1")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=512, help="new tokens per completion")
    parser.add_argument("--batch-size", type=int, default=32, help="problems per engine call per rank")
    parser.add_argument("--prompt-mode", choices=PROMPT_MODES, default=None,
                        help="chat template or a plain completion prompt (default: base for base checkpoints)")
    parser.add_argument("--synthetic-difficulty", default="easy", choices=tuple(SYNTHETIC_DIFFICULTY),
                        help="synthetic task preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="results folder (default <base>/eval/<task>_<stage>)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier predictions instead of resuming")
    parser.add_argument("--no-report", action="store_true", help="do not write a report section")
    add_run_args(parser)
    return parser


def default_temperature(args) -> float:
    """--temperature, else greedy for one sample and 0.7 for several; the flags are checked (UserError names
    them) before anything is loaded."""
    if args.num_samples < 1 or args.batch_size < 1 or args.max_tokens < 1:
        raise UserError("--num-samples, --batch-size and --max-tokens: expected positive integers")
    if args.max_problems == 0 or args.max_problems < -1:
        raise UserError(f"--max-problems {args.max_problems}: expected a positive number or -1")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.num_samples == 1 else 0.7)
    if args.num_samples > 1 and temperature == 0:
        raise UserError(f"--num-samples {args.num_samples} with --temperature 0: greedy samples are identical; "
                        "expected a temperature > 0")
    if not [name for name in args.task.split(",") if name.strip()]:
        raise UserError(f"-a {args.task!r}: expected a task name such as synthetic or MATH-500")
    return temperature


def eval_settings(args, temperature: float, stage: str, latent_steps: int | None = None) -> EvalSettings:
    """The sampling settings of the flags (the prompt mode follows the checkpoint's stage; a chat_latent checkpoint
    brings its latent steps), checked."""
    settings = EvalSettings(num_samples=args.num_samples, temperature=temperature, top_k=args.top_k,
                            max_tokens=args.max_tokens, batch_size=args.batch_size,
                            prompt_mode=args.prompt_mode or ("base" if stage == "base" else "chat"), seed=args.seed,
                            latent_steps=latent_steps)
    try:
        settings.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return settings


def task_out_dir(args, label: str, stage: str, num_tasks: int, base_dir: str) -> str:
    """--out-dir for a single task, else <out-dir or base/eval>/<task>_<stage>[_k<k>]; --fresh empties it."""
    out_dir = args.out_dir if args.out_dir and num_tasks == 1 else \
        os.path.join(args.out_dir or os.path.join(base_dir, "eval"),
                     f"{label}_{stage}" + (f"_k{args.num_samples}" if args.num_samples > 1 else ""))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir}: is a file; expected a directory (existing or new)")
    if args.fresh and is_master() and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    return out_dir


def headline(summary: dict) -> dict:
    k = summary["num_samples"]
    return {"accuracy": summary["accuracy"], f"pass@{k}": summary[f"pass@{k}"], f"maj@{k}": summary[f"maj@{k}"]}


def print_summary(label: str, summary: dict, out_dir: str) -> None:
    se = summary["accuracy_se"]
    print(f"{label}: {summary['num_problems']} problems x {summary['num_samples']} samples | "
          + " | ".join(f"{key} {value:.4f}" + (f" ± {se:.4f} (SE)" if key == "accuracy" and se else "")
                       for key, value in headline(summary).items())
          + f" | no answer {summary['no_answer_frac']:.3f} | mean length {summary['mean_completion_tokens']:.1f} "
          f"tokens | " + (f"{summary['tokens_per_s']:.0f} tok/s" if summary["tokens_per_s"] else "nothing new"))
    if summary["by_level"]:
        print("accuracy by level:\n" + format_table(summary["by_level"]))
    print(f"predictions and summary: {out_dir}", flush=True)


def report_summary(section: str, summary: dict, out_dir: str, base_dir: str) -> None:
    # headline numbers first: the report's summary table shows a section's first metrics
    metrics = {"accuracy": summary["accuracy"], "accuracy_se": summary["accuracy_se"], **headline(summary),
               "no_answer_frac": summary["no_answer_frac"]}
    metrics.update({key: value for key, value in summary.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in metrics})
    tables = {"accuracy by level": summary["by_level"], "accuracy by subject": summary["by_subject"]}
    log_stage(section, config={"protocol": summary["protocol"], "out_dir": out_dir}, metrics=metrics,
              seconds=summary["seconds"], tables={k: v for k, v in tables.items() if v}, base_dir=base_dir)


def main(argv: list[str] | None = None):
    args = parse_script_args(build_parser(), argv)
    temperature = default_temperature(args)
    task_names = [name.strip() for name in args.task.split(",") if name.strip()]
    info = init_distributed(args.device)
    base_dir = args.base_dir or get_base_dir()
    source = ModelSource.from_args(args, base_dir)
    stage = source.stage
    model, tokenizer, meta = source.load(info.device, phase="eval")
    tokenizer, latent_steps = serving_mode(tokenizer, meta)  # a chat_latent checkpoint thinks in latent steps
    memplan.check_stage(lambda: memplan.plan_chat_eval(args.batch_size, args.num_samples, args.max_tokens,
                                                       model.config), info.device, "--batch-size or --max-tokens")
    settings = eval_settings(args, temperature, stage, latent_steps)
    print0(f"model: {source.dir} step {source.step} ({stage}) | prompt mode {settings.prompt_mode}: "
           f"{template_text(settings.prompt_mode, tokenizer)}"
           + ("" if latent_steps is None else f" | latent mode: {latent_steps} latent steps"))

    results = []
    for name in task_names:
        options = {"difficulty": args.synthetic_difficulty} if name.lower() == "synthetic" else {}
        try:
            task = build_task(name, split=args.split, data_path=args.data_path, **options)
        except ValueError as e:
            raise UserError(f"-a {name} --split {args.split}: {e}") from None
        label = task_label(name)
        out_dir = task_out_dir(args, label, stage, len(task_names), base_dir)
        protocol = {"task": label, "split": args.split, "grader": task.grader_description,
                    "checkpoint": {"dir": source.dir, "step": source.step}}
        summary = evaluate_task(model, tokenizer, task, settings, out_dir=out_dir, protocol=protocol, progress=True,
                                max_problems=None if args.max_problems == -1 else args.max_problems, log=print0)
        if not is_master():
            continue
        print_summary(label, summary, out_dir)
        if not args.no_report:
            report_summary(section_name(name, stage, settings.num_samples), summary, out_dir, base_dir)
        results.append((label, summary))

    k = settings.num_samples

    def joined(key):  # one value per task, in task order
        return ",".join(f"{s[key]:.4f}" for _, s in results)

    print_result({"task": ",".join(label for label, _ in results), "accuracy": joined("accuracy"),
                  "pass@k": joined(f"pass@{k}"), "maj@k": joined(f"maj@{k}"), "k": k})


if __name__ == "__main__":
    run_main(main)
