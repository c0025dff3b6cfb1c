# reassemble the model, unpack data, set the environment; source it
set -e
cp .gpu/m2/* /tmp/model/
if [ ! -f /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf.part{0,1,2,3} > /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf
  (cd /tmp/model && sha256sum -c SHA256SUMS)
fi
for f in .gpu/data2/*.gz /tmp/data/*.gz; do [ -f "$f" ] && gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
ls -la /tmp/data
export PYTHONPATH=/tmp/site:$PWD SEER_ATTN_SMOLLM2_GGUF=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
set +e
