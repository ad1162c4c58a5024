#!/usr/bin/env bash
# The load test of the server over real HTTP: 64 concurrent clients for 10 minutes (CI runs the same test for 1 minute).
# Usage: tools/load/run-load-test.sh [seconds]   (default 600)
set -euo pipefail
cd "$(dirname "$0")/../.."
export MOE_RAG_LOAD_SECONDS="${1:-600}"
exec dotnet test tests/MoeRagInject.Server.Tests -c Release --filter "FullyQualifiedName~LoadTests" --logger "console;verbosity=detailed"
