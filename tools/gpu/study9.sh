#!/usr/bin/env bash
# Issue 9 gate study on the GPU machine: train several gate recipes side by side (one process each,
# sharing the GPU), evaluate each on pg19-mini + proofpile-mini at 8k with the same sweep, and the
# reference selectors once. Source stage2.sh first. Results: $OUT/study_<tag>.tar.gz.
# usage: [PHASE=train|eval|all] [FLOORS="0.5"] bash .gpu/scripts/study9.sh TAG STEPS "arm1|distill flags" ...
TAG=$1; STEPS=$2; shift 2
PHASE=${PHASE:-all}
R=/tmp/runs; mkdir -p $R $OUT
EVAL="--datasets /tmp/data/pg19-mini.jsonl,/tmp/data/proofpile-mini.jsonl --lengths 8192 --max_docs 16
  --nz_ratios 0.5,0.3,0.1 --budget_methods nz_ratio,adaptive --thresholds 0.002,0.005,0.02 --top_ps 0.6,0.8 --plot false"
pids=()
if [ "$PHASE" != train ] && [ "${BASELINES:-1}" = 1 ] && [ ! -f $R/eval_baselines/ppl_results.json ]; then
  (python -m seer_attn.evaluation.ppl --model smollm2-135m $EVAL --methods dense,oracle,oracle_mass,pooled,static,random \
     --output_dir $R/eval_baselines > $R/log_baselines.txt 2>&1; echo "baselines done rc=$?") &
  pids+=($!)
fi
for spec in "$@"; do
  name=${spec%%|*}; flags=${spec#*|}
  (
    if [ "$PHASE" != eval ]; then
      python -m seer_attn.training.distill --model smollm2-135m --train_length 8192 --max_steps $STEPS \
        --per_device_train_batch_size 8 --warmup_steps 20 --save_steps 100000 --logging_steps 20 \
        --preprocessing_num_workers 4 --output_dir $R/gates_$name $flags > $R/log_train_$name.txt 2>&1 || exit 1
    fi
    if [ "$PHASE" != train ]; then
      python -m seer_attn.evaluation.ppl --model $R/gates_$name $EVAL --methods seer \
        --output_dir $R/eval_$name > $R/log_eval_$name.txt 2>&1 || exit 1
      for fl in $FLOORS; do
        python -m seer_attn.evaluation.ppl --model $R/gates_$name $EVAL --methods seer --budget_methods adaptive \
          --thresholds "" --top_ps "" --adaptive_row_floor $fl --output_dir $R/eval_${name}_floor$fl > $R/log_eval_${name}_floor$fl.txt 2>&1
      done
    fi
    echo "$name done"
  ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
for f in $R/log_*.txt; do echo "== $f"; grep -v "it/s\]\|s/it\]\|doc/s\]\|s/doc\]\|ex/s\]\|examples/s\]\|^| " $f | tail -3; done
cd $R && tar czf $OUT/study_$TAG.tar.gz eval_*/ppl_results.json eval_*/recall.json gates_*/gate_loss.jsonl gates_*/config.json log_*.txt 2>/dev/null
ls -la $OUT
