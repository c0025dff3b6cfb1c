#!/usr/bin/env bash
# Perplexity vs density of a (gate-only) Seer checkpoint of any supported family, upstream's protocol.
#
#   MODEL=outputs/post_training/gates scripts/eval_ppl.sh
#   MODEL=outputs/gates EVAL_DATASETS=../shared/data/pg19-mini/test.jsonl,../shared/data/proofpile-mini/test.jsonl \
#     EVAL_LENGTHS=8192 MAX_DOCS=16 scripts/eval_ppl.sh
#
# Knobs (environment): MODEL, EVAL_DATASETS, EVAL_LENGTHS, NZ_RATIOS, THRESHOLDS, METHODS, MAX_DOCS,
# OUTPUT_DIR. Extra arguments go to `python -m seer_attn.evaluation.ppl` (see its --help).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

MODEL=${MODEL:-smollm2-135m}
EVAL_DATASETS=${EVAL_DATASETS:-builtin:pydoc-topics}
EVAL_LENGTHS=${EVAL_LENGTHS:-8192}
NZ_RATIOS=${NZ_RATIOS:-1.0,0.5,0.3,0.1}
THRESHOLDS=${THRESHOLDS:-}
METHODS=${METHODS:-dense,seer,oracle,oracle_mass,static,random}
MAX_DOCS=${MAX_DOCS:-}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/ppl}

$PYTHON -m seer_attn.evaluation.ppl \
  --model "$MODEL" \
  --datasets "$EVAL_DATASETS" \
  --lengths "$EVAL_LENGTHS" \
  --nz_ratios "$NZ_RATIOS" \
  --thresholds "$THRESHOLDS" \
  --methods "$METHODS" \
  ${MAX_DOCS:+--max_docs "$MAX_DOCS"} \
  --output_dir "$OUTPUT_DIR" \
  "$@"
