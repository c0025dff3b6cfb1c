#!/usr/bin/env bash
# Issue 13 on the GPU machine: distil the prefill + decode gates of SmolLM2 together (the library's
# default prefill recipe plus a Kmaxminavg decode gate), then decode-mode PPL on pg19-mini and
# proofpile-mini at 8k against dense / oracle / quest / static, and the greedy generation check.
# Source stage2.sh first (model, data, PYTHONPATH).
# usage: [PHASE=train|eval|all] bash .gpu/scripts/decode13.sh STEPS [DOCS]   (train and eval may be two calls)
STEPS=${1:-300}; DOCS=${2:-16}; PHASE=${PHASE:-all}
R=/tmp/runs; mkdir -p $R $OUT
t0=$(date +%s)
[ "$PHASE" != eval ] && python -m seer_attn.training.distill --model smollm2-135m --dataset /tmp/data/calib-large \
  --seerattn_decode_gate_type Kmaxminavg --train_length 8192 --max_steps $STEPS \
  --per_device_train_batch_size 8 --learning_rate 1e-3 --warmup_steps 20 --save_steps 100000 --logging_steps 20 \
  --preprocessing_num_workers 4 --output_dir $R/gates_dec > $R/log_train_dec.txt 2>&1
echo "train rc=$? $(( $(date +%s) - t0 ))s"; grep -v "it/s\]\|s/it\]" $R/log_train_dec.txt | tail -4
t0=$(date +%s)
[ "$PHASE" != train ] && python -m seer_attn.evaluation.decode_ppl --model $R/gates_dec \
  --datasets /tmp/data/pg19-mini.jsonl,/tmp/data/proofpile-mini.jsonl --lengths 8192 --max_docs $DOCS \
  --budgets 256,512,1024,2048 --generation_check 64 --output_dir $R/eval_dec > $R/log_eval_dec.txt 2>&1
echo "eval rc=$? $(( $(date +%s) - t0 ))s"; grep -v "it/s\]\|s/it\]" $R/log_eval_dec.txt | tail -30
cd $R && tar czf $OUT/decode13.tar.gz eval_dec gates_dec/config.json gates_dec/gate_loss.jsonl gates_dec/*.safetensors log_*dec.txt 2>/dev/null
ls -la $OUT
