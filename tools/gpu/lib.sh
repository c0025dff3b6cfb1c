# Shared preamble of the GPU call scripts (source it from the repo root on the device machine): the
# environment, the wheels the image lacks (into /tmp/site, once per warm machine), the versions, and
# `run NAME CAP cmd...`, which logs a part to $R/NAME.log under a time cap and prints its tail.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
[ -f /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf ] && export SEER_ATTN_SMOLLM2_GGUF=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/site "$OUT/r"
if [ ! -f /tmp/site/.ok ] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && touch /tmp/site/.ok
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
R=$OUT/r
run() {  # run NAME CAP cmd...
  local name=$1 cap=$2; shift 2
  local t0=$(date +%s)
  timeout "$cap" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t0 ))s"
  grep -v "it/s\]\|s/it\]" "$R/$name.log" | tail -n "${TAILN:-25}"
}
