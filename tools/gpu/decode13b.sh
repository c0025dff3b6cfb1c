#!/usr/bin/env bash
# Issue 13, second round: decode-gate designs side by side (one process each on the GPU), then
# decode-mode PPL of each (seer rows; the reference rows are those of decode13.sh, same documents).
# Source stage2.sh first. usage: PHASE=train|eval bash .gpu/scripts/decode13b.sh STEPS DOCS "name|flags" ...
STEPS=$1; DOCS=$2; shift 2
R=/tmp/runs; mkdir -p $R $OUT
pids=()
for spec in "$@"; do
  name=${spec%%|*}; flags=${spec#*|}
  (
    if [ "$PHASE" = train ]; then
      python -m seer_attn.training.distill --model smollm2-135m --dataset /tmp/data/calib-large \
        --seerattn_decode_gate_type Kmaxminavg --train_length 8192 --max_steps $STEPS \
        --per_device_train_batch_size 8 --learning_rate 1e-3 --warmup_steps 20 --save_steps 100000 --logging_steps 20 \
        --preprocessing_num_workers 4 --output_dir $R/gates_$name $flags > $R/log_train_$name.txt 2>&1
      echo "$name train rc=$?"
    else
      python -m seer_attn.evaluation.decode_ppl --model $R/gates_$name --methods dense,seer \
        --datasets /tmp/data/pg19-mini.jsonl,/tmp/data/proofpile-mini.jsonl --lengths 8192 --max_docs $DOCS \
        --budgets 256,512,1024,2048 --no_plot --output_dir $R/eval_$name > $R/log_eval_$name.txt 2>&1
      echo "$name eval rc=$?"; grep "^| " $R/eval_$name/decode_ppl_results.md
    fi
  ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
cd $R && tar czf $OUT/decode13b_$PHASE.tar.gz eval_*/decode_ppl_results.* gates_*/config.json gates_*/gate_loss.jsonl log_*.txt 2>/dev/null
ls -la $OUT
