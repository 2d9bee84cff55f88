#!/usr/bin/env bash
# The full pipeline on one 8×GPU node (H100/H200 class): tokenizer -> pretrain -> SFT -> GRPO -> MATH-500.
#
#   bash runs/speedrun.sh             # run it (a few hours at DEPTH=20)
#   bash runs/speedrun.sh --dry-run   # print every command, in order, without running anything, and under each
#                                     # GPU stage its memory plan and the settings the planner chooses for
#                                     # GPU_MEMORY_GIB (python -m scripts.plan_memory; minutes of CPU, no GPU needed)
#   bash runs/speedrun.sh --commands  # only the commands (instant); --plan is another name for --dry-run
#
# Environment knobs:
#   DEPTH=20                  model size dial (width, heads, batch derived from it)
#   NPROC=8                   GPUs per node (torchrun --nproc_per_node)
#   GPU_MEMORY_GIB=80         GPU memory --dry-run plans for (each stage plans the GPU it finds at startup itself)
#   REASONING_BASE_DIR=...    run folder (default ~/.cache/reasoning/speedrun)
#   WANDB_RUN=name            log to wandb under this run name (off when unset)
#   NUM_SHARDS=240            pretraining shards to download (~100M chars each)
#   VOCAB_SIZE=32768          tokenizer size
#   FP8=1                     FP8 training linears in base_train (Hopper)
#   SFT_TASKS=...             SFT mixture (default GSM8K,MATH,SmolTalk; add customjson:PATH for reasoning traces)
#   RL_STEPS=400              GRPO steps on MATH train
#   MAJ_K=8                   samples per problem for maj@k / pass@k on MATH-500
#   TORCHRUN=...              launcher command (default: torchrun --standalone --nproc_per_node=$NPROC);
#                             the CPU smoke test points it at gloo with tiny sizes
#   SYNTHETIC=1               write the offline synthetic corpus instead of downloading shards
#   RL_TASK=MATH              GRPO prompt source
#   CHAT_EVAL_TASK=GSM8K      task of the SFT eval and of the last eval (GSM8K_ARGS go with it)
#   FINAL_EVAL_TASK=MATH-500  task of the greedy and maj@k evals of the RL model (MATH500_ARGS go with it)
#   DATA_ARGS, BASE_ARGS, BASE_EVAL_ARGS, SFT_ARGS, RL_ARGS, EVAL_ARGS (every chat_eval), MATH500_ARGS, GSM8K_ARGS:
#                             extra flags appended to a stage's command (later flags win)
#   REASONING_SKIP_SETUP=1    use the python already on PATH instead of creating/updating .venv (runs/setup_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
PLAN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run|--plan) DRY_RUN=1; PLAN=1 ;;
        --commands) DRY_RUN=1; COMMANDS_ONLY=1 ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p;}' "$0"; exit 0 ;;  # the comment header
        *) echo "error: unknown argument '$arg' (expected --dry-run, --commands or --plan)" >&2; exit 2 ;;
    esac
done
if [ "${COMMANDS_ONLY:-0}" -eq 1 ]; then PLAN=0; fi

export REASONING_BASE_DIR="${REASONING_BASE_DIR:-$HOME/.cache/reasoning/speedrun}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DEPTH="${DEPTH:-20}"
NPROC="${NPROC:-8}"
TAG="${TAG:-d${DEPTH}}"
NUM_SHARDS="${NUM_SHARDS:-240}"
VOCAB_SIZE="${VOCAB_SIZE:-32768}"
SEQ_LEN="${SEQ_LEN:-2048}"
SFT_TASKS="${SFT_TASKS:-GSM8K,MATH,SmolTalk}"
RL_TASK="${RL_TASK:-MATH}"
RL_STEPS="${RL_STEPS:-400}"
MAJ_K="${MAJ_K:-8}"
CHAT_EVAL_TASK="${CHAT_EVAL_TASK:-GSM8K}"
FINAL_EVAL_TASK="${FINAL_EVAL_TASK:-MATH-500}"
SYNTHETIC="${SYNTHETIC:-0}"
TORCHRUN="${TORCHRUN:-torchrun --standalone --nproc_per_node=$NPROC}"
# Extra flags per stage, so the CPU smoke test can shrink sizes without a second copy of this pipeline.
if [ "$SYNTHETIC" = "1" ]; then
    DATA_ARGS="${DATA_ARGS:---num-shards 8 --docs-per-shard 4000}"
else
    DATA_ARGS="${DATA_ARGS:--n $NUM_SHARDS}"
fi
BASE_ARGS="${BASE_ARGS:---max-seq-len $SEQ_LEN}"
BASE_EVAL_ARGS="${BASE_EVAL_ARGS:-}"
SFT_ARGS="${SFT_ARGS:-}"
RL_ARGS="${RL_ARGS:---num-steps $RL_STEPS}"
EVAL_ARGS="${EVAL_ARGS:-}"
MATH500_ARGS="${MATH500_ARGS:-}"
GSM8K_ARGS="${GSM8K_ARGS:-}"
FP8_FLAG=""
if [ "${FP8:-0}" = "1" ]; then FP8_FLAG="--fp8"; fi
RUN_FLAG=""
if [ -n "${WANDB_RUN:-}" ]; then RUN_FLAG="--run $WANDB_RUN"; fi

GPU_MEMORY_GIB="${GPU_MEMORY_GIB:-80}"
PLAN_PYTHON=python
if [ -x .venv/bin/python ]; then PLAN_PYTHON=.venv/bin/python; fi
PLAN_STATUS=0
run() {
    # run "COMMAND LINE": print it, then evaluate it as one shell line (redirections, `&`, variables)
    echo "[speedrun] $*"
    if [ "$DRY_RUN" -eq 0 ]; then eval "$*"; fi
    local stages="base_train|base_eval|chat_sft|chat_rl|chat_eval"
    if [ "$PLAN" -eq 1 ] && [[ "$*" =~ -m\ scripts\.($stages)\ --\ (.*)$ ]]; then
        # the stage's own flags, word-split as the stage receives them
        # shellcheck disable=SC2086
        "$PLAN_PYTHON" -m scripts.plan_memory "${BASH_REMATCH[1]}" --brief --model "d$DEPTH" --nproc "$NPROC" \
            --gpu-memory-gib "$GPU_MEMORY_GIB" ${BASH_REMATCH[2]} || PLAN_STATUS=1
    fi
}

if [ "$DRY_RUN" -eq 0 ]; then
    source runs/setup_env.sh
    mkdir -p "$REASONING_BASE_DIR"
fi

run python -m reasoning.report reset
if [ "$SYNTHETIC" = "1" ]; then
    # Offline: the synthetic corpus (reasoning problems + templated prose) is written in seconds, nothing to wait for.
    run "python -m scripts.base_data --synthetic $DATA_ARGS"
else
    # The tokenizer needs only the first shards; the rest download in the background while it trains.
    run python -m scripts.base_data -n 8
    run "python -m scripts.base_data $DATA_ARGS > \"$REASONING_BASE_DIR/download.log\" 2>&1 &"
    # shellcheck disable=SC2016  # single quotes on purpose: $! is read when run() evaluates the line
    run 'DATASET_DOWNLOAD_PID=$!'
fi
run python -m scripts.tok_train --vocab-size "$VOCAB_SIZE"
run python -m scripts.tok_eval
if [ "$SYNTHETIC" != "1" ]; then
    # shellcheck disable=SC2016  # as above: expanded by run(), where the PID variable lives
    run 'wait $DATASET_DOWNLOAD_PID'
fi

run "$TORCHRUN -m scripts.base_train -- --depth $DEPTH --tag $TAG $BASE_ARGS $FP8_FLAG $RUN_FLAG"
run "$TORCHRUN -m scripts.base_eval -- --stage base --tag $TAG $BASE_EVAL_ARGS"
run "$TORCHRUN -m scripts.chat_sft -- --stage base --tag $TAG --task $SFT_TASKS --eval-task $CHAT_EVAL_TASK $SFT_ARGS $RUN_FLAG"
run "$TORCHRUN -m scripts.chat_eval -- --stage sft --tag $TAG -a $CHAT_EVAL_TASK $EVAL_ARGS $GSM8K_ARGS"
run "$TORCHRUN -m scripts.chat_rl -- --stage sft --tag $TAG --task $RL_TASK $RL_ARGS $RUN_FLAG"
run "$TORCHRUN -m scripts.chat_eval -- --stage rl --tag $TAG -a $FINAL_EVAL_TASK $EVAL_ARGS $MATH500_ARGS"
MAJ_FLAGS="--num-samples $MAJ_K --temperature 0.7"
run "$TORCHRUN -m scripts.chat_eval -- --stage rl --tag $TAG -a $FINAL_EVAL_TASK $MAJ_FLAGS $EVAL_ARGS $MATH500_ARGS"
run "$TORCHRUN -m scripts.chat_eval -- --stage rl --tag $TAG -a $CHAT_EVAL_TASK $EVAL_ARGS $GSM8K_ARGS"
run python -m reasoning.report generate
echo "[speedrun] report: $REASONING_BASE_DIR/report/report.md"
exit "$PLAN_STATUS"  # --plan: 1 when a stage would not fit
