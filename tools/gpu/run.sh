#!/usr/bin/env bash
# On the GPU machine, in the repository root, after tools/gpu/publish.sh here and with .gpu carried: checks, parity and
# benchmarks in one go. JSON results go to $OUT (or /tmp/gpu-out), packed at the end into results.tgz; the log to
# stdout. Stages: check, parity, bench, lockstep (the bench with every prompt of a batch prefilled in one step, so that
# no request starts decoding before the others, as sglang's bench_one_batch runs), determinism, det-pdl (--deterministic
# with and without programmatic dependent launch), prefill, paths (the MoE paths kept for comparison, forced), baseline
# (transformers' generate), compiled (the compiled PyTorch decode step, tools/gpu/baseline_compiled.py), read (how fast
# the card reads, tools/gpu/read_bandwidth.cu), proj (the attention projections' read rate through cuBLAS and through
# inductor's autotuned GEMMs, tools/gpu/projection_rates.py), ab (lockstep runs of environment knobs taking turns: AB_VARIANTS, e.g.
# AB_VARIANTS=";MOE_RAG_INJECT_TMA_N=64" AB_BATCHES=64 tools/gpu/run.sh ab), sweep (lockstep at every batch size from 1 to
# 256, then the compiled PyTorch step at the same sizes, and its dense form where its rule gathers: about 5 minutes),
# tokens (the token-major prefill kernels: gemm-bench, and ncu's stall samples by instruction), tokens-variants (those
# kernels with their epilogue, products or copies taken out), linear (the projections through cublasGemmEx and cuBLASLt's
# candidates), timeline (the kernels of a batch-1 decode step under ncu, graphs off; TIMELINE_ARGS adds bench flags).
# (Run whole on 2026-12-03 with the rule then, which gathered at batch 4 too, and the dense form at 2 and 4; the two
# baseline runs as they are now were run on their own the same day: docs/gpu-runs/26-call-compiled-rule.log.)
# Default: all but paths, det-pdl, read, proj, ab, sweep, tokens, tokens-variants, linear and timeline, about 5 minutes on an H200 (4 min 45 s on 2026-12-01), so that one device call
# measures ours and both baselines on one machine.
#   tools/gpu/run.sh [stage ...] > "$OUT/run.log" 2>&1
set -u
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"
tools/gpu/unpack.sh || { echo "could not unpack .gpu/moe-rag-inject.xz (run tools/gpu/publish.sh here first)"; exit 1; }
bin=.gpu/bin/moe-rag-inject
export MOE_RAG_INJECT_HOME="$PWD" DOTNET_gcServer=0 PYTHONUNBUFFERED=1
# EXPERT_LAYOUT=boxed: every bench of ours (but the forced MoE paths) with --expert-layout boxed, and check-device's op
# checks on boxed experts (MOE_RAG_INJECT_BOXED=1 on that command alone; its second group then checks the row-major ones).
layout="${EXPERT_LAYOUT:+--expert-layout $EXPERT_LAYOUT}"
check_env=""
[ "${EXPERT_LAYOUT:-}" = boxed ] && check_env="MOE_RAG_INJECT_BOXED=1"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(check parity bench lockstep determinism prefill baseline compiled)
has() { for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
log() { echo "=== $(date +%T) $*"; }
# The bench with every prompt of a batch prefilled in one step (128-token prompts, RAG off), its batch and rate lines:
#   lockstep_bench TIMEOUT_S NEW_TOKENS JSON_OUT [bench args, e.g. --batch-sizes 1,8]
lockstep_bench() {
  local limit=$1 tokens=$2 json=$3
  shift 3
  timeout "$limit" "$bin" bench $layout --device cuda --load-format dummy --model-config mixtral-8x7b "$@" \
    --modes off --input-len 128 --output-len "$tokens" --max-running-requests 256 --chunked-prefill-size 32768 --max-prefill-tokens 32768 \
    --json --out "$json" 2>&1 | grep "batch\|bandwidth"
}

log "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv
echo "build (tools/gpu/publish.sh): $( [ -f .gpu/BUILD ] && tr '\n' ' ' < .gpu/BUILD || echo unknown)"

if has check; then
  log "check-device (ops against the CPU backend, graphs, reference checkpoints, engine)"
  env $check_env timeout ${CHECK_TIMEOUT:-300} "$bin" check-device --device cuda --json "$out/check.json" 2>&1 | grep -v "^  layer"
fi
if has parity; then
  log "Mixtral-8x7B-dimension checkpoint (2 layers) against transformers"
  timeout 400 python3 tools/gpu/mixtral_parity.py --out /tmp/mixtral-2l --layers 2 2>&1
  timeout 300 "$bin" check-device --device cuda --groups none --case /tmp/mixtral-2l --json "$out/parity.json" 2>&1 | grep -v "^  layer"
fi
if has bench; then
  log "bench: Mixtral-8x7B shape, dummy weights"
  timeout ${BENCH_TIMEOUT:-400} "$bin" bench $layout --device cuda --load-format dummy --model-config mixtral-8x7b ${BENCH_ARGS:---batch-sizes 1,8,64,256} \
    --retriever assets/corpus/wordnet/wordnet-demo.jsonl.gz --modes ${BENCH_MODES:-off,latent} --input-len 128 --output-len 128 --max-running-requests 256 --json --out "$out/bench.json" 2>&1 | grep -v "^  layer"
fi
if has lockstep; then
  log "bench: the whole batch prefilled in one step (prefill budget batch x prompt), so that every decode step holds the whole batch"
  # The card's clock and power every 250 ms meanwhile: H200s of the slower kind run batch 256 at a lower clock under the
  # 700 W cap (performance.md, sessions 17, 18 and 25), so the summary says which kind this machine is.
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader,nounits -lms 250 > "$out/lockstep-smi.csv" 2>/dev/null &
  smi=$!
  lockstep_bench ${LOCKSTEP_TIMEOUT:-150} 128 "$out/bench-lockstep.json" ${BENCH_ARGS:---batch-sizes 1,8,64,256}
  kill "$smi" 2>/dev/null
  awk -F', *' '$3 + 0 > 500 { n++; clock += $2; power += $3 }
    END { if (n) printf "while the card drew over 500 W (%d samples of 250 ms): mean SM clock %.0f MHz at %.0f W\n", n, clock / n, power / n;
          else print "no nvidia-smi sample over 500 W" }' "$out/lockstep-smi.csv"
fi
if has determinism; then
  log "bench: --deterministic against the default, batch 1 and 64"
  for mode in "" --deterministic; do
    timeout ${DET_TIMEOUT:-150} "$bin" bench $layout --device cuda --load-format dummy --model-config mixtral-8x7b --batch-sizes 1,64 --modes off \
      --input-len 128 --output-len 32 --max-running-requests 64 $mode --json --out "$out/bench-det${mode:+-on}.json" 2>&1 | grep "batch\|bandwidth"
  done
fi
if has det-pdl; then
  log "bench: --deterministic with programmatic dependent launch (MOE_RAG_INJECT_PDL=1) against without, alternating, batch 1 and 64"
  for pdl in 1 "" 1 ""; do
    MOE_RAG_INJECT_PDL=$pdl timeout ${DET_TIMEOUT:-150} "$bin" bench $layout --device cuda --load-format dummy --model-config mixtral-8x7b --batch-sizes 1,64 \
      --modes off --input-len 128 --output-len 32 --max-running-requests 64 --deterministic 2>&1 | grep " batch " | sed "s/^/pdl=${pdl:-off} /"
  done
fi
if has prefill; then
  log "bench: prefill of one 2048-token prompt (median of 5 runs)"
  timeout 150 "$bin" bench $layout --device cuda --load-format dummy --model-config mixtral-8x7b --batch-sizes 1 --modes off \
    --input-len 2048 --output-len 8 --max-running-requests 4 --repeats 5 --json --out "$out/bench-prefill.json" 2>&1 | grep "batch\|bandwidth"
fi
if has paths; then
  log "bench: the MoE paths kept for comparison (MOE_RAG_INJECT_MOE_PATH): dense cuBLAS at batch 8 and 64, cuBLAS per expert for prefill"
  MOE_RAG_INJECT_MOE_PATH=dense timeout 150 "$bin" bench --device cuda --load-format dummy --model-config mixtral-8x7b --batch-sizes 8,64 --modes off \
    --input-len 128 --output-len 64 --max-running-requests 64 --json --out "$out/bench-dense.json" 2>&1 | grep "batch\|bandwidth"
  MOE_RAG_INJECT_MOE_PATH=cublas timeout 150 "$bin" bench --device cuda --load-format dummy --model-config mixtral-8x7b --batch-sizes 1 --modes off \
    --input-len 2048 --output-len 8 --max-running-requests 4 --json --out "$out/bench-prefill-cublas.json" 2>&1 | grep "batch\|bandwidth"
fi
if has timeline; then
  # Where a batch-1 decode step goes (performance.md, session 33): ncu with gpu__time_duration alone, its clocks and
  # caches left as they are, over launches 6,001-7,500 of a bench with graphs off (about five steps), summed by kernel
  # and grid. TIMELINE_ARGS adds to the bench's flags (e.g. --deterministic).
  log "timeline: the kernels of a decode step under ncu, graphs off ${TIMELINE_ARGS:-}"
  ncu=$(ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  timeout ${TIMELINE_TIMEOUT:-150} "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
    --launch-skip 6000 --launch-count 1500 --csv --log-file "$out/timeline.csv" \
    "$bin" bench $layout --device cuda --load-format dummy --model-config mixtral-8x7b --batch-sizes 1 --modes off \
    --input-len 128 --output-len 48 --disable-cuda-graph ${TIMELINE_ARGS:-} 2>&1 | grep " batch "
  python3 tools/gpu/ncu_summary.py "$out/timeline.csv" 2>&1 | head -30
fi
if has read; then
  log "how fast the card reads (tools/gpu/read_bandwidth.cu): loads, bulk TMA, tensor-map boxes, against the copy"
  nvcc -O3 -arch=sm_90a -o /tmp/read_bandwidth tools/gpu/read_bandwidth.cu -L/usr/local/cuda/lib64/stubs -lcuda 2>&1 \
    && timeout 120 /tmp/read_bandwidth
fi
if has proj; then
  log "the attention projections' read rate: cuBLAS against inductor's max-autotune (tools/gpu/projection_rates.py)"
  timeout ${PROJ_TIMEOUT:-480} python3 tools/gpu/projection_rates.py 2>&1 | grep -iv "warn"
fi
if has ab; then
  # Same-call comparisons of environment knobs: AB_VARIANTS holds variants separated by ";", each a list of VAR=value
  # (an empty one is the build as it is), run in turn for AB_ROUNDS rounds in lockstep; then ms a step by variant.
  IFS=';' read -r -a variants <<< "${AB_VARIANTS:-}"
  [ ${#variants[@]} -eq 0 ] && variants=("")
  for round in $(seq "${AB_ROUNDS:-2}"); do
    for v in "${variants[@]}"; do
      log "ab round $round [${v}]"
      env $v timeout ${LOCKSTEP_TIMEOUT:-150} "$bin" bench $layout --device cuda --load-format dummy --model-config mixtral-8x7b \
        --batch-sizes ${AB_BATCHES:-1,8,64,256} --modes off --input-len 128 --output-len 64 --max-running-requests 256 \
        --chunked-prefill-size 32768 --max-prefill-tokens 32768 2>&1 | grep " batch \|rror\|xception" | sed "s|^|[${v}] |"
    done
  done 2>&1 | tee "$out/ab.log"
  log "ab: ms a step by variant and batch, round by round"
  sed -n 's/^\[\(.*\)\] .*batch *\([0-9]*\):.* step *\([0-9.]*\) ms.*/\1|\2|\3/p' "$out/ab.log" \
    | awk -F'|' '{key = "[" $1 "] batch " $2; t[key] = t[key] " " $3; if (!(key in seen)) { seen[key] = 1; order[n++] = key } }
                 END { for (i = 0; i < n; i++) print order[i] ":" t[order[i]] }'
fi
if has sweep; then
  log "sweep: lockstep at every batch size from 1 to 256, then the compiled PyTorch step at the same sizes"
  sizes=1,2,4,8,16,32,64,128,256
  lockstep_bench ${LOCKSTEP_TIMEOUT:-200} 64 "$out/sweep.json" --batch-sizes $sizes
  timeout ${COMPILED_TIMEOUT:-330} python3 tools/gpu/baseline_compiled.py --batch-sizes $sizes --input-len 128 --output-len 64 \
    --json "$out/sweep-compiled.json" 2>&1 | grep "step_ms\|rror" | cut -c1-200
  # Its rule gathers the routed experts while batch x top-k < experts (at 1 and 2): the other form there.
  timeout ${COMPILED_TIMEOUT:-330} python3 tools/gpu/baseline_compiled.py --moe dense --batch-sizes 1,2 --input-len 128 --output-len 64 \
    --json "$out/sweep-compiled-dense.json" 2>&1 | grep "step_ms\|rror" | cut -c1-200
fi
if has tokens; then
  # The token-major prefill kernels (moe_tma_tokens_*, performance.md session 27) against cuBLAS per expert; then ncu on
  # one gate-up launch at 2,048 rows (warp stalls by SASS instruction, launch figures, speed of light, memory; the report
  # kept as tokens.ncu-rep) and on two of cuBLAS's GEMMs in the same bench (what it launches: grid, cluster, shared
  # memory, registers; cublas.ncu-rep), the top stalls summarised by tools/gpu/ncu_stalls.py. The first eight cuBLAS
  # launches are skipped: with one skipped (session 28, call 7) ncu caught two GEMMs of 128 × 16 and 128 × 24 tiles, not
  # the experts' (not yet run with eight).
  log "tokens: gemm-bench of the token-major kernels at 512 and 2,048 rows, and ncu on them and on cuBLAS"
  MOE_RAG_INJECT_GEMM_BENCH=wgmma MOE_RAG_INJECT_GEMM_BENCH_ROWS=512,2048 timeout 240 "$bin" check-device --device cuda --groups gemm-bench 2>&1 \
    | grep "cuBLAS\|tokens\|kernel \|rror"
  ncu=$(ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  sections="--section LaunchStats --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section ComputeWorkloadAnalysis"
  MOE_RAG_INJECT_GEMM_BENCH=wgmma MOE_RAG_INJECT_GEMM_BENCH_ROWS=2048 timeout 300 "$ncu" --kernel-name ${TOKENS_KERNEL:-moe_tma_tokens_gate_up} \
    --launch-skip 3 --launch-count 1 $sections --section SourceCounters --import-source no -f -o "$out/tokens" \
    "$bin" check-device --device cuda --groups gemm-bench > "$out/tokens-ncu.log" 2>&1
  "$ncu" --import "$out/tokens.ncu-rep" --page details > "$out/tokens-details.txt" 2>&1
  grep -v "^    ---\|^$" "$out/tokens-details.txt" | cut -c1-150 | head -120
  "$ncu" --import "$out/tokens.ncu-rep" --page source --print-source sass --csv > "$out/tokens-sass.csv" 2>&1
  python3 tools/gpu/ncu_stalls.py "$out/tokens-sass.csv" 40
  MOE_RAG_INJECT_GEMM_BENCH=wgmma MOE_RAG_INJECT_GEMM_BENCH_ROWS=2048 timeout 300 "$ncu" --kernel-name regex:"nvjet|xmma|sm90|cutlass" \
    --launch-skip 8 --launch-count 2 $sections -f -o "$out/cublas" \
    "$bin" check-device --device cuda --groups gemm-bench > "$out/cublas-ncu.log" 2>&1
  "$ncu" --import "$out/cublas.ncu-rep" --page details > "$out/cublas-details.txt" 2>&1
  grep -v "^    ---\|^$" "$out/cublas-details.txt" | cut -c1-150 | head -200
fi
if has tokens-variants; then
  # The token-major kernels with one part taken out each (tools/gpu/tokens_variants.py: no epilogue, no products, no
  # copies) against the whole kernel and cuBLAS per expert, at 2,048 rows (session 30, call 1).
  log "tokens-variants: gemm-bench of the token-major kernels with their epilogue, products or copies taken out"
  python3 tools/gpu/tokens_variants.py /tmp/tokens-variants
  for variant in base noepi nomma noload; do
    echo "--- $variant"
    MOE_RAG_INJECT_KERNEL_OVERRIDE=/tmp/tokens-variants/$variant MOE_RAG_INJECT_GEMM_BENCH=wgmma MOE_RAG_INJECT_GEMM_BENCH_ROWS=2048 \
      timeout 180 "$bin" check-device --device cuda --groups gemm-bench 2>&1 | grep "cuBLAS per\|tokens\|rror"
  done
fi
if has linear; then
  # The projections (fused QKV, output, LM head) through cublasGemmEx against every algorithm cuBLASLt's heuristic offers
  # (session 30, call 2).
  log "linear: the projections through cublasGemmEx and cuBLASLt's candidates at 8, 64 and 256 rows"
  MOE_RAG_INJECT_GEMM_BENCH=linear MOE_RAG_INJECT_GEMM_BENCH_ROWS=8,64,256 timeout 180 "$bin" check-device --device cuda --groups gemm-bench 2>&1 \
    | grep "linear\|rror"
fi
if has baseline; then
  log "baseline: transformers generate on the same shape, dummy weights"
  timeout ${BASELINE_TIMEOUT:-240} python3 tools/gpu/baseline_transformers.py ${BASELINE_ARGS:---batch-sizes 1,8,64} --input-len 128 --output-len 32 \
    --json "$out/baseline.json" 2>&1
fi
if has compiled; then
  log "baseline: compiled PyTorch decode step (inductor layer, whole step in one CUDA graph), same shape, dummy weights"
  timeout ${COMPILED_TIMEOUT:-240} python3 tools/gpu/baseline_compiled.py ${COMPILED_ARGS:---batch-sizes 1,8,64,256} --input-len 128 --output-len 128 \
    --json "$out/baseline-compiled.json" 2>&1
fi
# The device tool returns at most 8 files from $OUT (the first in name order): every result besides the log moves into
# one archive (tar xzf results.tgz where they come back).
(cd "$out" && find . -maxdepth 1 -type f ! -name run.log ! -name results.tgz -printf '%P\n' | sort \
  | tar czf results.tgz --remove-files -T -) && echo "packed into $out/results.tgz: $(tar tzf "$out/results.tgz" | tr '\n' ' ')"
log "done"
