#!/usr/bin/env bash
# Session 3 GPU calls (kernels, gate cost, decode). usage: bash .gpu/scripts/s3.sh PART
#   tests   : GPU tests of every kernel but TopK (validated in session 2), fused gate, decode model test
#   gate    : benchmarks/bench_gate.py (issue 11)
#   decode  : benchmarks/bench_decode.py (issue 13), with --generate when GEN=1
#   prefill : benchmarks/bench_prefill.py --suite (issue 11)
#   csr     : benchmarks/sweep_csr.py + benchmarks/bench_padded.py (issue 10)
# Several parts in one call: bash .gpu/scripts/s3.sh tests gate decode. Each part has its own
# time cap (CAP_<part> seconds) so one hang cannot eat the call; logs and JSON land in $OUT/r and
# are tarred at the end into $OUT/s3_<parts>.tar.gz (the device returns at most 8 files).
set -u
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRITON_INTERPRET=0
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
for part in "$@"; do
  case $part in
    tests)
      run gputests "${CAP_tests:-200}" python -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf \
        tests/kernels/test_attn_with_pooling.py tests/kernels/test_attn_with_token_pooling.py \
        tests/kernels/test_block_sparse_attn_csr.py tests/kernels/test_gate_kernel.py \
        tests/kernels/test_sparse_decode_attn.py tests/models/test_decode_sparsity.py \
        tests/modules/test_fused_gate.py tests/models/test_seer_llama.py ;;
    tests2)
      # the kernels changed in session 3 (canonical gate lists, CSR defaults) and the decode model test
      TAILN=45 run gputests2 "${CAP_tests2:-240}" bash -c "python -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf \
        tests/models/test_decode_sparsity.py tests/kernels/test_gate_kernel.py tests/modules/test_fused_gate.py \
        tests/kernels/test_block_sparse_attn_csr.py; python -m pytest -q -p no:cacheprovider --tb=short -rf \
        tests/kernels/test_block_sparse_attn_topk.py -k 'canonical or errors'" ;;
    gate)
      run bench_gate "${CAP_gate:-240}" python benchmarks/bench_gate.py --out "$R/bench_gate.json" ;;
    decode)
      run bench_decode "${CAP_decode:-200}" python benchmarks/bench_decode.py ${GEN:+--generate} --out "$R/bench_decode.json" ;;
    prefill)
      run bench_prefill "${CAP_prefill:-560}" python benchmarks/bench_prefill.py --suite --out "$R/bench_prefill.json" ;;
    csr)
      run sweep_csr "${CAP_csr:-300}" python benchmarks/sweep_csr.py --out "$R/sweep_csr.json"
      run bench_padded "${CAP_padded:-120}" python benchmarks/bench_padded.py --out "$R/bench_padded.json" ;;
    *) echo "unknown part $part" ;;
  esac
done
(cd "$OUT" && tar czf "s3_$(echo "$@" | tr ' ' _).tar.gz" r && rm -rf r)
ls -la "$OUT"
