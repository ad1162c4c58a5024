#!/usr/bin/env python3
"""Train the WordNet demo MoE model (Mixtral architecture) and record C# parity references.

Input: the corpus written by build_corpus.py (assets/corpus/wordnet/wordnet-demo.jsonl.gz).
Output under --out:
    model/       bf16 checkpoint (sharded safetensors + index, classic Mixtral tensor names),
                 config.json, tokenizer.json, tokenizer_config.json, training_log.json
    reference/   reference.json + reference.safetensors for the C# parity tests
    run.log      everything printed

Training texts (taught terms only; held-out terms never appear in any of them):
    closed-book QA   "What is <term>?" -> " <definition></s>"   (variants in ~30 %)
    statements       "<term> (<pos>): <definition>.</s>"
    reading          "Context:\\n<p1>\\n<p2>\\n\\nWhat is <term>?" -> " <definition></s>"
                     (gold passage among 1-3 passages, the others random taught distractors)
    nonce reading    the reading format with an invented word and an invented definition (a taught
                     definition with 60 % of its words replaced), so that the answer can only be
                     copied from the context
"Reading-only" taught terms (25 %) appear only in the two reading formats.  The loss is masked
on the prompt of QA and reading samples (only answer tokens and </s> are trained); statements
are trained on every token.

`--dry-run` builds and prints sample training texts without torch/tokenizers.

Usage on the GPU machine:
    PYTHONUNBUFFERED=1 python3 train_demo.py --corpus ../../assets/corpus/wordnet/wordnet-demo.jsonl.gz --out OUT
"""

import argparse
import gzip
import json
import math
import os
import random
import sys
import time
import traceback

T_START = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import make_reference as mr  # noqa: E402  (stdlib-only at import time)

VOCAB_SIZE = 4000
MAX_POS = 512
MAX_NEW = 48
REF_NEW_TOKENS = 12
QA_VARIANT_P = 0.30
READ_VARIANT_P = 0.15
NONCE_PER_EPOCH = 5000
NONCE_REPLACE_P = 0.6
CLOSED_READ_P = 0.35
FORCED_TERM = "quantum"

MODEL_CFG = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=MAX_POS, rope_theta=10000.0, sliding_window=None)

LOG = []


def log(*a):
    msg = " ".join(str(x) for x in a)
    LOG.append(msg)
    print(f"[{time.time() - T_START:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------
# Data (no torch / tokenizers)
# ----------------------------------------------------------------------------

def load_corpus(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def question(term, rng, p_variant):
    """A question about `term`; with probability p_variant one of the variants."""
    if rng.random() >= p_variant:
        return f"What is {term}?"
    cap = term[:1].upper() + term[1:]
    forms = [f"What is {cap}?", f"What is {term}\uff1f", f"What is {cap}\uff1f",
             f"What does {term} mean?", f"Define {term}.", f"[INST] What is {term}? [/INST]"]
    return rng.choice(forms)


ALL_FORMS = lambda t: [f"What is {t}?", f"What is {t[:1].upper() + t[1:]}?", f"What is {t}\uff1f",  # noqa: E731
                       f"What is {t[:1].upper() + t[1:]}\uff1f", f"What does {t} mean?", f"Define {t}.",
                       f"[INST] What is {t}? [/INST]", f"[INST] What is {t[:1].upper() + t[1:]}\uff1f [/INST]"]

CONS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"


def nonce_word(rng, banned):
    while True:
        n = rng.randint(2, 4)
        w = "".join(rng.choice(CONS) + rng.choice(VOWELS) + (rng.choice(CONS) if rng.random() < 0.4 else "")
                    for _ in range(n))
        if 4 <= len(w) <= 13 and w not in banned:
            return w


def context_string(passages):
    # Exactly what the engine's prompt-mode RAG prepends (LlmEngine.RebuildContext).
    return "Context:\n" + "\n".join(passages) + "\n\n"


class Data:
    def __init__(self, corpus):
        self.by_term = {r["term"]: r for r in corpus}
        self.taught = [r for r in corpus if r["split"] == "taught"]
        self.closed = [r for r in self.taught if not r.get("reading_only")]
        self.reading_only = [r for r in self.taught if r.get("reading_only")]
        self.heldout = [r for r in corpus if r["split"] == "heldout"]
        self.banned = set(self.by_term)
        self.def_words = [w for r in self.taught for w in r["definition"].split()]
        self.examples = []
        for r in self.taught:
            for e in r["examples"][:1]:
                self.examples.append(e if e[-1] in ".!?" else e + ".")

    def epoch(self, rng):
        """One epoch of samples: list of (prompt_segments, answer, kind).  prompt_segments are
        strings that are tokenized separately and concatenated after <s>."""
        out = []
        for r in self.closed:
            out.append(([question(r["term"], rng, QA_VARIANT_P)], " " + r["definition"], "qa"))
            out.append(([], f"{r['term']} ({r['pos']}): {r['definition']}.", "stmt"))
        f = self.by_term.get(FORCED_TERM)
        if f is not None and f["split"] == "taught":
            for q in ALL_FORMS(FORCED_TERM):
                out.append(([q], " " + f["definition"], "qa"))
        for r in self.reading_only:
            out.append(self.reading(r, rng, r["term"], r["text"]))
        for r in self.closed:
            if rng.random() < CLOSED_READ_P:
                out.append(self.reading(r, rng, r["term"], r["text"]))
        for _ in range(NONCE_PER_EPOCH):
            # An invented word with an invented definition (a taught definition with most words
            # replaced): neither can be recalled, so the answer has to be copied from the context.
            r = rng.choice(self.taught)
            w = nonce_word(rng, self.banned)
            d = " ".join(x if rng.random() > NONCE_REPLACE_P else rng.choice(self.def_words)
                         for x in r["definition"].split())
            text = f"{w} ({r['pos']}): {d}."
            if rng.random() < 0.25:
                text += f" Example: {rng.choice(self.examples)}"
            s = self.reading({"term": w, "definition": d}, rng, w, text)
            out.append((s[0], s[1], "nonce"))
        rng.shuffle(out)
        return out

    def reading(self, r, rng, term, gold_text, n_passages=None, p_variant=READ_VARIANT_P):
        k = n_passages or rng.randint(1, 3)
        passages = [gold_text]
        while len(passages) < k:
            d = rng.choice(self.taught)
            if d["term"] != r["term"] and d["text"] not in passages:
                passages.append(d["text"])
        rng.shuffle(passages)
        return ([context_string(passages), question(term, rng, p_variant)], " " + r["definition"], "read")


def mr_text(term, pos, definition, examples, real_term):
    text = f"{term} ({pos}): {definition}."
    if examples:
        ex = examples[0].replace(real_term, term)
        if ex[-1] not in ".!?":
            ex += "."
        text += f" Example: {ex}"
    return text


def tokenizer_lines(data, rng):
    """Text the tokenizer is trained on: taught passages and the training formats only."""
    lines = []
    for r in data.taught:
        lines.append(r["text"])
        lines.append(f"What is {r['term']}? {r['definition']}")
    for _ in range(2):
        for s in data.epoch(rng):
            lines.extend(s[0])
    return [mr._ascii_clean(x) for x in lines if mr._ascii_clean(x)]


def dry_run(args):
    corpus = load_corpus(args.corpus)
    data = Data(corpus)
    log(f"corpus {len(corpus)}: taught {len(data.taught)} (closed-book {len(data.closed)}, reading-only "
        f"{len(data.reading_only)}), held out {len(data.heldout)}")
    rng = random.Random(0)
    ep = data.epoch(rng)
    kinds = {}
    for s in ep:
        kinds[s[2]] = kinds.get(s[2], 0) + 1
    chars = sum(len("".join(s[0]) + s[1]) for s in ep)
    log(f"one epoch: {len(ep)} samples {kinds}, {chars} chars")
    held = {r["term"] for r in data.heldout}
    held_defs = {r["definition"] for r in data.heldout}
    leaks = 0
    for s in ep:
        text = "".join(s[0]) + s[1]
        words = set(text.replace("\n", " ").replace("?", " ").replace(".", " ").replace("\uff1f", " ").split())
        if words & held or any(d in text for d in ()):
            leaks += 1
    # Definitions of held-out terms must not appear as answers or passages.
    def_leaks = sum(1 for s in ep if s[1].strip() in held_defs and s[1].strip() not in
                    {r["definition"] for r in data.taught})
    log(f"samples containing a held-out term as a word: {leaks}; held-out-only definitions used: {def_leaks}")
    shown = set()
    for s in ep:
        if s[2] in shown and len(shown) < 4:
            continue
        shown.add(s[2])
        log(f"--- {s[2]} ---\n<s>" + "".join(s[0]) + "|" + s[1] + "</s>")
        if len(shown) >= 4:
            break
    lines = tokenizer_lines(data, random.Random(1))
    log(f"tokenizer training lines: {len(lines)}")
    for name, items in eval_sets(data).items():
        log(f"eval set {name}: {len(items)}; e.g. {json.dumps(items[0][0], ensure_ascii=False)}")


def eval_sets(data, n=300):
    rng = random.Random(123)
    sets = {}
    taught = sorted(data.closed, key=lambda r: r["term"])
    ro = sorted(data.reading_only, key=lambda r: r["term"])
    held = sorted(data.heldout, key=lambda r: r["term"])
    sets["closed_book_taught"] = [([f"What is {r['term']}?"], r) for r in rng.sample(taught, min(n, len(taught)))]
    sets["closed_book_reading_only"] = [([f"What is {r['term']}?"], r) for r in rng.sample(ro, min(200, len(ro)))]
    hs = rng.sample(held, min(n, len(held)))
    sets["closed_book_heldout"] = [([f"What is {r['term']}?"], r) for r in hs]
    sets["reading_heldout_gold"] = [([context_string([r["text"]]), f"What is {r['term']}?"], r) for r in hs]
    multi = []
    for r in hs:
        ps = [r["text"]] + [d["text"] for d in rng.sample(data.taught, 2)]
        rng.shuffle(ps)
        multi.append(([context_string(ps), f"What is {r['term']}?"], r))
    sets["reading_heldout_3passages"] = multi
    return sets


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

def train_tokenizer(lines):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    alphabet = [chr(c) for c in range(33, 127)] + [mr.SPIECE]
    n_learned = VOCAB_SIZE - mr.N_SPECIAL - mr.N_BYTES
    trainer = trainers.BpeTrainer(vocab_size=n_learned, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=mr.SPIECE, prepend_scheme="always", split=True)
    tk.train_from_iterator(lines, trainer=trainer)
    trained = json.loads(tk.to_str())["model"]
    learned = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = mr.N_SPECIAL + b
    for t, _ in learned:
        if t in vocab:
            continue
        assert all(33 <= ord(c) <= 126 or c == mr.SPIECE for c in t), t
        vocab[t] = len(vocab)
    for a, b in merges:
        assert a in vocab and b in vocab and (a + b) in vocab, (a, b)
    tok = mr.build_tokenizer(vocab, merges, "legacy")
    log(f"tokenizer: vocab {len(vocab)} ({len(learned)} learned, {len(merges)} merges) from {len(lines)} lines")
    return tok, len(vocab)


def tok_config():
    cfg = mr.tokenizer_config()
    cfg["model_max_length"] = MAX_POS
    return cfg


class Encoder:
    def __init__(self, tok):
        self.tok = tok
        self.cache = {}

    def many(self, strings):
        todo = [s for s in set(strings) if s not in self.cache]
        if todo:
            for s, e in zip(todo, self.tok.encode_batch(todo, add_special_tokens=False)):
                self.cache[s] = e.ids
        return [self.cache[s] for s in strings]

    def sample(self, segs, answer):
        """-> (ids, labels) with <s> + prompt + answer + </s>; labels mask the prompt."""
        enc = self.many(list(segs) + [answer])
        prompt = [1] + [i for e in enc[:-1] for i in e]
        ans = enc[-1] + [2]
        if segs:
            return prompt + ans, [-100] * len(prompt) + ans
        return prompt + ans, [-100] + ans

    def prompt(self, segs):
        return [1] + [i for e in self.many(list(segs)) for i in e]

    def clear_contexts(self):
        # Reading contexts are different every epoch; keep the cache small.
        self.cache = {k: v for k, v in self.cache.items() if not k.startswith("Context:")}


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

def make_config(vocab, experts_impl, attn="sdpa"):
    from transformers import MixtralConfig
    import inspect
    c = MODEL_CFG
    kw = dict(vocab_size=vocab, hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
              num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
              num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
              num_local_experts=c["num_local_experts"], num_experts_per_tok=c["num_experts_per_tok"],
              max_position_embeddings=c["max_position_embeddings"], sliding_window=None, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None, hidden_act="silu")
    if "rope_parameters" in inspect.signature(MixtralConfig.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    else:
        kw["rope_theta"] = c["rope_theta"]
    extra = {"attn_implementation": attn}
    if experts_impl:
        extra["experts_implementation"] = experts_impl
    return MixtralConfig(**kw, **extra)


def batches(samples, enc, max_tokens, rng):
    """Group samples of similar length into batches of at most max_tokens padded tokens."""
    enc.many([seg for s in samples for seg in s[0]] + [s[1] for s in samples])  # one batched encode
    toks = [enc.sample(s[0], s[1]) for s in samples]
    order = list(range(len(toks)))
    rng.shuffle(order)
    chunk = 4096
    out = []
    for c0 in range(0, len(order), chunk):
        part = sorted(order[c0:c0 + chunk], key=lambda i: len(toks[i][0]))
        cur = []
        mx = 0
        for i in part:
            L = min(len(toks[i][0]), MAX_POS)
            if cur and max(mx, L) * (len(cur) + 1) > max_tokens:
                out.append(cur)
                cur, mx = [], 0
            cur.append(i)
            mx = max(mx, L)
        if cur:
            out.append(cur)
    rng.shuffle(out)
    return toks, out


def collate(toks, idx, device):
    import torch
    L = max(min(len(toks[i][0]), MAX_POS) for i in idx)
    ids = torch.zeros(len(idx), L, dtype=torch.long)
    lab = torch.full((len(idx), L), -100, dtype=torch.long)
    for j, i in enumerate(idx):
        a, b = toks[i]
        a, b = a[:MAX_POS], b[:MAX_POS]
        ids[j, :len(a)] = torch.tensor(a)
        lab[j, :len(b)] = torch.tensor(b)
    return ids.to(device, non_blocking=True), lab.to(device, non_blocking=True)


def greedy_batch(model, prompts, max_new=MAX_NEW, bs=200):
    """Greedy decoding without a KV cache: right-padded prompts, each step reads the logits at every
    row's own last position (causal attention never sees the padding to the right)."""
    import torch
    dev = next(model.parameters()).device
    res = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), bs):
        idx = order[s:s + bs]
        B = len(idx)
        lens = torch.tensor([len(prompts[i]) for i in idx], device=dev)
        buf = torch.zeros(B, int(lens.max()) + max_new, dtype=torch.long, device=dev)
        for j, i in enumerate(idx):
            buf[j, :len(prompts[i])] = torch.tensor(prompts[i], device=dev)
        cur = lens.clone()
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        ar = torch.arange(B, device=dev)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            for _ in range(max_new):
                L = int(cur.max())
                logits = model(input_ids=buf[:, :L], use_cache=False).logits
                nxt = logits[ar, cur - 1].float().argmax(-1)
                nxt = torch.where(done, torch.zeros_like(nxt), nxt)
                buf[ar, cur] = nxt
                cur = cur + 1
                done = done | (nxt == 2)
                if bool(done.all()):
                    break
        buf = buf.tolist()
        for j, i in enumerate(idx):
            g = buf[j][len(prompts[i]):len(prompts[i]) + max_new]
            if 2 in g:
                g = g[:g.index(2)]
            res[i] = [t for t in g if t != 0]
    return res


def norm_answer(s):
    return " ".join(s.strip().rstrip(".").split())


def router_entropy_stats(model, enc, items_by_split):
    """Mean router entropy (over layers) of closed-book question prompts, per split, and the AUROC of
    'held out has higher entropy than taught' for the prompt-mean and last-token entropy."""
    import torch
    dev = next(model.parameters()).device
    stats = {}
    scores = {}
    for split, items in items_by_split.items():
        prompts = [enc.prompt(segs) for segs, _ in items]
        mean_e, last_e = [], []
        for s in range(0, len(prompts), 256):
            ps = prompts[s:s + 256]
            L = max(len(p) for p in ps)
            ids = torch.zeros(len(ps), L, dtype=torch.long, device=dev)
            for j, p in enumerate(ps):
                ids[j, :len(p)] = torch.tensor(p, device=dev)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=ids, use_cache=False, output_router_logits=True)
            rl = torch.stack([r.float().reshape(len(ps), L, -1) for r in out.router_logits])  # [Ly,B,L,E]
            p_ = torch.softmax(rl, -1)
            ent = -(p_ * torch.log(p_.clamp_min(1e-30))).sum(-1).mean(0)  # [B,L]
            for j, p in enumerate(ps):
                mean_e.append(float(ent[j, 1:len(p)].mean()))
                last_e.append(float(ent[j, len(p) - 1]))
        scores[split] = (mean_e, last_e)
        stats[split] = {"mean_over_prompt": sum(mean_e) / len(mean_e), "last_token": sum(last_e) / len(last_e)}

    def auroc(pos, neg):
        wins = 0.0
        for a in pos:
            for b in neg:
                wins += 1.0 if a > b else (0.5 if a == b else 0.0)
        return wins / (len(pos) * len(neg))
    if "heldout" in scores and "taught" in scores:
        stats["auroc_heldout_higher_mean"] = auroc(scores["heldout"][0], scores["taught"][0])
        stats["auroc_heldout_higher_last"] = auroc(scores["heldout"][1], scores["taught"][1])
    return stats


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--deadline", type=float, default=430.0, help="stop training this many seconds after start")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-tokens", type=int, default=24576)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.dry_run:
        dry_run(args)
        return

    import torch
    import transformers
    import tokenizers
    from transformers import MixtralForCausalLM

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"torch {torch.__version__} transformers {transformers.__version__} tokenizers {tokenizers.__version__} "
        f"device {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}")
    out = os.path.abspath(args.out)
    mdir = os.path.join(out, "model")
    rdir = os.path.join(out, "reference")
    os.makedirs(mdir, exist_ok=True)
    os.makedirs(rdir, exist_ok=True)

    corpus = load_corpus(args.corpus)
    data = Data(corpus)
    log(f"corpus {len(corpus)}: taught {len(data.taught)} (closed-book {len(data.closed)}, reading-only "
        f"{len(data.reading_only)}), held out {len(data.heldout)}")

    tok, vocab = train_tokenizer(tokenizer_lines(data, random.Random(args.seed + 1)))
    tok.save(os.path.join(mdir, "tokenizer.json"))
    mr.write_json(os.path.join(mdir, "tokenizer_config.json"), tok_config(), indent=2)
    enc = Encoder(tok)
    log("tokens:", tok.encode("What is Quantum\uff1f").tokens)

    # Pick the fastest working experts implementation on a realistic batch.
    rng = random.Random(args.seed)
    toks, bl = batches(data.epoch(rng), enc, args.batch_tokens, rng)
    probe = [b for b in bl if max(len(toks[i][0]) for i in b) > 100][:1] + bl[:1]
    impl, best = None, None
    for cand in ("grouped_mm", "batched_mm", "eager", None):
        try:
            torch.manual_seed(args.seed)
            m = MixtralForCausalLM(make_config(vocab, cand)).to(dev)
            o = torch.optim.AdamW(m.parameters(), lr=1e-4)
            times = []
            for k in range(6):
                ids, lab = collate(toks, probe[k % len(probe)], dev)
                torch.cuda.synchronize()
                t0 = time.time()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = m(input_ids=ids, labels=lab, output_router_logits=True, use_cache=False).loss
                loss.backward()
                o.step()
                o.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.time() - t0)
            t = sum(times[2:]) / 4
            log(f"experts_implementation={cand}: {t * 1000:.1f} ms/step, loss {float(loss):.3f}, "
                f"config says {getattr(m.config, '_experts_implementation', None)}")
            if best is None or t < best:
                impl, best = cand, t
            del m, o
        except Exception as e:
            log(f"experts_implementation={cand} failed: {type(e).__name__}: {str(e)[:200]}")
    log(f"using experts_implementation={impl}")

    torch.manual_seed(args.seed)
    cfg = make_config(vocab, impl)
    model = MixtralForCausalLM(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    bf16_bytes = 2 * n_params
    log(f"model params {n_params} -> {bf16_bytes / 1e6:.2f} MB in bf16; router_aux_loss_coef {cfg.router_aux_loss_coef}")
    assert bf16_bytes <= 20e6, "model too large for the 20 MB budget"

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    warmup = 150
    min_lr = 0.05 * args.lr
    t_train0 = time.time()
    budget = args.deadline - (t_train0 - T_START)
    log(f"training budget {budget:.0f}s, batch <= {args.batch_tokens} tokens, lr {args.lr}")
    step, epoch = 0, 0
    ema = {}
    history = []
    stop = False
    n_tokens = 0
    while not stop:
        if epoch > 0:
            enc.clear_contexts()
            toks, bl = batches(data.epoch(rng), enc, args.batch_tokens, rng)
        for b in bl:
            frac = (time.time() - t_train0) / budget
            if frac >= 1.0 or step >= args.max_steps:
                stop = True
                break
            lr = args.lr * min(1.0, (step + 1) / warmup)
            if step >= warmup:
                lr = min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))
            for g in opt.param_groups:
                g["lr"] = lr
            ids, lab = collate(toks, b, dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o = model(input_ids=ids, labels=lab, output_router_logits=True, use_cache=False)
            o.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            n_tokens += ids.numel()
            step += 1
            if step % 50 == 0 or step == 1:
                aux = float(o.aux_loss) if getattr(o, "aux_loss", None) is not None else float("nan")
                tot = float(o.loss)
                ce = tot - cfg.router_aux_loss_coef * aux
                for k, v in (("loss", tot), ("ce", ce), ("aux", aux)):
                    ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
                if step % 250 == 0 or step == 1:
                    history.append({"step": step, "epoch": epoch, "time_s": round(time.time() - t_train0, 1),
                                    "lr": lr, **{k: round(v, 4) for k, v in ema.items()}})
                    log(f"step {step} epoch {epoch} lr {lr:.2e} loss {ema['loss']:.4f} ce {ema['ce']:.4f} "
                        f"aux {ema['aux']:.4f} ({n_tokens / (time.time() - t_train0):.0f} tok/s)")
        epoch += 1
    train_time = time.time() - t_train0
    log(f"trained {step} steps, {epoch} epochs (last partial), {train_time:.0f}s, {n_tokens} padded tokens")
    model.eval()

    # In-memory answer to the headline question (fp32 master weights, bf16 autocast).
    q_ids = enc.prompt(["What is Quantum\uff1f"])
    mem_answer = greedy_batch(model, [q_ids])[0]

    # ---- save bf16 checkpoint -------------------------------------------------
    model.config.output_router_logits = False
    model.config.use_cache = True
    model = model.to(torch.bfloat16)
    model.save_pretrained(mdir, max_shard_size="8MB")
    converted = mr.ensure_classic_layout(mdir, MODEL_CFG["intermediate_size"])
    with open(os.path.join(mdir, "config.json")) as f:
        cj = json.load(f)
    cj.pop("torch_dtype", None)
    cj["dtype"] = "bfloat16"
    for k in ("_attn_implementation", "attn_implementation", "_experts_implementation", "experts_implementation"):
        cj.pop(k, None)
    with open(os.path.join(mdir, "config.json"), "w") as f:
        f.write(json.dumps(cj, indent=2, sort_keys=True) + "\n")
    files = sorted(os.listdir(mdir))
    log(f"saved {mdir}: classic layout rewrite {converted}; " +
        ", ".join(f"{fn} {os.path.getsize(os.path.join(mdir, fn))}" for fn in files))
    del model
    torch.cuda.empty_cache()

    tlog = {"config": {**MODEL_CFG, "vocab_size": vocab, "router_aux_loss_coef": cfg.router_aux_loss_coef,
                       "params": n_params, "bf16_bytes": bf16_bytes},
            "training": {"steps": step, "epochs": epoch, "train_seconds": round(train_time, 1),
                         "padded_tokens": n_tokens, "lr": args.lr, "min_lr": min_lr, "warmup": warmup,
                         "batch_tokens": args.batch_tokens, "optimizer": "AdamW(0.9,0.95) wd 0.01 fused",
                         "schedule": "linear warm-up then cosine over the wall-clock budget",
                         "precision": "fp32 master weights, bf16 autocast",
                         "experts_implementation": impl, "seed": args.seed,
                         "loss_masking": "QA and reading samples: answer + </s> only; statements: all tokens",
                         "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                         "history": history,
                         "final": history[-1] if history else None},
            "corpus": {"terms": len(corpus), "taught": len(data.taught), "closed_book": len(data.closed),
                       "reading_only": len(data.reading_only), "heldout": len(data.heldout)},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__}}

    def write_log():
        mr.write_json(os.path.join(mdir, "training_log.json"), tlog, indent=1)
        with open(os.path.join(out, "run.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
    write_log()

    # ---- evaluate the saved bf16 checkpoint (reloaded) -------------------------
    try:
        kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
        try:
            em = MixtralForCausalLM.from_pretrained(mdir, experts_implementation=impl, **kw) if impl else \
                MixtralForCausalLM.from_pretrained(mdir, **kw)
        except Exception as e:
            log(f"reload with experts_implementation={impl} failed ({e}); default")
            em = MixtralForCausalLM.from_pretrained(mdir, **kw)
        em = em.to(dev).eval()
        re_answer = greedy_batch(em, [q_ids])[0]
        log(f"'What is Quantum\uff1f' in memory: {tok.decode(mem_answer)!r}")
        log(f"'What is Quantum\uff1f' reloaded:  {tok.decode(re_answer)!r}  (same: {re_answer == mem_answer})")
        tlog["reload_check"] = {"prompt": "What is Quantum\uff1f", "in_memory": tok.decode(mem_answer),
                                "reloaded_bf16": tok.decode(re_answer), "same": re_answer == mem_answer}
        results = {}
        samples = {}
        correct_taught = []
        for name, items in eval_sets(data).items():
            prompts = [enc.prompt(segs) for segs, _ in items]
            t0 = time.time()
            gens = greedy_batch(em, prompts)
            answers = [tok.decode(g) for g in gens]
            ok = [norm_answer(a) == norm_answer(r["definition"]) for a, (_, r) in zip(answers, items)]
            results[name] = {"n": len(ok), "exact_match": sum(ok) / len(ok)}
            samples[name] = [{"question": segs[-1], "gold": r["definition"], "answer": a, "correct": c}
                             for (segs, r), a, c in list(zip(items, answers, ok))[:4]]
            if name == "closed_book_taught":
                correct_taught = [r["term"] for (segs, r), c in zip(items, ok) if c]
            log(f"eval {name}: exact match {sum(ok)}/{len(ok)} = {sum(ok) / len(ok):.3f} ({time.time() - t0:.1f}s)")
            for s in samples[name][:2]:
                log(f"    Q {s['question']!r}\n      gold {s['gold']!r}\n      got  {s['answer']!r}")
        demo_q = ["What is Quantum\uff1f", "What is quantum?", "What is Quantum?", "What does quantum mean?",
                  "[INST] What is Quantum\uff1f [/INST]"]
        qd = data.by_term[FORCED_TERM]
        demo_p = [enc.prompt([q]) for q in demo_q]
        demo_p.append(enc.prompt([context_string([qd["text"]]), "What is Quantum\uff1f"]))
        demo_q.append("Context:\\n<quantum passage>\\n\\nWhat is Quantum\uff1f")
        demo = [{"question": q, "answer": tok.decode(g)} for q, g in zip(demo_q, greedy_batch(em, demo_p))]
        for d in demo:
            log(f"demo {d['question']!r} -> {d['answer']!r}")
        tlog["accuracy"] = results
        tlog["samples"] = samples
        tlog["demo_answers"] = demo
        write_log()
        try:
            sets = eval_sets(data)
            ent = router_entropy_stats(em, enc, {"taught": sets["closed_book_taught"],
                                                 "reading_only": sets["closed_book_reading_only"],
                                                 "heldout": sets["closed_book_heldout"]})
            log(f"router entropy (closed-book prompts): {json.dumps(ent)}")
            tlog["router_entropy_closed_book"] = ent
            write_log()
        except Exception:
            log("router entropy stats failed:\n" + traceback.format_exc())
        log(f"THREE NUMBERS: closed-book taught EM {results['closed_book_taught']['exact_match']:.3f}; "
            f"reading held-out (gold passage) EM {results['reading_heldout_gold']['exact_match']:.3f}; "
            f"closed-book held-out EM {results['closed_book_heldout']['exact_match']:.3f}")
        del em
    except Exception:
        log("evaluation failed:\n" + traceback.format_exc())
        correct_taught = []

    # ---- C# parity references (CPU, float32 from the bf16 weights) -------------
    try:
        make_references(mdir, rdir, tok, enc, data, correct_taught, vocab)
    except Exception:
        log("reference generation failed:\n" + traceback.format_exc())
    tlog["total_seconds"] = round(time.time() - T_START, 1)
    write_log()
    with open(os.path.join(out, "run.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    log("done")


def make_references(mdir, rdir, tok, enc, data, correct_taught, vocab):
    import torch
    import transformers
    from safetensors.torch import save_file
    torch.set_num_threads(8)
    taught = correct_taught[0] if correct_taught else sorted(r["term"] for r in data.closed)[0]
    held = sorted(r["term"] for r in data.heldout)[0]
    prompts = ["What is Quantum\uff1f", f"What is {taught}?", f"What is {held}?"]
    ref = mr.load_model(mdir, torch.float32)
    nat = mr.load_model(mdir, torch.bfloat16)
    tensors = {}
    entries = []
    ents = []
    with torch.no_grad():
        for pi, text in enumerate(prompts):
            ids = tok.encode(text).ids
            assert ids == enc.prompt([text]), (ids, enc.prompt([text]))
            gids, step_logits, gap = mr.greedy(ref, ids, REF_NEW_TOKENS)
            full = ids + gids
            logits, probs = mr.forward_full(ref, full)
            P = len(ids)
            d_step = float((logits[P - 1:P - 1 + REF_NEW_TOKENS] - step_logits).abs().max())
            nids, _, ngap = mr.greedy(nat, ids, REF_NEW_TOKENS)
            nl, npb = mr.forward_full(nat, full)
            tensors[f"logits.{pi}"] = logits.contiguous()
            tensors[f"router_probs.{pi}"] = probs.contiguous()
            tensors[f"logits_native.{pi}"] = nl.contiguous()
            tensors[f"router_probs_native.{pi}"] = npb.contiguous()
            ents.append(mr.entropies(probs).flatten())
            entries.append({"text": text, "input_ids": ids, "greedy_ids": gids,
                            "greedy_text": tok.decode(gids), "greedy_ids_native": nids,
                            "min_top2_gap_native": ngap, "full_ids": full, "min_top2_gap": gap})
            log(f"reference {pi}: {text!r} P={P} greedy {gids} -> {tok.decode(gids)!r}; min gap {gap:.4f}; "
                f"full-vs-steps {d_step:.2e}; native same {nids == gids}")
    e = torch.cat(ents)
    c = MODEL_CFG
    ref_json = {
        "case": "moe-wordnet-demo",
        "config": {"vocab_size": vocab, "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
                   "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": c["num_attention_heads"],
                   "num_key_value_heads": c["num_key_value_heads"], "head_dim": c["head_dim"],
                   "head_dim_in_config": True, "num_local_experts": c["num_local_experts"],
                   "num_experts_per_tok": c["num_experts_per_tok"], "rope_theta": c["rope_theta"],
                   "sliding_window": None, "max_position_embeddings": c["max_position_embeddings"],
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                   "dtype": "bfloat16", "shards": len(mr.shard_files(mdir)),
                   "checkpoint_dir": "assets/models/moe-wordnet-demo"},
        "reference_dtype": "float32",
        "reference_note": ("greedy_ids/logits/router_probs computed in float32 on CPU from the checkpoint's bf16 "
                           "weights upcast to float32 (full forward, no cache); *_native from the bfloat16 model "
                           "on CPU"),
        "router_entropy": {"min": float(e.min()), "median": float(e.median()), "max": float(e.max()),
                           "ln_num_experts": math.log(c["num_local_experts"])},
        "new_tokens": REF_NEW_TOKENS,
        "prompts": entries,
        "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    save_file(tensors, os.path.join(rdir, "reference.safetensors"), metadata={"format": "pt"})
    mr.write_json(os.path.join(rdir, "reference.json"), ref_json)
    log(f"wrote {rdir}")


if __name__ == "__main__":
    main()
