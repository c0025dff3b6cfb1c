set -e
mkdir -p /tmp/model /tmp/data /tmp/site
cp .gpu/m1/* /tmp/model/
cp .gpu/data1/* /tmp/data/ 2>/dev/null || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
ls -la /tmp/model /tmp/data
