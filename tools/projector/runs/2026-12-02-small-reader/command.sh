#!/usr/bin/env bash
# session 19: a reader with about a fifth of the shipped one's work (width 128, one encoder layer), trained as it was
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 380 python3 tools/projector/train_projector.py --out /tmp/p --arch attn --attn-width 128 --attn-layers 1 --attn-heads 4 \
  --attn-queries 4 --answer-positions 24 --context embed-seq:32 --invented-definitions splice --train-seconds 230 --deadline 330 \
  --skip-forward-check 2>&1 | tail -40
find /tmp/p -type f | head
cp /tmp/p/assets/models/moe-wordnet-demo/projector.safetensors $OUT/projector-small.safetensors
cp /tmp/p/assets/models/moe-wordnet-demo/projector_training.json $OUT/projector-small_training.json
