# Sourced by the run_*.sh scripts: how to start a Python module on NPROC processes.
#   NPROC=1 (default): plain python.  NPROC=N: accelerate launch with N processes and the
#   accelerate config ACCELERATE_CONFIG (each script picks a default from configs/accelerate/).
# NVLink multicast stays off for every process a launcher starts (shared multi-GPU hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NPROC=${NPROC:-1}
launch_module() {
  local config=$1; shift
  if [[ "$NPROC" -le 1 ]]; then
    $PYTHON -m "$@"
  else
    $PYTHON -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$config}" \
      --num_processes "$NPROC" --main_process_port "${MAIN_PROCESS_PORT:-29517}" -m "$@"
  fi
}
