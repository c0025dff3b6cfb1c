#!/usr/bin/env bash
# SeerAttention with YaRN: (1) distil gates at the original length (post-training, frozen base),
# (2) extend the context SCALING_FACTOR-fold with YaRN and fine-tune model + gates together with
# block-sparse attention at NZ_RATIO, (3) perplexity at the extended length.
#
#   scripts/run_seerattn_yarn_finetuning.sh                 # SmolLM2-135M, 8k -> 32k, nz 0.5
#   NZ_RATIO=0.1 scripts/run_seerattn_yarn_finetuning.sh
#   GATES=outputs/post_training/gates scripts/...            # skip step 1 with existing gates
#
# Knobs (environment): as run_dense_yarn_finetuning.sh, plus NZ_RATIO, EVAL_NZ_RATIOS (default
# NZ_RATIO), INIT_TRAIN_LENGTH / INIT_STEPS (step 1), GATES.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
source "$REPO_ROOT/scripts/_launch.sh"
DEVICE=${DEVICE:-$($PYTHON -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}

MODEL=${MODEL:-smollm2-135m}
DATASET=${DATASET:-builtin:python-stdlib}
EVAL_DATASETS=${EVAL_DATASETS:-builtin:pydoc-topics}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/seerattn_yarn}
SCALING_FACTOR=${SCALING_FACTOR:-4}
NZ_RATIO=${NZ_RATIO:-0.5}
EVAL_NZ_RATIOS=${EVAL_NZ_RATIOS:-$NZ_RATIO}
LR=${LR:-1e-5}
if [[ "$DEVICE" == cuda ]]; then
  TRAIN_LENGTH=${TRAIN_LENGTH:-32768}; MAX_STEPS=${MAX_STEPS:-100}; BATCH_SIZE=${BATCH_SIZE:-1}; GRAD_ACCUM=${GRAD_ACCUM:-8}
  WARMUP_STEPS=${WARMUP_STEPS:-20}; MAX_TRAIN_DOCS=${MAX_TRAIN_DOCS:-}; EVAL_LENGTHS=${EVAL_LENGTHS:-$TRAIN_LENGTH}; MAX_DOCS=${MAX_DOCS:-16}
  INIT_TRAIN_LENGTH=${INIT_TRAIN_LENGTH:-8192}; INIT_STEPS=${INIT_STEPS:-100}; INIT_BATCH=${INIT_BATCH:-8}
else
  TRAIN_LENGTH=${TRAIN_LENGTH:-512}; MAX_STEPS=${MAX_STEPS:-4}; BATCH_SIZE=${BATCH_SIZE:-1}; GRAD_ACCUM=${GRAD_ACCUM:-1}
  WARMUP_STEPS=${WARMUP_STEPS:-0}; MAX_TRAIN_DOCS=${MAX_TRAIN_DOCS:-64}; EVAL_LENGTHS=${EVAL_LENGTHS:-$TRAIN_LENGTH}; MAX_DOCS=${MAX_DOCS:-2}
  INIT_TRAIN_LENGTH=${INIT_TRAIN_LENGTH:-256}; INIT_STEPS=${INIT_STEPS:-10}; INIT_BATCH=${INIT_BATCH:-1}
fi

mkdir -p "$OUTPUT_DIR"
if [[ -z "${GATES:-}" ]]; then
  GATES="$OUTPUT_DIR/init_gates"
  echo "== step 1: distilling gates of $MODEL at L=$INIT_TRAIN_LENGTH ($INIT_STEPS steps) -> $GATES"
  launch_module "$REPO_ROOT/configs/accelerate/ddp.yaml" seer_attn.training.distill \
    --model "$MODEL" --dataset "$DATASET" ${MAX_TRAIN_DOCS:+--max_documents "$MAX_TRAIN_DOCS"} \
    --train_length "$INIT_TRAIN_LENGTH" --max_steps "$INIT_STEPS" --per_device_train_batch_size "$INIT_BATCH" \
    --learning_rate 1e-3 --warmup_steps $(( INIT_STEPS / 10 )) --save_steps "$INIT_STEPS" --output_dir "$GATES"
fi

echo "== step 2: YaRN x$SCALING_FACTOR + sparse fine-tuning at nz_ratio=$NZ_RATIO (L=$TRAIN_LENGTH, $MAX_STEPS steps, $NPROC process(es)) -> $OUTPUT_DIR/model"
launch_module "$REPO_ROOT/configs/accelerate/fsdp.yaml" seer_attn.training.finetune \
  --model "$GATES" --seerattn_mode sparse --nz_ratio "$NZ_RATIO" --yarn_factor "$SCALING_FACTOR" \
  --dataset "$DATASET" ${MAX_TRAIN_DOCS:+--max_documents "$MAX_TRAIN_DOCS"} \
  --train_length "$TRAIN_LENGTH" --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM" \
  --learning_rate "$LR" --warmup_steps "$WARMUP_STEPS" $([[ "$DEVICE" == cuda ]] && echo --bf16) \
  --save_steps "$MAX_STEPS" --output_dir "$OUTPUT_DIR/model" ${FSDP_ARGS[@]+"${FSDP_ARGS[@]}"} ${EXTRA_TRAIN_ARGS:-}

echo "== step 3: perplexity of $OUTPUT_DIR/model at L=$EVAL_LENGTHS, nz_ratio $EVAL_NZ_RATIOS -> $OUTPUT_DIR/eval"
$PYTHON -m seer_attn.evaluation.ppl --model "$OUTPUT_DIR/model" --datasets "$EVAL_DATASETS" \
  --lengths "$EVAL_LENGTHS" --nz_ratios "1.0,$EVAL_NZ_RATIOS" --methods dense,seer \
  ${MAX_DOCS:+--max_docs "$MAX_DOCS"} --output_dir "$OUTPUT_DIR/eval" ${EXTRA_EVAL_ARGS:-}
echo "== done: model in $OUTPUT_DIR/model, results in $OUTPUT_DIR/eval"
