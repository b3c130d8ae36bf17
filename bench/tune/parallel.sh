#!/bin/bash
# GPU machine, repo root: how long `ktc tune` searches a LAYERS-layer Qwen3-30B-A3B-shaped --target cuda plan
# at SIZES with the candidates compiled on 1 process (compiling while searching) vs on N processes first
# (runtime/gpu/precompile.py). Each run starts from an empty Triton cache and no records, as on a fresh host;
# --no-validate, so only the search is timed. Prints one line per run; logs in $OUT/parallel_<jobs>.log.
set -u
R=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/kp/ktc
for f in "$R"/ktc/*; do ln -sfn "$f" /tmp/kp/ktc/; done
for d in codegen passes runtime targets; do ln -sfn "$R/$d" /tmp/kp/ktc/$d; done
export PYTHONPATH=/tmp/kp:$R PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 COLUMNS=200
cd /tmp
python3 -c "
import sys, json, os; sys.path.insert(0, '$R/bench'); from gpu_decode import QWEN3_30B_A3B as c
os.makedirs('/tmp/q3', exist_ok=True); json.dump(dict(c, num_hidden_layers=${LAYERS:-48}), open('/tmp/q3/config.json', 'w'))"
python3 -m ktc compile /tmp/q3 -o /tmp/q3.ktc --target cuda --weights-free --force 2>&1 | grep -v -i warn | tail -1
for J in ${JOBS:-1 8}; do
  rm -rf /tmp/q3.ktc/tuning /tmp/kc_$J /tmp/tc_$J
  t=$(date +%s.%N)
  KTC_CACHE_DIR=/tmp/kc_$J TRITON_CACHE_DIR=/tmp/tc_$J timeout ${T:-280} python3 -m ktc tune /tmp/q3.ktc --no-validate \
    --batch-sizes ${SIZES:-1} --jobs $J > $OUT/parallel_$J.log 2>&1
  rc=$?
  dt=$(python3 -c "print(f'{$(date +%s.%N) - $t:.1f}')")
  echo "jobs $J: rc $rc, $dt s; $(grep -E 'compiled|measured' $OUT/parallel_$J.log | tr '\n' ' ')"
done
