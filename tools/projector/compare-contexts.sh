#!/usr/bin/env bash
# On the GPU machine, in the repository root: trains projectors with different contexts c side by side on the one GPU
# (same seed, data and time budget; each its own process), and keeps each run's log and training facts under $OUT
# (<name>.log, <name>.json; the projector files stay in /tmp: the larger ones exceed what the device tool returns).
#   OUT=/tmp/compare tools/projector/compare-contexts.sh [seconds] > /tmp/compare/run.log 2>&1
# Runs: mean (the engine's embed-mean, MLP 1024), seq32 (embed-seq:32, MLP 1024), seq32-256 (embed-seq:32, MLP 256).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/compare}"
seconds="${1:-240}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"
git log --oneline -1 2>/dev/null || true
run() {
  local name="$1"; shift
  local dir="/tmp/projector-$name"
  timeout $((seconds + 240)) python3 tools/projector/train_projector.py --out "$dir" --train-seconds "$seconds" \
    --deadline $((seconds + 200)) --processes 5 "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $?"
  cp "$dir/assets/models/moe-wordnet-demo/projector_training.json" "$out/$name.json" 2>/dev/null || true
}
run mean --context embed-mean &
run seq32 --context embed-seq:32 &
run seq32-256 --context embed-seq:32 --inner 256 &
wait
grep -h "validation F1" "$out"/{mean,seq32,seq32-256}.log
