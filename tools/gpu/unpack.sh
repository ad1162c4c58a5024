#!/usr/bin/env bash
# On the GPU machine: unpacks the CLI that tools/gpu/publish.sh built (.gpu/moe-rag-inject.xz) to .gpu/bin/moe-rag-inject,
# with xz or, where that is missing, Python's lzma.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .gpu/bin/moe-rag-inject ] && [ .gpu/bin/moe-rag-inject -nt .gpu/moe-rag-inject.xz ] && exit 0
mkdir -p .gpu/bin
if command -v xz > /dev/null; then xz -dc .gpu/moe-rag-inject.xz > .gpu/bin/moe-rag-inject
else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .gpu/moe-rag-inject.xz .gpu/bin/moe-rag-inject
fi
chmod +x .gpu/bin/moe-rag-inject
