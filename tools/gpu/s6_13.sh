#!/usr/bin/env bash
# Issue 13, next run (written in session 5, not run yet): per-layer decode token budgets. Distils the
# default prefill + decode gates (Kmaxminavg, `heads`, pooled init) on calib-large, measures the decode
# layer curves with the oracle on 4 calibration documents (`layer_budgets --stage decode`), then
# decode-mode PPL on pg19-mini + proofpile-mini at 8k with and without the per-layer budgets, for the
# gate and the references. Source stage2.sh first; calib-large (or its first ~30 MB) in /tmp/data/calib-large.
# usage: [STEPS=500] [TAG=_k2 EXTRA="--seerattn_decode_k_summaries 2"] [PHASE=train|eval|all] [CURVES=json] bash .gpu/scripts/s6_13.sh [DOCS]
# (EXTRA="--decode_arms k2:k_summaries=2;k4:k_summaries=4" trains decode-gate arms beside the main gates in the same
# run; each arm in gates_dec$TAG/arms/<name> is then evaluated too: its seer and seer+layers rows, in eval_dec$TAG_<name>)
# (TAG names another arm's gate and evaluation folders; the layer curves, measured with the oracle, are shared)
DOCS=${1:-12}; STEPS=${STEPS:-500}; EXTRA=${EXTRA:-}; TAG=${TAG:-}; PHASE=${PHASE:-all}
R=/tmp/runs; D=/tmp/data; mkdir -p $R $OUT
t0=$(date +%s)
if [ ! -f $R/gates_dec$TAG/model.safetensors ]; then
  python -m seer_attn.training.distill --model smollm2-135m --dataset $D/calib-large --seerattn_decode_gate_type Kmaxminavg \
    --train_length 8192 --max_steps $STEPS --per_device_train_batch_size 8 --learning_rate 1e-3 --warmup_steps 20 \
    --save_steps 100000 --preprocessing_num_workers 8 $EXTRA --output_dir $R/gates_dec$TAG > $R/log_train_dec$TAG.txt 2>&1
  echo "train rc=$? $(( $(date +%s) - t0 ))s"; tail -2 $R/log_train_dec$TAG.txt
fi
[ "$PHASE" = train ] && exit 0
# CURVES=file: the oracle's decode layer curves measured before (same protocol) instead of measuring them again
[ -n "${CURVES:-}" ] && [ ! -f $R/decode_layer_budgets.json ] && cp "$CURVES" $R/decode_layer_budgets.json
if [ ! -f $R/decode_layer_budgets.json ]; then
  python -m seer_attn.evaluation.layer_budgets --model $R/gates_dec$TAG --stage decode --dataset $D/calib-large --length 8192 \
    --max_docs 4 --output $R/decode_layer_budgets.json --write_config > $R/log_lb_dec.txt 2>&1
  echo "decode curves rc=$? $(( $(date +%s) - t0 ))s"; grep "token budget" $R/log_lb_dec.txt | tail -3
fi
# an arm whose config lacks the curves (they were measured through another arm's gates) gets them copied in
for cfg in $R/gates_dec$TAG/config.json $R/gates_dec$TAG/arms/*/config.json; do
[ -f "$cfg" ] || continue
python - <<EOF
import json
p = "$cfg"; c = json.load(open(p))
if "seerattn_decode_layer_budget_curves" not in c:
    c["seerattn_decode_layer_budget_curves"] = json.load(open("$R/decode_layer_budgets.json"))["curves"]
    json.dump(c, open(p, "w"), indent=2); print("curves copied into", p)
EOF
done
python -m seer_attn.evaluation.decode_ppl --model $R/gates_dec$TAG --methods dense,seer,oracle,static,seer+layers,oracle+layers,static+layers \
  --datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 8192 --max_docs $DOCS --budgets 256,512,1024,2048 \
  --no_plot --output_dir $R/eval_dec$TAG > $R/log_eval_dec$TAG.txt 2>&1
echo "eval rc=$? $(( $(date +%s) - t0 ))s"; cat $R/eval_dec$TAG/decode_ppl_results.md
for arm in $R/gates_dec$TAG/arms/*/; do
  [ -d "$arm" ] || continue
  a=$(basename $arm)
  python -m seer_attn.evaluation.decode_ppl --model $arm --methods seer,seer+layers \
    --datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 8192 --max_docs $DOCS --budgets 256,512,1024,2048 \
    --no_plot --output_dir $R/eval_dec${TAG}_$a > $R/log_eval_dec${TAG}_$a.txt 2>&1
  echo "eval arm $a rc=$? $(( $(date +%s) - t0 ))s"; cat $R/eval_dec${TAG}_$a/decode_ppl_results.md
done
cd $R && tar czf $OUT/s6_13$TAG.tar.gz eval_dec$TAG*/decode_ppl_results.* decode_layer_budgets.json gates_dec$TAG/config.json \
  gates_dec$TAG/arms/*/config.json gates_dec$TAG/gate_loss.jsonl log_*dec*.txt 2>/dev/null
ls -la $OUT
