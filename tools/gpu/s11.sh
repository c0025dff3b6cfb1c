#!/usr/bin/env bash
# Session 11's H100 call (no model files: random weights). Parts run in the order given, each with its own cap
# CAP_<part> (seconds); logs and JSON land in $OUT/r, tarred into $OUT/s11_<parts>.tar.gz. Carry .gpu/wheels, .gpu/scripts.
# usage: bash .gpu/scripts/s11.sh PART...
#   padded  : bench_padded.py, classic and default gate designs: a padded batch of 8 sequences (4k-32k) padding-free
#             (the new default) vs the padded layout vs the same tokens packed (issue 10's 1.15x target)
#   gqa     : sweep_topk.py, row vs headpair kernels with the gqa: rows (one block set per GQA group; never timed)
#   gate    : bench_gate.py default / tf32 / bf16 designs, with the CUDA-graphed fused gate rows (issue 11)
#   decode  : GPU tests of the one-kernel decode-gate step and GraphedDecoder (now on it; `decodetests`: only them), then bench_decode.py --graphed
#             (SmolLM2 config, random weights, YaRN x4; contexts CONTEXTS (default 16384,32768), batch 1 / 8, budget 2048):
#             dense (masked SDPA; split-K kernel) vs sparse (fused gate step; compiled PyTorch gate step) (issue 13)
set -u
source "$(dirname "$0")/lib.sh"
for part in "$@"; do
  case $part in
    padded)
      for design in classic default; do
        TAILN=12 run padded_$design "${CAP_padded:-200}" python benchmarks/bench_padded.py --design $design \
          --out "$R/bench_padded_$design.json"
      done ;;
    gqa)
      TAILN=40 run sweep_gqa "${CAP_gqa:-240}" python benchmarks/sweep_topk.py --variants '^row_tma_w4s3$|^headpair_tma_w8s3$' \
        --full --seqlens 32768,131072 --budget-s 200 --out "$R/sweep_gqa.json" ;;
    gate)
      run bench_gate "${CAP_gate:-240}" python benchmarks/bench_gate.py --designs default,default_tf32,default_bf16 --seqlens 32768,131072 \
        --compile-seqlens "" --out "$R/bench_gate.json" ;;
    decode|decodetests)
      TAILN=20 run decodetests "${CAP_decodetests:-150}" python -m pytest -q -p no:cacheprovider --tb=short -rf \
        tests/kernels/test_decode_gate_kernel.py tests/models/test_decode_sparsity.py -k "decode_gate_step or graphed_decoder"
      [ "$part" = decodetests ] && continue
      TAILN=8 run graphed "${CAP_graphed:-240}" python benchmarks/bench_decode.py --skip-attention --no-flex --graphed \
        --gen-config configs/smollm2_135m_llama_config.json --gen-contexts ${CONTEXTS:-16384,32768} --gen-batches 1,8 \
        --gen-tokens 128 --budget 2048 --out "$R/bench_decode_graphed.json" ;;
    *) echo "unknown part $part" ;;
  esac
done
(cd "$OUT" && tar czf "s11_$(echo "$@" | tr ' ' _).tar.gz" r && rm -rf r)
ls -la "$OUT"
