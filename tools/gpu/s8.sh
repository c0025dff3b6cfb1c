#!/usr/bin/env bash
# Session 8's H100 calls (issue 11 gate cost; issue 13 decode check). Parts run in the order given, each with
# its own cap CAP_<part> (seconds); logs and JSON land in $OUT/r, tarred into $OUT/s8_<parts>.tar.gz.
# usage: bash .gpu/scripts/s8.sh PART...
#   gatetests : GPU tests of the gate kernels and the fused gate (the adaptive selection's new digit width,
#               int32 floor keys, the gate precision setting)
#   bits      : bench_gate.py --adaptive-bits 10,8,6,5: the adaptive selection per radix digit width, same scores
#   profile   : bench_gate.py --profile default (Llama-8B 32k / 128k): where the default gate's time goes now
#   gate      : bench_gate.py --designs default,default_tf32,default_bf16 (every shape and length, the issue-11 table)
#   prefill   : bench_prefill.py --suite (end-to-end prefill, TTFT and the fine-tuning step; issue 11's targets)
# Needing the model (stage2.sh sourced in an earlier call of the same warm machine):
#   tf32ppl   : PPL of one gate checkpoint (.gpu/gates_s4, or GATES=dir) with the fused gate's products in tf32x3 / tf32 / bf16,
#               adaptive+layers at nz 0.5 / 0.3 / 0.1 on 16 + 16 documents (does single-pass tf32 cost quality?)
#   decodetest: tests/models/test_decode_sparsity.py::test_smollm2_triton_decoding_gpu alone
#   decodegen : bench_decode.py --generate: generate() tokens/s of SmolLM2 (YaRN x4) at a 32k context, batch 1 / 8,
#               dense vs sparse decoding (eager, DynamicCache), beside the per-step attention rows at 32k
set -u
source "$(dirname "$0")/lib.sh"
for part in "$@"; do
  case $part in
    gatetests)
      TAILN=30 run gatetests "${CAP_gatetests:-240}" python -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf \
        tests/kernels/test_gate_kernel.py tests/modules/test_fused_gate.py ;;
    bits)
      TAILN=20 run adaptive_bits "${CAP_bits:-240}" python benchmarks/bench_gate.py --adaptive-bits 10,8,6,5 \
        --shapes llama8b,smollm2 --seqlens 32768,131072 --out "$R/adaptive_bits.json" ;;
    profile)
      run profile_default "${CAP_profile:-120}" python benchmarks/bench_gate.py --profile default --shapes llama8b \
        --seqlens 32768,131072 --out "$R/gate_profile_default.json" ;;
    gate)
      run bench_gate "${CAP_gate:-300}" python benchmarks/bench_gate.py --designs default,default_tf32,default_bf16 \
        --compile-seqlens "" --out "$R/bench_gate.json" ;;
    prefill)
      TAILN=60 run bench_prefill "${CAP_prefill:-420}" python benchmarks/bench_prefill.py --suite --out "$R/bench_prefill_suite.json" ;;
    tf32ppl)
      G=${GATES:-/tmp/runs/gates_s4}; if [ -d .gpu/gates_s4 ]; then mkdir -p $G; cp .gpu/gates_s4/* $G/; fi
      EVAL=(--model $G --datasets /tmp/data/pg19-mini.jsonl,/tmp/data/proofpile-mini.jsonl --lengths 8192 --max_docs 16
            --nz_ratios 0.5,0.3,0.1 --methods seer --budget_methods adaptive+layers
            --layer_budgets docs/results/s4_9/layer_budgets_loss.json --plot false)
      for prec in ${PRECS:-tf32x3 tf32 bf16}; do
        TAILN=12 run ppl_$prec "${CAP_tf32ppl:-200}" python -m seer_attn.evaluation.ppl "${EVAL[@]}" --gate_precision $prec \
          --output_dir "$R/ppl_$prec"
      done ;;
    decodetest)
      TAILN=30 run decodetest "${CAP_decodetest:-200}" python -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf \
        "tests/models/test_decode_sparsity.py::test_smollm2_triton_decoding_gpu" ;;
    decodegen)
      TAILN=20 run decodegen "${CAP_decodegen:-300}" python benchmarks/bench_decode.py --shapes smollm2 --contexts 32768 \
        --batches 1,8 --no-flex --generate --gen-batches 1,8 --out "$R/bench_decode_generate.json" ;;
    *) echo "unknown part $part" ;;
  esac
done
(cd "$OUT" && tar czf "s8_$(echo "$@" | tr ' ' _).tar.gz" r && rm -rf r)
ls -la "$OUT"
