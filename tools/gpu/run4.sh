# issue 4 on the GPU: distill SmolLM2 gates at 8k on calib-mini, then PPL at 8k with baselines.
# usage: bash .gpu/scripts/run4.sh TARGET (max|mass) [STEPS]
TARGET=${1:-max}; STEPS=${2:-200}
R=/tmp/runs; mkdir -p $R $OUT
python -m seer_attn.training.distill --model smollm2-135m --dataset /tmp/data/calib-mini.jsonl \
  --train_length 8192 --max_steps $STEPS --per_device_train_batch_size 8 --learning_rate 1e-3 --warmup_steps 20 \
  --seerattn_distill_target $TARGET --save_steps 1000 --logging_steps 10 --output_dir $R/gates_$TARGET 2>&1 | grep -v "it/s\]\|s/it\]" | tail -30
python -m seer_attn.evaluation.ppl --model $R/gates_$TARGET \
  --datasets /tmp/data/pg19-mini.jsonl,/tmp/data/proofpile-mini.jsonl \
  --lengths 8192 --nz_ratios 1.0,0.5,0.3,0.1 --thresholds 0.002,0.005,0.02 --max_docs 16 \
  --output_dir $R/eval_$TARGET 2>&1 | grep -v "doc/s\]\|s/doc\]" | tail -45
cp $R/eval_$TARGET/ppl_results.md $OUT/ppl_$TARGET.md; cp $R/eval_$TARGET/ppl_vs_density.png $OUT/ppl_$TARGET.png
cp $R/eval_$TARGET/ppl_results.json $OUT/ppl_$TARGET.json; cp $R/gates_$TARGET/gate_loss.jsonl $OUT/gate_loss_$TARGET.jsonl
