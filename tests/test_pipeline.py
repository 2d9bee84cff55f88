"""The run scripts themselves, end to end: runs/runcpu.sh (one process per stage) and runs/speedrun.sh (the 8×GPU
stage sequence, here under `torchrun --nproc_per_node=2` on gloo), at micro sizes.

These are the most expensive tests of the suite (each full chain is ~1–1.5 minutes of mostly interpreter and
process-group start-up on 2 cores), so every stage is shrunk through the scripts' env knobs to the least that still
exercises it: depth 1, vocab 400, a couple of optimizer steps, a few eval problems of 8 new tokens. The sequence
length is 192 rather than 64 because synthetic prompts run to ~150 tokens at this vocab and GRPO needs the whole
prompt in context. The interpreter running pytest is reused (REASONING_SKIP_SETUP=1): no venv is created.
"""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH500 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "math500_test.json"))
HAVE_MATH500 = os.path.isfile(MATH500)
NO_MATH500 = f"MATH-500 slice skipped: no shared data at {MATH500}"

# Every env knob the run scripts read: inherited values would change what the tests run, so they are cleared.
SCRIPT_KNOBS = (
    "REASONING_BASE_DIR", "REASONING_DATA_DIR", "REASONING_TASK_DATA_DIR", "REASONING_VENV", "REASONING_EXTRAS", "WANDB_RUN", "DEPTH", "TAG",
    "VOCAB_SIZE", "SEQ_LEN", "BASE_STEPS", "SFT_STEPS", "RL_STEPS", "EVAL_PROBLEMS", "MATH500_PATH", "NUM_SHARDS",
    "DOCS_PER_SHARD", "TOK_ARGS", "BASE_ARGS", "BASE_EVAL_ARGS", "SFT_ARGS", "RL_ARGS", "EVAL_ARGS", "MATH500_ARGS",
    "GSM8K_ARGS", "DATA_ARGS", "NPROC", "SFT_TASKS", "RL_TASK", "MAJ_K", "TORCHRUN", "SYNTHETIC", "CHAT_EVAL_TASK",
    "FINAL_EVAL_TASK", "FP8", "RECIPE", "SFT_ANSWER_ONLY", "SYNTHETIC_DIFFICULTY", "RL_LR_SCALE",
)

# Micro sizes per stage, shared by both pipelines (appended flags: later ones win over the scripts' own).
SEQ_LEN = 192
EVAL_PROBLEMS = 4
MICRO_BASE = f"--device-batch-size 2 --total-batch-size {2 * SEQ_LEN} --eval-every 0 --eval-tokens 2048 --sample-every -1"
MICRO_BASE_EVAL = "--device-batch-size 2 --eval-tokens 2048 --sample-tokens 4"
MICRO_SFT = (f"--device-batch-size 2 --total-batch-rows 4 --max-seq-len {SEQ_LEN} --task-size 64 --val-examples 8 --eval-every 0 "
             "--eval-problems 2 --eval-max-tokens 8")
MICRO_RL = ("--prompts-per-step 2 --num-samples 2 --max-new-tokens 8 --task-size 16 --eval-every 0 "
            "--eval-problems 2 --eval-pass-k 1 --device-batch-size 4")
MICRO_EVAL = "--max-tokens 8 --batch-size 2"
STEPS = {"base": 3, "sft": 2, "rl": 1}

RUNCPU_STAGES = ["tok_train", "tok_eval", "base_train", "base_eval", "chat_sft", "chat_eval_sft", "chat_rl",
                 "chat_eval_rl"] + (["math500_rl"] if HAVE_MATH500 else [])


# ----------------------------------------------------------------------------------------------- helpers

def script_env(tmp_dir, **knobs) -> dict:
    """The environment of a run script: this interpreter as `python`, CPU only, one thread per process."""
    bin_dir = os.path.join(tmp_dir, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    wrapper = os.path.join(bin_dir, "python")
    if not os.path.exists(wrapper):
        # a wrapper rather than a symlink: the venv is found from the real executable's path
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
        os.chmod(wrapper, 0o755)
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_KNOBS}
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), REASONING_SKIP_SETUP="1", REASONING_DEVICE="cpu",
               OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in knobs.items()})
    return env


def run_script(script: str, *args: str, env: dict, timeout: int = 420) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", os.path.join("runs", script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


def section(base_dir, name: str) -> dict:
    with open(os.path.join(base_dir, "report", f"{name}.json")) as f:
        return json.load(f)


def section_mtimes(base_dir) -> dict:
    report = os.path.join(base_dir, "report")
    return {f: os.stat(os.path.join(report, f)).st_mtime_ns for f in os.listdir(report) if f.endswith(".json")}


def stage_lines(stdout: str) -> list[str]:
    """Names of the stages runcpu.sh started, in order."""
    return re.findall(r"^\[runcpu\] ===== (\w+):", stdout, flags=re.M)


def parse_result(line: str) -> dict:
    assert line.startswith("RESULT "), line
    return dict(item.split("=", 1) for item in line.split()[1:])


def summary_rows(report_md: str) -> dict[str, tuple[str, str]]:
    """stage -> (status, key metrics) from report.md's summary table."""
    table = report_md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("stage", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def assert_finite_metrics(text: str, where: str):
    pairs = [item.split("=", 1) for item in text.split(", ")]
    assert pairs and all(len(p) == 2 for p in pairs), f"{where}: unparsable metrics {text!r}"
    for key, value in pairs:
        assert math.isfinite(float(value)), f"{where}: {key}={value}"


def assert_valid_png(path: str):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG file"
    import matplotlib.image

    pixels = matplotlib.image.imread(path)  # a full decode: a truncated file fails here
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50, (path, pixels.shape)
    assert pixels.std() > 0, f"{path}: a blank image"


def assert_report_card(base_dir, stages: list[str]):
    """report.md lists every stage as done with finite numbers; every plot it links is a real PNG."""
    with open(os.path.join(base_dir, "report", "report.md")) as f:
        report_md = f.read()
    rows = summary_rows(report_md)
    for name in stages:
        assert name in rows, f"report.md has no row for {name}: {sorted(rows)}"
        status, metrics = rows[name]
        assert status == "done", (name, status)
        assert_finite_metrics(metrics, name)
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report_md)
    assert {"base_train.png", "chat_sft.png", "chat_rl.png"} <= set(plots), plots  # the stages with curves
    for fname in plots:
        assert_valid_png(os.path.join(base_dir, "report", fname))
    return report_md


def assert_predictions(base_dir, eval_name: str, num_lines: int, checkpoint_stage: str):
    eval_dir = os.path.join(base_dir, "eval", eval_name)
    with open(os.path.join(eval_dir, "predictions.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert len(records) == num_lines, (eval_name, len(records))
    assert all(isinstance(r["correct"], bool) and isinstance(r["completion"], str) for r in records)
    with open(os.path.join(eval_dir, "summary.json")) as f:
        summary = json.load(f)
    # graded the checkpoint of the stage it names, not some other one
    assert os.path.normpath(summary["protocol"]["checkpoint"]["dir"]) == \
        os.path.join(str(base_dir), "checkpoints", checkpoint_stage, "d1")
    assert summary["accuracy"] == sum(r["correct"] for r in records) / len(records)


def assert_checkpoints(base_dir):
    from reasoning.checkpoint import checkpoint_dir, find_last_step

    for stage, steps in STEPS.items():
        assert find_last_step(checkpoint_dir(stage, "d1", str(base_dir))) == steps, stage


# ----------------------------------------------------------------------------------------------- static checks

def test_run_scripts_parse():
    for script in sorted(os.listdir(os.path.join(REPO, "runs"))):
        if script.endswith(".sh"):
            proc = subprocess.run(["bash", "-n", os.path.join(REPO, "runs", script)], capture_output=True, text=True)
            assert proc.returncode == 0, f"{script}: {proc.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_run_scripts_are_shellcheck_clean():
    scripts = sorted(os.path.join("runs", s) for s in os.listdir(os.path.join(REPO, "runs")) if s.endswith(".sh"))
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_speedrun_dry_run_lists_the_stages_in_order(tmp_path):
    base = tmp_path / "speedrun"
    proc = run_script("speedrun.sh", "--commands", env=script_env(tmp_path, REASONING_BASE_DIR=base), timeout=30)
    commands = [line[len("[speedrun] "):] for line in proc.stdout.splitlines() if line.startswith("[speedrun] ")]
    expected = [  # (command prefix, must contain), in pipeline order
        ("python -m reasoning.report reset", ""),
        ("python -m scripts.base_data -n 8", ""),
        ("python -m scripts.base_data -n 240", "&"),  # the rest downloads in the background...
        ("DATASET_DOWNLOAD_PID=$!", ""),
        ("python -m scripts.tok_train", "--vocab-size 32768"),
        ("python -m scripts.tok_eval", ""),
        ("wait ", ""),  # ...and is waited for before pretraining
        ("torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- ", "--depth 20"),
        ("torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- ", "--stage base"),
        ("torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- ", "--task GSM8K,MATH,SmolTalk"),
        ("torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- ", "--stage sft --tag d20 -a GSM8K"),
        ("torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- ", "--task MATH --num-steps 400"),
        ("torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- ", "--stage rl --tag d20 -a MATH-500"),
        ("torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- ", "-a MATH-500 --num-samples 8"),
        ("torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- ", "--stage rl --tag d20 -a GSM8K"),
        ("python -m reasoning.report generate", ""),
    ]
    assert len(commands) == len(expected) + 1, commands  # + the line naming the report
    for command, (prefix, part) in zip(commands, expected):
        assert command.startswith(prefix) and part in command, (command, prefix, part)
    assert not base.exists(), "a dry run must not create the run folder"

    # the CPU knobs: synthetic corpus instead of the download, the launcher and tasks swapped
    proc = run_script("speedrun.sh", "--commands", env=script_env(
        tmp_path, REASONING_BASE_DIR=base, SYNTHETIC=1, DEPTH=1, TORCHRUN="torchrun --nproc_per_node=2",
        SFT_TASKS="synthetic", RL_TASK="synthetic", CHAT_EVAL_TASK="synthetic", FINAL_EVAL_TASK="MATH-500",
        MATH500_ARGS="--data-path x.json"), timeout=30)
    assert "scripts.base_data --synthetic --num-shards 8 --docs-per-shard 4000" in proc.stdout
    assert " -n 240" not in proc.stdout and "wait " not in proc.stdout
    assert proc.stdout.count("torchrun --nproc_per_node=2 -m scripts.") == 8
    assert "-a synthetic" in proc.stdout and "-a GSM8K" not in proc.stdout and "--task MATH " not in proc.stdout
    assert proc.stdout.count("-a MATH-500") == 2 and proc.stdout.count("--data-path x.json") == 2


def test_speedrun_dry_run_shows_each_gpu_stage_plan_and_chosen_batch(tmp_path):
    """--dry-run = the commands + under each GPU stage the memory planner's line (scripts.plan_memory --brief) with
    the settings it chose for GPU_MEMORY_GIB; --commands alone prints no plan. A tiny depth keeps planning quick."""
    base = tmp_path / "speedrun"
    env = script_env(tmp_path, REASONING_BASE_DIR=base, SYNTHETIC=1, DEPTH=2, SFT_TASKS="synthetic",
                     RL_TASK="synthetic", CHAT_EVAL_TASK="synthetic", FINAL_EVAL_TASK="synthetic", GPU_MEMORY_GIB=80)
    out = run_script("speedrun.sh", "--dry-run", env=env, timeout=600).stdout
    lines = out.splitlines()
    stages = [line for line in lines if line.startswith("[speedrun] ") and " -m scripts." in line and " -- " in line]
    plans = [line for line in lines if line.startswith("[plan] ")]
    assert len(stages) >= 5 and len(plans) == len(stages), out
    current = None  # each GPU stage's plan line comes after its command, before the next command
    for line in lines:
        if line in stages:
            current = line.split(" -m scripts.")[1].split()[0]
        elif line.startswith("[speedrun] "):
            current = None
        elif line.startswith("[plan] "):
            assert current and line.startswith(f"[plan] {current}: ") and "fit 80 GiB" in line, (current, line)
            current = None
    train = next(line for line in plans if line.startswith("[plan] base_train: "))
    assert "device_batch_size=" in train and "accumulation=" in train  # the batch the planner chose
    assert not base.exists(), "a dry run must not create the run folder"
    quick = run_script("speedrun.sh", "--commands", env=env, timeout=60).stdout
    assert "[plan]" not in quick and quick.count("[speedrun] ") == out.count("[speedrun] ")


def test_runcpu_dry_run_and_bad_stage(tmp_path):
    base = tmp_path / "runcpu"
    env = script_env(tmp_path, REASONING_BASE_DIR=base, MATH500_PATH=tmp_path / "absent.json", BASE_ARGS="--foo 1")
    proc = run_script("runcpu.sh", "--dry-run", env=env, timeout=30)
    assert stage_lines(proc.stdout) == ["corpus"] + RUNCPU_STAGES[:8]
    base_line = next(line for line in proc.stdout.splitlines() if "===== base_train:" in line)
    assert base_line.endswith("--tag d2 --foo 1")  # extra flags go last, so they win
    assert "MATH-500 slice skipped" in proc.stdout
    assert not base.exists(), "a dry run must not create the run folder"
    bad = subprocess.run(["bash", "runs/runcpu.sh", "--stage", "chat_lr", "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--stage chat_lr: unknown stage" in bad.stderr, bad.stderr

    # the default recipe: clean SFT data (every example worked), the twostep RL recipe, 1000-problem evals
    lines = {name: line for line in proc.stdout.splitlines() for name in RUNCPU_STAGES if f"===== {name}:" in line}
    assert "--synthetic-answer-only 0 " in lines["chat_sft"] + " " and "--num-iterations 30 " in lines["chat_sft"]
    for name in ("chat_sft", "chat_eval_sft", "chat_rl", "chat_eval_rl"):
        assert "--synthetic-difficulty twostep" in lines[name], lines[name]
    for flags in ("--num-steps 450", "--lr-scale 0.1", "--warmup-ratio 0.05", "--filter-zero-variance"):
        assert flags in lines["chat_rl"], lines["chat_rl"]
    assert "--max-problems 1000" in lines["chat_eval_sft"] and "--max-problems 1000" in lines["chat_eval_rl"]
    # the answer-only mixture stays one knob away; an unknown recipe is a one-line error
    answer_only = run_script("runcpu.sh", "--dry-run", env=dict(env, RECIPE="answer-only"), timeout=30).stdout
    assert "--synthetic-difficulty easy --num-iterations 300" in answer_only
    assert "--synthetic-answer-only 0.5" in answer_only and "--lr-scale 0.2 --eval-every" in answer_only
    bad = subprocess.run(["bash", "runs/runcpu.sh", "--dry-run"], cwd=REPO, env=dict(env, RECIPE="dirty"),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: RECIPE=dirty: unknown recipe (expected clean or answer-only)", bad.stderr


# ----------------------------------------------------------------------------------------------- runcpu.sh

def run_runcpu_micro(tmp) -> tuple:
    """One full micro run of runs/runcpu.sh in folder `tmp`: (base_dir, env, stdout). Run once per session by the
    `runcpu` fixture (conftest.py), which test_newcomer shares."""
    base = tmp / "run"
    env = script_env(
        tmp, REASONING_BASE_DIR=base, NUM_SHARDS=2, DOCS_PER_SHARD=200, VOCAB_SIZE=400, DEPTH=1, SEQ_LEN=SEQ_LEN,
        BASE_STEPS=STEPS["base"], SFT_STEPS=STEPS["sft"], RL_STEPS=STEPS["rl"], EVAL_PROBLEMS=EVAL_PROBLEMS,
        MATH500_PATH=MATH500 if HAVE_MATH500 else tmp / "no_math500.json", BASE_ARGS=MICRO_BASE,
        BASE_EVAL_ARGS=MICRO_BASE_EVAL, SFT_ARGS=MICRO_SFT, RL_ARGS=MICRO_RL, EVAL_ARGS=MICRO_EVAL,
        MATH500_ARGS="--max-problems 2 --max-tokens 8")
    start = time.perf_counter()
    proc = run_script("runcpu.sh", env=env)
    print(f"runcpu.sh micro chain: {time.perf_counter() - start:.1f} s")
    return base, env, proc.stdout


@pytest.mark.slow
def test_runcpu_runs_every_stage_and_writes_the_report_card(runcpu):
    base, _, stdout = runcpu
    assert stage_lines(stdout) == ["corpus"] + RUNCPU_STAGES
    if not HAVE_MATH500:
        assert "MATH-500 slice skipped" in stdout

    from reasoning.tokenizer import Tokenizer

    assert Tokenizer.load(os.path.join(base, "tokenizer")).vocab_size == 400
    assert_checkpoints(base)
    assert_predictions(base, "synthetic_sft", EVAL_PROBLEMS, "sft")
    assert_predictions(base, "synthetic_rl", EVAL_PROBLEMS, "rl")
    if HAVE_MATH500:
        assert_predictions(base, "MATH-500_rl", 2, "rl")
    assert_report_card(base, RUNCPU_STAGES)

    # the chain is wired through: each stage learned from / evaluated the previous one's output
    train, evaluated = section(base, "base_train")["metrics"], section(base, "base_eval")["metrics"]
    assert train["val_bpb"] < train["initial_val_bpb"]  # 3 steps already lower held-out bpb
    assert abs(evaluated["val_bpb"] - train["val_bpb"]) < 1e-4  # base_eval reloads the same weights, same tokens
    sft = section(base, "chat_sft")["metrics"]
    assert sft["val_loss"] < sft["initial_val_loss"]

    result = parse_result(stdout.strip().splitlines()[-1])
    for key in ("val_bpb", "sft_acc", "rl_acc"):
        assert math.isfinite(float(result[key])), result
    assert result["val_bpb"] == f"{train['val_bpb']:.4f}"
    assert float(result["sft_acc"]) == pytest.approx(section(base, "chat_eval_sft")["metrics"]["accuracy"], abs=1e-4)
    assert float(result["rl_acc"]) == pytest.approx(section(base, "chat_eval_rl")["metrics"]["accuracy"], abs=1e-4)
    # every held-out accuracy comes with its standard error; the gain's is the two combined
    sft_se, rl_se = (section(base, f"chat_eval_{s}")["metrics"]["accuracy_se"] for s in ("sft", "rl"))
    assert float(result["sft_se"]) == pytest.approx(sft_se, abs=1e-4)
    assert float(result["rl_se"]) == pytest.approx(rl_se, abs=1e-4)
    assert float(result["gain"]) == pytest.approx(float(result["rl_acc"]) - float(result["sft_acc"]), abs=2e-4)
    assert float(result["se"]) == pytest.approx(math.hypot(sft_se, rl_se), abs=1e-4)


@pytest.mark.slow
def test_runcpu_rerun_skips_finished_stages(runcpu):
    base, env, first_stdout = runcpu
    before = section_mtimes(base)
    stdout = run_script("runcpu.sh", env=env, timeout=120).stdout
    assert stage_lines(stdout) == []
    for name in RUNCPU_STAGES:
        assert f"[runcpu] {name}: done already (report/{name}.json), skipping" in stdout
    assert section_mtimes(base) == before
    assert parse_result(stdout.strip().splitlines()[-1])["val_bpb"] == \
        parse_result(first_stdout.strip().splitlines()[-1])["val_bpb"]


@pytest.mark.slow
def test_runcpu_stage_flag_reruns_only_that_stage(runcpu):
    base, env, _ = runcpu
    before = section_mtimes(base)
    stdout = run_script("runcpu.sh", "--stage", "tok_eval", env=env, timeout=120).stdout
    assert stage_lines(stdout) == ["tok_eval"]
    assert "skipping" not in stdout
    after = section_mtimes(base)
    assert after["tok_eval.json"] > before["tok_eval.json"]
    assert {k: v for k, v in after.items() if k != "tok_eval.json"} == \
        {k: v for k, v in before.items() if k != "tok_eval.json"}
    assert stdout.strip().splitlines()[-1].startswith("RESULT ")


# ----------------------------------------------------------------------------------------------- speedrun.sh

@pytest.fixture(scope="module")
def speedrun(tmp_path_factory):
    """runs/speedrun.sh's stage sequence under torchrun with 2 gloo ranks: (base_dir, stdout, dry-run stdout)."""
    tmp = tmp_path_factory.mktemp("speedrun")
    base = tmp / "run"
    final_eval = {"FINAL_EVAL_TASK": "MATH-500", "MATH500_ARGS": f"--data-path {MATH500} --max-problems 2"} \
        if HAVE_MATH500 else {"FINAL_EVAL_TASK": "synthetic"}
    env = script_env(
        tmp, REASONING_BASE_DIR=base, SYNTHETIC=1, DATA_ARGS="--num-shards 3 --docs-per-shard 200", VOCAB_SIZE=400,
        DEPTH=1, TORCHRUN="python -m torch.distributed.run --standalone --nproc_per_node=2",
        # 2 rows on each of the 2 ranks (later flags win over MICRO_BASE's one-rank batch)
        BASE_ARGS=f"--max-seq-len {SEQ_LEN} --num-iterations {STEPS['base']} {MICRO_BASE} "
                  f"--total-batch-size {2 * 2 * SEQ_LEN}",
        BASE_EVAL_ARGS=MICRO_BASE_EVAL, SFT_TASKS="synthetic", SFT_ARGS=f"--num-iterations {STEPS['sft']} {MICRO_SFT}",
        RL_TASK="synthetic", RL_ARGS=f"--num-steps {STEPS['rl']} {MICRO_RL}", CHAT_EVAL_TASK="synthetic",
        EVAL_ARGS=f"--max-problems {EVAL_PROBLEMS} {MICRO_EVAL}", MAJ_K=2, **final_eval)
    dry = run_script("speedrun.sh", "--commands", env=env, timeout=30).stdout
    start = time.perf_counter()
    proc = run_script("speedrun.sh", env=env)
    print(f"speedrun.sh micro chain under torchrun x2: {time.perf_counter() - start:.1f} s")
    return base, proc.stdout, dry


@pytest.mark.slow
def test_speedrun_stage_sequence_runs_under_torchrun(speedrun):
    base, stdout, dry = speedrun
    # exactly the commands the dry run lists, in the same order
    assert [l for l in stdout.splitlines() if l.startswith("[speedrun] ")] == dry.splitlines()
    assert "× 2 data ranks" in stdout  # base_train really ran data-parallel
    assert_checkpoints(base)
    final = "math500_rl" if HAVE_MATH500 else "chat_eval_rl"
    stages = ["tok_train", "tok_eval", "base_train", "base_eval", "chat_sft", "chat_eval_sft", "chat_rl",
              "chat_eval_rl", final, f"{final}_k2"]
    assert_report_card(base, stages)
    for name in ("chat_sft", "chat_rl"):
        assert section(base, name)["config"]["world_size"] == 2, name
    for name in ("chat_eval_sft", "chat_eval_rl", final, f"{final}_k2"):
        assert section(base, name)["metrics"]["world_size"] == 2, name
    assert_predictions(base, "synthetic_sft", EVAL_PROBLEMS, "sft")
    assert_predictions(base, "synthetic_rl", EVAL_PROBLEMS, "rl")
    train, evaluated = section(base, "base_train")["metrics"], section(base, "base_eval")["metrics"]
    assert abs(evaluated["val_bpb"] - train["val_bpb"]) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MATH500, reason=NO_MATH500)
def test_speedrun_math500_greedy_and_majority_evals(speedrun):
    base, _, _ = speedrun
    assert_predictions(base, "MATH-500_rl", 2, "rl")
    assert_predictions(base, "MATH-500_rl_k2", 2 * 2, "rl")  # 2 problems x MAJ_K samples
    sampled = section(base, "math500_rl_k2")
    assert sampled["config"]["protocol"]["temperature"] == 0.7
    assert {"pass@2", "maj@2"} <= set(sampled["metrics"])
    assert section(base, "math500_rl")["config"]["protocol"]["temperature"] == 0.0
