"""A Mixtral-8x7B-dimension checkpoint of a few layers and transformers' outputs on it, for `check-device --case DIR`.

Writes DIR/config.json and safetensors (bf16, as transformers saves them), and DIR/reference/ in the layout of
tools/reference/make_reference.py: reference.json (prompts: input_ids, greedy_ids (fp32), greedy_ids_native (bf16),
full_ids) and reference.safetensors (logits.P and router_probs.P from the fp32 model, logits_native.P from the bf16 one).
The fp32 model holds exactly the bf16 weights, so both see the same numbers. Run on the GPU machine (transformers 5.17).
"""
import argparse, json, math, os, time
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--new-tokens", type=int, default=12)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
t0 = time.time()
torch.manual_seed(a.seed)
cfg = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, sliding_window=None)
cfg._attn_implementation = "eager"
try:
    cfg.experts_implementation = "eager"
except Exception:
    pass
with torch.device("cuda"):
    ref = MixtralForCausalLM(cfg).float().eval()
with torch.no_grad():
    for prm in ref.parameters():
        prm.copy_(prm.bfloat16().float())   # the fp32 model holds exactly the bf16 weights
native = MixtralForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
native.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()})
print(f"models built in {time.time() - t0:.1f} s", flush=True)

os.makedirs(a.out, exist_ok=True)
native.save_pretrained(a.out, safe_serialization=True)
print(f"saved to {a.out}: {sorted(os.listdir(a.out))}", flush=True)


def full(model, ids):
    out = model(torch.tensor([ids], device="cuda"), output_router_logits=True)
    logits = out.logits[0].float()
    probs = torch.stack([torch.softmax(r.float(), dim=-1) for r in out.router_logits])  # [L, T, E]
    return logits, probs


def greedy(model, ids, n):
    ids = list(ids)
    gaps = []
    for _ in range(n):
        logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        gaps.append(float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
    return ids[-n:], min(gaps)


gen = torch.Generator().manual_seed(a.seed + 1)
candidates = []
with torch.no_grad():
    for c in range(8):
        length = int(torch.randint(8, 40, (1,), generator=gen))
        ids = [1] + torch.randint(3, 32000, (length,), generator=gen).tolist()
        gids, gap = greedy(ref, ids, a.new_tokens)
        nids, ngap = greedy(native, ids, a.new_tokens)
        candidates.append((min(gap, ngap), ids, gids, nids))
    candidates.sort(key=lambda c: -c[0])
    tensors, prompts = {}, []
    for pi, (gap, ids, gids, nids) in enumerate(candidates[:4]):
        whole = ids + gids
        logits, probs = full(ref, whole)
        nlogits, _ = full(native, whole)
        tensors[f"logits.{pi}"] = logits.cpu().contiguous()
        tensors[f"router_probs.{pi}"] = probs.cpu().contiguous()
        tensors[f"logits_native.{pi}"] = nlogits.cpu().contiguous()
        prompts.append({"input_ids": ids, "greedy_ids": gids, "greedy_ids_native": nids, "full_ids": whole, "min_top2_gap": gap})
        print(f"prompt {pi}: {len(ids)} tokens, min top-2 gap {gap:.3f}, fp32 == bf16 greedy: {gids == nids}, "
              f"|logits_native - logits| max {float((nlogits - logits).abs().max()):.3f}", flush=True)
ref_dir = os.path.join(a.out, "reference")
os.makedirs(ref_dir, exist_ok=True)
save_file(tensors, os.path.join(ref_dir, "reference.safetensors"))
import transformers
with open(os.path.join(ref_dir, "reference.json"), "w") as f:
    json.dump({"case": f"mixtral-8x7b-{a.layers}l", "prompts": prompts, "new_tokens": a.new_tokens,
               "reference_note": "logits/router_probs: fp32 model with the bf16 weights; logits_native: bf16 model",
               "torch_version": torch.__version__, "transformers_version": transformers.__version__}, f)
print(f"done in {time.time() - t0:.1f} s", flush=True)
