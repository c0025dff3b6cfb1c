# Sourced by the run_*.sh scripts: how to start a training module on NPROC processes.
#   NPROC=1 (default): plain python.  NPROC=N: torchrun with N processes; the HF Trainer (through
#   accelerate) then runs data parallel (DDP), or FSDP when the caller adds $FSDP_ARGS.
#   LAUNCHER=accelerate uses `accelerate launch --config_file configs/accelerate/<ACCELERATE_CONFIG>`
#   instead (ddp.yaml, fsdp.yaml, deepspeed_*.yaml).
# NVLink multicast stays off for every process a launcher starts (shared multi-GPU hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NPROC=${NPROC:-1}
FSDP_ARGS=()
if [[ "$NPROC" -gt 1 ]]; then
  FSDP_ARGS=(--fsdp "full_shard auto_wrap" --fsdp_config "$REPO_ROOT/configs/fsdp_finetune.json")
fi
launch_module() {
  # launch_module DEFAULT_ACCELERATE_CONFIG MODULE ARGS...
  local config=$1; shift
  if [[ "$NPROC" -le 1 ]]; then
    $PYTHON -m "$@"
  elif [[ "${LAUNCHER:-torchrun}" == accelerate ]]; then
    $PYTHON -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$config}" \
      --num_processes "$NPROC" --main_process_port "${MAIN_PROCESS_PORT:-29517}" -m "$@"
  else
    $PYTHON -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m "$@"
  fi
}
