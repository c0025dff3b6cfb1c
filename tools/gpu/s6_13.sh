#!/usr/bin/env bash
# Issue 13, next run (written in session 5, not run yet): per-layer decode token budgets. Distils the
# default prefill + decode gates (Kmaxminavg, `heads`, pooled init) on calib-large, measures the decode
# layer curves with the oracle on 4 calibration documents (`layer_budgets --stage decode`), then
# decode-mode PPL on pg19-mini + proofpile-mini at 8k with and without the per-layer budgets, for the
# gate and the references. Source stage2.sh first; calib-large (or its first ~30 MB) in /tmp/data/calib-large.
# usage: [STEPS=500] [EXTRA="--seerattn_decode_k_summaries 2"] bash .gpu/scripts/s6_13.sh [DOCS]
DOCS=${1:-12}; STEPS=${STEPS:-500}; EXTRA=${EXTRA:-}
R=/tmp/runs; D=/tmp/data; mkdir -p $R $OUT
t0=$(date +%s)
if [ ! -f $R/gates_dec/model.safetensors ]; then
  python -m seer_attn.training.distill --model smollm2-135m --dataset $D/calib-large --seerattn_decode_gate_type Kmaxminavg \
    --train_length 8192 --max_steps $STEPS --per_device_train_batch_size 8 --learning_rate 1e-3 --warmup_steps 20 \
    --save_steps 100000 --preprocessing_num_workers 8 $EXTRA --output_dir $R/gates_dec > $R/log_train_dec.txt 2>&1
  echo "train rc=$? $(( $(date +%s) - t0 ))s"
fi
if [ ! -f $R/decode_layer_budgets.json ]; then
  python -m seer_attn.evaluation.layer_budgets --model $R/gates_dec --stage decode --dataset $D/calib-large --length 8192 \
    --max_docs 4 --output $R/decode_layer_budgets.json --write_config > $R/log_lb_dec.txt 2>&1
  echo "decode curves rc=$? $(( $(date +%s) - t0 ))s"; grep "token budget" $R/log_lb_dec.txt | tail -3
fi
python -m seer_attn.evaluation.decode_ppl --model $R/gates_dec --methods dense,seer,oracle,static,seer+layers,oracle+layers,static+layers \
  --datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 8192 --max_docs $DOCS --budgets 256,512,1024,2048 \
  --no_plot --output_dir $R/eval_dec > $R/log_eval_dec.txt 2>&1
echo "eval rc=$? $(( $(date +%s) - t0 ))s"; cat $R/eval_dec/decode_ppl_results.md
cd $R && tar czf $OUT/s6_13.tar.gz eval_dec/decode_ppl_results.* decode_layer_budgets.json gates_dec/config.json \
  gates_dec/gate_loss.jsonl gates_dec/model.safetensors log_*dec*.txt 2>/dev/null
ls -la $OUT
