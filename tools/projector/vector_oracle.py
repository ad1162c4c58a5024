#!/usr/bin/env python3
"""How much of a passage one vector can carry into the demo model's answer, by the form it enters in (issue 9).

The trained projector recovers 4.3% of prompt RAG's held-out gain (docs/eval/eval.md), and adding the passage's own
activation change at the trigger recovers nothing (docs/eval/injection-oracle.md). Neither says whether the form of the
injection or the projector is what falls short. Here no projector is involved: for each item a free vector is
optimised on that item's own gold answer (answer NLL, teacher forcing, the model frozen), and the item is then answered
greedily with it. What the best vector of a form achieves bounds what any projector can achieve in that form:
    add       v added to the residual stream after each injection layer from the last prompt position on (the engine's
              latent injection, trigger at the first answer token; v starts at 0)
    soft<k>   k extra input positions after the prompt whose input embeddings are free vectors (xRAG's form: the answer
              attends to them; they start at c, the mean embedding of the gold passage's tokens, ContextInjector's c)
Each form is optimised with Adam (cosine decay) at each learning rate of --lrs, scaled by the typical size of what it
replaces (the residual stream's rms for add, the embedding rows' rms for soft), and the rate with the lowest final NLL is
answered. Baselines: none (the question alone) and prompt RAG with the gold passage (`Context:\\n{passage}\\n\\n{question}`).
Token F1 against the gold answer as eval scores it; recovery = (F1 - F1 none) / (F1 prompt - F1 none), per group.

Items: the projector training's validation split (train_projector.Data, seed --seed): reading-only taught terms, which
the model was shown only in passages, and invented terms, which it cannot know. Nothing of eval's held-out split is used.

In the repository root, on the GPU machine or on a CPU (the demo model is small: on the 2-core development machine,
with Debian's PyTorch 1.13 as /usr/bin/python3, 64 items a group and 100 steps took 10 minutes for add at 3 rates and
15 for soft1 and soft4 at 2; docs/eval/vector-oracle.md):
    PYTHONUNBUFFERED=1 python3 tools/projector/vector_oracle.py --device cpu --items 64 --steps 100 --forms add \
        --lrs 0.003,0.01,0.03 --out OUT
writes OUT/vector_oracle.json and OUT/vector_oracle.run.log.
"""

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import projector_lib as pl  # noqa: E402
import train_projector as tp  # noqa: E402

T0 = time.time()
LOG = []
MAX_ANSWER_TOKENS = tp.MAX_ANSWER_TOKENS


def log(*parts):
    msg = " ".join(str(p) for p in parts)
    LOG.append(f"[{time.time() - T0:6.1f}s] {msg}")
    print(LOG[-1], flush=True)


def padded(seqs, dev):
    import torch
    L = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs], dtype=torch.long, device=dev)
    return ids, torch.tensor([len(s) for s in seqs], device=dev)


def answer_nll(model, ids, lengths, loss_from, inject=None, soft=None):
    """Summed NLL of the tokens after positions loss_from .. length - 2, and their count."""
    import torch
    import torch.nn.functional as F
    hidden = model(ids, inject=inject, soft=soft)
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    mask = (positions >= loss_from[:, None]) & (positions < lengths[:, None] - 1)
    logits = model.logits(hidden[:, :-1][mask[:, :-1]])
    targets = ids[:, 1:][mask[:, :-1]]
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def optimise(model, make_inputs, init, lr, steps, batch):
    """Adam on the free vectors `init` [N, ...] (cosine decay to 0), full batch in chunks of `batch` rows. make_inputs(rows,
    params) -> (ids, lengths, loss_from, inject, soft). Returns the vectors and the final mean NLL a token."""
    import torch
    params = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    n = params.shape[0]
    chunks = [torch.arange(s, min(n, s + batch), device=params.device) for s in range(0, n, batch)]
    tokens = 0  # answer tokens over all items: each chunk's loss is divided by it, so the step is the full batch's mean
    for rows in chunks:
        _, lengths, loss_from, _, _ = make_inputs(rows, params)
        tokens += int((lengths - 1 - loss_from).clamp_min(0).sum())
    final = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        total, count = 0.0, 0
        for rows in chunks:
            ids, lengths, loss_from, inject, soft = make_inputs(rows, params)
            loss, k = answer_nll(model, ids, lengths, loss_from, inject, soft)
            (loss / tokens).backward()
            total += float(loss)
            count += k
        opt.step()
        final = total / max(count, 1)
    return params.detach(), final


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="vector-oracle-out")
    ap.add_argument("--model", default=os.path.join(tp.ROOT, tp.MODEL_REL))
    ap.add_argument("--corpus", default=os.path.join(tp.ROOT, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"))
    ap.add_argument("--qa", default=os.path.join(tp.ROOT, "assets", "eval", "wordnet-qa.jsonl"))
    ap.add_argument("--items", type=int, default=200, help="items per group (reading-only, invented)")
    ap.add_argument("--forms", default="add,soft1,soft4")
    ap.add_argument("--layers", default="0,1,2,3", help="injection layers of the add form (the engine's default)")
    ap.add_argument("--lrs", default="0.01,0.03,0.1,0.3", help="Adam learning rates, times the form's scale")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--invented-definitions", choices=("replace", "splice"), default="replace",
                    help="how the invented terms' definitions are made (train_projector.py's option of the same name)")
    args = ap.parse_args()
    import torch
    torch.manual_seed(args.seed)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(args.out, exist_ok=True)
    log(f"vector_oracle.py {' '.join(sys.argv[1:])}; device {dev}; torch {torch.__version__}")

    data_args = argparse.Namespace(seed=args.seed, invented=0, val_invented=args.items, limit=0,
                                   invented_definitions=args.invented_definitions, replace_rates=tp.REPLACE_RATES)
    data = tp.Data(tp.load_jsonl(args.corpus), tp.load_jsonl(args.qa), data_args)
    problems = data.check_no_test_data()
    if problems:
        raise SystemExit("held-out data would be used:\n" + "\n".join(problems[:20]))
    groups = {"reading_only": data.val["reading_only"][:args.items], "invented": data.val["invented"][:args.items]}
    log("items: " + ", ".join(f"{g} {len(v)}" for g, v in groups.items()) + " (train_projector's validation split; no held-out item)")

    tok = pl.Tokenizer(os.path.join(args.model, "tokenizer.json"))
    tp.check_forward(args.model, log)
    model = pl.load_model(args.model, dev)
    layers = [int(x) for x in args.layers.split(",")]
    newline = tok.encode("\n", False)[-1]
    stops = (pl.EOS, newline)
    H = model.hidden
    embed_rms = float(model.embed.pow(2).mean().sqrt())

    results = {"settings": vars(args), "embed_rms": embed_rms, "groups": {}}
    for group, items in groups.items():
        prompts = [[pl.BOS] + ids for ids in tok.encode_many([it["question"] for it in items])]
        answers = [a[:MAX_ANSWER_TOKENS] if len(a) > MAX_ANSWER_TOKENS else a + [pl.EOS]
                   for a in tok.encode_many([" " + it["answer"] for it in items])]
        passages = [data.passage_text[it["passage_id"]] for it in items]
        bags = tok.encode_many(passages)
        flat = torch.tensor([t for b in bags for t in b], dtype=torch.long, device=dev)
        starts = torch.tensor([0] + [len(b) for b in bags[:-1]], dtype=torch.long, device=dev).cumsum(0)
        with torch.no_grad():
            c = model.mean_embedding(flat, starts)  # [N, H]

        def f1_of(generated):
            return [pl.token_f1(pl.first_line(tok.decode(g)), it["answer"]) for g, it in zip(generated, items)]

        row = {"n": len(items)}
        none = f1_of(pl.greedy(model, prompts, MAX_ANSWER_TOKENS, stop_ids=stops))
        ctx = [[pl.BOS] + tok.encode(pl.context_string([p]), False) + q[1:] for p, q in zip(passages, prompts)]
        prompt = f1_of(pl.greedy(model, ctx, MAX_ANSWER_TOKENS, stop_ids=stops))
        row["none"] = sum(none) / len(none)
        row["prompt"] = sum(prompt) / len(prompt)
        gain = row["prompt"] - row["none"]
        log(f"{group}: F1 none {row['none']:.3f}, prompt RAG {row['prompt']:.3f}")

        # The add form's scale: the rms of the residual stream after the last layer at the last prompt position.
        with torch.no_grad():
            ids0, len0 = padded(prompts, dev)
            residual = model(ids0, pre_norm=True)
            residual_rms = float(residual[torch.arange(len(items), device=dev), len0 - 1].pow(2).mean().sqrt())

        for form in args.forms.split(","):
            if form == "add":
                seqs = [p + a for p, a in zip(prompts, answers)]
                ids_all, len_all = padded(seqs, dev)
                start_all = torch.tensor([len(p) - 1 for p in prompts], device=dev)

                def make_inputs(rows, params, ids_all=ids_all, len_all=len_all, start_all=start_all):
                    L = int(len_all[rows].max())
                    return (ids_all[rows, :L], len_all[rows], start_all[rows], (params[rows], start_all[rows], layers), None)
                init, scale = torch.zeros(len(items), H, device=dev), residual_rms
            elif form.startswith("soft"):
                k = int(form[4:])
                seqs = [p + [0] * k + a for p, a in zip(prompts, answers)]
                ids_all, len_all = padded(seqs, dev)
                at_all = torch.tensor([len(p) for p in prompts], device=dev)

                def make_inputs(rows, params, ids_all=ids_all, len_all=len_all, at_all=at_all, k=k):
                    L = int(len_all[rows].max())
                    return (ids_all[rows, :L], len_all[rows], at_all[rows] + k - 1, None, (params[rows], at_all[rows]))
                init, scale = c[:, None, :].repeat(1, k, 1), embed_rms
            else:
                raise SystemExit(f"unknown form {form}")
            best = None
            tried = {}
            for lr in (float(x) for x in args.lrs.split(",")):
                vectors, nll = optimise(model, make_inputs, init, lr * scale, args.steps, args.batch)
                tried[str(lr)] = round(nll, 4)
                log(f"{group} {form}: lr {lr} x {scale:.3g}: final answer NLL {nll:.4f} a token")
                if best is None or nll < best[1]:
                    best = (lr, nll, vectors)
            lr, nll, vectors = best
            if form == "add":
                generated = pl.greedy(model, prompts, MAX_ANSWER_TOKENS, inject=(vectors, layers),
                                      start_offsets=[0] * len(prompts), stop_ids=stops)
            else:
                k = vectors.shape[1]
                generated = pl.greedy(model, [p + [0] * k for p in prompts], MAX_ANSWER_TOKENS, stop_ids=stops,
                                      soft=(vectors, [len(p) for p in prompts]))
            f1 = f1_of(generated)
            mean_f1 = sum(f1) / len(f1)
            norm = float(vectors.reshape(len(items), -1, H).norm(dim=-1).mean())
            row[form] = {"f1": round(mean_f1, 4), "recovery": round((mean_f1 - row["none"]) / gain, 4) if gain > 0 else None,
                         "answer_nll": round(nll, 4), "lr": lr, "scale": round(scale, 4), "nll_by_lr": tried,
                         "vector_norm": round(norm, 3)}
            log(f"{group} {form}: F1 {mean_f1:.3f}, recovery {row[form]['recovery']}, |vector| {norm:.2f} (lr {lr})")
        row["none"], row["prompt"] = round(row["none"], 4), round(row["prompt"], 4)
        results["groups"][group] = row

    results["seconds"] = round(time.time() - T0, 1)
    with open(os.path.join(args.out, "vector_oracle.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "vector_oracle.run.log"), "w", encoding="utf-8") as f:
        f.write("\n".join(LOG) + "\n")
    log(f"wrote {args.out}/vector_oracle.json")


if __name__ == "__main__":
    main()
