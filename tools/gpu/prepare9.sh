#!/usr/bin/env bash
# Extra staging for the issue 9 study: calib-large shards (one per call, each fits beside half the model).
set -euo pipefail
SHARED=${SHARED:-../shared}
mkdir -p .gpu/cl0 .gpu/cl1
cp $SHARED/data/calib-large/train-00000-of-00002.jsonl.gz .gpu/cl0/
cp $SHARED/data/calib-large/train-00001-of-00002.jsonl.gz .gpu/cl1/
mv .gpu/data2/* .gpu/data1/ 2>/dev/null || true   # calib-mini travels with the first call
cp tools/gpu/*.sh .gpu/scripts/
du -sh .gpu/*
