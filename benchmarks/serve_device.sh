#!/usr/bin/env bash
# The device run of benchmarks/serve.py (issue 26, item 7; docs/benchmarks.md): one H200, ~8 minutes.
# From the repository root, with the server's wheels in .whl/ (ignored by git: carry it to the device):
#   bash benchmarks/serve_device.sh
# Writes $OUT/serve.json (every part's rows, notes and status), $OUT/bench.txt (the log and the
# tables) and $OUT/device.txt (GPU, driver, library versions). ARGS passes options to serve.py
# (e.g. ARGS="--parts decode,offline --offline-requests 500"); TESTS=1 first runs the engine's GPU
# tests into $OUT/tests.txt (then give the benchmark less time: BENCH_TIMEOUT).
# .whl/ was filled on the host with (the device image has anyio, h11, click, httpx but not these; also
# llguidance for structured output, and trl, datasets, dill, multiprocess for benchmarks/preference.py):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
#     pydantic_core==2.50.5 uvicorn==0.55.0 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     opentelemetry-api==1.45.2 openai
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, triton, peft, fastapi, uvicorn, httpx; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'httpx', httpx.__version__)" | tee -a "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
if [ "${TESTS:-0}" = 1 ]; then
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:warnings -p no:cacheprovider -rf --tb=short tests/engine \
    tests/kernels/test_paged_attention.py tests/kernels/test_rope_cache.py tests/kernels/test_multi_lora.py \
    tests/kernels/test_nf4_gemv.py tests/fused tests/lora/test_bank.py tests/serve/test_structured.py \
    2>&1 | tee "$OUT/tests.txt" | tail -15
fi
timeout ${BENCH_TIMEOUT:-560} python3 benchmarks/serve.py --json "$OUT/serve.json" $ARGS 2>&1 \
  | grep -v "attention mask" | tee "$OUT/bench.txt"
