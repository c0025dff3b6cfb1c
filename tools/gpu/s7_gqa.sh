#!/usr/bin/env bash
# GQA-shared selection (seerattn_share_gqa_blocks) against per-head selection on the GPU, the issue-9 protocol
# (source stage2.sh first; carry .gpu/gates_s4, the session-4 default gates). Same 16 + 16 documents at 8k, the
# default recipe (adaptive + the checkpoint's layer budgets) and per-row top-k, seer and oracle_mass both ways.
# usage: bash .gpu/scripts/s7_gqa.sh [DOCS]
DOCS=${1:-16}
R=/tmp/runs; D=/tmp/data; mkdir -p $R/gates $OUT
cp .gpu/gates_s4/* $R/gates/
EVAL="--model $R/gates --datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 8192 --max_docs $DOCS
  --nz_ratios 0.5,0.3,0.1 --budget_methods nz_ratio,adaptive+layers --plot false"
t0=$(date +%s)
python -m seer_attn.evaluation.ppl $EVAL --methods seer,oracle_mass --share_gqa_blocks true \
  --output_dir $R/eval_gqa_on > $R/log_gqa_on.txt 2>&1
echo "shared rc=$? $(( $(date +%s) - t0 ))s"; grep "^| " $R/log_gqa_on.txt | head -14
python -m seer_attn.evaluation.ppl $EVAL --methods dense,seer,oracle_mass,static \
  --output_dir $R/eval_gqa_off > $R/log_gqa_off.txt 2>&1
echo "per-head rc=$? $(( $(date +%s) - t0 ))s"; grep "^| " $R/log_gqa_off.txt | head -14
cd $R && tar czf $OUT/s7_gqa.tar.gz eval_gqa_*/ppl_results.* eval_gqa_*/recall.json log_gqa_*.txt 2>/dev/null
ls -la $OUT
