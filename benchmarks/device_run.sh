#!/usr/bin/env bash
# Run on the GPU machine from the repository root:  bash benchmarks/device_run.sh check|full
#   check: GPU tests + per-kernel timings + throughput of every framework (with profiles of C)
#          + splice's 131,072-token probe
#   quick: GPU tests (kernels, fast, checkpoint, graphs, trainer) + throughput of PEFT and splice
#          on A and C; TUNE=1 adds the LoRA kernel tuning table, PROFILE=C,A profiles
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
