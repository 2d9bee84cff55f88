"""The run's report card: every stage appends a section, `generate` turns them into report.md with PNG plots.

Each stage calls `log_stage(name, config=..., metrics=..., series=..., seconds=...)`, which writes
`<base>/report/<name>.json` atomically (a rerun of a stage replaces its own section, nothing else).
`python -m reasoning.report generate` collects the sections into `<base>/report/report.md`: environment
(git commit, hardware, torch), one table of stage -> key metrics, total wall time, and plots of the curves
stages recorded (loss/bpb, SFT loss, RL reward/accuracy, MATH-500 accuracy by level), and an RL section: what the
gain measures, SFT vs RL held-out accuracy with standard errors, the reward curve. A stage without a section is
listed as "not run" — numbers are never invented.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess

from reasoning.common import atomic_write_json, atomic_write_text, get_base_dir

# Canonical order of the pipeline; other section names are listed after these, alphabetically.
STAGE_ORDER = ["tok_train", "tok_eval", "base_train", "base_eval", "chat_sft", "chat_eval_sft",
               "chat_rl", "chat_eval_rl", "math500_rl"]

# Which metrics summarise a stage in the table (others stay in the per-stage detail section).
HEADLINE_KEYS = {
    "tok_train": ["vocab_size", "train_seconds"],
    "tok_eval": ["bytes_per_token"],
    "base_train": ["val_bpb", "min_val_bpb", "initial_val_bpb", "train_loss", "tok_per_s", "mfu", "pack_utilization"],
    "base_eval": ["val_bpb"],
    "chat_sft": ["train_loss", "val_loss", "accuracy"],
    "chat_rl": ["mean_reward", "accuracy", "initial_accuracy"],
}


def report_dir(base_dir: str | None = None) -> str:
    path = os.path.join(base_dir or get_base_dir(), "report")
    os.makedirs(path, exist_ok=True)
    return path


def _jsonable(value):
    """Coerce tensors / numpy scalars to plain numbers so sections stay valid JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def log_stage(name: str, config: dict | None = None, metrics: dict | None = None,
              series: dict | None = None, seconds: float | None = None, tables: dict | None = None,
              base_dir: str | None = None) -> str:
    """Write (replace) one stage's section. `series` maps a curve name to [[x, y], ...] for plotting;
    `tables` maps a title to a list of row dicts (e.g. accuracy by level). Only rank 0 should call this."""
    section = {
        "name": name,
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": seconds,
        "config": _jsonable(config or {}),
        "metrics": _jsonable(metrics or {}),
        "series": _jsonable(series or {}),
        "tables": _jsonable(tables or {}),
    }
    path = os.path.join(report_dir(base_dir), f"{name}.json")
    atomic_write_json(path, section, indent=1)
    return path


def load_sections(base_dir: str | None = None) -> dict[str, dict]:
    directory = report_dir(base_dir)
    sections = {}
    for fname in sorted(os.listdir(directory)):
        if not fname.endswith(".json") or fname.startswith("."):  # hidden: temp files of interrupted writes
            continue
        try:
            with open(os.path.join(directory, fname), encoding="utf-8") as f:
                section = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue  # a damaged section must not take the whole report down; it shows as "not run"
        sections[section.get("name", fname[:-5])] = section
    return sections


def _ordered_names(sections: dict) -> list[str]:
    extra = sorted(n for n in sections if n not in STAGE_ORDER)
    return STAGE_ORDER + extra


def _fmt(value) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def environment_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, timeout=5, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
        else:
            info["gpu"] = "none"
    except ImportError:
        info["torch"] = "not installed"
    return info


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled towards 0)."""
    alpha, mean, weight, out = 2.0 / (span + 1), 0.0, 0.0, []
    for v in values:
        mean = (1 - alpha) * mean + alpha * float(v)
        weight = (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return out


def _plot_series(sections: dict, out_dir: str) -> list[tuple[str, str]]:
    """One PNG per stage that recorded curves; returns (title, filename) pairs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = []
    for name in _ordered_names(sections):
        section = sections.get(name)
        if not section or not section.get("series"):
            continue
        curves = {k: v for k, v in section["series"].items() if isinstance(v, list) and v}
        if not curves:
            continue
        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
        for ax, (curve, points) in zip(axes[0], curves.items()):
            xs = [p[0] for p in points if isinstance(p, (list, tuple)) and len(p) == 2]
            ys = [p[1] for p in points if isinstance(p, (list, tuple)) and len(p) == 2]
            if len(xs) < 30:
                ax.plot(xs, ys, marker="o", markersize=3)
            else:  # per-step curves (RL reward, training loss) are noisy: faint raw points, bold running mean
                ax.plot(xs, ys, alpha=0.3, linewidth=0.8, label="per step")
                ax.plot(xs, _ema(ys, span=max(5, len(ys) // 20)), linewidth=1.8, label="EMA")
                ax.legend(fontsize=7)
            ax.set_title(curve, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(name)
        fig.tight_layout()
        fname = f"{name}.png"
        fig.savefig(os.path.join(out_dir, fname), dpi=90)
        plt.close(fig)
        plots.append((name, fname))
    # Accuracy by level (MATH-500 style tables) as bar charts.
    for name in _ordered_names(sections):
        section = sections.get(name)
        if not section:
            continue
        for title, rows in section.get("tables", {}).items():
            if "level" not in title.lower() or not rows:
                continue
            labels = [str(r.get("level", "?")) for r in rows]
            values = [float(r.get("accuracy", 0.0)) for r in rows]
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            ax.bar(labels, values)
            ax.set_ylim(0, 1)
            ax.set_xlabel("level")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{name}: {title}", fontsize=9)
            fig.tight_layout()
            fname = f"{name}_{title.replace(' ', '_').lower()}.png"
            fig.savefig(os.path.join(out_dir, fname), dpi=90)
            plt.close(fig)
            plots.append((f"{name} — {title}", fname))
    return plots


def _rl_gain(sections: dict, out_dir: str) -> list[str]:
    """The RL section's lines: what the gain measures (one sentence), SFT and RL held-out accuracy with their
    standard errors, and a PNG of both with error bars beside the RL reward curve. Empty without both evals."""
    sft, rl = (sections.get(name, {}).get("metrics", {}) for name in ("chat_eval_sft", "chat_eval_rl"))
    if not (isinstance(sft.get("accuracy"), (int, float)) and isinstance(rl.get("accuracy"), (int, float))):
        return []
    task = sections["chat_eval_rl"].get("config", {}).get("protocol", {}).get("task", "task")
    n = rl.get("num_problems", "the")
    sft_config = sections.get("chat_sft", {}).get("config", {})
    answer_only = sft_config.get("synthetic_answer_only") or 0.0
    difficulty = f" (preset {sft_config['synthetic_difficulty']})" \
        if task == "synthetic" and sft_config.get("synthetic_difficulty") else ""
    lines = ["## RL: what the gain measures", "",
             f"The gain is what RL added to the SFT model it started from: greedy accuracy on the same {n} held-out "
             f"{task}{difficulty} test problems, drawn from the distribution RL trained on but never seen in "
             f"training, after RL minus after SFT."]
    if answer_only > 0:
        lines[-1] += (f" Here {answer_only:.0%} of the SFT examples stated the answer without worked steps, so part "
                      "of the gain is RL teaching the model to use its think span again (dev/LOG.md).")
    elif task == "synthetic":
        lines[-1] += " Every SFT example was fully worked, so the gain is RL improving the answers themselves."
    sft_se, rl_se = sft.get("accuracy_se"), rl.get("accuracy_se")
    gain = rl["accuracy"] - sft["accuracy"]
    gain_se = math.hypot(sft_se, rl_se) if isinstance(sft_se, (int, float)) and isinstance(rl_se, (int, float)) \
        else None

    def pm(value, se):
        return f"{value * 100:.1f}" + ("" if se is None else f" ± {se * 100:.1f}")
    lines += ["", "| held-out greedy accuracy (%, ± 1 standard error) | value |", "|---|---|",
              f"| after SFT | {pm(sft['accuracy'], sft_se)} |", f"| after RL | {pm(rl['accuracy'], rl_se)} |",
              f"| gain (points; SE of two independent evals, conservative) | {'+' if gain >= 0 else ''}"
              f"{pm(gain, gain_se)}" + ("" if not gain_se else f" ({gain / gain_se:.1f} SE)") + " |", ""]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return lines
    reward = [p for p in sections.get("chat_rl", {}).get("series", {}).get("reward", [])
              if isinstance(p, (list, tuple)) and len(p) == 2]
    fig, axes = plt.subplots(1, 2 if reward else 1, figsize=(8.4 if reward else 4.2, 3.2), squeeze=False)
    ax = axes[0][0]
    ax.bar(["SFT", "RL"], [sft["accuracy"], rl["accuracy"]], color=["#999999", "#3b7dd8"],
           yerr=[sft_se or 0.0, rl_se or 0.0], capsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"{n} {task} test problems (± 1 SE)", fontsize=9)
    if reward:
        xs, ys = [p[0] for p in reward], [p[1] for p in reward]
        ax = axes[0][1]
        ax.plot(xs, ys, alpha=0.3, linewidth=0.8, label="per step")
        ax.plot(xs, _ema(ys, span=max(5, len(ys) // 20)), linewidth=1.8, label="EMA")
        ax.set_title("RL reward (train prompts, sampled)", fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "rl_gain.png"), dpi=90)
    plt.close(fig)
    return lines + ["![RL gain](rl_gain.png)", ""]


def generate(base_dir: str | None = None) -> str:
    """Write report.md (and PNGs) from the stage sections; returns the report path."""
    out_dir = report_dir(base_dir)
    sections = load_sections(base_dir)
    lines = ["# reasoning — run report", ""]
    env = environment_info()
    lines += ["## Environment", ""] + [f"- **{k}**: {v}" for k, v in env.items()]
    lines += [f"- **generated**: {datetime.datetime.now().isoformat(timespec='seconds')}", ""]

    lines += ["## Summary", "", "| stage | status | key metrics | wall time |", "|---|---|---|---|"]
    total_seconds = 0.0
    for name in _ordered_names(sections):
        section = sections.get(name)
        if section is None:
            if name in STAGE_ORDER:
                lines.append(f"| {name} | not run | — | — |")
            continue
        metrics = section.get("metrics", {})
        keys = [k for k in HEADLINE_KEYS.get(name, []) if k in metrics] or list(metrics)[:6]
        summary = ", ".join(f"{k}={_fmt(metrics[k])}" for k in keys) or "—"
        seconds = section.get("seconds")
        if isinstance(seconds, (int, float)):
            total_seconds += seconds
            wall = f"{seconds / 60:.1f} min"
        else:
            wall = "—"
        lines.append(f"| {name} | done | {summary} | {wall} |")
    lines += ["", f"**Total wall time of recorded stages:** {total_seconds / 60:.1f} min", ""]

    lines += _rl_gain(sections, out_dir)
    plots = _plot_series(sections, out_dir)
    if plots:
        lines += ["## Plots", ""] + [f"### {title}\n\n![{title}]({fname})\n" for title, fname in plots]

    lines += ["## Stage details", ""]
    for name in _ordered_names(sections):
        section = sections.get(name)
        if section is None:
            continue
        lines += [f"### {name}", ""]
        if section.get("metrics"):
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in section["metrics"].items()]
            lines.append("")
        for title, rows in section.get("tables", {}).items():
            if not rows:
                continue
            cols = list(rows[0].keys())
            lines += [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
            lines.append("")
        if section.get("config"):
            config_text = json.dumps(section["config"], indent=1, sort_keys=True)
            lines += ["<details><summary>config</summary>", "", "```json", config_text, "```", "", "</details>", ""]
    path = os.path.join(out_dir, "report.md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def reset(base_dir: str | None = None):
    """Remove all sections (a fresh run); report.md and PNGs go too."""
    directory = report_dir(base_dir)
    for fname in os.listdir(directory):
        if fname.endswith((".json", ".md", ".png")):
            os.remove(os.path.join(directory, fname))


def main():
    parser = argparse.ArgumentParser(description="Run report: collect stage sections into report.md")
    parser.add_argument("command", choices=["generate", "reset"])
    parser.add_argument("--base-dir", default=None, help="run folder (default $REASONING_BASE_DIR)")
    args = parser.parse_args()
    if args.command == "generate":
        path = generate(args.base_dir)
        print(f"report written to {path}")
    else:
        reset(args.base_dir)
        print("report sections removed")


if __name__ == "__main__":
    main()
