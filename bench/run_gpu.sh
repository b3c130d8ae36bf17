#!/bin/bash
# Run on the GPU machine from the repo root: makes `ktc` importable without pip (the package
# maps ktc.codegen -> codegen/ etc.), runs the GPU tests, then the benchmark.
set -u
R=$PWD
mkdir -p /tmp/kp/ktc
for f in "$R"/ktc/*; do ln -sfn "$f" /tmp/kp/ktc/; done
for d in codegen passes runtime targets; do ln -sfn "$R/$d" /tmp/kp/ktc/$d; done
export PYTHONPATH=/tmp/kp:$R${KTC_SITE:+:$KTC_SITE} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
if [ "${TESTS:-1}" = 1 ]; then
  # from /tmp/kp: `python -m` puts the working directory first on sys.path, and the repo's own ktc/ lacks codegen/
  (cd /tmp/kp && timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider --import-mode=append -s \
    "$R/tests/codegen/gpu/test_kernels.py" "$R/tests/codegen/gpu/test_mla.py" "$R/tests/codegen/gpu/test_sampling.py" "$R/tests/codegen/gpu/test_matmul_w4a16.py" \
    "$R/tests/codegen/gpu/test_fp8.py" \
    "$R/tests/runtime/gpu" -p no:logging; echo "pytest exit $?") 2>&1 \
    | grep -E "error|passed|failed|Error|agreeing|^E |exit" | tail -40
fi
[ "${BENCH:-1}" = 1 ] || exit 0
timeout ${BENCH_TIMEOUT:-420} python3 bench/gpu_decode.py --out "$OUT" "$@" 2>&1 | grep -v -i warn
