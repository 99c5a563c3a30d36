#!/usr/bin/env bash
# The device run of benchmarks/serve.py (see docs/benchmarks.md, "Multi-adapter serving").
# Before the call, on the host: download the server's wheels into .whl/ (the device image has
# anyio, h11, click, httpx but not these):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
#     pydantic_core==2.50.5 uvicorn==0.54.0 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     opentelemetry-api==1.45.2
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, triton, peft; print(torch.__version__, transformers.__version__, triton.__version__, peft.__version__)" | tee -a "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
timeout 100 python3 -m pytest -q -p no:warnings -p no:cacheprovider tests/kernels/test_multi_lora.py tests/lora/test_bank.py tests/generation/test_engine.py 2>&1 | tee "$OUT/tests.txt" | tail -15
timeout 175 python3 benchmarks/serve.py --json "$OUT/serve.json" 2>&1 | grep -v "attention mask" | tee "$OUT/bench.txt"
