#!/usr/bin/env bash
# Next GPU session's kernel/gate calls (no model needed; carry .gpu/wheels .gpu/scripts).
# usage: bash .gpu/scripts/s7.sh PART...   (several parts in one call; each has its own cap CAP_<part>)
#   tests   : GPU tests of what session 6 changed without a GPU: TMA loads in attn_with_pooling and the CSR
#             kernels (forward, backward, packed), the TopK packed (cu_seqlens) path, the fused gate's
#             GQA-shared selection. Run first: distillation and fine-tuning use those kernels
#   tma     : bench_attention.py with the new TMA loads and with SEER_ATTN_NO_TMA=1 (plain loads)
#   padded  : benchmarks/bench_padded.py: a padded batch packed through TopK vs CSR vs a loop (issue 10)
#   profile : bench_gate.py --profile default and default_shared, Llama-8B 32k/128k (issue 11)
#   gate    : bench_gate.py --designs default,default_shared (issue 11: per-group selection's cost)
#   gqa     : sweep_topk.py on a few variants with the gqa: rows (one block set per GQA group)
# Logs and JSON land in $OUT/r, tarred at the end into $OUT/s7_<parts>.tar.gz.
set -u
source "$(dirname "$0")/lib.sh"
for part in "$@"; do
  case $part in
    tests)
      TAILN=40 run gputests "${CAP_tests:-300}" python -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf \
        tests/kernels/test_attn_with_pooling.py tests/kernels/test_block_sparse_attn_csr.py \
        tests/kernels/test_block_sparse_attn_topk.py::test_block_sparse_attn_topk_varlen_gpu tests/modules/test_fused_gate.py ;;
    tma)
      # the kernels with and without their new TMA loads, same inputs (issue 10: attn_with_pooling vs SDPA-flash,
      # CSR fwd+bwd vs Flex): bench_attention's columns twice
      A="--seqlens 32768,131072 --densities 0.5,0.1 --only topk,csr_fwd,csr_fwdbwd,pool,flash,cudnn,flex,flex128"
      run bench_tma "${CAP_tma:-300}" python benchmarks/bench_attention.py $A --out "$R/tma" --fig "$R/tma.png"
      SEER_ATTN_NO_TMA=1 run bench_notma "${CAP_tma:-300}" python benchmarks/bench_attention.py $A --only topk,csr_fwd,csr_fwdbwd,pool \
        --out "$R/notma" --fig "$R/notma.png" ;;
    padded)
      run bench_padded "${CAP_padded:-150}" python benchmarks/bench_padded.py --out "$R/bench_padded.json" ;;
    profile)
      run profile_default "${CAP_profile:-120}" python benchmarks/bench_gate.py --profile default --shapes llama8b \
        --seqlens 32768,131072 --out "$R/gate_profile_default.json"
      run profile_shared "${CAP_profile:-120}" python benchmarks/bench_gate.py --profile default_shared --shapes llama8b \
        --seqlens 32768,131072 --out "$R/gate_profile_shared.json" ;;
    gate)
      run bench_gate "${CAP_gate:-240}" python benchmarks/bench_gate.py --designs default,default_shared \
        --compile-seqlens "" --out "$R/bench_gate.json" ;;
    gqa)
      TAILN=60 run sweep_gqa "${CAP_gqa:-300}" python benchmarks/sweep_topk.py --variants '^row_tma_w4s3$|^headpair_tma_w8s3$' \
        --full --seqlens 32768,131072 --budget-s 220 --out "$R/sweep_gqa.json" ;;
    *) echo "unknown part $part" ;;
  esac
done
(cd "$OUT" && tar czf "s7_$(echo "$@" | tr ' ' _).tar.gz" r && rm -rf r)
ls -la "$OUT"
