#!/usr/bin/env bash
# Fill the ignored .gpu/ folder with what a GPU run needs and cannot reach there (run from the repo root):
# the SmolLM2 GGUF in two halves (each call carries at most 64 MiB), the wheels the GPU image lacks
# (datasets, gguf, ...) and gzipped data. See tools/gpu/README.md.
set -euo pipefail
SHARED=${SHARED:-../shared}
M=$SHARED/models/smollm2-135m-instruct-q4_1
mkdir -p .gpu/m1 .gpu/m2 .gpu/wheels .gpu/data1 .gpu/data2 .gpu/scripts
cp $M/*.part0 $M/*.part1 .gpu/m1/
cp $M/*.part2 $M/*.part3 $M/SHA256SUMS .gpu/m2/
cp $SHARED/wheels/py312/*.whl .gpu/wheels/
gzip -c $SHARED/data/pg19-mini/test.jsonl > .gpu/data1/pg19-mini.jsonl.gz
gzip -c $SHARED/data/proofpile-mini/test.jsonl > .gpu/data1/proofpile-mini.jsonl.gz
gzip -c $SHARED/data/calib-mini/train.jsonl > .gpu/data2/calib-mini.jsonl.gz
cp tools/gpu/*.sh .gpu/scripts/
du -sh .gpu/*
