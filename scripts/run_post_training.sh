#!/usr/bin/env bash
# Post-training of SeerAttention gates, then perplexity vs density: everything lands in $OUTPUT_DIR.
#
#   scripts/run_post_training.sh                 # offline, embedded SmolLM2-135M (about 10 min on a 2-core CPU)
#   MODEL=meta-llama/Llama-3.1-8B DATASET=togethercomputer/RedPajama-Data-1T-Sample \
#     EVAL_DATASETS=emozilla/pg19-test,hoskinson-center/proof-pile scripts/run_post_training.sh
#   MODEL=Qwen/Qwen2.5-7B-Instruct ...   # any supported family: Llama, Qwen2/2.5, Qwen3, Mistral, Phi-3/4
#   DATASET=../shared/data/calib-large/,../shared/data/calib-mini/train.jsonl DATASET_WEIGHTS=0.7,0.3 \
#     EVAL_DATASETS=../shared/data/pg19-mini/test.jsonl,../shared/data/proofpile-mini/test.jsonl scripts/run_post_training.sh
#
# Default data (no network, no files outside the Python install): calibration on the standard
# library's .py sources (builtin:python-stdlib), evaluation on the pydoc help topics
# (builtin:pydoc-topics); the two share no text. Without a GPU the defaults are tiny (256-token
# training sequences, a few dozen steps, 512-token evaluation on 2 documents); with a GPU they are
# 8k. NPROC=N distils on N GPUs (data parallel through accelerate). DATASET may list several
# sources (files, folders of .jsonl.gz shards, globs) separated by commas, mixed by DATASET_WEIGHTS
# (shares of training tokens; unset: concatenated); STREAMING=1 reads them lazily (corpora larger
# than memory). Before training, local training and evaluation sets are checked to share no
# document (text, source or title; CHECK_DISJOINT=0 skips it). Every knob below is an environment
# variable; EXTRA_TRAIN_ARGS / EXTRA_EVAL_ARGS are appended to the two commands.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
source "$REPO_ROOT/scripts/_launch.sh"   # NPROC=N: distillation on N processes (accelerate, DDP)
DEVICE=${DEVICE:-$($PYTHON -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}

MODEL=${MODEL:-smollm2-135m}
DATASET=${DATASET:-builtin:python-stdlib}
DATASET_WEIGHTS=${DATASET_WEIGHTS:-}
STREAMING=${STREAMING:-0}
CHECK_DISJOINT=${CHECK_DISJOINT:-1}
STREAMING_FLAG=""
if [[ "$STREAMING" == 1 ]]; then STREAMING_FLAG="--streaming"; fi
EVAL_DATASETS=${EVAL_DATASETS:-builtin:pydoc-topics}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/post_training}
LR=${LR:-1e-3}
DISTILL_TARGET=${DISTILL_TARGET:-max}
NZ_RATIOS=${NZ_RATIOS:-1.0,0.5,0.3,0.1}
METHODS=${METHODS:-dense,seer,oracle,oracle_mass,pooled,static,random}
if [[ "$DEVICE" == cuda ]]; then
  TRAIN_LENGTH=${TRAIN_LENGTH:-8192}
  MAX_STEPS=${MAX_STEPS:-200}
  BATCH_SIZE=${BATCH_SIZE:-8}
  GRAD_ACCUM=${GRAD_ACCUM:-1}
  WARMUP_STEPS=${WARMUP_STEPS:-20}
  MAX_TRAIN_DOCS=${MAX_TRAIN_DOCS:-}
  EVAL_LENGTHS=${EVAL_LENGTHS:-8192}
  THRESHOLDS=${THRESHOLDS:-0.002,0.005,0.02}
  MAX_DOCS=${MAX_DOCS:-16}
  SAVE_STEPS=${SAVE_STEPS:-100}
else
  TRAIN_LENGTH=${TRAIN_LENGTH:-256}
  MAX_STEPS=${MAX_STEPS:-40}
  BATCH_SIZE=${BATCH_SIZE:-1}
  GRAD_ACCUM=${GRAD_ACCUM:-2}
  WARMUP_STEPS=${WARMUP_STEPS:-4}
  MAX_TRAIN_DOCS=${MAX_TRAIN_DOCS:-64}
  EVAL_LENGTHS=${EVAL_LENGTHS:-512}
  THRESHOLDS=${THRESHOLDS:-0.05,0.15}
  MAX_DOCS=${MAX_DOCS:-2}
  SAVE_STEPS=${SAVE_STEPS:-20}
fi

GATES_DIR="$OUTPUT_DIR/gates"
mkdir -p "$OUTPUT_DIR"
if [[ "$CHECK_DISJOINT" == 1 ]]; then
  $PYTHON -m seer_attn.data --train "$DATASET" --eval "$EVAL_DATASETS"
fi
echo "== device $DEVICE: distilling gates of $MODEL on $DATASET (L=$TRAIN_LENGTH, $MAX_STEPS steps) -> $GATES_DIR"
launch_module "$REPO_ROOT/configs/accelerate/ddp.yaml" seer_attn.training.distill \
  --model "$MODEL" \
  --dataset "$DATASET" \
  ${DATASET_WEIGHTS:+--dataset_weights "$DATASET_WEIGHTS"} \
  ${STREAMING_FLAG} \
  ${MAX_TRAIN_DOCS:+--max_documents "$MAX_TRAIN_DOCS"} \
  --train_length "$TRAIN_LENGTH" \
  --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACCUM" \
  --learning_rate "$LR" \
  --warmup_steps "$WARMUP_STEPS" \
  --seerattn_distill_target "$DISTILL_TARGET" \
  --save_steps "$SAVE_STEPS" \
  --output_dir "$GATES_DIR" \
  ${EXTRA_TRAIN_ARGS:-}

echo "== evaluating $GATES_DIR on $EVAL_DATASETS (L=$EVAL_LENGTHS) -> $OUTPUT_DIR/eval"
$PYTHON -m seer_attn.evaluation.ppl \
  --model "$GATES_DIR" \
  --datasets "$EVAL_DATASETS" \
  --lengths "$EVAL_LENGTHS" \
  --nz_ratios "$NZ_RATIOS" \
  --thresholds "$THRESHOLDS" \
  --methods "$METHODS" \
  ${MAX_DOCS:+--max_docs "$MAX_DOCS"} \
  --output_dir "$OUTPUT_DIR/eval" \
  ${EXTRA_EVAL_ARGS:-}

echo "== done: gates in $GATES_DIR, results in $OUTPUT_DIR/eval (ppl_results.md, ppl_vs_density.png)"
