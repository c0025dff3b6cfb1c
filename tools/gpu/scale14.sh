#!/usr/bin/env bash
# Issue 14 on `nvidia-h200-x2` (prepared in session 3, not run yet): 1 vs 2 GPUs at the same global
# batch and seed (same data order), SmolLM2. Source stage2.sh first (model, data, PYTHONPATH).
#   bash .gpu/scripts/scale14.sh distill STEPS     # gates at 8k, global batch 8 (DDP for 2)
#   bash .gpu/scripts/scale14.sh finetune STEPS    # YaRN x4 sparse fine-tuning at 32k, global batch 8 (FSDP for 2)
# Each run writes throughput.json (steady tokens/s, peak memory per rank) and its loss log; the
# summary at the end prints them side by side. NVLink multicast stays off in every process.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WHAT=$1; STEPS=${2:-30}
R=/tmp/scale; mkdir -p $R $OUT
run() {  # run NPROC module args...
  local n=$1; shift
  if [ "$n" = 1 ]; then python -m "$@"; else python -m torch.distributed.run --standalone --nproc_per_node "$n" -m "$@"; fi
}
for n in 1 2; do
  t0=$(date +%s)
  case $WHAT in
    distill)
      run $n seer_attn.training.distill --model smollm2-135m --dataset /tmp/data/calib-large --train_length 8192 \
        --max_steps $STEPS --per_device_train_batch_size $((8 / n)) --learning_rate 1e-3 --warmup_steps 5 \
        --save_steps 100000 --seed 0 --output_dir $R/distill_np$n > $R/log_distill_np$n.txt 2>&1 ;;
    finetune)
      gates=$R/distill_np1  # the same starting gates for both
      fsdp=(); [ $n -gt 1 ] && fsdp=(--fsdp "full_shard auto_wrap" --fsdp_config configs/fsdp_finetune.json)
      run $n seer_attn.training.finetune --model $gates --seerattn_mode sparse --nz_ratio 0.1 --yarn_factor 4 \
        --dataset /tmp/data/calib-large --train_length 32768 --max_steps $STEPS --per_device_train_batch_size 1 \
        --gradient_accumulation_steps $((8 / n)) --learning_rate 1e-5 --warmup_steps 2 --bf16 --save_steps 100000 \
        --seed 0 "${fsdp[@]}" --output_dir $R/ft_np$n > $R/log_ft_np$n.txt 2>&1 ;;
  esac
  echo "$WHAT nproc=$n rc=$? $(( $(date +%s) - t0 ))s"
done
for d in $R/*_np1 $R/*_np2; do [ -f $d/throughput.json ] && echo "$d: $(tr -d '\n ' < $d/throughput.json)"; done
cd $R && tar czf $OUT/scale14_$WHAT.tar.gz */throughput.json */*.jsonl log_*.txt 2>/dev/null
