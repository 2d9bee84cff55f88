#!/usr/bin/env bash
# The whole pipeline in miniature on a CPU, offline, in about 20 minutes on 2 cores:
#   synthetic corpus -> tok_train/tok_eval -> base_train -> base_eval -> chat_sft -> chat_eval (SFT)
#   -> chat_rl -> chat_eval (RL) -> MATH-500 slice (when ../shared/data is present) -> report.md
#
# Usage:
#   bash runs/runcpu.sh                 # run every stage not yet done (a stage is done when its report section exists)
#   bash runs/runcpu.sh --force         # rerun every stage
#   bash runs/runcpu.sh --stage chat_rl # (re)run one stage alone (repeatable: --stage a --stage b)
#   bash runs/runcpu.sh --dry-run       # print the commands only
#
# Knobs (environment): REASONING_BASE_DIR (default ~/.cache/reasoning/runcpu), DEPTH, TAG, VOCAB_SIZE, SEQ_LEN,
# BASE_STEPS, SFT_STEPS, RL_STEPS, EVAL_PROBLEMS, MATH500_PATH, NUM_SHARDS, DOCS_PER_SHARD, WANDB_RUN (wandb off
# unless set), and extra flags appended to a stage's command (later flags win, so they can override the ones above):
# TOK_ARGS, BASE_ARGS, BASE_EVAL_ARGS, SFT_ARGS, RL_ARGS, EVAL_ARGS (both synthetic evals), MATH500_ARGS.
# REASONING_SKIP_SETUP=1 runs with the python already on PATH instead of the project venv (runs/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_ROOT="$(pwd)"
START_TIME=$(date +%s)

FORCE=0
DRY_RUN=0
ONLY_STAGES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --stage) shift; ONLY_STAGES+=("${1:?--stage needs a stage name}") ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p;}' "$0"; exit 0 ;;  # the comment header
        *) echo "error: unknown argument '$1' (expected --force, --stage NAME, --dry-run)" >&2; exit 2 ;;
    esac
    shift
done

STAGES=(tok_train tok_eval base_train base_eval chat_sft chat_eval_sft chat_rl chat_eval_rl math500_rl)
for requested in "${ONLY_STAGES[@]}"; do
    case " ${STAGES[*]} " in
        *" $requested "*) ;;
        *) echo "error: --stage $requested: unknown stage (expected one of ${STAGES[*]})" >&2; exit 2 ;;
    esac
done

export REASONING_BASE_DIR="${REASONING_BASE_DIR:-$HOME/.cache/reasoning/runcpu}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 2)}"
export WANDB_MODE="${WANDB_MODE:-offline}"
DEPTH="${DEPTH:-2}"
TAG="${TAG:-d${DEPTH}}"
VOCAB_SIZE="${VOCAB_SIZE:-1024}"
SEQ_LEN="${SEQ_LEN:-256}"
BASE_STEPS="${BASE_STEPS:-300}"
SFT_STEPS="${SFT_STEPS:-300}"
RL_STEPS="${RL_STEPS:-100}"
EVAL_PROBLEMS="${EVAL_PROBLEMS:-500}"
MATH500_PATH="${MATH500_PATH:-$REPO_ROOT/../shared/data/math500_test.json}"
NUM_SHARDS="${NUM_SHARDS:-8}"
# Half the SFT examples state the answer without worked steps (as distillation data often does): greedy SFT then
# prefers the shortcut, and RL with a verifiable reward has to discover that reasoning in the think span pays.
SFT_ANSWER_ONLY="${SFT_ANSWER_ONLY:-0.5}"
DOCS_PER_SHARD="${DOCS_PER_SHARD:-4000}"
# Extra per-stage flags, split on whitespace (the smoke test shrinks every stage with them).
read -r -a TOK_EXTRA <<< "${TOK_ARGS:-}"
read -r -a BASE_EXTRA <<< "${BASE_ARGS:-}"
read -r -a BASE_EVAL_EXTRA <<< "${BASE_EVAL_ARGS:-}"
read -r -a SFT_EXTRA <<< "${SFT_ARGS:-}"
read -r -a RL_EXTRA <<< "${RL_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
read -r -a MATH500_EXTRA <<< "${MATH500_ARGS:-}"
RUN_ARGS=()
if [ -n "${WANDB_RUN:-}" ]; then RUN_ARGS=(--run "$WANDB_RUN"); fi

if [ "$DRY_RUN" -eq 0 ]; then
    source runs/setup_env.sh
fi
PY="python"

stage_done() { [ -f "$REASONING_BASE_DIR/report/$1.json" ]; }
should_run() {
    local name="$1"
    if [ ${#ONLY_STAGES[@]} -gt 0 ]; then
        local s
        for s in "${ONLY_STAGES[@]}"; do [ "$s" = "$name" ] && return 0; done
        return 1
    fi
    [ "$FORCE" -eq 1 ] && return 0
    if stage_done "$name"; then
        echo "[runcpu] $name: done already (report/$name.json), skipping; --force or --stage $name reruns it"
        return 1
    fi
    return 0
}
run_stage() {
    # run_stage NAME CMD...: time a stage, print its command, stop the pipeline if it fails
    local name="$1"; shift
    if ! should_run "$name"; then return 0; fi
    echo "[runcpu] ===== $name: $*"
    if [ "$DRY_RUN" -eq 1 ]; then return 0; fi
    local t0; t0=$(date +%s)
    "$@"
    echo "[runcpu] $name finished in $(( $(date +%s) - t0 )) s"
}

[ "$DRY_RUN" -eq 1 ] || mkdir -p "$REASONING_BASE_DIR"  # a dry run touches nothing
echo "[runcpu] base dir: $REASONING_BASE_DIR"

# 1. offline pretraining corpus (synthetic reasoning problems + templated prose); only written once
if [ "$DRY_RUN" -eq 1 ] || [ ! -d "$REASONING_BASE_DIR/base_data" ] || [ "$FORCE" -eq 1 ]; then
    CORPUS_CMD=("$PY" -m reasoning.dataset --synthetic --num-shards "$NUM_SHARDS" --docs-per-shard "$DOCS_PER_SHARD")
    echo "[runcpu] ===== corpus: ${CORPUS_CMD[*]}"
    [ "$DRY_RUN" -eq 1 ] || "${CORPUS_CMD[@]}"
fi

run_stage tok_train $PY -m scripts.tok_train --vocab-size "$VOCAB_SIZE" "${TOK_EXTRA[@]}"
run_stage tok_eval $PY -m scripts.tok_eval
# a stage that runs again (--force, --stage, or after a killed attempt) replaces its checkpoints: --overwrite
run_stage base_train $PY -m scripts.base_train --overwrite --depth "$DEPTH" --max-seq-len "$SEQ_LEN" \
    --num-iterations "$BASE_STEPS" --device-batch-size 16 --total-batch-size $((16 * SEQ_LEN)) --eval-every 100 --eval-tokens 131072 --tag "$TAG" "${RUN_ARGS[@]}" "${BASE_EXTRA[@]}"
run_stage base_eval $PY -m scripts.base_eval --stage base --tag "$TAG" --eval-tokens 131072 "${BASE_EVAL_EXTRA[@]}"
run_stage chat_sft $PY -m scripts.chat_sft --overwrite --stage base --tag "$TAG" --task synthetic \
    --num-iterations "$SFT_STEPS" --device-batch-size 16 --total-batch-rows 16 --max-seq-len "$SEQ_LEN" \
    --synthetic-answer-only "$SFT_ANSWER_ONLY" "${RUN_ARGS[@]}" "${SFT_EXTRA[@]}"
run_stage chat_eval_sft $PY -m scripts.chat_eval --stage sft --tag "$TAG" -a synthetic --max-problems "$EVAL_PROBLEMS" \
    --max-tokens 64 --batch-size 128 "${EVAL_EXTRA[@]}"
run_stage chat_rl $PY -m scripts.chat_rl --overwrite --stage sft --tag "$TAG" --task synthetic --num-steps "$RL_STEPS" \
    --prompts-per-step 16 --num-samples 8 --max-new-tokens 64 --lr-scale 0.2 --eval-every 50 --eval-problems 100 \
    "${RUN_ARGS[@]}" "${RL_EXTRA[@]}"
run_stage chat_eval_rl $PY -m scripts.chat_eval --stage rl --tag "$TAG" -a synthetic --max-problems "$EVAL_PROBLEMS" \
    --max-tokens 64 --batch-size 128 "${EVAL_EXTRA[@]}"
if [ -f "$MATH500_PATH" ]; then
    run_stage math500_rl $PY -m scripts.chat_eval --stage rl --tag "$TAG" -a MATH-500 --data-path "$MATH500_PATH" \
        --max-problems 32 --max-tokens 128 "${MATH500_EXTRA[@]}"
else
    echo "[runcpu] MATH-500 slice skipped: no file at $MATH500_PATH (set MATH500_PATH)"
fi

if [ "$DRY_RUN" -eq 1 ]; then exit 0; fi
$PY -m reasoning.report generate
MINUTES=$(python - "$START_TIME" <<'EOF'
import sys, time
print(f"{(time.time() - float(sys.argv[1])) / 60:.1f}")
EOF
)
# Headline numbers from the report sections (never invented: a missing stage prints "na").
$PY - "$REASONING_BASE_DIR" "$MINUTES" <<'EOF'
import json, os, sys
base, minutes = sys.argv[1], sys.argv[2]
def metric(stage, key):
    try:
        with open(os.path.join(base, "report", f"{stage}.json")) as f:
            value = json.load(f)["metrics"].get(key)
        return "na" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
    except (OSError, ValueError, KeyError):
        return "na"
print(f"[runcpu] report: {os.path.join(base, 'report', 'report.md')}")
print(f"[runcpu] chat with the model (README, Chatting): source .venv/bin/activate && "
      f"REASONING_BASE_DIR={base} python -m scripts.chat_cli --stage rl")
print(f"RESULT val_bpb={metric('base_train', 'val_bpb')} sft_acc={metric('chat_eval_sft', 'accuracy')} "
      f"rl_acc={metric('chat_eval_rl', 'accuracy')} math500_acc={metric('math500_rl', 'accuracy')} minutes={minutes}")
EOF
