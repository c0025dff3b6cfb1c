#!/usr/bin/env bash
# Session 12's H100 calls, one per argument, run back to back on one warm machine (a machine is released
# ~30 s after a call, and /tmp with the staged model goes with it). Carry per call:
#   call1: .gpu/m1 .gpu/wheels .gpu/data1 .gpu/scripts   stage1 (model's first half, wheels, eval data), then the
#          decode-gate kernel's GPU tests after session 11's shared-memory fix and bench_gate's default designs
#          with the graphed rows (issue 11; no model needed)
#   call2: .gpu/m2 .gpu/scripts                          stage2 (model assembled); the decode-gate kernel's GPU tests
#          again (its top-k became a multi-way search after call 1 was packed), the gate step alone per variant
#          (bench_decode.py --gate-step), graphed decoding at 32k (issue 13's point)
#   call3: .gpu/cl0h .gpu/scripts                        issue 13's key-summary study: distil prefill + decode gates (the
#          default decode gate, one key summary per block) with a decode-gate arm beside it (2 key summaries per block,
#          `--decode_arms`: same batches and target), 500 steps x 8 x 8k on calib-large's first ~30 MB (331 s in session 7
#          without the arm; a 4-summary arm would add ~2x the 2-summary one's cost, over this call's cap); if that fails
#          (memory), again in micro-batches of 4; test_smollm2_triton_decoding_gpu
#   call4: .gpu/scripts                                  decode-mode PPL of the main gate and each arm (8 + 8 documents,
#          the oracle's layer curves measured in session 7), the main gate and the oracle again keeping the sink and the
#          most recent block (`--keep_sink --keep_recent 1`), then issue 11's precision question on the same gates: prefill PPL with
#          the gate's products in tf32x3 / bf16 (16 + 16 documents); then, if at least 300 s of the call are left,
#          issue 11's cheaper ground truth: YaRN x4 fine-tuning at 32k (30 steps) from these gates with the full
#          ground truth and with 8 of 30 layers per step, PPL at 32k after each (4 + 4 documents)
set -u
part=$1
case $part in
  call1)
    bash .gpu/scripts/stage1.sh
    CAP_decodetests=${CAP_decodetests:-110} CAP_gate=${CAP_gate:-220} bash .gpu/scripts/s11.sh decodetests gate ;;
  call2)
    source .gpu/scripts/stage2.sh
    source .gpu/scripts/lib.sh
    TAILN=12 run gatekernel 55 python -m pytest -q -p no:cacheprovider --tb=short -rf tests/kernels/test_decode_gate_kernel.py
    TAILN=14 run gatestep 80 python benchmarks/bench_decode.py --skip-attention --no-flex --gate-step --contexts 32768,131072 \
      --batches 1,8 --budget 2048 --out "$R/bench_decode_gate_step.json"
    TAILN=8 run graphed 125 python benchmarks/bench_decode.py --skip-attention --no-flex --graphed \
      --gen-config configs/smollm2_135m_llama_config.json --gen-contexts 32768 --gen-batches 1,8 \
      --gen-tokens 128 --budget 2048 --out "$R/bench_decode_graphed.json"
    (cd "$OUT" && tar czf s12_call2.tar.gz r && rm -rf r) ;;
  call3)
    export PYTHONPATH=/tmp/site:$PWD SEER_ATTN_SMOLLM2_GGUF=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf PYTHONUNBUFFERED=1 \
      TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    mkdir -p /tmp/data/calib-large
    [ -f /tmp/data/calib-large/train-00000.jsonl ] || gunzip -c .gpu/cl0h/*.gz > /tmp/data/calib-large/train-00000.jsonl
    t0=$(date +%s)
    GA="--per_device_train_batch_size 4 --gradient_accumulation_steps 2"
    PHASE=train TAG=_arms EXTRA="--decode_arms k2:k_summaries=2" bash .gpu/scripts/s6_13.sh 8
    if [ ! -f /tmp/runs/gates_dec_arms/model.safetensors ]; then
      grep -m3 -i "error\|out of memory" /tmp/runs/log_train_dec_arms.txt; rm -rf /tmp/runs/gates_dec_arms
      PHASE=train TAG=_arms EXTRA="--decode_arms k2:k_summaries=2 $GA" bash .gpu/scripts/s6_13.sh 8
    fi
    ls /tmp/runs/gates_dec_arms/arms 2>/dev/null
    [ $(( $(date +%s) - t0 )) -lt 430 ] && CAP_decodetest=${CAP_decodetest:-110} bash .gpu/scripts/s8.sh decodetest ;;
  call4)
    export PYTHONPATH=/tmp/site:$PWD SEER_ATTN_SMOLLM2_GGUF=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf PYTHONUNBUFFERED=1 \
      TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    t0=$(date +%s)
    PHASE=eval TAG=_arms CURVES=docs/results/s7_decode13/decode_layer_budgets.json bash .gpu/scripts/s6_13.sh 8
    # the same gates keeping the sink and the most recent complete block whatever the selector scores (inside the budget)
    D=/tmp/data; R=/tmp/runs
    timeout 120 python -m seer_attn.evaluation.decode_ppl --model $R/gates_dec_arms --methods seer,oracle,seer+layers \
      --keep_sink true --keep_recent 1 --datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 8192 --max_docs 8 \
      --budgets 256,512,1024,2048 --no_plot --output_dir $R/eval_dec_arms_keep > $R/log_eval_dec_arms_keep.txt 2>&1
    echo "eval keep rc=$?"; cat $R/eval_dec_arms_keep/decode_ppl_results.md
    (cd $R && tar czf $OUT/s12_keep.tar.gz eval_dec_arms_keep/decode_ppl_results.* log_eval_dec_arms_keep.txt)
    PRECS="tf32x3 bf16" GATES=/tmp/runs/gates_dec_arms CAP_tf32ppl=${CAP_tf32ppl:-130} bash .gpu/scripts/s8.sh tf32ppl
    left=$(( 590 - ($(date +%s) - t0) ))
    if [ $left -ge 300 ]; then
      for arm in "_gtfull:" "_gtl8:--gt_layers_per_step 8"; do
        left=$(( 590 - ($(date +%s) - t0) )); [ $left -lt 60 ] && break
        PART=sparse TAG=${arm%%:*} FLAGS="${arm#*:}" GATES=/tmp/runs/gates_dec_arms BM=nz_ratio,adaptive \
          timeout $left bash .gpu/scripts/s5_yarn.sh 4
      done
    else echo "cheaper ground truth skipped: $left s left"; fi ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
