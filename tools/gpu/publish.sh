#!/usr/bin/env bash
# Builds what the GPU machine runs (it has no .NET): the CLI, self-contained for linux-x64, trimmed, one compressed file,
# without calibrate/eval (their plotting libraries) -> .gpu/bin/moe-rag-inject (about 17 MB; ignored by git, sent with
# the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/../.."
dotnet publish src/MoeRagInject.Cli -c Release -r linux-x64 --self-contained \
  -p:PublishSingleFile=true -p:PublishTrimmed=true -p:EnableCompressionInSingleFile=true \
  -p:IncludeNativeLibrariesForSelfExtract=true -p:WithEvaluation=false -p:DebugType=none \
  -o .gpu/bin --nologo -v quiet
ls -la .gpu/bin
