#!/bin/bash
# GPU check of `ktc tune` with validation, from the repo root on the device machine (tracked in the repo: bench/tune/):
# a LAYERS-layer Qwen3-30B-A3B-shaped --target cuda plan (weights-free compile, no TVM needed), `ktc tune`
# for BUDGET at SIZES (search, then the whole-model validation table), `ktc tune --report`, then an
# independent tuned-as-loaded vs untuned check (validate.py). Files: $OUT/log.txt, $OUT/records.json,
# $OUT/validate.json.
set -u
R=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/kp/ktc
for f in "$R"/ktc/*; do ln -sfn "$f" /tmp/kp/ktc/; done
for d in codegen passes runtime targets; do ln -sfn "$R/$d" /tmp/kp/ktc/$d; done
export PYTHONPATH=/tmp/kp:$R PYTHONUNBUFFERED=1 KTC_CACHE_DIR=/tmp/kcache TRITON_DEFAULT_FP_FUSION=1 COLUMNS=200
cd /tmp
t=$(date +%s)
python3 -c "
import sys, json, os; sys.path.insert(0, '$R/bench'); from gpu_decode import QWEN3_30B_A3B as c
os.makedirs('/tmp/q3', exist_ok=True); json.dump(dict(c, num_hidden_layers=${LAYERS:-2}), open('/tmp/q3/config.json', 'w'))"
python3 -m ktc compile /tmp/q3 -o /tmp/q3.ktc --target cuda --weights-free --force 2>&1 | grep -v -i warn | tail -1
echo "compile $(( $(date +%s) - t )) s"
timeout ${T:-270} python3 $R/bench/tune/validate.py /tmp/q3.ktc $OUT ${BUDGET:-120s} ${SIZES:-1,4,16,2048} "${TUNE_ARGS:-}" 2>&1 | grep -v -i warn | tee $OUT/log.txt | tail -${TAIL:-90}
cp /tmp/q3.ktc/tuning/*.json $OUT/records.json 2>/dev/null
echo "total $(( $(date +%s) - t )) s"
