#!/usr/bin/env bash
# Issue 11 benchmarks in one command (about 7 minutes on an H100): the gate alone, then the
# model-level suite (prefill 32k/128k dense vs sparse for SmolLM2 and the 4-layer Llama-3-8B shape,
# CUDA graphs, PyTorch vs fused gate, generate() time to first token, SmolLM2 fine-tuning step with
# and without the cheaper ground truth, per-layer crossover, profile). Tables end up in
# $RESULTS/*.md and are printed again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="${RESULTS:-${OUT:-benchmarks/results}}"
mkdir -p "$RESULTS"
python benchmarks/bench_gate.py --out "$RESULTS/bench_gate_issue11.json" "$@" 2>&1 | tee "$RESULTS/bench_gate_issue11.log"
python benchmarks/bench_prefill.py --suite --out "$RESULTS/bench_prefill_issue11.json" 2>&1 | tee "$RESULTS/bench_prefill_issue11.log"
echo "================ summary ================"
cat "$RESULTS/bench_gate_issue11.md" "$RESULTS/bench_prefill_issue11.md"
