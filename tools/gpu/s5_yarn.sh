#!/usr/bin/env bash
# Issue 9's last row (not run yet): YaRN 8k -> 32k fine-tuning at nz 0.1 from the session-4 gates (the
# default recipe: 4/2 summaries, pooled init, 100M tokens, layer curves), beside a dense-YaRN run on the
# same data, steps and seed; then PPL at 32k on pg19-mini and proofpile-mini. Source stage2.sh first;
# carry .gpu/gates_s4 and .gpu/cl0h (calib-large's first ~30 MB: its documents of >= 32k tokens train).
# usage: [STEPS=30] [PART=dense|sparse|all] [TAG=_gt4 FLAGS="--gt_every_n_steps 4"] [GATES=dir] [BM=budget methods] bash .gpu/scripts/s5_yarn.sh [DOCS]
#   GATES: the gate checkpoint the sparse arm starts from (default: the session-4 gates); BM: the sparse evaluation's
#   budget methods (default nz_ratio,adaptive,adaptive+layers; '+layers' needs layer curves in the checkpoint)
#   PART=dense needs only cl0h (it fits beside the model's second half); PART=sparse then carries gates_s4;
#   TAG/FLAGS: another sparse arm (e.g. issue 11's cheaper ground truth) in ft_s01$TAG / eval_ft_s01$TAG
DOCS=${1:-8}; STEPS=${STEPS:-30}; PART=${PART:-all}; TAG=${TAG:-}; FLAGS=${FLAGS:-}
R=/tmp/runs; D=/tmp/data; mkdir -p $R/gates_s4 $D/calib-large $OUT
[ -d .gpu/gates_s4 ] && cp .gpu/gates_s4/* $R/gates_s4/
[ -f $D/calib-large/train-00000.jsonl ] || [ ! -d .gpu/cl0h ] || gunzip -c .gpu/cl0h/*.gz > $D/calib-large/train-00000.jsonl
COMMON="--dataset $D/calib-large --yarn_factor 4 --train_length 32768 --max_steps $STEPS --per_device_train_batch_size 1
  --gradient_accumulation_steps 2 --learning_rate 1e-5 --warmup_steps 5 --bf16 --save_steps 100000 --logging_steps 5 --seed 0"
EVAL="--datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 32768 --max_docs $DOCS --plot false"
t0=$(date +%s)
if [ $PART != sparse ]; then
python -m seer_attn.training.finetune --model smollm2-135m --seerattn_mode dense $COMMON --output_dir $R/ft_dense > $R/log_ft_dense.txt 2>&1
echo "ft dense rc=$? $(( $(date +%s) - t0 ))s"
python -m seer_attn.evaluation.ppl --model $R/ft_dense $EVAL --methods dense,oracle_mass,static --nz_ratios 0.1 \
  --budget_methods nz_ratio,adaptive --output_dir $R/eval_ft_dense > $R/log_eval_ft_dense.txt 2>&1
echo "eval dense rc=$? $(( $(date +%s) - t0 ))s"
fi
if [ $PART != dense ]; then
python -m seer_attn.training.finetune --model ${GATES:-$R/gates_s4} --seerattn_mode sparse --nz_ratio 0.1 $COMMON $FLAGS \
  --output_dir $R/ft_s01$TAG > $R/log_ft_s01$TAG.txt 2>&1
echo "ft s01$TAG rc=$? $(( $(date +%s) - t0 ))s"
# the fine-tuned sparse checkpoint keeps the gates' layer curves (calibrated at 8k before fine-tuning)
python -m seer_attn.evaluation.ppl --model $R/ft_s01$TAG $EVAL --methods dense,seer --nz_ratios 0.1 \
  --budget_methods ${BM:-nz_ratio,adaptive,adaptive+layers} --output_dir $R/eval_ft_s01$TAG > $R/log_eval_ft_s01$TAG.txt 2>&1
echo "eval s01$TAG rc=$? $(( $(date +%s) - t0 ))s"
fi
grep "^| " $R/log_eval_ft_dense.txt $R/log_eval_ft_s01$TAG.txt | head -30
cd $R && tar czf $OUT/s5_yarn$TAG.tar.gz eval_ft_*/ppl_results.* eval_ft_*/recall.json ft_*/train_loss.jsonl ft_*/throughput.json log_*.txt 2>/dev/null
ls -la $OUT
