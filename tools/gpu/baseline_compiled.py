"""The second baseline of issue 7, on the GPU machine: a compiled PyTorch decode step in the style of gpt-fast.

Plain PyTorch (no transformers) on the Mixtral-8x7B shape with dummy bf16 weights: one decoder layer compiled by inductor
(torch.compile, fullgraph, static shapes) and reused by all layers, the whole decode step (embedding, layers, final norm,
LM head, greedy argmax, router entropy) captured in one CUDA graph per batch size and replayed for timing. Decode
tokens/s per batch size, as baseline_transformers.py reports them for transformers' generate.

The prompt is not run: the static KV cache is filled with random values (standard normal, about the scale of the real
keys) for its first --input-len positions, since only decode is timed. As in gpt-fast, every step attends over the
whole static cache (--input-len + --output-len positions) under a mask, so the cache read is that of the longest context.

A batch size that fails (out of memory, a compile or capture error) gets the error in its entry and the run goes on;
the JSON is rewritten after every stage, so a timeout leaves what had finished.

  python3 tools/gpu/baseline_compiled.py --batch-sizes 1,8,64,256 --input-len 128 --output-len 128 --json OUT.json
  python3 tools/gpu/baseline_compiled.py --layers 2 --batch-sizes 1,8 --check     # a short trial that checks itself
"""
import argparse, gc, json, shutil, time, traceback
import torch
import torch._dynamo.config
import torch._inductor.config
import torch.nn.functional as F

# Mixtral-8x7B (assets/configs/mixtral-8x7b).
VOCAB, DIM, N_HEADS, N_KV_HEADS, HEAD_DIM = 32000, 4096, 32, 8, 128
N_EXPERTS, TOP_K, INTER = 8, 2, 14336
EPS, ROPE_THETA = 1e-5, 1e6
INIT = 0.034641016  # U(-a, a) with a = 0.02·√3: standard deviation 0.02, as our dummy weights and baseline_transformers.py
GROUP = N_HEADS // N_KV_HEADS
QKV = (N_HEADS + 2 * N_KV_HEADS) * HEAD_DIM
LAYER_WEIGHTS = ("attn_norm", "wqkv", "wo", "ffn_norm", "gate", "w13", "w2")  # the order the layer function takes them

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--batch-sizes", default="1,8,64,256")
p.add_argument("--input-len", type=int, default=128, help="positions of the KV cache filled before decode")
p.add_argument("--output-len", type=int, default=128, help="decode steps timed per batch size")
p.add_argument("--warmup", type=int, default=3, help="graph replays before the timed ones")
p.add_argument("--layers", type=int, default=32)
p.add_argument("--moe", choices=("auto", "gather", "dense"), default="auto",
               help="auto: gather while batch·top_k < experts, else dense")
# The modes with inductor's own CUDA graphs (reduce-overhead, max-autotune) would clash with the one we capture.
p.add_argument("--compile-mode", choices=("default", "max-autotune-no-cudagraphs"), default="default")
p.add_argument("--check", action="store_true", help="first compare the captured compiled step with the eager one at batch 2")
p.add_argument("--json", default=None)
a = p.parse_args()
batch_sizes = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
max_len = a.input_len + a.output_len
assert a.output_len >= 1 and a.warmup >= 0

T0 = time.time()
def log(msg):
    print(f"[{time.time() - T0:7.1f} s] {msg}", flush=True)

torch.set_grad_enabled(False)
torch.manual_seed(0)
# gpt-fast's setting: inductor tunes each generated kernel's block sizes on its first call (compile time, not step time).
torch._inductor.config.coordinate_descent_tuning = True
# One compiled variant per batch size and MoE path (dynamic=False); the default limit of 8 per function is close.
for name in ("recompile_limit", "cache_size_limit"):  # the second is its older name
    if hasattr(torch._dynamo.config, name):
        setattr(torch._dynamo.config, name, 64)
        break

result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
          # Triton compiles small C helpers with the host's C compiler on first use; without one, compiling fails.
          "c_compiler": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
          "model": {"layers": a.layers, "hidden": DIM, "heads": N_HEADS, "kv_heads": N_KV_HEADS, "head_dim": HEAD_DIM,
                    "experts": N_EXPERTS, "top_k": TOP_K, "intermediate": INTER, "vocab": VOCAB, "dtype": "bfloat16"},
          "compile_mode": a.compile_mode, "fullgraph": True, "dynamic": False, "coordinate_descent_tuning": True,
          "cuda_graph": "whole decode step, one graph per batch size",
          "moe_rule": {"auto": "gather while batch*top_k < experts, else dense"}.get(a.moe, f"{a.moe} forced"),
          "input_len": a.input_len, "output_len": a.output_len, "warmup_replays": a.warmup,
          "prefill": "not run: KV cache positions < input_len filled with N(0,1)",
          "attention_span": f"all {max_len} cache positions every step, masked (gpt-fast style)"}

def save():
    if a.json:
        with open(a.json, "w") as f: json.dump(result, f, indent=1)


# ---- the model ------------------------------------------------------------------------------------------------------

def rms_norm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w

def rope(x, cos, sin):
    """x [B, H, HEAD_DIM], cos and sin [1, HEAD_DIM] in fp32; the rotate-half layout of transformers' Mixtral."""
    xf = x.float()
    rotated = torch.cat((-xf[..., HEAD_DIM // 2:], xf[..., :HEAD_DIM // 2]), -1)
    return (xf * cos + rotated * sin).to(x.dtype)

def attention(x, pos, cos, sin, mask, k_cache, v_cache, attn_norm, wqkv, wo):
    b = x.shape[0]
    q, k, v = (rms_norm(x, attn_norm) @ wqkv.t()).split([N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM], -1)
    q = rope(q.reshape(b, N_HEADS, HEAD_DIM), cos, sin)
    k = rope(k.reshape(b, N_KV_HEADS, HEAD_DIM), cos, sin)
    # An index_put_ into the caches the caller owns, as gpt-fast writes its cache: inductor should reinplace it on the
    # graph input; if it did not, the step would still be right (--check checks the write) but copy the cache back.
    k_cache[:, :, pos] = k.unsqueeze(2)
    v_cache[:, :, pos] = v.reshape(b, N_KV_HEADS, 1, HEAD_DIM)
    # GQA without repeating the cache: the 4 query heads of a KV head enter as 4 query rows of that head (query head
    # h uses KV head h // 4, as transformers' repeat_kv), so each KV head's cache is read once.
    o = F.scaled_dot_product_attention(q.view(b, N_KV_HEADS, GROUP, HEAD_DIM), k_cache, v_cache, attn_mask=mask)
    return o.reshape(b, DIM) @ wo.t()

def route(h, gate):
    """transformers' Mixtral router: softmax over all experts in fp32, top-2, renormalised; and its entropy (nats)."""
    probs = torch.softmax((h @ gate.t()).float(), -1)
    top_w, top_i = probs.topk(TOP_K, -1)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
    return top_w / top_w.sum(-1, keepdim=True), top_i, entropy

def moe_gather(h, gate, w13, w2):
    """gpt-fast's small-batch path: each token reads the weights of its own two experts. Written as products and sums
    rather than einsum, so that inductor can fuse the gather into one matrix-vector reduction reading the weights in
    place instead of copying them first (eager does copy; only --check runs it). A token reads its experts whatever
    the others read: B·top_k expert matrices per layer."""
    top_w, top_i, entropy = route(h, gate)
    h13 = (h.float()[:, None, None, :] * w13[top_i].float()).sum(-1)                 # [B, K, 2·INTER]
    act = (F.silu(h13[..., :INTER]) * h13[..., INTER:]).to(h.dtype)
    out = (act.float()[:, :, None, :] * w2[top_i].float()).sum(-1)                     # [B, K, DIM]
    return (out * top_w[..., None]).sum(1).to(h.dtype), entropy

def moe_dense(h, gate, w13, w2):
    """Every expert computes every token, weighted by the routing (zero where a token is not routed): each expert is
    read once and the shapes do not depend on the routing, so a graph can replay it; the FLOPs are experts/top_k times
    the routed ones (4x), the cost the issue's table names at batch 256."""
    b = h.shape[0]
    top_w, top_i, entropy = route(h, gate)
    weights = top_w.new_zeros(b, N_EXPERTS).scatter(1, top_i, top_w)                 # [B, E]
    h13 = (h @ w13.view(N_EXPERTS * 2 * INTER, DIM).t()).view(b, N_EXPERTS, 2 * INTER)
    act = (F.silu(h13[..., :INTER].float()) * h13[..., INTER:].float()).to(h.dtype)  # [B, E, INTER]
    out = torch.bmm(act.transpose(0, 1), w2.transpose(1, 2))                           # [E, B, DIM]
    return (out.float() * weights.t()[..., None]).sum(0).to(h.dtype), entropy

def decoder_layer(moe, x, pos, cos, sin, mask, k_cache, v_cache, attn_norm, wqkv, wo, ffn_norm, gate, w13, w2):
    x = x + attention(x, pos, cos, sin, mask, k_cache, v_cache, attn_norm, wqkv, wo)
    out, entropy = moe(rms_norm(x, ffn_norm), gate, w13, w2)
    return x + out, entropy

# Two functions, not one closure over the path: dynamo keeps its compiled variants per code object.
def layer_gather(x, pos, cos, sin, mask, k_cache, v_cache, attn_norm, wqkv, wo, ffn_norm, gate, w13, w2):
    return decoder_layer(moe_gather, x, pos, cos, sin, mask, k_cache, v_cache, attn_norm, wqkv, wo, ffn_norm, gate, w13, w2)

def layer_dense(x, pos, cos, sin, mask, k_cache, v_cache, attn_norm, wqkv, wo, ffn_norm, gate, w13, w2):
    return decoder_layer(moe_dense, x, pos, cos, sin, mask, k_cache, v_cache, attn_norm, wqkv, wo, ffn_norm, gate, w13, w2)

EAGER = {"gather": layer_gather, "dense": layer_dense}
# The weights are arguments, so one compiled graph per shape serves all layers; only shapes are guarded.
COMPILED = {k: torch.compile(f, mode=a.compile_mode, fullgraph=True, dynamic=False) for k, f in EAGER.items()}

def moe_path(b):
    if a.moe != "auto":
        return a.moe
    # Gathering reads B·top_k expert matrices, dense reads all of them once: gather only while that is fewer. At
    # B·top_k = experts the two read as much, and dense was the faster (H200, 2026-12-03: 23.9 against 30.8 ms at batch 4;
    # at batch 2 gather 16.3 against dense 23.8; docs/gpu-runs/26-call-sweep-stage.log).
    return "gather" if b * TOP_K < N_EXPERTS else "dense"


class Weights:
    """Dummy weights, each tensor allocated and filled on the GPU (no host copy of 93 GB)."""
    def __init__(self, n_layers):
        def dummy(*shape):
            return torch.empty(shape, dtype=torch.bfloat16, device="cuda").uniform_(-INIT, INIT)
        def ones(n):
            return torch.ones(n, dtype=torch.bfloat16, device="cuda")
        self.embed, self.norm, self.lm_head = dummy(VOCAB, DIM), ones(DIM), dummy(VOCAB, DIM)
        self.layers = []
        for i in range(n_layers):
            # w13: an expert's gate (w1) rows then its up (w3) rows; w2 [expert, out, in] as nn.Linear stores it.
            named = dict(attn_norm=ones(DIM), wqkv=dummy(QKV, DIM), wo=dummy(DIM, DIM), ffn_norm=ones(DIM),
                         gate=dummy(N_EXPERTS, DIM), w13=dummy(N_EXPERTS, 2 * INTER, DIM), w2=dummy(N_EXPERTS, DIM, INTER))
            self.layers.append(tuple(named[k] for k in LAYER_WEIGHTS))
            if (i + 1) % 8 == 0 or i + 1 == n_layers:
                log(f"weights: {i + 1}/{n_layers} layers")
        torch.cuda.synchronize()
        tensors = [self.embed, self.norm, self.lm_head] + [t for l in self.layers for t in l]
        self.bytes = sum(t.numel() * t.element_size() for t in tensors)
        # RoPE tables for every cache position, fp32 [max_len, HEAD_DIM] (the two halves repeat, as in transformers).
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
        angles = torch.arange(max_len, device="cuda", dtype=torch.float32)[:, None] * inv_freq
        angles = torch.cat((angles, angles), -1)
        self.cos, self.sin = angles.cos(), angles.sin()
        self.positions = torch.arange(max_len, device="cuda")


class DecodeState:
    """The static buffers a captured step reads and writes: tokens [B], the position [1] (all B sequences decode in
    step from the same prompt length), the KV cache per layer [B, KV heads, max_len, HEAD_DIM] for k and v, the logits
    and the router entropies of the last step."""
    def __init__(self, b, n_layers):
        dev = "cuda"
        self.tokens = torch.randint(3, VOCAB, (b,), device=dev)
        self.pos = torch.full((1,), a.input_len, dtype=torch.long, device=dev)
        shape = (b, N_KV_HEADS, max_len, HEAD_DIM)
        self.k = [torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_() for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_() for _ in range(n_layers)]
        self.logits = torch.empty(b, VOCAB, dtype=torch.float32, device=dev)
        self.entropy = torch.empty(n_layers, b, dtype=torch.float32, device=dev)
        self.kv_bytes = 2 * n_layers * self.k[0].numel() * self.k[0].element_size()

    def snapshot(self):
        return [t.clone() for t in self._tensors()]

    def restore(self, snap):
        for t, s in zip(self._tensors(), snap):
            t.copy_(s)

    def _tensors(self):
        return [self.tokens, self.pos] + self.k + self.v


def decode_step(w, st, layer_fn):
    """One greedy decode step, no host synchronisation: reads st.tokens at st.pos, writes the KV cache there, the
    logits, the next tokens and the entropies, and advances st.pos, so graph replays decode one token after another."""
    pos = st.pos
    cos, sin = w.cos[pos], w.sin[pos]
    mask = (w.positions <= pos).view(1, 1, 1, -1)
    x = w.embed[st.tokens]
    for i, lw in enumerate(w.layers):
        x, entropy = layer_fn(x, pos, cos, sin, mask, st.k[i], st.v[i], *lw)
        st.entropy[i].copy_(entropy)
    logits = (rms_norm(x, w.norm) @ w.lm_head.t()).float()
    st.logits.copy_(logits)
    st.tokens.copy_(logits.argmax(-1))
    st.pos.add_(1)


def build_graph(w, st, layer_fn):
    """Compile (first call), warm up on a side stream, capture one step. Leaves st's position at --input-len; the
    cache holds what the warm-up steps wrote at that position."""
    t = time.time()
    decode_step(w, st, layer_fn)
    torch.cuda.synchronize()
    compile_s = time.time() - t
    t = time.time()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(a.warmup, 1)):
            st.pos.fill_(a.input_len)
            decode_step(w, st, layer_fn)
    torch.cuda.current_stream().wait_stream(side)
    st.pos.fill_(a.input_len)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step(w, st, layer_fn)  # recorded, not run
    torch.cuda.synchronize()
    return graph, compile_s, time.time() - t


def run_batch(w, b):
    moe = moe_path(b)
    run = {"batch_size": b, "moe": moe}
    st = DecodeState(b, len(w.layers))
    run["kv_cache_gb"] = round(st.kv_bytes / 1e9, 2)
    log(f"batch {b}: KV cache {run['kv_cache_gb']} GB, moe {moe}; compiling (first call)")
    graph, run["compile_s"], run["capture_s"] = build_graph(w, st, COMPILED[moe])
    log(f"batch {b}: compiled in {run['compile_s']:.1f} s, warmed up and captured in {run['capture_s']:.1f} s")
    st.pos.fill_(a.input_len)
    for _ in range(a.warmup):
        graph.replay()
    st.pos.fill_(a.input_len)  # the timed steps write positions input_len .. input_len + output_len - 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.output_len):
        graph.replay()
    end.record()
    end.synchronize()
    step_s = start.elapsed_time(end) / 1e3 / a.output_len
    if not torch.isfinite(st.logits).all().item():
        run["warning"] = "non-finite logits after the timed steps"
    run["step_ms"] = round(step_s * 1e3, 3)
    run["decode_tok_s"] = round(b / step_s, 1)
    run["mean_router_entropy"] = round(st.entropy.mean().item(), 4)
    run["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
    return run


def check(w):
    """At batch 2, the captured compiled step against the same step run eagerly from the same state, for both MoE
    paths; and the two paths' eager steps against each other. The KV slot the step writes is compared too, beside how
    far an unwritten slot is (the control): a write lost in the compiled graph would show as a difference of that size.
    'ok' is a loose sanity bound (logits within 10% of their largest magnitude, the slot within 10% of the control),
    meant to catch a broken graph, not to judge bf16 rounding."""
    b, at = 2, a.input_len
    st = DecodeState(b, len(w.layers))
    init = st.snapshot()
    unwritten = init[2 + len(w.layers) - 1][:, :, at].float()   # the last layer's k slot before any step
    eager_logits, out = {}, []
    for moe in ("gather", "dense"):
        c = {"batch_size": b, "moe": moe}
        out.append(c)
        try:
            st.restore(init)
            decode_step(w, st, EAGER[moe])
            ref, ref_k = st.logits.clone(), st.k[-1][:, :, at].float()
            eager_logits[moe] = ref
            st.restore(init)
            log(f"check {moe}: compiling (first call)")
            graph, c["compile_s"], c["capture_s"] = build_graph(w, st, COMPILED[moe])
            st.restore(init)
            graph.replay()
            torch.cuda.synchronize()
            got_k = st.k[-1][:, :, at].float()
            c["max_abs_logit"] = round(ref.abs().max().item(), 4)
            c["logits_max_abs_diff"] = round((st.logits - ref).abs().max().item(), 5)
            c["argmax_equal"] = f"{(st.logits.argmax(-1) == ref.argmax(-1)).sum().item()}/{b}"
            c["kv_slot_max_abs_diff"] = round((got_k - ref_k).abs().max().item(), 5)
            c["kv_slot_control"] = round((unwritten - ref_k).abs().max().item(), 5)
            c["ok"] = bool(c["logits_max_abs_diff"] <= 0.1 * c["max_abs_logit"]
                           and c["kv_slot_max_abs_diff"] <= 0.1 * c["kv_slot_control"])
            del graph
        except Exception as e:
            c["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
            traceback.print_exc()
        log(f"check: {json.dumps(c)}")
    if len(eager_logits) == 2:
        diff = (eager_logits["gather"] - eager_logits["dense"]).abs().max().item()
        out.append({"eager_gather_vs_dense_logits_max_abs_diff": round(diff, 5)})
        log(f"check: eager gather vs dense, max |logit difference| {diff:.5f}")
    return out


def free():
    gc.collect()
    torch.cuda.empty_cache()


log(f"{result['device']}, torch {torch.__version__}, C compiler {result['c_compiler']}; "
    f"{a.layers} layers, batch sizes {batch_sizes}, cache of {max_len} positions")
try:
    w = Weights(a.layers)
except Exception as e:
    result["error"] = f"weights: {type(e).__name__}: {str(e)[:1000]}"
    save()
    raise
result["weights_gb"] = round(w.bytes / 1e9, 2)
free_b, total_b = torch.cuda.mem_get_info()
log(f"weights: {result['weights_gb']} GB; {free_b / 1e9:.1f} of {total_b / 1e9:.1f} GB free")
save()

if a.check:
    result["check"] = check(w)
    free()
    save()

runs = result["compiled_decode"] = []
for b in batch_sizes:
    torch.cuda.reset_peak_memory_stats()
    try:
        runs.append(run_batch(w, b))
    except Exception as e:  # an OOM or a compile error at one batch size: record it and go on
        runs.append({"batch_size": b, "moe": moe_path(b), "error": f"{type(e).__name__}: {str(e)[:1000]}"})
        traceback.print_exc()
    free()
    log(json.dumps(runs[-1]))
    save()

log("done")
print(json.dumps(result), flush=True)
