# issue 4 variant: a gate with Q projection over 3 Q pools, lr 2e-3, 300 steps, mass target
R=/tmp/runs; mkdir -p $R $OUT
python -m seer_attn.training.distill --model smollm2-135m --dataset /tmp/data/calib-mini.jsonl \
  --train_length 8192 --max_steps 300 --per_device_train_batch_size 8 --learning_rate 2e-3 --warmup_steps 20 \
  --seerattn_gate_type Qmaxminavg_Kmaxminavg --seerattn_distill_target mass --save_steps 1000 --logging_steps 20 \
  --output_dir $R/gates_qkproj 2>&1 | grep -v "it/s\]\|s/it\]" | tail -8
python -m seer_attn.evaluation.ppl --model $R/gates_qkproj \
  --datasets /tmp/data/pg19-mini.jsonl,/tmp/data/proofpile-mini.jsonl \
  --lengths 8192 --nz_ratios 1.0,0.5,0.3,0.1 --thresholds 0.002,0.005,0.02 --methods dense,seer,oracle,oracle_mass,static --max_docs 16 \
  --output_dir $R/eval_qkproj 2>&1 | grep -v "doc/s\]\|s/doc\]" | tail -20
cp $R/eval_qkproj/ppl_results.json $OUT/ppl_qkproj.json; cp $R/eval_qkproj/ppl_vs_density.png $OUT/ppl_qkproj.png; cp $R/gates_qkproj/gate_loss.jsonl $OUT/gate_loss_qkproj.jsonl
