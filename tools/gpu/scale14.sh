#!/usr/bin/env bash
# Issue 14 on `nvidia-h200-x2`: 1 vs 2 GPUs at the same global batch and data order, SmolLM2.
# Source stage2.sh first (model, data, PYTHONPATH); calib-large (or its first half) in /tmp/data/calib-large.
#   bash .gpu/scripts/scale14.sh distill STEPS    # gates at 8k, global batch 8: 1 GPU, 2 GPUs (DDP), gates compared
#   bash .gpu/scripts/scale14.sh resume STEPS     # 2-GPU distillation killed after its checkpoint at STEPS/2, resumed
#   [NPROCS=2] bash .gpu/scripts/scale14.sh finetune STEPS   # YaRN x4 sparse fine-tuning at 32k, global batch 8: 1 GPU, 2 GPUs (FSDP);
#                                                 # each checkpoint reloaded on GPU and CPU against what training held
#   bash .gpu/scripts/scale14.sh accelerate STEPS # the FSDP fine-tuning once through `accelerate launch` + fsdp.yaml
#   bash .gpu/scripts/scale14.sh profile STEPS    # distillation on 1 and 2 GPUs with 3 profiled steps (profile.json)
#   [NPROCS=1] bash .gpu/scripts/scale14.sh distillc STEPS  # distillation with the compiled gate (seerattn_compile_gate),
#                                                 # no profiler: tokens/s against `distill`'s eager runs
# Every run writes throughput.json (steady tokens/s, peak memory per rank) and its loss log; the results
# come back as one tarball per part. NVLink multicast stays off in every process.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WHAT=$1; STEPS=${2:-30}
R=/tmp/scale; mkdir -p $R $OUT
COMMON=(--seed 0 --train_sampling_strategy sequential --dataloader_num_workers 2 --logging_steps 20)
run() {  # run NPROC module args... (torchrun for 1 process too: the same launcher on both sides; a plain
  # single process hit a Triton autotuner error on the H200 host in session 4, see docs/RESULTS.md)
  local n=$1; shift
  python -m torch.distributed.run --standalone --nproc_per_node "$n" -m "$@"
}
distill() {  # distill NPROC OUTDIR extra...
  local n=$1 out=$2; shift 2
  run $n seer_attn.training.distill --model smollm2-135m --dataset /tmp/data/calib-large --train_length 8192 \
    --max_steps $STEPS --per_device_train_batch_size $((8 / n)) --learning_rate 1e-3 --warmup_steps 5 \
    --preprocessing_num_workers 8 "${COMMON[@]}" --output_dir $out "$@"
}
finetune() {  # finetune NPROC OUTDIR extra...
  local n=$1 out=$2; shift 2
  local fsdp=(); [ $n -gt 1 ] && fsdp=(--fsdp "full_shard auto_wrap" --fsdp_config configs/fsdp_finetune.json)
  run $n seer_attn.training.finetune --model $R/distill_np1 --seerattn_mode sparse --nz_ratio 0.1 --yarn_factor 4 \
    --dataset /tmp/data/calib-large --train_length 32768 --max_steps $STEPS --per_device_train_batch_size 1 \
    --gradient_accumulation_steps $((8 / n)) --learning_rate 1e-5 --warmup_steps 2 --bf16 --save_steps 100000 \
    --reload_check_tokens 4096 "${COMMON[@]}" "${fsdp[@]}" --output_dir $out "$@"
}
case $WHAT in
  distill)
    for n in 1 2; do
      [ -f $R/distill_np$n/model.safetensors ] && continue  # a repeated call redoes only what failed
      t0=$(date +%s); distill $n $R/distill_np$n --save_steps 100000 > $R/log_distill_np$n.txt 2>&1
      echo "distill nproc=$n rc=$? $(( $(date +%s) - t0 ))s"
    done
    python - <<'EOF'
import json
from safetensors.torch import load_file
a, b = load_file("/tmp/scale/distill_np1/model.safetensors"), load_file("/tmp/scale/distill_np2/model.safetensors")
rel = {k: float((a[k].double() - b[k].double()).norm() / a[k].double().norm()) for k in a}
la = {r["step"]: r["gate_loss"] for r in map(json.loads, open("/tmp/scale/distill_np1/gate_loss.jsonl"))}
lb = {r["step"]: r["gate_loss"] for r in map(json.loads, open("/tmp/scale/distill_np2/gate_loss.jsonl"))}
dl = max(abs(lb[s] - la[s]) / abs(la[s]) for s in la if s in lb)
res = {"gates_max_rel_diff": max(rel.values()), "gates_tensors": len(rel), "same_keys": a.keys() == b.keys(),
       "loss_max_rel_diff": dl, "steps_compared": len(set(la) & set(lb))}
print(json.dumps(res)); json.dump(res, open("/tmp/scale/compare_distill.json", "w"))
EOF
    ;;
  distillc)
    for n in ${NPROCS:-1 2}; do
      t0=$(date +%s); distill $n $R/distillc_np$n --save_steps 100000 --seerattn_compile_gate true > $R/log_distillc_np$n.txt 2>&1
      echo "distill (compiled gate) nproc=$n rc=$? $(( $(date +%s) - t0 ))s: $(tr -d '\n' < $R/distillc_np$n/throughput.json 2>/dev/null | cut -c1-300)"
    done
    ;;
  resume)
    # the uninterrupted 2-GPU run of the `distill` part is the reference (same STEPS)
    half=$((STEPS / 2)); out=$R/resume_np2; rm -rf $out
    distill 2 $out --save_steps $half > $R/log_resume_a.txt 2>&1 &
    pid=$!
    while kill -0 $pid 2>/dev/null && [ ! -f $out/checkpoint-$half/trainer_state.json ]; do sleep 1; done
    sleep 2; pkill -f "output_dir $out" ; wait $pid; echo "killed after checkpoint-$half: $(ls $out)"
    distill 2 $out --save_steps $half --resume_from_checkpoint last > $R/log_resume_b.txt 2>&1
    echo "resumed rc=$?"
    python - <<EOF
import json
ref = {r["step"]: r["gate_loss"] for r in map(json.loads, open("$R/distill_np2/gate_loss.jsonl"))}
got = {}
for r in map(json.loads, open("$out/gate_loss.jsonl")):
    got[r["step"]] = r["gate_loss"]  # a step logged before the kill and again after the resume: the resumed one
after = [s for s in sorted(got) if s > $half]
res = {"resumed_from": $half, "steps_after": len(after), "max_rel_diff_after_resume": max(abs(got[s] - ref[s]) / abs(ref[s]) for s in after),
       "first_steps": {s: [got[s], ref[s]] for s in after[:3]}}
print(json.dumps(res)); json.dump(res, open("$R/compare_resume.json", "w"))
EOF
    ;;
  finetune)
    for n in ${NPROCS:-1 2}; do
      t0=$(date +%s); finetune $n $R/ft_np$n > $R/log_ft_np$n.txt 2>&1
      echo "finetune nproc=$n rc=$? $(( $(date +%s) - t0 ))s"; grep -m1 "trained as" $R/log_ft_np$n.txt
      for dev in cuda cpu; do
        python -m seer_attn.training.reload_check $R/ft_np$n --device $dev --output $R/ft_np$n/reload_$dev.json > $R/log_reload_np${n}_$dev.txt 2>&1
        echo "reload np$n $dev rc=$?: $(tr -d '\n ' < $R/ft_np$n/reload_$dev.json 2>/dev/null | cut -c1-300)"
      done
    done
    ;;
  profile)
    for n in 1 2; do
      for c in "" compile; do  # eager, then the gate's training path as one compiled graph (seerattn_compile_gate)
        out=$R/prof${c}_np$n; flag=(); [ -n "$c" ] && flag=(--seerattn_compile_gate true)
        t0=$(date +%s); distill $n $out --save_steps 100000 --profile_steps 3 "${flag[@]}" > $R/log_prof${c}_np$n.txt 2>&1
        echo "profile $c nproc=$n rc=$? $(( $(date +%s) - t0 ))s: $(python -c "import json; d=json.load(open('$out/profile.json')); t=json.load(open('$out/throughput.json')); print({k: d[k] for k in ('wall_s', 'device_busy_s', 'device_idle_share')}, t['tokens_per_s'])" 2>&1)"
      done
    done
    ;;
  accelerate)
    t0=$(date +%s)
    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \
      -m seer_attn.training.finetune --model $R/distill_np1 --seerattn_mode sparse --nz_ratio 0.1 --yarn_factor 4 \
      --dataset /tmp/data/calib-large --train_length 32768 --max_steps $STEPS --per_device_train_batch_size 1 \
      --gradient_accumulation_steps 4 --learning_rate 1e-5 --warmup_steps 2 --bf16 --save_steps 100000 \
      --reload_check_tokens 4096 "${COMMON[@]}" --output_dir $R/ft_acc > $R/log_ft_acc.txt 2>&1
    echo "accelerate fsdp rc=$? $(( $(date +%s) - t0 ))s"; grep -m1 "trained as" $R/log_ft_acc.txt
    python -m seer_attn.training.reload_check $R/ft_acc --device cuda --output $R/ft_acc/reload_cuda.json > $R/log_reload_acc.txt 2>&1
    echo "reload acc rc=$?: $(tr -d '\n ' < $R/ft_acc/reload_cuda.json 2>/dev/null | cut -c1-300)"
    ;;
esac
for d in $R/*_np1 $R/*_np2 $R/ft_acc; do [ -f $d/throughput.json ] && echo "$d: $(tr -d '\n ' < $d/throughput.json)"; done
cd $R && tar czf $OUT/scale14_$WHAT.tar.gz */throughput.json */*.jsonl */reload_*.json */profile.* compare_*.json log_*.txt 2>/dev/null
ls -la $OUT
