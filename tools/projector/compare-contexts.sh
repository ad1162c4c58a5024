#!/usr/bin/env bash
# On the GPU machine, in the repository root: trains projectors with different contexts c or projectors side by side on
# the one GPU (same seed, data and time budget; each its own process), and keeps each run's log and training facts under
# $OUT (<name>.log, <name>.json; the projector files stay in /tmp: the larger ones exceed what the device tool returns).
#   OUT=/tmp/compare tools/projector/compare-contexts.sh [seconds] [name=ARGS ...] > /tmp/compare/run.log 2>&1
# Each name=ARGS is one run: ARGS (split on spaces) go to train_projector.py. Without any, the default runs: mean (the
# engine's embed-mean, MLP 1024), seq32 (embed-seq:32, MLP 1024), seq32-256 (embed-seq:32, MLP 256). For instance the
# reading projectors (docs/eval/vector-oracle.md):
#   tools/projector/compare-contexts.sh 220 "attn-seq32=--context embed-seq:32 --arch attn" \
#     "poswise-seq32=--context embed-seq:32 --arch poswise" "attn-seq64=--context embed-seq:64 --arch attn"
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/compare}"
seconds="${1:-240}"
shift $(( $# > 0 ? 1 : 0 ))
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  runs=("mean=--context embed-mean" "seq32=--context embed-seq:32" "seq32-256=--context embed-seq:32 --inner 256")
fi
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
names=()
for spec in "${runs[@]}"; do
  name="${spec%%=*}"
  args="${spec#*=}"
  [ "$name" != "$spec" ] || { echo "run '$spec': expected name=ARGS"; exit 2; }
  names+=("$name")
  echo "run $name: train_projector.py $args"
  # shellcheck disable=SC2086  # ARGS are split on spaces on purpose
  run "$name" $args &
done
wait
for name in "${names[@]}"; do grep -H "validation F1" "$out/$name.log"; done
