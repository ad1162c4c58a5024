#!/usr/bin/env python3
"""Reference log-probabilities of the demo model with a projector's latent injection, computed by PyTorch in float32.

The C# test InjectionReferenceTests runs the engine (CPU backend, float32) on the same checkpoint, projector files and
passages and requires every log-probability within 1e-4 of these, and the engine's own generation (trigger at the first
answer token, the passages from a retriever) to give the tokens generated here: so what train_projector.py trains is
what the engine runs. The forward is projector_lib's, which train_projector.py also checks against transformers.

The projectors are small and seeded, written by this script (not the trained one, which changes when it is retrained):
    projector-mlp.safetensors     mlp 256 -> 32 -> 256, silu, layers 0,1,2,3, alpha 1
    projector-linear.safetensors  linear proj + bias, layers 1,3, alpha 0.5
    projector-attn.safetensors    attn over embed-seq:32 (width 64, 2 heads, 2 queries, 2 encoder layers), layers 0,2,
                                  alpha 0.8 (its own RNG, so the other two files and cases 0-2 stay as they were)
    projector-attn-positions.safetensors  the attn reader with one vector for each of the first 6 answer tokens (its
                                  own RNG's queries for every position)
Cases (reference.json "cases"; tensors logprobs.<i> [T, V], vector.<i> [hidden], c.<i> [hidden], or [32, hidden] for attn):
    0 mlp, a held-out term's question, its passage and two taught ones, trigger at answer token 0
    1 linear, a taught term's question, two passages, trigger at answer token 2 (the first two tokens un-injected), alpha 0.5
    2 the tokens of case 0 without any injection (so the test sees what the injection changed)
    3 attn, a held-out term's question, its passage and two taught ones (more than 32 tokens: the reader reads the first
      32), trigger at answer token 0
    4 attn, a taught term's question, one passage of fewer than 32 tokens (the rows past its end are masked), trigger at
      answer token 1
    5 attn with 6 answer positions, a held-out term's question, its passage and two taught ones, trigger at answer token
      0 (vector.5 [6, hidden]: vector k at the position that predicts answer token k; none from token 6 on)
Each case's tokens are the prompt plus 12 greedy tokens generated with the injection as the engine applies it. An attn
case's v is computed twice from the file's tensors, by train_projector.make_reader's module and by projector_lib's
functional apply_attn_file, which must agree; its injection must move some log-probability by more than 0.5.

Output under --out in the repository's layout: tests/data/reference/demo-injection/{projector-mlp.safetensors,
projector-linear.safetensors, projector-attn.safetensors, projector-attn-positions.safetensors, reference.json,
reference.safetensors}. Runs on the CPU in about a minute.
    python3 tools/projector/make_injection_reference.py --out "$OUT"
"""

import argparse
import gzip
import json
import math
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import projector_lib as pl  # noqa: E402
import train_projector as tp  # noqa: E402

REL = os.path.join("tests", "data", "reference", "demo-injection")
NEW_TOKENS = 12
MIN_GAP = 0.05
ATTN_LENGTH = 32  # T of the seeded attn projector's context embed-seq:T


def log(*parts):
    print(" ".join(str(p) for p in parts), flush=True)


def gauss(rng, n, std):
    return [rng.gauss(0.0, std) for _ in range(n)]


def seeded_projectors(out_dir, hidden, c_scale):
    """Two seeded projectors whose output norm is a few units (the residual stream's scale), written as files."""
    rng = random.Random(20261130)
    inner = 32
    # Pre-activations about N(0, 1) for c of the embedding table's scale.
    mlp = {
        "mlp.in.weight": ([inner, hidden], gauss(rng, inner * hidden, 1.0 / (c_scale * math.sqrt(hidden)))),
        "mlp.in.bias": ([inner], gauss(rng, inner, 0.1)),
        "mlp.out.weight": ([hidden, inner], gauss(rng, hidden * inner, 1.5 / math.sqrt(inner))),
        "mlp.out.bias": ([hidden], gauss(rng, hidden, 0.05)),
    }
    linear = {
        "proj": ([hidden, hidden], gauss(rng, hidden * hidden, 18.0 / (c_scale * math.sqrt(hidden) * math.sqrt(hidden)))),
        "bias": ([hidden], gauss(rng, hidden, 0.1)),
    }
    files = {
        "mlp": ("projector-mlp.safetensors", mlp, pl.projector_metadata("mlp", [0, 1, 2, 3], 1.0, "silu",
                                                                      {"trained_by": "make_injection_reference.py (seeded)"})),
        "linear": ("projector-linear.safetensors", linear, pl.projector_metadata("linear", [1, 3], 0.5, None,
                                                                               {"trained_by": "make_injection_reference.py (seeded)"})),
    }
    for name, (fn, tensors, meta) in files.items():
        pl.write_safetensors(os.path.join(out_dir, fn), tensors, meta)
    return {name: fn for name, (fn, _, _) in files.items()}


def seeded_attn_projector(out_dir, embed):
    """A seeded attn reader (train_projector.make_reader's layout) whose output norm is a few units, with LayerNorm weights
    and biases away from 1 and 0 and mu, sigma the embedding table's per-dimension statistics. Its own RNG."""
    rng = random.Random(20261201)
    hidden = embed.shape[1]
    width, heads, queries, layers = 64, 2, 2, 2

    def norm(prefix):
        return {prefix + ".weight": ([width], [1.0 + g for g in gauss(rng, width, 0.2)]), prefix + ".bias": ([width], gauss(rng, width, 0.1))}

    def linear(prefix, rows, cols, std):
        return {prefix + ".weight": ([rows, cols], gauss(rng, rows * cols, std)), prefix + ".bias": ([rows], gauss(rng, rows, 0.05))}

    p = pl.ATTN_PREFIX
    tensors = {p + "mu": embed.mean(0), p + "sigma": embed.std(0)}
    tensors.update(linear(p + "in", width, hidden, 1.0 / math.sqrt(hidden)))
    tensors[p + "pos"] = ([ATTN_LENGTH, width], gauss(rng, ATTN_LENGTH * width, 0.5))
    for b in range(layers):
        q = f"{p}blocks.{b}."
        tensors.update(norm(q + "norm1"))
        tensors.update(linear(q + "qkv", 3 * width, width, 1.5 / math.sqrt(width)))
        tensors.update(linear(q + "proj", width, width, 1.0 / math.sqrt(width)))
        tensors.update(norm(q + "norm2"))
        tensors.update(linear(q + "ff1", 2 * width, width, 1.0 / math.sqrt(width)))
        tensors.update(linear(q + "ff2", width, 2 * width, 1.0 / math.sqrt(2 * width)))
    tensors.update(norm(p + "norm"))
    tensors[p + "queries"] = ([queries, width], gauss(rng, queries * width, 2.0))
    tensors.update(linear(p + "key", width, width, 1.0 / math.sqrt(width)))
    tensors.update(linear(p + "value", width, width, 1.0 / math.sqrt(width)))
    tensors.update(linear(p + "out", hidden, queries * width, 0.6 / math.sqrt(queries * width)))
    fn = "projector-attn.safetensors"
    meta = pl.attn_metadata([0, 2], 0.8, ATTN_LENGTH, width, heads, queries, layers,
                            extra={"trained_by": "make_injection_reference.py (seeded)"})
    pl.write_safetensors(os.path.join(out_dir, fn), tensors, meta)
    return fn


ATTN_POSITIONS = 6  # K of the seeded attn reader with one vector an answer position (fewer than NEW_TOKENS: the cut shows)


def seeded_attn_positions_projector(out_dir, attn_file):
    """The seeded attn reader with one vector for each of the first ATTN_POSITIONS answer tokens: its tensors, and its
    own RNG's queries for every position (so the other files and cases stay as they were)."""
    rng = random.Random(20261202)
    tensors = pl.load_tensors(os.path.join(out_dir, attn_file))
    _, meta, _ = pl.read_safetensors_header(os.path.join(out_dir, attn_file))
    queries, width = tensors[pl.ATTN_PREFIX + "queries"].shape
    tensors = {k: ([int(x) for x in v.shape], v.flatten().tolist()) for k, v in tensors.items()}
    tensors[pl.ATTN_PREFIX + "queries"] = ([ATTN_POSITIONS * queries, width], gauss(rng, ATTN_POSITIONS * queries * width, 2.0))
    fn = "projector-attn-positions.safetensors"
    positions_meta = pl.attn_metadata([0, 2], 0.8, ATTN_LENGTH, int(width), int(meta["heads"]), int(queries), int(meta["encoder_layers"]),
                                      float(meta["layer_norm_eps"]), extra={"trained_by": "make_injection_reference.py (seeded)"},
                                      answer_positions=ATTN_POSITIONS)
    pl.write_safetensors(os.path.join(out_dir, fn), tensors, positions_meta)
    return fn


def attn_vector(tensors, meta, c):
    """f(c) of an attn file by make_reader's module loaded with the file's tensors, checked against the functional path."""
    import torch
    with torch.no_grad():
        module = tp.load_attn_reader(tensors, meta)(c[None])[0]
        functional = pl.apply_attn_file(tensors, meta, c[None])[0]
    diff = float((module - functional).abs().max())
    if not diff <= 1e-6 * max(1.0, float(module.abs().max())):
        raise SystemExit(f"make_reader's module and apply_attn_file differ by {diff:.2e}")
    return module


def project(tensors, c):
    """ContextInjector's f(c) in float32 from the file's tensors."""
    import torch
    if "proj" in tensors:
        return tensors["proj"] @ c + tensors.get("bias", torch.zeros_like(c))
    h = torch.nn.functional.silu(tensors["mlp.in.weight"] @ c + tensors["mlp.in.bias"])
    return tensors["mlp.out.weight"] @ h + tensors["mlp.out.bias"]


def run_case(model, tok, spec, out_dir):
    import torch
    prompt = tok.encode(spec["question"])
    passage_text = "\n".join(spec["passages"])
    passage_ids = tok.encode(passage_text, False)
    context = spec.get("context", "embed-mean")
    with torch.no_grad():
        if context == "embed-mean":
            c = model.embed[torch.tensor(passage_ids)].mean(0)
        else:  # embed-seq:T as train_projector builds it: the first T rows, zero rows after the end
            c = tp.embedding_sequence(model, [passage_ids], int(context.split(":")[1]), torch.device("cpu"))[0]
    v = torch.zeros(model.hidden)
    if spec["projector"]:
        tensors = pl.load_tensors(os.path.join(out_dir, spec["projector"]))
        _, meta, _ = pl.read_safetensors_header(os.path.join(out_dir, spec["projector"]))
        assert [int(x) for x in meta["layers"].split(",")] == spec["layers"] and float(meta["alpha"]) == spec["alpha"]
        assert meta["context"] == context
        with torch.no_grad():
            v = spec["alpha"] * (attn_vector(tensors, meta, c) if meta["kind"] == "attn" else project(tensors, c))
    j = spec["answer_index"]
    start = len(prompt) - 1 + j
    base = len(prompt) - 1  # one vector an answer position (v [K, hidden]): vector i at the position that predicts token i
    inject = (v[None], spec["layers"]) if spec["projector"] else None
    generated = spec.get("generated") or pl.greedy(model, [prompt], NEW_TOKENS, inject=inject, start_offsets=[j],
                                                   stop_ids=(), exact=True)[0]
    full = prompt + generated
    with torch.no_grad():
        ids = torch.tensor([full])
        injection = (v[None], torch.tensor([start]), spec["layers"], torch.tensor([base])) if spec["projector"] else None
        logprobs = torch.log_softmax(model.logits(model(ids, inject=injection, exact=True))[0], -1)
    steps = logprobs[len(prompt) - 1:len(full) - 1]
    top2 = steps.topk(2, -1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    argmax_ok = steps.argmax(-1).tolist() == generated
    with torch.no_grad():
        plain = torch.log_softmax(model.logits(model(ids, exact=True))[0], -1)
    changed = float((logprobs[start:] - plain[start:]).abs().max())
    if context != "embed-mean":
        c = c.reshape(-1, model.hidden)
    return {"prompt": prompt, "passage_ids": passage_ids, "passage_text": passage_text, "c": c, "v": v, "start": start,
            "generated": generated, "full": full, "logprobs": logprobs, "min_gap": gap, "argmax_ok": argmax_ok,
            "changed": changed}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="injection-reference-out")
    ap.add_argument("--model", default=os.path.join(ROOT, "assets", "models", "moe-wordnet-demo"))
    ap.add_argument("--corpus", default=os.path.join(ROOT, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    t0 = time.time()
    out_dir = os.path.join(os.path.abspath(args.out), REL)
    os.makedirs(out_dir, exist_ok=True)
    model = pl.load_model(args.model, "cpu")
    tok = pl.Tokenizer(os.path.join(args.model, "tokenizer.json"))
    log(f"torch {torch.__version__}; tokenizer: {tok.backend}")
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f if line.strip()]
    heldout = sorted((r for r in corpus if r["split"] == "heldout"), key=lambda r: r["term"])
    taught = sorted((r for r in corpus if r["split"] == "taught" and not r.get("reading_only")), key=lambda r: r["term"])
    c_scale = float(model.embed.detach().std())
    files = seeded_projectors(out_dir, model.hidden, c_scale)
    files["attn"] = seeded_attn_projector(out_dir, model.embed.detach())
    files["attn_positions"] = seeded_attn_positions_projector(out_dir, files["attn"])

    def first_with_gap(candidates, make, min_change=0.0):
        """The first candidate whose greedy tokens have a top-2 margin of at least MIN_GAP at every step (and whose
        injection moves some log-probability by more than min_change)."""
        for r in candidates:
            spec = make(r)
            result = run_case(model, tok, spec, out_dir)
            if result["min_gap"] >= MIN_GAP and result["argmax_ok"] and result["changed"] > min_change:
                return spec, result
            log(f"  skipped {r['term']}: min top-2 gap {result['min_gap']:.4f}, injection changed {result['changed']:.3f}")
        raise SystemExit("no candidate with clear greedy margins")

    rng = random.Random(5)
    specs, results = [], []
    spec, result = first_with_gap(heldout[:40], lambda r: {
        "name": "mlp-heldout-j0", "projector": files["mlp"], "layers": [0, 1, 2, 3], "alpha": 1.0, "answer_index": 0,
        "question": f"What is {r['term']}?",
        "passages": [r["text"]] + [d["text"] for d in random.Random(r["term"]).sample(taught, 2)]})
    specs.append(spec)
    results.append(result)
    spec, result = first_with_gap(rng.sample(taught, 40), lambda r: {
        "name": "linear-taught-j2", "projector": files["linear"], "layers": [1, 3], "alpha": 0.5, "answer_index": 2,
        "question": f"What is {r['term']}?",
        "passages": [r["text"], random.Random(r["term"]).choice(taught)["text"]]})
    specs.append(spec)
    results.append(result)
    plain = dict(specs[0], name="plain", projector=None, layers=[], alpha=0.0, generated=results[0]["generated"])
    specs.append(plain)
    results.append(run_case(model, tok, plain, out_dir))
    # attn: the candidates and their RNG are new, so that cases 0-2 stay as they were.
    attn = {"projector": files["attn"], "layers": [0, 2], "alpha": 0.8, "context": f"embed-seq:{ATTN_LENGTH}"}
    spec, result = first_with_gap(heldout[40:80], lambda r: {
        "name": "attn-heldout-j0", **attn, "answer_index": 0, "question": f"What is {r['term']}?",
        "passages": [r["text"]] + [d["text"] for d in random.Random(r["term"]).sample(taught, 2)]}, min_change=0.5)
    assert len(result["passage_ids"]) > ATTN_LENGTH, "the long attn case must exceed T"
    specs.append(spec)
    results.append(result)
    short = [r for r in random.Random(6).sample(taught, 400) if len(tok.encode(r["text"], False)) <= ATTN_LENGTH - 8]
    spec, result = first_with_gap(short[:40], lambda r: {
        "name": "attn-taught-short-j1", **attn, "answer_index": 1, "question": f"What is {r['term']}?",
        "passages": [r["text"]]}, min_change=0.5)
    specs.append(spec)
    results.append(result)
    # attn with one vector for each of the first ATTN_POSITIONS answer tokens, trigger at the first answer token.
    spec, result = first_with_gap(heldout[80:120], lambda r: {
        "name": "attnpos-heldout-j0", **attn, "projector": files["attn_positions"], "answer_index": 0,
        "question": f"What is {r['term']}?",
        "passages": [r["text"]] + [d["text"] for d in random.Random(r["term"]).sample(taught, 2)]}, min_change=0.5)
    specs.append(spec)
    results.append(result)

    tensors = {}
    cases = []
    for i, (spec, r) in enumerate(zip(specs, results)):
        tensors[f"logprobs.{i}"] = r["logprobs"].contiguous()
        tensors[f"vector.{i}"] = r["v"].contiguous()
        tensors[f"c.{i}"] = r["c"].contiguous()
        cases.append({"name": spec["name"], "projector": spec["projector"], "layers": spec["layers"], "alpha": spec["alpha"],
                      **({"context": spec["context"]} if "context" in spec else {}),
                      "question": spec["question"], "prompt_ids": r["prompt"], "passages": spec["passages"],
                      "passage_text": r["passage_text"], "passage_ids": r["passage_ids"], "answer_index": spec["answer_index"],
                      "start_position": r["start"], "generated_ids": r["generated"], "generated_text": tok.decode(r["generated"]),
                      "full_ids": r["full"], "min_top2_gap": round(r["min_gap"], 6),
                      "injection_norm": round(float(r["v"].norm()), 6)})
        log(f"case {i} {spec['name']}: {spec['question']!r} start {r['start']} |v| {float(r['v'].norm()):.3f} "
            f"{len(r['passage_ids'])} passage tokens -> {tok.decode(r['generated'])!r} (min gap {r['min_gap']:.3f}, "
            f"injection changed {r['changed']:.3f})")
    changed = float((results[0]["logprobs"] - results[2]["logprobs"]).abs().max())
    before = float((results[0]["logprobs"][:results[0]["start"]] - results[2]["logprobs"][:results[0]["start"]]).abs().max())
    log(f"case 0 against no injection: max |d logprob| {changed:.3f} from the start position on, {before:.2e} before it")
    if not changed > 0.5 or before > 1e-5:
        raise SystemExit("the seeded projector's injection is too weak to test, or it changed positions before its start")
    pl.write_safetensors(os.path.join(out_dir, "reference.safetensors"), tensors, {"format": "pt"})
    reference = {
        "model": "assets/models/moe-wordnet-demo",
        "note": ("log_softmax of the logits at every position of full_ids, float32 on the CPU from the checkpoint's bf16 "
                 "weights upcast (tools/projector/projector_lib.py forward); the injection vector alpha * f(c) is added "
                 "to the residual stream after each layer in `layers` at every position >= start_position; "
                 "c = mean of the embedding rows of passage_ids = tokenize(passage_text) without <s> (context embed-mean, "
                 "the default), or with context embed-seq:T the embedding rows of the first T passage_ids in order, zero "
                 "rows after the end; a projector with answer_positions K makes K vectors (vector.<i> [K, hidden]), vector "
                 "k added at position len(prompt_ids) - 1 + k (from start_position on; none past the K-th)"),
        "new_tokens": NEW_TOKENS,
        "cases": cases,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "torch_version": torch.__version__,
        "tokenizer": tok.backend,
    }
    with open(os.path.join(out_dir, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")
    sizes = {fn: os.path.getsize(os.path.join(out_dir, fn)) for fn in sorted(os.listdir(out_dir))}
    log(f"wrote {out_dir}: {sizes} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
