#!/usr/bin/env bash
# Extra staging for the issue 9 study: calib-large shards (one per call, each fits beside half the model).
set -euo pipefail
SHARED=${SHARED:-../shared}
mkdir -p .gpu/cl0 .gpu/cl1
cp $SHARED/data/calib-large/train-00000-of-00002.jsonl.gz .gpu/cl0/
cp $SHARED/data/calib-large/train-00001-of-00002.jsonl.gz .gpu/cl1/
mv .gpu/data2/* .gpu/data1/ 2>/dev/null || true
rm -f .gpu/data1/calib-mini.jsonl.gz   # with half the model, the first call's 64 MiB has no room for it
# half a shard (~30 MB of text) fits beside the second half of the model in one call
mkdir -p .gpu/cl0h
{ gunzip -c .gpu/cl0/*.gz || true; } | head -c 30000000 | head -n -1 | gzip -1 > .gpu/cl0h/train-00000-half.jsonl.gz  # gunzip stops on SIGPIPE
cp tools/gpu/*.sh .gpu/scripts/
du -sh .gpu/*
