# issue 5 on the GPU: YaRN 8k -> 32k fine-tuning of SmolLM2: dense baseline, SeerAttention at 0.5 and 0.1
R=/tmp/runs; D=/tmp/data; STEPS=${STEPS:-30}; mkdir -p $R $OUT
COMMON="--dataset $D/calib-mini.jsonl --yarn_factor 4 --train_length 32768 --max_steps $STEPS --per_device_train_batch_size 1 --gradient_accumulation_steps 2 --learning_rate 1e-5 --warmup_steps 5 --bf16 --save_steps 1000 --logging_steps 5 --seed 0"
GATES=${GATES:-$R/gates_mass}
for run in "s01 sparse 0.1" "dense dense 1.0" "s05 sparse 0.5"; do
  set -- $run
  model=$GATES; [[ $2 == dense ]] && model=smollm2-135m
  echo "== ft_$1: mode $2 nz $3 from $model"
  python -m seer_attn.training.finetune --model $model --seerattn_mode $2 --nz_ratio $3 --seerattn_distill_target mass $COMMON --output_dir $R/ft_$1 2>&1 | grep -v "it/s\]\|s/it\]\|Map\|Filter\|Generat" | tail -12
  cp $R/ft_$1/train_loss.jsonl $OUT/train_loss_$1.jsonl 2>/dev/null
done
nvidia-smi --query-gpu=memory.used --format=csv
