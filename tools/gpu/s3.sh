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
source "$(dirname "$0")/lib.sh"
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
