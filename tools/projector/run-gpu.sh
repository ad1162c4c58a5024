#!/usr/bin/env bash
# On the GPU machine, in the repository root (python3 with torch, safetensors and tokenizers; no .NET, no network):
# writes the injection reference (CPU, float32) and trains the projector (GPU), everything the repository needs under
# $OUT in the repository's layout (7 files, the largest about 2.2 MB; about 5 minutes in all):
#   OUT=/tmp/projector-out tools/projector/run-gpu.sh > /tmp/projector-out/run-gpu.log 2>&1
# Then, in the repository: cp -r "$OUT"/. . (see tools/projector/README.md). Extra arguments go to train_projector.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/projector-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log() { echo "=== $(date +%T) $*"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"
git log --oneline -1 2>/dev/null || true
python3 -c "import sys, torch, safetensors, tokenizers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'safetensors', safetensors.__version__, 'tokenizers', tokenizers.__version__)"

log "injection reference: PyTorch float32 log-probabilities with seeded projectors (tests/data/reference/demo-injection)"
timeout 300 python3 tools/projector/make_injection_reference.py --out "$out"

log "projector training through the frozen demo model"
timeout 420 python3 tools/projector/train_projector.py --out "$out" "$@"

log "files under $out"
(cd "$out" && find . -type f ! -name run-gpu.log -printf '%10s  %p\n' | sort -k2)
