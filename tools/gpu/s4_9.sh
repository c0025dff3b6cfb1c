#!/usr/bin/env bash
# Issue 9, session 4 on the GPU machine: the default recipe trained on all of calib-large for >= 100M
# tokens, per-layer budgets calibrated on calib-large, and the evaluation on pg19-mini + proofpile-mini
# at 8k with uniform and layer-budgeted selection, reference selectors in the same call sequence.
# Source stage2.sh first; call `cal` carries .gpu/cl0 .gpu/cl1 (both calib-large shards).
# usage: PHASE=train|eval CAP=seconds [TAG=_x FLAGS="--seerattn_loss kl_top"] bash .gpu/scripts/s4_9.sh STEPS [DOCS]
#   TAG/FLAGS: another arm (gates in /tmp/runs/gates$TAG, trained with extra distill flags)
#   train: calibrates the layer curves once (oracle only, no gates needed), runs the baselines beside
#          training (first call only), trains until STEPS or CAP (checkpoints every 100 steps; run it
#          again to resume);
#   eval:  seer rows of the finished gates (uniform and +layers), then one tarball of everything.
STEPS=${1:-1536}; DOCS=${2:-16}; PHASE=${PHASE:-train}; CAP=${CAP:-540}; TAG=${TAG:-}; FLAGS=${FLAGS:-}
R=/tmp/runs; D=/tmp/data; mkdir -p $R/gates$TAG $OUT $D/calib-large
for f in .gpu/cl0/*.gz .gpu/cl1/*.gz; do [ -f "$f" ] && cp -n "$f" $D/calib-large/; done
EVAL="--datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 8192 --max_docs $DOCS --nz_ratios 0.5,0.3,0.1 --plot false"
t0=$(date +%s)
if [ "$PHASE" = train ]; then
  if [ ! -f $R/layer_budgets.json ]; then
    python -m seer_attn.evaluation.layer_budgets --model smollm2-135m --dataset $D/calib-large --length 8192 \
      --max_docs 8 --output $R/layer_budgets.json > $R/log_lb.txt 2>&1
    echo "layer budgets rc=$? $(( $(date +%s) - t0 ))s"; grep "nz_ratio" $R/log_lb.txt | tail -3
  fi
  if [ ! -f $R/eval_baselines/ppl_results.json ]; then
    (python -m seer_attn.evaluation.ppl --model smollm2-135m $EVAL --methods dense,oracle_mass,static \
       --budget_methods nz_ratio,adaptive,adaptive+layers --layer_budgets $R/layer_budgets.json \
       --output_dir $R/eval_baselines > $R/log_baselines.txt 2>&1; echo "baselines rc=$? $(( $(date +%s) - t0 ))s") &
  fi
  left=$(( CAP - ($(date +%s) - t0) ))
  timeout $left python -m seer_attn.training.distill --model smollm2-135m --dataset $D/calib-large --train_length 8192 \
    --max_steps $STEPS --per_device_train_batch_size 8 --learning_rate 1e-3 --warmup_steps 20 \
    --save_steps 100 --save_total_limit 1 --logging_steps 20 --preprocessing_num_workers 8 \
    --layer_budget_docs 8 --resume_from_checkpoint last $FLAGS --output_dir $R/gates$TAG >> $R/log_train$TAG.txt 2>&1
  echo "train rc=$? $(( $(date +%s) - t0 ))s"; grep -v "it/s\]\|s/it\]" $R/log_train$TAG.txt | tail -3
  ls $R/gates$TAG; tail -1 $R/gates$TAG/gate_loss.jsonl | cut -c1-80
  wait
fi
if [ "$PHASE" = eval ]; then
  python -m seer_attn.evaluation.ppl --model $R/gates$TAG $EVAL --methods seer --budget_methods nz_ratio,adaptive,adaptive+layers \
    --output_dir $R/eval_seer$TAG > $R/log_eval$TAG.txt 2>&1
  echo "eval rc=$? $(( $(date +%s) - t0 ))s"; grep -v "it/s\]\|s/it\]\|doc/s\]\|s/doc\]" $R/log_eval$TAG.txt | tail -24
  cat $R/eval_baselines/ppl_results.md 2>/dev/null | head -40
fi
cd $R && tar czf $OUT/s4_9$TAG.tar.gz layer_budgets.json eval_*/ppl_results.* eval_*/recall.json gates$TAG/config.json \
  gates$TAG/gate_loss.jsonl gates$TAG/throughput.json gates$TAG/model.safetensors log_*.txt 2>/dev/null
ls -la $OUT
