#!/usr/bin/env bash
# On the GPU machine, with the published CLI (tools/gpu/publish.sh): top logprobs and parallel samples served on CUDA
# against the same server on the CPU, over HTTP, on the tiny-mixtral reference checkpoint. Greedy: tokens equal
# transformers' (reference.json: its fp32 or its bf16 model's) for every one of n = 3 samples, top-5 ids the CPU's up to
# near-ties and logprobs within 0.1 while the two servers' tokens agree; seeded (--deterministic): n = 4 samples on CUDA
# equal the four single requests with seed + j on CUDA, and the prompt is prefilled once.
# Writes check-api.json to $OUT (or /tmp); exits 1 on a mismatch. DEVICE=cpu runs the second server on the CPU too (a
# smoke test of this script where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
tools/gpu/unpack.sh
bin=.gpu/bin/moe-rag-inject
model=tests/data/reference/tiny-mixtral
out=${OUT:-/tmp}
mkdir -p "$out"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
# The device server runs --deterministic (DETERMINISTIC=0: not): a seeded sample must not depend on what decodes beside it.
for server in cpu:30101 "${DEVICE:-cuda}:30102"; do
  device=${server%%:*} port=${server##*:}
  "$bin" serve --model-path "$model" --device "$device" --port "$port" --rag-mode off --log-dir "$out/logs-$port" \
    $([ "$port" = 30102 ] && [ "${DETERMINISTIC:-1}" = 1 ] && echo --deterministic) > "$out/serve-$port.log" 2>&1 &
  pids+=($!)
done
python3 - "$model" "$out" "${pids[@]}" <<'PY'
import json, math, os, sys, time, urllib.request
model, out, pids = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
servers = {"cpu": "http://127.0.0.1:30101", "cuda": "http://127.0.0.1:30102"}

def call(base, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())

def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False

for (device, base), pid in zip(servers.items(), pids):
    for _ in range(600):
        try:
            call(base, "/health"); break
        except Exception:
            if not alive(pid): sys.exit(f"the {device} server exited before it became healthy (see serve-{base[-5:]}.log in {out})")
            time.sleep(0.5)
    else:
        sys.exit(f"{base} did not become healthy")

# The CPU keeps activations in fp32, the GPU rounds GEMM inputs to bf16: logprobs differ by a few hundredths on this model
# (0.054 at most on an H200, 2026-11-30).
TOL = 0.1
reference = json.load(open(f"{model}/reference/reference.json"))["prompts"]
failures, report = [], {"device": call(servers["cuda"], "/get_model_info")["device"], "prompts": []}
for p in reference:
    ids, greedy, native = p["input_ids"], p["greedy_ids"], p.get("greedy_ids_native", p["greedy_ids"])
    ids, greedy, native = (json.loads(v) if isinstance(v, str) else v for v in (ids, greedy, native))
    body = {"input_ids": ids, "return_logprob": True, "top_logprobs_num": 5,
            "sampling_params": {"n": 3, "temperature": 0, "max_new_tokens": len(greedy), "ignore_eos": True}}
    results = {d: call(b, "/generate", body) for d, b in servers.items()}
    worst, compared = 0.0, 0
    for j in range(3):
        cpu, cuda = results["cpu"][j], results["cuda"][j]
        # The GPU rounds activations to bf16 as transformers' bf16 model does: its greedy tokens are the fp32 model's or the
        # bf16 model's (they part at near-ties), and top logprobs are compared while the two servers' tokens agree.
        if cuda["output_ids"] not in (greedy, native):
            failures.append(f"cuda sample {j} of prompt {len(report['prompts'])}: {cuda['output_ids']} is neither {greedy} nor {native}")
        same = next((t for t, (x, y) in enumerate(zip(cpu["output_ids"], cuda["output_ids"])) if x != y), len(cuda["output_ids"]))
        compared += same
        for a, b in list(zip(cpu["meta_info"]["output_top_logprobs"], cuda["meta_info"]["output_top_logprobs"]))[:same]:
            # The same ranking up to near-ties: a token only one side lists, or two listed in another order, must be
            # within TOL of its neighbour on the CPU side; every token both list within TOL.
            mine = {t[1]: t[0] for t in a}
            for lp, token, _ in b:
                if token in mine: worst = max(worst, abs(mine[token] - lp))
                elif lp < a[-1][0] - TOL: failures.append(f"cuda lists {token} ({lp}) beyond the CPU's top: {a} vs {b}")
            order = [t[1] for t in b if t[1] in mine]
            ranks = [t[1] for t in a if t[1] in order]
            for x, y in zip(order, ranks):
                if x != y and abs(mine[x] - mine[y]) > TOL: failures.append(f"top ids in another order beyond near-ties: {a} vs {b}")
    if worst > TOL: failures.append(f"top logprobs differ by {worst}")
    report["prompts"].append({"prompt_tokens": len(ids), "max_top_logprob_difference": worst, "positions_compared": compared})

cuda = servers["cuda"]
long_prompt = reference[1]["input_ids"]
long_prompt = json.loads(long_prompt) if isinstance(long_prompt, str) else long_prompt
before = call(cuda, "/get_server_info")["status"]["prompt_tokens_computed"]
samples = call(cuda, "/generate", {"input_ids": long_prompt, "sampling_params":
    {"n": 4, "temperature": 1.0, "max_new_tokens": 10, "ignore_eos": True, "sampling_seed": 77}})
time.sleep(0.5)
computed = call(cuda, "/get_server_info")["status"]["prompt_tokens_computed"] - before
shared = (len(long_prompt) - 1) // 16 * 16
if computed != shared + 4 * (len(long_prompt) - shared): failures.append(f"n = 4 computed {computed} prompt tokens")
for j in range(4):
    alone = call(cuda, "/generate", {"input_ids": long_prompt, "sampling_params":
        {"temperature": 1.0, "max_new_tokens": 10, "ignore_eos": True, "sampling_seed": 77 + j}})
    if alone["output_ids"] != samples[j]["output_ids"]: failures.append(f"cuda sample {j} differs from seed {77 + j} alone")
report.update(parallel_prompt_tokens_computed=computed, unshared_would_be=4 * len(long_prompt), failures=failures)
json.dump(report, open(f"{out}/check-api.json", "w"), indent=1)
print(json.dumps(report, indent=1))
sys.exit(1 if failures else 0)
PY
