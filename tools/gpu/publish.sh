#!/usr/bin/env bash
# Builds what the GPU machine runs (it has no .NET): the CLI, self-contained for linux-x64, trimmed, one file, without
# calibrate/eval (their plotting libraries), xz-compressed -> .gpu/moe-rag-inject.xz (7.4 MB; the single file's own
# compression would leave 17 MB, too much beside the tracked files in the device tool's 64 MiB `carry`). .gpu is
# ignored by git. On the GPU machine tools/gpu/unpack.sh (called by run.sh and check-api.sh) unpacks it to .gpu/bin.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .build/gpu-publish .gpu/bin
dotnet publish src/MoeRagInject.Cli -c Release -r linux-x64 --self-contained \
  -p:PublishSingleFile=true -p:PublishTrimmed=true -p:EnableCompressionInSingleFile=false \
  -p:IncludeNativeLibrariesForSelfExtract=true -p:WithEvaluation=false -p:DebugType=none \
  -o .build/gpu-publish --nologo -v quiet
mkdir -p .gpu
# The x86 branch filter before LZMA2 at its strongest preset: 7.41 MB against 7.75 with plain `xz -6`. The tracked files
# and this file must stay under the 64 MiB the device tool carries: on 2026-12-02 the tracked files were 59.3 MB, and the
# device tool refused the 7.75 MB file beside them.
xz --x86 --lzma2=preset=9e,dict=32MiB -T1 -c .build/gpu-publish/moe-rag-inject > .gpu/moe-rag-inject.xz
# What was built, for run.sh's log: the commit and whether tracked files differed from it (the checkout the device tool
# copies may be another commit's, as in session 29, when a branch's build ran beside main's scripts).
{ git log --oneline -1; git diff --quiet HEAD -- src || echo "with uncommitted changes under src/"; } > .gpu/BUILD
ls -la .gpu/moe-rag-inject.xz
# The device tool carries the working tree's tracked files beside .gpu, 64 MiB in all (on 2026-12-04 the tracked files
# were 60.7 MB, so the demo model's two projectors, 7.6 MB, had to be moved aside for each call and back after it).
# Tracked files moved aside count nothing.
tracked=$({ git ls-files -z | xargs -0 stat -c %s 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }')
carried=$((tracked + $(du -sb .gpu | cut -f1)))
echo "the device tool would carry $((carried / 1048576)) MiB of its 64: tracked files $tracked bytes, .gpu the rest"
if [ "$carried" -gt $((64 * 1048576)) ]; then
  echo "over 64 MiB: move large tracked files the GPU run does not read out of the checkout for the call, e.g." \
    "assets/models/moe-wordnet-demo/projector*.safetensors (and back after it; never commit their removal)"
fi
