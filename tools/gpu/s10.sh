#!/usr/bin/env bash
# Session 10's H100 call (issue 13: decoding with a StaticCache and one CUDA graph per step). Parts run in
# the order given, each with its own cap CAP_<part> (seconds); logs and JSON land in $OUT/r, tarred into
# $OUT/s10_<parts>.tar.gz. Carry .gpu/wheels and .gpu/scripts. No model files needed (random weights).
# usage: bash .gpu/scripts/s10.sh PART...
#   graphtest : tests/models/test_decode_sparsity.py -m gpu -k graphed_decoder (capture works, replays == eager == generate())
#   graphed   : bench_decode.py --graphed: GraphedDecoder dense (masked SDPA; split-K kernel) vs sparse (eager / compiled
#               gate step), SmolLM2 config (random weights, YaRN x4), batch 1 / 8, contexts CONTEXTS (default 32768),
#               budgets BUDGETS (default 2048) (issue 13's end-to-end target)
#   eagergen  : bench_decode.py --generate at budget 4096 (generate(), DynamicCache, eager) for comparison
#   attn      : bench_decode.py per-step attention rows, both shapes, 32k / 128k, batch 1 / 8 (no Flex)
set -u
source "$(dirname "$0")/lib.sh"
CFG=configs/smollm2_135m_llama_config.json
for part in "$@"; do
  case $part in
    graphtest)
      TAILN=30 run graphtest "${CAP_graphtest:-150}" python -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf \
        tests/models/test_decode_sparsity.py -k graphed_decoder ;;
    graphed)
      for b in ${BUDGETS:-2048}; do
        TAILN=6 run graphed_$b "${CAP_graphed:-200}" python benchmarks/bench_decode.py --skip-attention --no-flex --graphed \
          --gen-config $CFG --gen-contexts ${CONTEXTS:-32768} --gen-batches 1,8 --gen-tokens 128 --budget $b \
          --out "$R/bench_decode_graphed_$b.json"
      done ;;
    eagergen)
      TAILN=6 run eagergen "${CAP_eagergen:-200}" python benchmarks/bench_decode.py --skip-attention --no-flex --generate \
        --gen-config $CFG --gen-context 32768 --gen-batches 1,8 --gen-tokens 64 --budget 4096 --out "$R/bench_decode_eager.json" ;;
    attn)
      TAILN=14 run attn "${CAP_attn:-200}" python benchmarks/bench_decode.py --no-flex --contexts 32768,131072 --batches 1,8 \
        --budget 4096 --out "$R/bench_decode_attn.json" ;;
    *) echo "unknown part $part" ;;
  esac
done
(cd "$OUT" && tar czf "s10_$(echo "$@" | tr ' ' _).tar.gz" r && rm -rf r)
ls -la "$OUT"
