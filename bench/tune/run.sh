#!/bin/bash
# On the GPU machine, from the repo root: a 2-layer Qwen3-30B-A3B-shaped artifact (random weights),
# timed untuned, then `ktc tune`, report, timed tuned. Args: budget layers
set -u
R=$PWD; BUDGET=${1:-4m}; LAYERS=${2:-2}; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
mkdir -p /tmp/kp/ktc
for f in "$R"/ktc/*; do ln -sfn "$f" /tmp/kp/ktc/; done
for d in codegen passes runtime targets; do ln -sfn "$R/$d" /tmp/kp/ktc/$d; done
export PYTHONPATH=/tmp/kp:$R PYTHONUNBUFFERED=1 KTC_CACHE_DIR=/tmp/kcache TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd /tmp
python3 -c "
import sys, json, os; sys.path.insert(0, '$R/bench'); from gpu_decode import QWEN3_30B_A3B as c
os.makedirs('/tmp/q3', exist_ok=True); json.dump(dict(c, num_hidden_layers=$LAYERS), open('/tmp/q3/config.json', 'w'))"
t=$(date +%s)
python3 -m ktc compile /tmp/q3 -o /tmp/q3.ktc --target cuda --weights-free --force 2>&1 | grep -v -i warn | tail -2
python3 -m ktc pack /tmp/q3.ktc --random 2>&1 | tail -1
echo "compile+pack $(( $(date +%s) - t )) s"
KTC_TUNING=0 timeout 150 python3 $R/bench/tune/measure.py /tmp/q3.ktc untuned $OUT 2>&1 | grep -v -i warn | tail -3
t=$(date +%s)
timeout 400 python3 -m ktc tune /tmp/q3.ktc --budget $BUDGET 2>&1 | tee $OUT/tune.log | tail -8
echo "tune $(( $(date +%s) - t )) s"
COLUMNS=220 python3 -m ktc tune /tmp/q3.ktc --report > $OUT/report.txt 2>&1; tail -4 $OUT/report.txt
cp /tmp/q3.ktc/tuning/*.json $OUT/records.json
timeout 150 python3 $R/bench/tune/measure.py /tmp/q3.ktc tuned $OUT 2>&1 | grep -v -i warn | tail -3
python3 -c "
import torch; a=torch.load('$OUT/logits_untuned.pt').float(); b=torch.load('$OUT/logits_tuned.pt').float()
print('logits rel diff tuned vs untuned', float((a-b).norm()/a.norm()), 'argmax agree', float((a.argmax(-1)==b.argmax(-1)).float().mean()))"
