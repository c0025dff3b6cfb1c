#!/usr/bin/env bash
# Issue 9/11, session 4, second round on the GPU machine (source stage2.sh first; carry .gpu/gates_s4, the
# gates trained by s4_9.sh, and .gpu/cl0, calib-large's first shard): layer budgets calibrated with the
# loss objective on calib-large, evaluated with the same reference selectors; then the gate benchmark
# after the mixture-kernel tile change.
# usage: bash .gpu/scripts/s4_9b.sh [DOCS]
DOCS=${1:-16}
R=/tmp/runs; D=/tmp/data; mkdir -p $R/gates $D/calib-large $OUT
cp .gpu/gates_s4/* $R/gates/; cp .gpu/cl0/*.gz $D/calib-large/ 2>/dev/null
EVAL="--datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 8192 --max_docs $DOCS --nz_ratios 0.5,0.3,0.1 --plot false"
t0=$(date +%s)
python -m seer_attn.evaluation.layer_budgets --model $R/gates --dataset $D/calib-large --length 8192 --max_docs 8 \
  --objective loss --grid 0.03,0.05,0.1,0.15,0.2,0.3,0.5 --write_config --output $R/layer_budgets_loss.json > $R/log_lb_loss.txt 2>&1
echo "loss curves rc=$? $(( $(date +%s) - t0 ))s"; grep "nz_ratio" $R/log_lb_loss.txt | cut -c1-400
python -m seer_attn.evaluation.ppl --model $R/gates $EVAL --methods seer,oracle_mass,static --budget_methods adaptive+layers \
  --output_dir $R/eval_loss_layers > $R/log_eval_loss_layers.txt 2>&1
echo "eval rc=$? $(( $(date +%s) - t0 ))s"; grep "^| " $R/log_eval_loss_layers.txt | head -12
timeout $(( 570 - ($(date +%s) - t0) )) python benchmarks/bench_gate.py --designs default,nq4nk2,adaptive_floor --compile-seqlens "" \
  --out $R/bench_gate_h100_s4.json > $R/log_bench_gate.txt 2>&1
echo "bench_gate rc=$? $(( $(date +%s) - t0 ))s"; tail -12 $R/log_bench_gate.txt
cd $R && tar czf $OUT/s4_9b.tar.gz layer_budgets_loss.json eval_loss_layers/ppl_results.* eval_loss_layers/recall.json \
  bench_gate_h100_s4.* log_lb_loss.txt log_eval_loss_layers.txt log_bench_gate.txt 2>/dev/null
ls -la $OUT
