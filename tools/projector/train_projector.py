#!/usr/bin/env python3
"""Train the latent-injection projector of the WordNet demo model through the frozen model (issue 9, part 3).

The model stays frozen. A projector f (an MLP c -> v, or a linear map) is trained so that the question plus v = alpha * f(c),
added to the residual stream after each injection layer at every position from the trigger on (the engine's
AddInjection, MixtralModel.Layers), makes the model say the gold answer: loss = NLL of the answer tokens and </s>
(teacher forcing). c is what the engine computes at serve time: the mean of the model's embedding rows of the tokenized
passages that its retriever (SQLite FTS5 / BM25 over the corpus, top-k, query = the question and the answer so far)
returns, joined by "\\n". Training therefore sees retrieved passages, distractors included, not only the gold one.

Data (nothing of eval's held-out split is used: no held-out question, answer, passage or definition):
    taught terms      assets/eval QA items of split "taught": closed-book ones (the model knows them: the projector
                      must not disturb them) and reading-only ones (the model does not: the closest kin of held-out terms)
    invented terms    a made-up word with a made-up definition (a taught definition with 0, 30 or 60 % of its words
                      swapped for words of other taught definitions), written as a corpus passage and indexed beside
                      the taught passages: the model cannot know them, so the answer has to come from c
The trigger of the eval's latent modes fires at some answer token j; the engine then injects from the position that
predicts token j on, after the tokens the model already emitted. Each item draws j from --offsets; its first j answer
tokens are the model's own greedy closed-book tokens, and the query that retrieves its passages holds them (as the
engine's query window does). The target after that prefix is the rest of the gold answer when the prefix is the gold
one, else the whole gold answer.
Validation: 10 % of the closed-book terms (at most 300), 20 % of the reading-only terms and --val-invented invented terms,
never trained on. Early stopping on the mean of the three groups' answer NLL; the best step is kept. At the end the
validation items are answered greedily (as eval answers them: up to 48 tokens, first line) without injection, with the
trained projector, and with the passages in the prompt (prompt RAG), and the token F1s are reported.

Outputs under --out (the repository layout, so that `cp -r OUT/. REPO/` puts each file in place):
    assets/models/moe-wordnet-demo/projector.safetensors   the projector in ContextInjector's format (metadata: kind,
                                                            activation, layers, alpha, context; attn adds its shape);
                                                            the input standardisation is folded into the first layer
                                                            (mlp, linear) or stored as attn.mu and attn.sigma (attn)
    assets/models/moe-wordnet-demo/projector_training.json the training facts (data, settings, history, validation F1)
    tools/projector/train_projector.run.log                 everything printed

Before training, the Mixtral forward of projector_lib is checked in float32 on the CPU against transformers' logits
committed in tests/data/reference/demo (the same reference the C# engine matches to 1e-4); the run stops if it is off.

Usage on the GPU machine, in the repository root:
    PYTHONUNBUFFERED=1 python3 tools/projector/train_projector.py --out "$OUT"
`--dry-run` builds the splits, the invented terms and the retrieval index and answers every training query (j = 0),
without torch; it checks that nothing of the held-out split is used and prints statistics and samples.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import projector_lib as pl  # noqa: E402

T0 = time.time()
LOG = []
MODEL_REL = os.path.join("assets", "models", "moe-wordnet-demo")
MAX_ANSWER_TOKENS = 48  # eval's --max-new-tokens
NEWLINE_TOKEN = "<0x0A>"
CONS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"
REPLACE_RATES = (0.0, 0.3, 0.6)  # --replace-rates' default
EXAMPLE_P = 0.23  # share of corpus passages with an example sentence


def log(*parts):
    msg = " ".join(str(p) for p in parts)
    LOG.append(f"[{time.time() - T0:6.1f}s] {msg}")
    print(LOG[-1], flush=True)


def parse_weights(text, cast):
    out = {}
    for part in text.split(","):
        key, value = part.split(":")
        out[cast(key.strip())] = float(value)
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def load_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------
# Data (no torch)
# ----------------------------------------------------------------------------

def nonce_word(rng, banned):
    while True:
        n = rng.randint(2, 4)
        w = "".join(rng.choice(CONS) + rng.choice(VOWELS) + (rng.choice(CONS) if rng.random() < 0.4 else "") for _ in range(n))
        if 4 <= len(w) <= 13 and w not in banned:
            banned.add(w)
            return w


def passage_text(term, pos, definition, example):
    """The corpus' passage format (tools/demo/build_corpus.py): 'term (pos): definition.' plus an optional example."""
    text = f"{term} ({pos}): {definition}."
    if example:
        text += f" Example: {example}"
    return text


class Data:
    """The splits. `test` is eval's held-out split: its terms, passages and definitions are never used."""

    def __init__(self, corpus, qa, args):
        rng = random.Random(args.seed)
        self.by_id = {r["id"]: r for r in corpus}
        heldout_ids = {q["passage_id"] for q in qa if q["split"] == "heldout"}
        heldout_ids |= {r["id"] for r in corpus if r["split"] == "heldout"}
        self.test_terms = sorted({self.by_id[i]["term"] for i in heldout_ids if i in self.by_id})
        self.test_definitions = {self.by_id[i]["definition"] for i in heldout_ids if i in self.by_id}
        self.test_passage_ids = heldout_ids
        taught_qa = [q for q in qa if q["split"] == "taught" and q["passage_id"] in self.by_id
                     and q["passage_id"] not in heldout_ids]
        # A taught term whose definition is also a held-out term's is left out too (WordNet repeats a few).
        self.shared_definition = [q["id"] for q in taught_qa if self.by_id[q["passage_id"]]["definition"] in self.test_definitions]
        taught_qa = [q for q in taught_qa if q["id"] not in set(self.shared_definition)]
        closed = [q for q in taught_qa if not q.get("reading_only")]
        reading = [q for q in taught_qa if q.get("reading_only")]
        rng.shuffle(closed)
        rng.shuffle(reading)
        n_closed_val = min(300, len(closed) // 10)
        n_reading_val = len(reading) // 5
        taught_records = [self.by_id[q["passage_id"]] for q in taught_qa]
        self.def_words = [w for r in taught_records for w in r["definition"].split()]
        self.examples = [e if e[-1] in ".!?" else e + "." for r in taught_records for e in r["examples"][:1]]
        self.pos = [r["pos"] for r in taught_records]
        self.taught_passages = [(r["id"], r["title"], r["text"]) for r in corpus
                                if r["split"] == "taught" and r["id"] not in heldout_ids and r["definition"] not in self.test_definitions]
        banned = {r["term"] for r in corpus}

        def item(q, group):
            r = self.by_id[q["passage_id"]]
            return {"group": group, "term": r["term"], "question": q["question"], "answer": q["answer"],
                    "passage_id": r["id"]}

        self.train = {"closed_book": [item(q, "closed_book") for q in closed[n_closed_val:]],
                      "reading_only": [item(q, "reading_only") for q in reading[n_reading_val:]]}
        self.val = {"closed_book": [item(q, "closed_book") for q in closed[:n_closed_val]],
                    "reading_only": [item(q, "reading_only") for q in reading[:n_reading_val]]}
        self.invented_passages = []
        for split, n, seed in (("train", args.invented, args.seed + 101), ("val", args.val_invented, args.seed + 202)):
            irng = random.Random(seed)
            items = []
            for k in range(n):
                base = irng.choice(taught_records)
                rate = irng.choice(args.replace_rates)
                words = base["definition"].split()
                if args.invented_definitions == "splice":
                    # The head of one taught definition and the tail of another: a sentence the model has not learnt by
                    # heart, made of phrases it reads fluently (a replaced-word definition at rate 0 is a taught one).
                    other = irng.choice(taught_records)["definition"].split()
                    words = words[:irng.randint(1, max(1, len(words) - 1))] + other[irng.randint(min(1, len(other) - 1), len(other) - 1):]
                definition = " ".join(w if irng.random() >= rate else irng.choice(self.def_words) for w in words)
                word = nonce_word(irng, banned)
                example = irng.choice(self.examples) if irng.random() < EXAMPLE_P else None
                pid = f"invented-{split}-{k}"
                self.invented_passages.append((pid, word, passage_text(word, base["pos"], definition, example)))
                items.append({"group": "invented", "term": word, "question": f"What is {word}?", "answer": definition,
                              "passage_id": pid})
            (self.train if split == "train" else self.val)["invented"] = items
        if args.limit:
            for split in (self.train, self.val):
                for group in split:
                    split[group] = split[group][:args.limit]
        self.passage_text = {pid: text for pid, _, text in self.taught_passages + self.invented_passages}

    def check_no_test_data(self):
        """Every text a training or validation item can see is free of the held-out split's passages and definitions."""
        test_terms = set(self.test_terms)
        problems = []
        for split in (self.train, self.val):
            for group, items in split.items():
                for it in items:
                    if it["passage_id"] in self.test_passage_ids or (group != "invented" and it["term"] in test_terms):
                        problems.append(f"{group} item {it['term']} is a held-out term")
                    if it["answer"] in self.test_definitions:
                        problems.append(f"{group} item {it['term']} answers with a held-out definition")
        indexed = {pid for pid, _, _ in self.taught_passages + self.invented_passages}
        problems += [f"held-out passage {p} is indexed" for p in sorted(indexed & self.test_passage_ids)]
        train_terms = {it["term"] for items in self.train.values() for it in items}
        val_terms = {it["term"] for items in self.val.values() for it in items}
        problems += [f"term {t} is in both train and validation" for t in sorted(train_terms & val_terms)]
        return problems

    def counts(self):
        return {"train": {g: len(v) for g, v in self.train.items()}, "val": {g: len(v) for g, v in self.val.items()},
                "test_terms_excluded": len(self.test_terms), "taught_left_out_sharing_a_test_definition": len(self.shared_definition),
                "test_terms_sha256": hashlib.sha256("\n".join(self.test_terms).encode()).hexdigest(),
                "indexed_passages": len(self.taught_passages) + len(self.invented_passages)}


def retrieval_stats(items, retrieved):
    n = len(items)
    gold = sum(1 for it, ids in zip(items, retrieved) if it["passage_id"] in ids)
    first = sum(1 for it, ids in zip(items, retrieved) if ids and ids[0] == it["passage_id"])
    sizes = {}
    for ids in retrieved:
        sizes[len(ids)] = sizes.get(len(ids), 0) + 1
    return {"n": n, "gold_retrieved": round(gold / max(n, 1), 4), "gold_first": round(first / max(n, 1), 4),
            "passages_returned": {str(k): sizes[k] for k in sorted(sizes)}}


class Indexes:
    """Taught items retrieve from the taught passages alone (the serve-time corpus less the held-out split). Invented
    items retrieve from the taught passages plus their own: all invented passages are indexed together, and the other
    invented ones are dropped from each result (so an invented term meets taught distractors, as a held-out one does)."""

    FETCH = 64

    def __init__(self, data, work):
        t = time.time()
        self.taught = os.path.join(work, "taught.db")
        self.invented = os.path.join(work, "invented.db")
        pl.build_index(self.taught, data.taught_passages)
        pl.build_index(self.invented, data.taught_passages + data.invented_passages)
        log(f"retrieval indexes: {len(data.taught_passages)} taught passages; the same + {len(data.invented_passages)} "
            f"invented ({time.time() - t:.1f}s)")

    def search(self, items, queries, k, processes):
        if not items or items[0]["group"] != "invented":
            return pl.search_many(self.taught, queries, k, processes)
        found = pl.search_many(self.invented, queries, self.FETCH, processes)
        return [[pid for pid in ids if pid == it["passage_id"] or not pid.startswith("invented-")][:k]
                for it, ids in zip(items, found)]


def dry_run(args, data):
    work = tempfile.mkdtemp(prefix="projector-dry-")
    index = Indexes(data, work)
    groups = {f"{s}/{g}": items for s, split in (("train", data.train), ("val", data.val)) for g, items in split.items()}
    stats = {}
    for name, items in groups.items():
        t = time.time()
        retrieved = index.search(items, [it["question"] for it in items], args.top_k, args.processes)
        stats[name] = retrieval_stats(items, retrieved)
        log(f"retrieval {name} (j = 0): {json.dumps(stats[name])} ({time.time() - t:.1f}s)")
    tok = pl.Tokenizer(os.path.join(args.model, "tokenizer.json"))
    sample = [it for items in groups.values() for it in items[:2]]
    for it in sample[:6]:
        ids = index.search([it], [it["question"]], args.top_k, 1)[0]
        joined = "\n".join(data.passage_text[i] for i in ids)
        log(f"--- {it['group']}: {it['question']!r} -> {it['answer']!r}\n    retrieved {ids}: {joined[:200]!r}\n"
            f"    c from {len(tok.encode(joined, False))} tokens ({tok.backend})")
    if args.write_retrieval_fixture:
        write_retrieval_fixture(args, data)
    return stats


def write_retrieval_fixture(args, data):
    """Queries and the top-k ids this module's FTS5 replica returns over the whole demo corpus, for the C# test that
    checks the engine's retriever returns the same (RetrievalParityTests)."""
    corpus = load_jsonl(args.corpus)
    work = tempfile.mkdtemp(prefix="projector-fixture-")
    path = os.path.join(work, "corpus.db")
    pl.build_index(path, [(r["id"], r.get("title"), r["text"]) for r in corpus])
    rng = random.Random(7)
    terms = [r["term"] for r in rng.sample(corpus, 40)]
    queries = [f"What is {t}?" for t in terms[:30]]
    words = [w for r in rng.sample(corpus, 40) for w in r["definition"].split()]
    queries += [f"What is {t}? {' '.join(rng.sample(words, 3))}" for t in terms[30:]]
    queries += ["What is Quantum\uff1f", "the of and", "???", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9"]
    s = pl.Searcher(path)
    cases = [{"query": q, "ids": [pid for pid, _ in s.search(q, args.top_k)]} for q in queries]
    out = {"corpus": "assets/corpus/wordnet/wordnet-demo.jsonl.gz", "top_k": args.top_k,
           "note": "written by tools/projector/train_projector.py --dry-run --write-retrieval-fixture (Python sqlite3 "
                   f"{pl.sqlite3.sqlite_version}); the C# retriever must return the same ids in the same order",
           "cases": cases}
    with open(args.write_retrieval_fixture, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(f"wrote {args.write_retrieval_fixture} ({len(cases)} queries)")


# ----------------------------------------------------------------------------
# Training (torch)
# ----------------------------------------------------------------------------

def check_forward(model_dir, log_fn):
    """projector_lib's forward in float32 on the CPU against transformers' logits (tests/data/reference/demo)."""
    import torch
    ref_dir = os.path.join(ROOT, "tests", "data", "reference", "demo", "reference")
    with open(os.path.join(ref_dir, "reference.json")) as f:
        ref = json.load(f)
    tensors = pl.load_tensors(os.path.join(ref_dir, "reference.safetensors"))
    model = pl.load_model(model_dir, "cpu")
    worst = 0.0
    with torch.no_grad():
        for i, p in enumerate(ref["prompts"]):
            hidden = model(torch.tensor([p["full_ids"]]), exact=True)
            ours = torch.log_softmax(model.logits(hidden)[0], -1)
            theirs = torch.log_softmax(tensors[f"logits.{i}"], -1)
            worst = max(worst, float((ours - theirs).abs().max()))
    log_fn(f"forward check against transformers' fp32 reference ({len(ref['prompts'])} prompts): max |d logprob| = {worst:.2e}")
    if not worst < 1e-4:
        raise SystemExit(f"the Mixtral forward differs from transformers by {worst:.2e} (> 1e-4): stopping")
    return worst


CONTEXTS = {
    "embed-mean": "embed-mean: mean of the embedding rows of tokenize('\\n'.join(top-k passages))",
    "embed-seq": "embed-seq:T: the embedding rows of the first T tokens of tokenize('\\n'.join(top-k passages)) side by "
                 "side, zeros after the end (the engine computes it for an attn projector only)",
    "hidden-mean": "hidden-mean:L: the passages' residual stream after L layers, averaged over their positions (not "
                   "computed by the engine)",
}


def make_projector(kind, hidden, inner, mu, sigma):
    import torch

    class Projector(torch.nn.Module):
        """v = f((c - mu) / sigma); the standardisation is folded into the first layer when exported."""

        def __init__(self):
            super().__init__()
            self.kind = kind
            self.register_buffer("mu", mu.clone())
            self.register_buffer("sigma", sigma.clone())
            inputs = mu.numel()  # hidden, or length * hidden for embed-seq
            if kind == "mlp":
                self.inp = torch.nn.Linear(inputs, inner)
                self.out = torch.nn.Linear(inner, hidden)
            else:
                self.out = torch.nn.Linear(inputs, hidden)
            torch.nn.init.zeros_(self.out.weight)
            torch.nn.init.zeros_(self.out.bias)

        def forward(self, c):
            z = (c - self.mu) / self.sigma
            if self.kind == "mlp":
                z = torch.nn.functional.silu(self.inp(z))
            return self.out(z)

        def export(self):
            """Tensors of ContextInjector's format with the standardisation folded in: W' = W / sigma, b' = b - W' mu."""
            with torch.no_grad():
                first = self.inp if self.kind == "mlp" else self.out
                w = first.weight.double() / self.sigma.double()[None, :]
                b = first.bias.double() - w @ self.mu.double()
                if self.kind == "mlp":
                    return {"mlp.in.weight": w.float(), "mlp.in.bias": b.float(),
                            "mlp.out.weight": self.out.weight.float(), "mlp.out.bias": self.out.bias.float()}
                return {"proj": w.float(), "bias": b.float()}

    return Projector()


READERS = ("attn", "poswise")  # --arch choices for --context embed-seq:T only; the engine runs attn, not poswise
READER_NOTES = {
    "attn": "c as T rows, each standardised per dimension (statistics shared by all positions), plus a learned position "
            "embedding, rows past the end masked; pre-LayerNorm transformer encoder, attention pooling by learned "
            "queries (concatenated), a linear map to hidden (zero-initialised)",
    "poswise": "c as T rows, each standardised per dimension (statistics shared by all positions), rows past the end "
               "masked; v = sum_t a_t * (W z_t) + b with W [hidden, hidden] shared by the positions (zero-initialised) "
               "and a per-position, per-dimension gain a_t (initialised to 1/T)",
}


def make_reader(kind, hidden, length, mu, sigma, args):
    """A projector with a reading bias over c = embed-seq:T, read as T rows of `hidden` (--arch attn or poswise).
    Each row is standardised with one mean and deviation per dimension, shared by all positions (so a token gives the
    same input wherever it stands); rows past the passages' end are masked. embedding_sequence zero-fills them, and no
    embedding row of the demo model is all zeros, so a row is present exactly when it is not all zeros. A bag without
    any row (no passages) gets v = 0, as the engine injects nothing then. The output layer starts at zero, so training
    starts from the model without injection.
      attn     a small pre-LayerNorm transformer encoder over the rows (a learned position embedding, --attn-layers
               layers of width --attn-width with --attn-heads heads, feed-forward 2 x width with SiLU, dropout
               --dropout), then attention pooling by --attn-queries learned queries, concatenated, and a linear map to
               `hidden`.
      poswise  v = sum_t a_t * (W z_t) + b: one W [hidden, hidden] shared by all positions and a per-position,
               per-dimension gain a_t (a diagonal gain on W's output), so position t's row counts by a_t.
    attn is exported (export(), attn_metadata()) as ContextInjector's kind "attn"; poswise is not (an experiment)."""
    import torch
    import torch.nn.functional as F

    def row_mask(c):
        rows = c.reshape(c.shape[0], length, hidden)
        present = rows.abs().amax(-1) > 0  # [bags, T]
        return rows, present

    class SelfAttention(torch.nn.Module):
        def __init__(self, width, heads, dropout):
            super().__init__()
            self.heads = heads
            self.qkv = torch.nn.Linear(width, 3 * width)
            self.proj = torch.nn.Linear(width, width)
            self.drop = torch.nn.Dropout(dropout)

        def forward(self, h, keep):
            n, t, w = h.shape
            q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) / math.sqrt(w // self.heads)  # [n, heads, t, t]
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
            att = self.drop(torch.softmax(scores, -1))
            return self.proj((att @ v).transpose(1, 2).reshape(n, t, w))

    class Block(torch.nn.Module):
        def __init__(self, width, heads, dropout):
            super().__init__()
            self.norm1 = torch.nn.LayerNorm(width)
            self.att = SelfAttention(width, heads, dropout)
            self.norm2 = torch.nn.LayerNorm(width)
            self.ff1 = torch.nn.Linear(width, 2 * width)
            self.ff2 = torch.nn.Linear(2 * width, width)
            self.drop = torch.nn.Dropout(dropout)

        def forward(self, h, keep):
            h = h + self.drop(self.att(self.norm1(h), keep))
            return h + self.drop(self.ff2(F.silu(self.ff1(self.norm2(h)))))

    class Reader(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.kind = kind
            self.register_buffer("mu", mu.clone())  # [hidden]
            self.register_buffer("sigma", sigma.clone())
            if kind == "attn":
                width, heads, queries = args.attn_width, args.attn_heads, args.attn_queries
                if width % heads:
                    raise SystemExit(f"--attn-width {width} is not a multiple of --attn-heads {heads}")
                self.inp = torch.nn.Linear(hidden, width)
                self.pos = torch.nn.Parameter(0.02 * torch.randn(length, width))
                self.blocks = torch.nn.ModuleList([Block(width, heads, args.dropout) for _ in range(args.attn_layers)])
                self.norm = torch.nn.LayerNorm(width)
                # --answer-positions K: a set of queries for each answer position (one vector each, an experiment)
                self.positions = max(1, getattr(args, "answer_positions", 0))
                self.queries = torch.nn.Parameter(torch.randn(self.positions * queries, width) / math.sqrt(width))
                self.key = torch.nn.Linear(width, width)
                self.value = torch.nn.Linear(width, width)
                self.out = torch.nn.Linear(queries * width, hidden)
            elif kind == "poswise":
                self.gain = torch.nn.Parameter(torch.full((length, hidden), 1.0 / length))
                self.out = torch.nn.Linear(hidden, hidden)  # W and b
            else:
                raise ValueError(kind)
            torch.nn.init.zeros_(self.out.weight)
            torch.nn.init.zeros_(self.out.bias)

        def forward(self, c):
            rows, present = row_mask(c)
            nonempty = present.any(-1)
            keep = present | ~nonempty[:, None]  # an empty bag attends to its zero rows; its v is zeroed below
            z = (rows - self.mu) / self.sigma * present[:, :, None].to(rows.dtype)
            if self.kind == "poswise":
                v = torch.einsum("nth,th->nh", F.linear(z, self.out.weight), self.gain) + self.out.bias
            else:
                h = self.inp(z) + self.pos
                for block in self.blocks:
                    h = block(h, keep)
                h = self.norm(h)
                scores = torch.einsum("ntw,qw->nqt", self.key(h), self.queries) / math.sqrt(h.shape[-1])
                att = torch.softmax(scores.masked_fill(~keep[:, None, :], float("-inf")), -1)
                pooled = torch.einsum("nqt,ntw->nqw", att, self.value(h))
                if getattr(args, "answer_positions", 0):
                    v = self.out(pooled.reshape(c.shape[0], self.positions, -1))  # [n, K, hidden]
                    return v * nonempty[:, None, None].to(v.dtype)
                v = self.out(pooled.reshape(c.shape[0], -1))
            return v * nonempty[:, None].to(v.dtype)

        def export(self):
            """The attn reader's tensors under their file names (attn_file_name), mu and sigma included (not folded:
            a masked row's input is in.bias, which folding (row - mu) / sigma into in.weight would change)."""
            if self.kind != "attn":
                raise ValueError(f"a {self.kind} reader is not exported")
            return {attn_file_name(k): v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}

        def attn_metadata(self, layers, alpha, extra=None):
            return pl.attn_metadata(layers, alpha, length, self.pos.shape[1], args.attn_heads, self.queries.shape[0] // self.positions,
                                    len(self.blocks), self.norm.eps, extra, answer_positions=self.positions)

    return Reader()


def attn_file_name(state_key):
    """The file name of an attn reader's state_dict entry: "inp.weight" -> "attn.in.weight", "blocks.0.att.qkv.weight"
    -> "attn.blocks.0.qkv.weight", "mu" -> "attn.mu"."""
    name = "in." + state_key[len("inp."):] if state_key.startswith("inp.") else state_key
    return pl.ATTN_PREFIX + name.replace(".att.", ".")


def load_attn_reader(tensors, metadata):
    """make_reader's attn module holding an attn projector file's tensors (eval mode), for checks against the file."""
    import types
    import torch
    length = int(metadata["context"].split(":")[1])
    width, hidden = tensors[pl.ATTN_PREFIX + "in.weight"].shape
    positions = pl.attn_answer_positions(metadata)
    shape = types.SimpleNamespace(attn_width=int(width), attn_heads=int(metadata["heads"]),
                                  attn_queries=int(tensors[pl.ATTN_PREFIX + "queries"].shape[0]) // positions,
                                  attn_layers=int(metadata["encoder_layers"]), dropout=0.0,
                                  answer_positions=positions if positions > 1 else 0)
    reader = make_reader("attn", int(hidden), length, tensors[pl.ATTN_PREFIX + "mu"], tensors[pl.ATTN_PREFIX + "sigma"], shape)
    state = {k: tensors[attn_file_name(k)] for k in reader.state_dict()}
    unused = sorted(set(tensors) - {attn_file_name(k) for k in state})
    if unused:
        raise ValueError(f"tensors the attn reader has no place for: {unused}")
    reader.load_state_dict(state)
    for module in reader.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = float(metadata["layer_norm_eps"])
    return reader.eval()


def reader_row_stats(cs, length, hidden):
    """Per-dimension mean and deviation of the present rows (not all zeros) of the embed-seq c's in `cs`, over all
    positions, accumulated in chunks (no copy of all c at once)."""
    import torch
    total, total_sq, count = 0.0, 0.0, 0
    for c in cs:
        for s in range(0, c.shape[0], 8192):
            rows = c[s:s + 8192].reshape(-1, hidden).double()
            rows = rows[rows.abs().amax(-1) > 0]
            total = total + rows.sum(0)
            total_sq = total_sq + (rows * rows).sum(0)
            count += rows.shape[0]
    mu = total / max(count, 1)
    var = (total_sq / max(count, 1) - mu * mu) * count / max(count - 1, 1)
    return mu.float(), var.clamp_min(1e-12).sqrt().float(), count


def apply_exported(tensors, c, metadata=None):
    """The exported file's function, as ContextInjector computes it (for the round-trip check); an attn file needs its
    metadata (the heads, encoder layers, LayerNorm eps and T)."""
    import torch
    if metadata is not None and metadata.get("kind") == "attn":
        return pl.apply_attn_file(tensors, metadata, c)
    if "proj" in tensors:
        return c @ tensors["proj"].T + tensors["bias"]
    h = torch.nn.functional.silu(c @ tensors["mlp.in.weight"].T + tensors["mlp.in.bias"])
    return h @ tensors["mlp.out.weight"].T + tensors["mlp.out.bias"]


def embedding_sequence(model, bags, length, dev):
    """c per bag in order: the embedding rows of the bag's first `length` tokens side by side ([bags, length * hidden]),
    zeros after a shorter bag's end. Unlike the mean it keeps which word stands where (--context embed-seq:T)."""
    import torch
    import torch.nn.functional as F
    ids = torch.zeros(len(bags), length, dtype=torch.long)
    mask = torch.zeros(len(bags), length)
    for k, b in enumerate(bags):
        b = list(b)[:length]
        ids[k, :len(b)] = torch.tensor(b, dtype=torch.long)
        mask[k, :len(b)] = 1.0
    rows = F.embedding(ids.to(dev), model.embed) * mask.to(dev)[:, :, None]
    return rows.reshape(len(bags), -1)


class Prepared:
    """Token ids, prefixes, passages, c and padded training sequences of one group of items."""


def prepare(model, tok, data, items, index, args, rng, dev, own_cache, force_j=None):
    import torch
    newline = tok.encode("\n", False)[-1]
    prompts = [[pl.BOS] + ids for ids in tok.encode_many([it["question"] for it in items])]  # tokenizer.Encode(question)
    answers = tok.encode_many([" " + it["answer"] for it in items])
    own = own_cache(prompts)
    offsets, weights = zip(*sorted(args.offsets_map.items()))
    js = []
    for k, o in enumerate(own):
        j = force_j if force_j is not None else rng.choices(offsets, weights)[0]
        js.append(min(j, len(o)))
    queries = [tok.decode(p + o[:j]).strip() for p, o, j in zip(prompts, own, js)]
    retrieved = index.search(items, queries, args.top_k, args.processes)
    joined = ["\n".join(data.passage_text[i] for i in ids) for ids in retrieved]
    bags = tok.encode_many(joined)
    flat = torch.tensor([t for b in bags for t in b] or [0], dtype=torch.long, device=dev)
    lengths = [len(b) for b in bags]
    starts = torch.tensor([0] + lengths[:-1], dtype=torch.long, device=dev).cumsum(0)
    with torch.no_grad():
        if args.context == "embed-mean":
            c = model.mean_embedding(flat, starts)
        elif args.context.startswith("embed-seq:"):  # an experiment the engine does not compute (yet)
            c = embedding_sequence(model, bags, int(args.context.split(":")[1]), dev)
        else:  # hidden-mean:L, an experiment the engine does not compute
            c = model.mean_hidden(bags, int(args.context.split(":")[1]))
    c[torch.tensor([n == 0 for n in lengths], device=dev)] = 0.0  # no passages: the engine injects nothing
    seqs, starts_pos, bases, loss_from, golds_match = [], [], [], [], 0
    for p, o, j, a in zip(prompts, own, js, answers):
        # The answer and </s>; an answer longer than eval's 48 tokens is cut there, without </s>.
        a = a[:MAX_ANSWER_TOKENS] if len(a) > MAX_ANSWER_TOKENS else a + [pl.EOS]
        target = a[j:] if o[:j] == a[:j] else a
        golds_match += o[:j] == a[:j]
        seq = p + o[:j] + target
        seqs.append(seq)
        starts_pos.append(len(p) - 1 + j)
        bases.append(len(p) - 1)
    L = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs], dtype=torch.long)
    out = Prepared()
    out.items, out.prompts, out.answers, out.own, out.js = items, prompts, answers, own, js
    out.queries, out.retrieved, out.joined = queries, retrieved, joined
    out.c = c
    out.empty = sum(1 for n in lengths if n == 0)
    out.ids = ids.to(dev)
    out.lengths = torch.tensor([len(s) for s in seqs], device=dev)
    out.start = torch.tensor(starts_pos, device=dev)
    out.base = torch.tensor(bases, device=dev)  # the position that predicts answer token 0
    out.prefix_is_gold = golds_match / max(len(items), 1)
    out.newline = newline
    return out


def batch_loss(model, proj, parts, layers, alpha, dev, amp):
    """Summed answer NLL and its token count of one forward over the rows `parts` = [(Prepared, row indices)]."""
    import torch
    import torch.nn.functional as F
    lengths = torch.cat([p.lengths[i] for p, i in parts])
    L = int(lengths.max())
    ids = torch.cat([F.pad(p.ids[i, :L], (0, max(0, L - p.ids.shape[1]))) for p, i in parts])
    start = torch.cat([p.start[i] for p, i in parts])
    base = torch.cat([p.base[i] for p, i in parts])
    v = alpha * proj(torch.cat([p.c[i] for p, i in parts]))
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
        hidden = model(ids, inject=(v, start, layers, base))
    positions = torch.arange(L, device=dev)[None, :]
    mask = (positions >= start[:, None]) & (positions < lengths[:, None] - 1)
    h = hidden[:, :-1][mask[:, :-1]]
    targets = ids[:, 1:][mask[:, :-1]]
    logits = model.logits(h.float())
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def evaluate_loss(model, proj, preps, layers, alpha, dev, amp, batch):
    import torch
    out = {}
    was_training = proj.training
    proj.eval()  # no dropout (--arch attn) while measuring
    with torch.no_grad():
        for group, prep in preps.items():
            total, count = 0.0, 0
            n = prep.ids.shape[0]
            for s in range(0, n, batch):
                idx = torch.arange(s, min(n, s + batch), device=dev)
                loss, k = batch_loss(model, proj, [(prep, idx)], layers, alpha, dev, amp)
                total += float(loss)
                count += k
            out[group] = total / max(count, 1)
    proj.train(was_training)
    return out


def answer_f1(tok, prep, generated):
    texts = [pl.first_line(tok.decode(g)) for g in generated]
    return [pl.token_f1(t, it["answer"]) for t, it in zip(texts, prep.items)], texts


def final_f1(model, proj, tok, data, preps, layers, alpha, dev, args):
    """Greedy answers of the validation items, as eval answers (48 tokens, first line): none, trained (trigger at the
    item's j, after the model's own first j tokens), trained at j = 0, and prompt RAG (the j = 0 passages in the prompt)."""
    import torch
    results = {}
    samples = {}
    for group, (prep, prep0) in preps.items():
        stops = (pl.EOS, prep.newline)
        with torch.no_grad():
            v = alpha * proj(prep.c)
            v0 = alpha * proj(prep0.c)
        none = pl.greedy(model, prep.prompts, MAX_ANSWER_TOKENS, stop_ids=stops, batch=args.eval_batch)
        trained = pl.greedy(model, prep.prompts, MAX_ANSWER_TOKENS, inject=(v, layers), start_offsets=prep.js,
                            forced_prefixes=[o[:j] for o, j in zip(prep.own, prep.js)], stop_ids=stops, batch=args.eval_batch)
        trained0 = pl.greedy(model, prep0.prompts, MAX_ANSWER_TOKENS, inject=(v0, layers), start_offsets=[0] * len(prep0.prompts),
                             stop_ids=stops, batch=args.eval_batch)
        ctx_prompts = [[pl.BOS] + tok.encode(pl.context_string([data.passage_text[i] for i in ids]), False) + p[1:]
                       if ids else p for ids, p in zip(prep0.retrieved, prep0.prompts)]
        prompt = pl.greedy(model, ctx_prompts, MAX_ANSWER_TOKENS, stop_ids=stops, batch=args.eval_batch)
        row = {}
        for name, gen in (("none", none), ("trained", trained), ("trained_j0", trained0), ("prompt", prompt)):
            f1, texts = answer_f1(tok, prep, gen)
            row[name] = round(sum(f1) / max(len(f1), 1), 4)
            if name == "trained":
                samples[group] = [{"question": it["question"], "gold": it["answer"], "j": j, "answer": t}
                                  for it, j, t in list(zip(prep.items, prep.js, texts))[:4]]
        gain = row["prompt"] - row["none"]
        row["recovery"] = round((row["trained"] - row["none"]) / gain, 4) if gain > 0 else None
        row["recovery_j0"] = round((row["trained_j0"] - row["none"]) / gain, 4) if gain > 0 else None
        row["n"] = len(prep.items)
        results[group] = row
        log(f"validation F1 {group}: {json.dumps(row)}")
    return results, samples


def train(args, data):
    import torch
    torch.manual_seed(args.seed)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = dev.type == "cuda" and not args.fp32
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads or torch.get_num_threads())
    versions = {"torch": torch.__version__, "python": sys.version.split()[0], "sqlite": pl.sqlite3.sqlite_version}
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log(f"torch {torch.__version__}, device {device_name}, bf16 autocast {amp}")
    facts = {"versions": versions, "device": device_name}
    if not args.skip_forward_check:
        facts["forward_check_max_abs_logprob"] = check_forward(args.model, log)

    out_model = os.path.join(args.out, MODEL_REL)
    os.makedirs(out_model, exist_ok=True)
    work = tempfile.mkdtemp(prefix="projector-")
    index = Indexes(data, work)
    tok = pl.Tokenizer(os.path.join(args.model, "tokenizer.json"))
    log(f"tokenizer: {tok.backend}")
    model = pl.load_model(args.model, dev)
    hidden = model.hidden
    layers = [int(x) for x in args.layers.split(",")]
    newline = tok.encode("\n", False)[-1]
    cache = {}

    def own_cache(prompts):
        """The model's own greedy closed-book first answer tokens (no injection), up to the largest offset."""
        todo = sorted(p for p in {tuple(p) for p in prompts} if p not in cache)
        if todo:
            gen = pl.greedy(model, [list(p) for p in todo], max(args.offsets_map), stop_ids=(pl.EOS, newline),
                            batch=args.eval_batch)
            cache.update(zip(todo, gen))
        return [cache[tuple(p)] for p in prompts]

    rng = random.Random(args.seed + 7)
    t = time.time()
    train_preps = {g: prepare(model, tok, data, items, index, args, rng, dev, own_cache) for g, items in data.train.items()}
    val_preps = {g: prepare(model, tok, data, items, index, args, rng, dev, own_cache) for g, items in data.val.items()}
    val0_preps = {g: prepare(model, tok, data, items, index, args, rng, dev, own_cache, force_j=0) for g, items in data.val.items()}
    prep_stats = {}
    for name, preps in (("train", train_preps), ("val", val_preps), ("val_j0", val0_preps)):
        for g, p in preps.items():
            js = {}
            for j in p.js:
                js[str(j)] = js.get(str(j), 0) + 1
            prep_stats[f"{name}/{g}"] = {**retrieval_stats(p.items, p.retrieved), "j": js, "no_passages": p.empty,
                                         "own_prefix_is_gold": round(p.prefix_is_gold, 4),
                                         "tokens_per_sequence": round(float(p.lengths.float().mean()), 1)}
            log(f"prepared {name}/{g}: {json.dumps(prep_stats[f'{name}/{g}'])}")
    log(f"data prepared in {time.time() - t:.1f}s")

    if args.arch in READERS:
        length = int(args.context.split(":")[1])
        mu, sigma, n_rows = reader_row_stats([p.c for p in train_preps.values()], length, hidden)
        sigma = sigma.clamp_min(1e-6)
        log(f"{args.arch}: c read as {length} rows of {hidden}, standardised per dimension over the {n_rows} present rows "
            f"of the training c's (mean rows a bag {n_rows / sum(p.c.shape[0] for p in train_preps.values()):.1f})")
        proj = make_reader(args.arch, hidden, length, mu.to(dev), sigma.to(dev), args).to(dev)
    else:
        all_c = torch.cat([p.c for p in train_preps.values()])
        mu, sigma = all_c.mean(0), all_c.std(0)
        # embed-seq: a position few bags reach has a tiny spread; a floor at 1% of the mean keeps it from blowing up
        sigma = sigma.clamp_min(1e-6 if args.context == "embed-mean" else 0.01 * float(sigma.mean()))
        del all_c
        proj = make_projector(args.arch, hidden, args.inner, mu, sigma).to(dev)
    n_params = sum(p.numel() for p in proj.parameters())
    param_counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in proj.named_children()}
    param_counts.update({name: p.numel() for name, p in proj.named_parameters(recurse=False)})
    log(f"projector parameters: {n_params} ({', '.join(f'{k} {v}' for k, v in param_counts.items())})")
    opt = torch.optim.AdamW(proj.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    groups = list(train_preps)
    mix = {g: args.mix_map.get(g, 0.0) for g in groups}
    per_batch = {g: max(1, round(mix[g] * args.batch)) for g in groups if mix[g] > 0}
    log(f"projector {args.arch} ({n_params} parameters), layers {layers}, alpha {args.alpha}, batch {per_batch}, lr {args.lr}")

    budget = min(args.train_seconds, args.deadline - (time.time() - T0) - args.reserve_seconds)
    log(f"training budget {budget:.0f}s (deadline {args.deadline:.0f}s after start, {args.reserve_seconds:.0f}s kept for the end)")
    t_train = time.time()
    step, best, best_step, bad_evals = 0, float("inf"), 0, 0
    best_state = {k: v.detach().clone() for k, v in proj.state_dict().items()}
    history = []
    ema = None
    val = evaluate_loss(model, proj, val_preps, layers, args.alpha, dev, amp, args.eval_batch)
    history.append({"step": 0, "time_s": 0.0, "val": {k: round(v, 4) for k, v in val.items()}})
    log(f"step 0 (no injection): val NLL {json.dumps(history[-1]['val'])}")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    stopped = "time budget"
    while True:
        elapsed = time.time() - t_train
        if elapsed >= budget:
            break
        if step >= args.max_steps:
            stopped = "max steps"
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step >= args.warmup:
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        parts = [(train_preps[g], torch.randint(0, train_preps[g].ids.shape[0], (n,), device=dev, generator=gen))
                 for g, n in per_batch.items()]
        total, count = batch_loss(model, proj, parts, layers, args.alpha, dev, amp)
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
        opt.step()
        step += 1
        ema = float(loss) if ema is None else 0.95 * ema + 0.05 * float(loss)
        if step % args.eval_every == 0:
            val = evaluate_loss(model, proj, val_preps, layers, args.alpha, dev, amp, args.eval_batch)
            score = sum(val.values()) / len(val)
            improved = score < best - 1e-4
            if improved:
                best, best_step, bad_evals = score, step, 0
                best_state = {k: v.detach().clone() for k, v in proj.state_dict().items()}
            else:
                bad_evals += 1
            history.append({"step": step, "time_s": round(time.time() - t_train, 1), "lr": lr, "train_nll_ema": round(ema, 4),
                            "val": {k: round(v, 4) for k, v in val.items()}, "val_score": round(score, 4)})
            log(f"step {step} lr {lr:.2e} train NLL {ema:.4f} val {json.dumps(history[-1]['val'])} score {score:.4f}"
                f"{' *' if improved else ''} ({step / (time.time() - t_train):.1f} steps/s)")
            if bad_evals >= args.patience:
                stopped = f"early stop: no better validation score in {args.patience} evaluations"
                break
    train_time = time.time() - t_train
    log(f"trained {step} steps in {train_time:.0f}s ({stopped}); best validation score {best:.4f} at step {best_step}")
    proj.load_state_dict(best_state)
    proj.eval()

    path = os.path.join(out_model, "projector.safetensors")
    if args.arch == "poswise":
        path, size, roundtrip = None, None, None
        log("export skipped: ContextInjector's file format has no poswise projector (an experiment); the training facts "
            "are still written")
    else:
        tensors = proj.export()
        meta_extra = {"trained_by": "tools/projector/train_projector.py", "best_step": best_step}
        if args.arch == "attn":
            metadata = proj.attn_metadata(layers, args.alpha, meta_extra)
        else:
            metadata = pl.projector_metadata(args.arch, layers, args.alpha, "silu" if args.arch == "mlp" else None, meta_extra)
        metadata["context"] = args.context  # the engine refuses a file whose context it does not compute
        pl.write_safetensors(path, tensors, metadata)
        size = os.path.getsize(path)
        back = pl.load_tensors(path)
        _, back_metadata, _ = pl.read_safetensors_header(path)
        probe = torch.cat([p.c[:256] for p in val_preps.values()]).float().cpu()
        with torch.no_grad():
            expected = proj.cpu()(probe)
            got = apply_exported(back, probe, back_metadata)
        proj.to(dev)
        roundtrip = float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-12))
        log(f"wrote {path} ({size} bytes); exported file vs module: max relative difference {roundtrip:.2e}")
        if not roundtrip < 1e-4:
            raise SystemExit("the exported projector does not compute what was trained")
    with torch.no_grad():
        v_norms = (args.alpha * proj(torch.cat([p.c for p in val_preps.values()]))).norm(dim=-1)
    f1, samples = final_f1(model, proj, tok, data, {g: (val_preps[g], val0_preps[g]) for g in val_preps}, layers, args.alpha, dev, args)

    facts.update({
        "projector": {"file": os.path.join(MODEL_REL, "projector.safetensors") if path else None, "bytes": size, "kind": args.arch,
                      "inner": args.inner if args.arch == "mlp" else None, "activation": "silu" if args.arch == "mlp" else None,
                      "parameters": n_params, "parameters_by_part": param_counts, "layers": layers, "alpha": args.alpha,
                      **({"reader": READER_NOTES[args.arch],
                          "export": "kind attn, ContextInjector computes it" if args.arch == "attn"
                          else "skipped: the engine cannot run this projector",
                          **({"attn_layers": args.attn_layers, "attn_width": args.attn_width, "attn_heads": args.attn_heads,
                              "attn_queries": args.attn_queries, "dropout": args.dropout} if args.arch == "attn" else {})}
                         if args.arch in READERS else {}),
                      "context": CONTEXTS[args.context.split(":")[0]],
                      "injection": "added to the MoE output of each layer in `layers` (the residual stream after it) at every "
                                   "position from the one that predicts answer token j on",
                      "v_norm_val": {"mean": round(float(v_norms.mean()), 4), "max": round(float(v_norms.max()), 4)},
                      "export_roundtrip_max_rel_diff": roundtrip},
        "data": {**data.counts(), "prepared": prep_stats, "top_k": args.top_k, "offsets": args.offsets_map,
                 "mix": {g: round(w, 4) for g, w in mix.items()}, "invented_replace_rates": list(args.replace_rates),
                 "invented_definitions": args.invented_definitions,
                 "retrieval": "SQLite FTS5 replica of the engine's (projector_lib), over the taught and invented passages only",
                 "target": "the rest of the gold answer after the model's own first j tokens when they are the gold ones, "
                           "else the whole gold answer; then </s>; answers cut at 48 tokens"},
        "training": {"steps": step, "seconds": round(train_time, 1), "stopped": stopped, "best_step": best_step,
                     "best_val_score": round(best, 4), "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
                     "batch": per_batch, "schedule": "linear warm-up, then cosine to 0.1 x over the time budget",
                     "optimizer": "AdamW(0.9, 0.99), grad-norm clip 1", "precision": "bf16 autocast" if amp else "fp32",
                     "seed": args.seed, "eval_every": args.eval_every, "patience": args.patience,
                     "val_score": "mean over the validation groups of the answer NLL per token", "history": history},
        "validation_f1": f1, "samples": samples,
        "args": {k: v for k, v in vars(args).items() if k not in ("offsets_map", "mix_map")},
        "total_seconds": round(time.time() - T0, 1),
    })
    with open(os.path.join(out_model, "projector_training.json"), "w", encoding="utf-8") as f:
        json.dump(facts, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(f"wrote {os.path.join(out_model, 'projector_training.json')}; total {time.time() - T0:.0f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="projector-out", help="output root (files go under the repository's layout)")
    ap.add_argument("--model", default=os.path.join(ROOT, MODEL_REL))
    ap.add_argument("--corpus", default=os.path.join(ROOT, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"))
    ap.add_argument("--qa", default=os.path.join(ROOT, "assets", "eval", "wordnet-qa.jsonl"))
    ap.add_argument("--arch", choices=("mlp", "linear") + READERS, default="mlp",
                    help="mlp or linear (over embed-mean); with --context embed-seq:T only: attn (a small attention "
                         "encoder over the T rows, attention pooling; exported as the engine's kind attn) or poswise "
                         "(v = sum_t a_t * (W x_t) + b, W shared by the positions; an experiment, not exported)")
    ap.add_argument("--inner", type=int, default=1024, help="MLP width")
    ap.add_argument("--attn-layers", type=int, default=2, help="--arch attn: encoder layers")
    ap.add_argument("--attn-width", type=int, default=256, help="--arch attn: encoder width")
    ap.add_argument("--attn-heads", type=int, default=4, help="--arch attn: heads of each encoder layer")
    ap.add_argument("--attn-queries", type=int, default=4, help="--arch attn: learned pooling queries (concatenated)")
    ap.add_argument("--answer-positions", type=int, default=0,
                    help="--arch attn: K > 0 makes one vector for each of the first K answer tokens (its own queries), "
                         "added at the position that predicts that token, none after (the engine reads such a file but "
                         "does not inject it yet)")
    ap.add_argument("--dropout", type=float, default=0.1, help="--arch attn: dropout in the encoder")
    ap.add_argument("--layers", default="0,1,2,3", help="injection layers (the file names them; eval injects there)")
    ap.add_argument("--alpha", type=float, default=1.0, help="alpha in v = alpha * f(c) during training (written to the file)")
    ap.add_argument("--top-k", type=int, default=3, help="passages per retrieval (eval's --top-k)")
    ap.add_argument("--context", default="embed-mean",
                    help="c: embed-mean (the engine's for linear and mlp: mean of the passages' token embeddings); "
                         "embed-seq:T (the first T tokens' embeddings side by side; the engine computes it for --arch attn "
                         "only); an experiment the engine does not compute: hidden-mean:L (the passages' residual stream "
                         "after L layers, averaged)")
    ap.add_argument("--offsets", default="0:0.4,1:0.15,2:0.15,3:0.1,5:0.1,8:0.1",
                    help="answer token j at which the trigger fires, with weights")
    ap.add_argument("--mix", default="invented:0.5,reading_only:0.3,closed_book:0.2", help="share of each group in a batch")
    ap.add_argument("--invented", type=int, default=100000, help="invented terms for training")
    ap.add_argument("--invented-definitions", choices=("replace", "splice"), default="replace",
                    help="an invented term's definition: a taught term's with words replaced (replace), or the head of one "
                         "taught definition and the tail of another, then words replaced (splice: not a definition the "
                         "model has learnt)")
    ap.add_argument("--replace-rates", default=",".join(str(r) for r in REPLACE_RATES),
                    help="share of an invented definition's words replaced by words of taught definitions, one of these "
                         "chosen per term")
    ap.add_argument("--val-invented", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--eval-batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--train-seconds", type=float, default=170.0)
    ap.add_argument("--deadline", type=float, default=270.0, help="seconds after start by which training must end")
    ap.add_argument("--reserve-seconds", type=float, default=30.0, help="kept after training for export and validation F1")
    ap.add_argument("--max-steps", type=int, default=10 ** 9)
    ap.add_argument("--processes", type=int, default=min(16, os.cpu_count() or 1), help="retrieval threads")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads of torch on the CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on the GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="at most this many items per group (a quick trial run)")
    ap.add_argument("--skip-forward-check", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="data, splits and retrieval only (no torch)")
    ap.add_argument("--write-retrieval-fixture", default=None, help="with --dry-run: write the retrieval parity fixture here")
    args = ap.parse_args()
    kind, _, number = args.context.partition(":")
    if kind not in CONTEXTS or (kind == "embed-mean") != (number == "") or (number and not number.isdigit()):
        ap.error(f"--context {args.context}: embed-mean, embed-seq:T (T tokens) or hidden-mean:L (L layers)")
    if args.arch in READERS and kind != "embed-seq":
        ap.error(f"--arch {args.arch} reads the ordered rows of --context embed-seq:T; it cannot take --context {args.context}")
    if args.answer_positions and args.arch != "attn":
        ap.error("--answer-positions needs --arch attn")
    if args.answer_positions == 1 or args.answer_positions < 0:
        ap.error(f"--answer-positions {args.answer_positions}: 0 (one vector for every position) or K >= 2")
    text = args.replace_rates
    try:
        args.replace_rates = tuple(float(r) for r in text.split(","))
    except ValueError:
        ap.error(f"--replace-rates {text}: comma-separated shares such as 0,0.3,0.6")
    if any(not 0 <= r <= 1 for r in args.replace_rates):
        ap.error(f"--replace-rates {text}: each share must lie in 0..1")
    args.offsets_map = parse_weights(args.offsets, int)
    args.mix_map = parse_weights(args.mix, str)
    args.out = os.path.abspath(args.out)
    log(f"train_projector.py {' '.join(sys.argv[1:])}")

    data = Data(load_jsonl(args.corpus), load_jsonl(args.qa), args)
    log(f"data: {json.dumps(data.counts())}")
    problems = data.check_no_test_data()
    if problems:
        raise SystemExit("held-out data would be used:\n" + "\n".join(problems[:20]))
    log("check: no held-out question, answer, definition or passage is used; train and validation terms are disjoint")
    try:
        if args.dry_run:
            dry_run(args, data)
        else:
            train(args, data)
    finally:
        log_path = os.path.join(args.out, "tools", "projector", "train_projector.run.log")
        if not args.dry_run:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            with open(log_path, "w", encoding="utf-8") as f:
                f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
