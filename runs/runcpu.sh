#!/usr/bin/env bash
# The whole pipeline in miniature on a CPU, offline, in under 20 minutes on 2 cores:
#   synthetic corpus -> tok_train/tok_eval -> base_train -> base_eval -> chat_sft -> chat_eval (SFT)
#   -> chat_rl -> chat_eval (RL) -> MATH-500 slice (when ../shared/data is present) -> report.md
#
# Usage:
#   bash runs/runcpu.sh                 # run every stage not yet done (a stage is done when its report section exists)
#   bash runs/runcpu.sh --force         # rerun every stage
#   bash runs/runcpu.sh --stage chat_rl # (re)run one stage alone (repeatable: --stage a --stage b)
#   bash runs/runcpu.sh --dry-run       # print the commands only
#
# Recipe (environment RECIPE, default clean): which SFT data the RL stage starts from.
#   clean        every SFT example fully worked (preset twostep: two operations on operands <= 5); 30 SFT steps,
#                then 450 GRPO steps at lr-scale 0.1, warmup 0.05, zero-variance groups filtered. The RL gain is RL
#                improving the answers themselves (dev/LOG.md: +15 ± 2 points on 1000 problems, ~5 CPU min of RL).
#   answer-only  half the SFT examples state the answer without worked steps (preset easy, 300 SFT steps, 100 RL
#                steps at lr-scale 0.2): greedy SFT takes the shortcut, and RL's gain is mostly the model learning to
#                use its think span again -- a real effect, but one this data choice creates (dev/LOG.md).
# The held-out evals are greedy on EVAL_PROBLEMS (1000) test problems, printed with their standard error.
#
# Knobs (environment): REASONING_BASE_DIR (default ~/.cache/reasoning/runcpu), RECIPE, DEPTH, TAG, VOCAB_SIZE,
# SEQ_LEN, BASE_STEPS, SFT_STEPS, SFT_ANSWER_ONLY, SYNTHETIC_DIFFICULTY, RL_STEPS, RL_LR_SCALE, EVAL_PROBLEMS,
# MATH500_PATH, NUM_SHARDS, DOCS_PER_SHARD, WANDB_RUN (wandb off
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
RECIPE="${RECIPE:-clean}"
case "$RECIPE" in
    clean)  # fully worked SFT data; RL improves the arithmetic itself (dev/LOG.md, "RL loop ... the RL sweep")
        R_DIFFICULTY=twostep; R_SFT_STEPS=30; R_ANSWER_ONLY=0; R_RL_STEPS=450; R_LR_SCALE=0.1
        RL_RECIPE_FLAGS=(--warmup-ratio 0.05 --filter-zero-variance) ;;
    answer-only)  # half the SFT examples skip the worked steps (as distillation data often does): greedy SFT
        # prefers the shortcut, and RL with a verifiable reward discovers that reasoning in the think span pays
        R_DIFFICULTY=easy; R_SFT_STEPS=300; R_ANSWER_ONLY=0.5; R_RL_STEPS=100; R_LR_SCALE=0.2
        RL_RECIPE_FLAGS=() ;;
    *) echo "error: RECIPE=$RECIPE: unknown recipe (expected clean or answer-only)" >&2; exit 2 ;;
esac
SYNTHETIC_DIFFICULTY="${SYNTHETIC_DIFFICULTY:-$R_DIFFICULTY}"
SFT_STEPS="${SFT_STEPS:-$R_SFT_STEPS}"
SFT_ANSWER_ONLY="${SFT_ANSWER_ONLY:-$R_ANSWER_ONLY}"
RL_STEPS="${RL_STEPS:-$R_RL_STEPS}"
RL_LR_SCALE="${RL_LR_SCALE:-$R_LR_SCALE}"
EVAL_PROBLEMS="${EVAL_PROBLEMS:-1000}"
MATH500_PATH="${MATH500_PATH:-$REPO_ROOT/../shared/data/math500_test.json}"
NUM_SHARDS="${NUM_SHARDS:-8}"
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
echo "[runcpu] base dir: $REASONING_BASE_DIR | recipe $RECIPE (synthetic $SYNTHETIC_DIFFICULTY, SFT answer-only" \
    "fraction $SFT_ANSWER_ONLY)"

# 1. offline pretraining corpus (synthetic reasoning problems + templated prose); only written once
if [ "$DRY_RUN" -eq 1 ] || [ ! -d "$REASONING_BASE_DIR/base_data" ] || [ "$FORCE" -eq 1 ]; then
    CORPUS_CMD=("$PY" -m scripts.base_data --synthetic --num-shards "$NUM_SHARDS" --docs-per-shard "$DOCS_PER_SHARD")
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
    --synthetic-difficulty "$SYNTHETIC_DIFFICULTY" --num-iterations "$SFT_STEPS" --device-batch-size 16 \
    --total-batch-rows 16 --max-seq-len "$SEQ_LEN" --synthetic-answer-only "$SFT_ANSWER_ONLY" "${RUN_ARGS[@]}" "${SFT_EXTRA[@]}"
run_stage chat_eval_sft $PY -m scripts.chat_eval --stage sft --tag "$TAG" -a synthetic \
    --synthetic-difficulty "$SYNTHETIC_DIFFICULTY" --max-problems "$EVAL_PROBLEMS" --max-tokens 64 --batch-size 128 \
    "${EVAL_EXTRA[@]}"
run_stage chat_rl $PY -m scripts.chat_rl --overwrite --stage sft --tag "$TAG" --task synthetic \
    --synthetic-difficulty "$SYNTHETIC_DIFFICULTY" --num-steps "$RL_STEPS" --prompts-per-step 16 --num-samples 8 \
    --max-new-tokens 64 --lr-scale "$RL_LR_SCALE" "${RL_RECIPE_FLAGS[@]}" --eval-every 50 --eval-problems 100 \
    --eval-pass-k 0 "${RUN_ARGS[@]}" "${RL_EXTRA[@]}"
run_stage chat_eval_rl $PY -m scripts.chat_eval --stage rl --tag "$TAG" -a synthetic \
    --synthetic-difficulty "$SYNTHETIC_DIFFICULTY" --max-problems "$EVAL_PROBLEMS" --max-tokens 64 --batch-size 128 \
    "${EVAL_EXTRA[@]}"
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
def value(stage, key):
    try:
        with open(os.path.join(base, "report", f"{stage}.json")) as f:
            return json.load(f)["metrics"].get(key)
    except (OSError, ValueError, KeyError, AttributeError):
        return None
def metric(stage, key):
    found = value(stage, key)
    return "na" if found is None else (f"{found:.4f}" if isinstance(found, float) else str(found))
# the gain's standard error treats the two evals as independent (conservative: they share their problems)
sft, sft_se = value("chat_eval_sft", "accuracy"), value("chat_eval_sft", "accuracy_se")
rl, rl_se = value("chat_eval_rl", "accuracy"), value("chat_eval_rl", "accuracy_se")
gain = f"{rl - sft:.4f}" if None not in (sft, rl) else "na"
se = f"{(sft_se ** 2 + rl_se ** 2) ** 0.5:.4f}" if None not in (sft_se, rl_se) else "na"
print(f"[runcpu] report: {os.path.join(base, 'report', 'report.md')}")
print(f"[runcpu] chat with the model (README, Chatting): source .venv/bin/activate && "
      f"REASONING_BASE_DIR={base} python -m scripts.chat_cli --stage rl")
print(f"RESULT val_bpb={metric('base_train', 'val_bpb')} sft_acc={metric('chat_eval_sft', 'accuracy')} "
      f"sft_se={metric('chat_eval_sft', 'accuracy_se')} rl_acc={metric('chat_eval_rl', 'accuracy')} "
      f"rl_se={metric('chat_eval_rl', 'accuracy_se')} gain={gain} se={se} "
      f"math500_acc={metric('math500_rl', 'accuracy')} minutes={minutes}")
EOF
