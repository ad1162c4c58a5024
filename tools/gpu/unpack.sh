#!/usr/bin/env bash
# On the GPU machine: unpacks the CLI that tools/gpu/publish.sh built (.gpu/moe-rag-inject.xz) to .gpu/bin/moe-rag-inject,
# with xz or, where that is missing, Python's lzma; every time (a second or two), into a temporary file first, so that a
# failed or interrupted unpack never leaves a truncated executable behind.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/bin
partial=.gpu/bin/moe-rag-inject.partial
if command -v xz > /dev/null; then xz -dc .gpu/moe-rag-inject.xz > "$partial"
else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .gpu/moe-rag-inject.xz "$partial"
fi
chmod +x "$partial"
mv -f "$partial" .gpu/bin/moe-rag-inject
