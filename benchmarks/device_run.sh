#!/usr/bin/env bash
# Run on the GPU machine from the repository root:  bash benchmarks/device_run.sh check|full
#   check: GPU tests + per-kernel timings + throughput of every framework (with profiles of C)
#          + splice's 131,072-token probe
#   quick: GPU tests (kernels, fast, checkpoint, graphs, trainer) + throughput of PEFT and splice
#          on A and C; TUNE=1 adds the LoRA kernel tuning table, PROFILE=C,A profiles
#   session: GPU tests, then A/C throughput (PEFT vs splice), multi-adapter serving and DoRA,
#          each part under its own time limit (PARTS picks a subset: tests,ac,serve,dora,qlora)
#   full:  the benchmark in one invocation: throughput, loss parity, longest sequence search
#          (TESTS=1 runs the GPU tests first)
# Results go to $OUT (default ./bench_out). Liger-Kernel comes from wheels in .whl/ if present.
set -uo pipefail
MODE=${1:-full}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=.:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/log.txt"
GPU_TESTS="tests/kernels tests/fused tests/memory tests/quant tests/training/test_graphs.py tests/training/test_loss.py tests/training/test_loop.py tests/lora tests/generation tests/distributed"
if [ "$MODE" = quick ]; then
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider $GPU_TESTS \
    2>&1 | tee "$OUT/pytest.log" | tail -25
  if [ "${TUNE:-0}" = 1 ]; then
    timeout 130 python3 benchmarks/lora_kernel_tuning.py --out "$OUT/tuning.json" 2>&1 | tee "$OUT/tuning.txt" | tail -12
  fi
  timeout 300 python3 benchmarks/train_throughput.py --out "$OUT" --frameworks "${FRAMEWORKS:-peft,splice}" \
    --configs "${CONFIGS:-A,C}" --profile "${PROFILE:-}" --worker-timeout 220 2>&1 | tee -a "$OUT/log.txt" \
    | grep -v "^ *maxseq\|^  "
elif [ "$MODE" = session ]; then
  PARTS=${PARTS:-tests,ac,serve,dora}
  python3 -c "import torch, transformers, triton, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'peft', peft.__version__)" | tee -a "$OUT/log.txt"
  date -u | tee -a "$OUT/log.txt"
  if [[ $PARTS == *tests* ]]; then
    timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -p no:warnings $GPU_TESTS \
      2>&1 | tee "$OUT/pytest.log" | grep -E "passed|failed|FAILED|ERROR" | tail -25
  fi
  if [[ $PARTS == *ac* ]]; then
    timeout ${AC_TIMEOUT:-170} python3 benchmarks/train_throughput.py --out "$OUT" --frameworks peft,splice \
      --configs A,C --worker-timeout 150 2>&1 | tee -a "$OUT/log.txt" | grep -v "^ *maxseq\|^  " | tail -20
  fi
  if [[ $PARTS == *serve* ]]; then
    timeout ${SERVE_TIMEOUT:-140} python3 benchmarks/serve.py --parts peft,http,decode --json "$OUT/serve.json" \
      2>&1 | grep -v "attention mask" | tee "$OUT/serve.txt" | tail -20
  fi
  if [[ $PARTS == *dora* ]] && [ -f benchmarks/dora.py ]; then
    timeout ${DORA_TIMEOUT:-90} python3 benchmarks/dora.py --out "$OUT/dora.json" 2>&1 | tee "$OUT/dora.txt" | tail -12
  fi
  if [[ $PARTS == *qlora* ]]; then
    timeout ${QLORA_TIMEOUT:-300} python3 benchmarks/qlora.py --out "$OUT" --budget-s $(( ${QLORA_TIMEOUT:-300} - 20 )) \
      2>&1 | tee "$OUT/qlora.txt" | tail -25
  fi
elif [ "$MODE" = check ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider $GPU_TESTS 2>&1 \
    | tee "$OUT/pytest.log" | tail -15
  timeout 90 python3 benchmarks/kernel_timings.py 2>&1 | tee "$OUT/kernels.txt"
  timeout 280 python3 benchmarks/train_throughput.py --out "$OUT" --frameworks "${FRAMEWORKS:-peft,liger,splice}" --profile C,A --worker-timeout 150 2>&1 | tee -a "$OUT/log.txt" | grep -v "^ *\(maxseq\)"
  timeout 130 python3 benchmarks/train_throughput.py --out "$OUT/maxseq" --frameworks splice --configs "" --maxseq \
    --maxseq-budget 100 --worker-timeout 140 2>&1 | tee -a "$OUT/log.txt" | tail -8
else
  if [ "${TESTS:-0}" = 1 ]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider $GPU_TESTS 2>&1 | tee "$OUT/pytest.log" | tail -4
  fi
  timeout 570 python3 benchmarks/train_throughput.py --out "$OUT" --maxseq --profile "${PROFILE:-C,A}" \
    --worker-timeout 300 2>&1 | tee -a "$OUT/log.txt" | grep -v "^  "
fi
