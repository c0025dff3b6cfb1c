#!/usr/bin/env bash
# Dense YaRN baseline: extend the context SCALING_FACTOR-fold with YaRN and fine-tune the whole
# model with plain attention, then perplexity at the extended length.
#
#   scripts/run_dense_yarn_finetuning.sh            # SmolLM2-135M, 8k -> 32k on a GPU (tiny on CPU)
#   NPROC=2 scripts/run_dense_yarn_finetuning.sh    # 2 GPUs, FSDP (torchrun + configs/fsdp_finetune.json)
#
# Knobs (environment): MODEL DATASET EVAL_DATASETS OUTPUT_DIR MAX_STEPS TRAIN_LENGTH EVAL_LENGTHS
# SCALING_FACTOR LR BATCH_SIZE GRAD_ACCUM MAX_TRAIN_DOCS MAX_DOCS NPROC EXTRA_TRAIN_ARGS EXTRA_EVAL_ARGS.
# Training text: documents of at least TRAIN_LENGTH tokens.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
source "$REPO_ROOT/scripts/_launch.sh"
DEVICE=${DEVICE:-$($PYTHON -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}

MODEL=${MODEL:-smollm2-135m}
DATASET=${DATASET:-builtin:python-stdlib}
EVAL_DATASETS=${EVAL_DATASETS:-builtin:pydoc-topics}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/dense_yarn}
SCALING_FACTOR=${SCALING_FACTOR:-4}
LR=${LR:-1e-5}
if [[ "$DEVICE" == cuda ]]; then
  TRAIN_LENGTH=${TRAIN_LENGTH:-32768}; MAX_STEPS=${MAX_STEPS:-100}; BATCH_SIZE=${BATCH_SIZE:-1}; GRAD_ACCUM=${GRAD_ACCUM:-8}
  WARMUP_STEPS=${WARMUP_STEPS:-20}; MAX_TRAIN_DOCS=${MAX_TRAIN_DOCS:-}; EVAL_LENGTHS=${EVAL_LENGTHS:-$TRAIN_LENGTH}; MAX_DOCS=${MAX_DOCS:-16}
else
  TRAIN_LENGTH=${TRAIN_LENGTH:-512}; MAX_STEPS=${MAX_STEPS:-4}; BATCH_SIZE=${BATCH_SIZE:-1}; GRAD_ACCUM=${GRAD_ACCUM:-1}
  WARMUP_STEPS=${WARMUP_STEPS:-0}; MAX_TRAIN_DOCS=${MAX_TRAIN_DOCS:-64}; EVAL_LENGTHS=${EVAL_LENGTHS:-$TRAIN_LENGTH}; MAX_DOCS=${MAX_DOCS:-2}
fi

mkdir -p "$OUTPUT_DIR"
echo "== dense YaRN x$SCALING_FACTOR fine-tuning of $MODEL on $DATASET (L=$TRAIN_LENGTH, $MAX_STEPS steps, $NPROC process(es)) -> $OUTPUT_DIR/model"
launch_module "$REPO_ROOT/configs/accelerate/fsdp.yaml" seer_attn.training.finetune \
  --model "$MODEL" --seerattn_mode dense --yarn_factor "$SCALING_FACTOR" \
  --dataset "$DATASET" ${MAX_TRAIN_DOCS:+--max_documents "$MAX_TRAIN_DOCS"} \
  --train_length "$TRAIN_LENGTH" --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM" \
  --learning_rate "$LR" --warmup_steps "$WARMUP_STEPS" $([[ "$DEVICE" == cuda ]] && echo --bf16) \
  --save_steps "$MAX_STEPS" --output_dir "$OUTPUT_DIR/model" ${FSDP_ARGS[@]+"${FSDP_ARGS[@]}"} ${EXTRA_TRAIN_ARGS:-}

echo "== perplexity of $OUTPUT_DIR/model at L=$EVAL_LENGTHS -> $OUTPUT_DIR/eval"
$PYTHON -m seer_attn.evaluation.ppl --model "$OUTPUT_DIR/model" --datasets "$EVAL_DATASETS" \
  --lengths "$EVAL_LENGTHS" --methods dense ${MAX_DOCS:+--max_docs "$MAX_DOCS"} \
  --output_dir "$OUTPUT_DIR/eval" ${EXTRA_EVAL_ARGS:-}
echo "== done: model in $OUTPUT_DIR/model, results in $OUTPUT_DIR/eval"
