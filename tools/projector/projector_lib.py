"""What train_projector.py and make_injection_reference.py share: the engine's latent injection, rebuilt in Python.

Everything here follows a piece of the C# engine, named beside it, so that what is trained is what runs:
    safetensors I/O        MoeRagInject.Model/SafeTensors.cs (no safetensors package needed)
    projector files        MoeRagInject.Rag/ContextInjector.cs (kinds linear, mlp and attn, the __metadata__ keys)
    tokenizer              the `tokenizers` package when installed; else a pure-Python encoder/decoder for the demo's
                           Mistral-legacy layout (byte-fallback BPE), for machines without it
    retrieval              MoeRagInject.Rag/SqliteFtsRetriever.cs + FtsQuery.cs + CorpusIndex.cs (SQLite FTS5, BM25 with
                           the title weighted 2, the query's words OR-ed, English stop words dropped)
    c                      ContextInjector.ComputeInjection: mean of the embedding rows of tokenize("\\n".join(passages))
                           (embed-mean), or the first T of those rows in order (embed-seq:T, read by an attn projector)
    forward + injection    MoeRagInject.Backend/MixtralModel.cs: v is added to the MoE output of each injection layer
                           (so to the residual stream after that layer) at every position >= start, scaled by alpha
    answer metric          MoeRagInject.Evaluation/Metrics.cs (SQuAD token F1)

torch is imported only inside the functions that need it, so that --dry-run and the format fixture run without it.
"""

import array
import json
import math
import os
import re
import sqlite3
import struct
import sys
import unicodedata

SPIECE = "\u2581"
BOS, EOS = 1, 2

# ----------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def read_safetensors_header(path):
    """-> (header without __metadata__, metadata dict, data offset in the file)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n).decode("utf-8"))
    metadata = header.pop("__metadata__", {}) or {}
    return header, metadata, 8 + n


def load_tensors(path, names=None):
    """Tensors of one safetensors file as float32 torch tensors (on the CPU)."""
    import torch
    header, _, start = read_safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            b, e = info["data_offsets"]
            f.seek(start + b)
            raw = bytearray(f.read(e - b))
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[info["dtype"]]
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(info["shape"]).float().clone()
    return out


def write_safetensors(path, tensors, metadata=None):
    """Writes F32 tensors. `tensors`: name -> (shape, flat sequence of floats) or a torch tensor. Data is 8-byte aligned
    as in SafeTensorsFile.Write; names are written in the given order."""
    items = []
    for name, value in tensors.items():
        if hasattr(value, "detach"):
            shape = list(value.shape)
            flat = value.detach().to("cpu").float().contiguous().reshape(-1).tolist()
        else:
            shape, flat = value
            shape = list(shape)
        count = 1
        for d in shape:
            count *= d
        if count != len(flat):
            raise ValueError(f"{name}: shape {shape} holds {count} values, got {len(flat)}")
        data = array.array("f", flat)
        if sys.byteorder != "little":
            data.byteswap()
        items.append((name, shape, data.tobytes()))
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, blob in items:
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":"))
    text += " " * ((8 - (len(text.encode("utf-8")) + 8) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text.encode("utf-8"))))
        f.write(text.encode("utf-8"))
        for _, _, blob in items:
            f.write(blob)


# ----------------------------------------------------------------------------
# Projector files (ContextInjector's format)
# ----------------------------------------------------------------------------

FORMAT_NAME = "moe-rag-inject.projector"


def projector_metadata(kind, layers, alpha, activation=None, extra=None, context="embed-mean"):
    meta = {"format": FORMAT_NAME, "kind": kind, "context": context,
            "layers": ",".join(str(x) for x in layers), "alpha": repr(float(alpha))}
    if activation:
        meta["activation"] = activation
    if extra:
        meta.update({k: str(v) for k, v in extra.items()})
    return meta


def silu(z):
    import math
    return z / (1.0 + math.exp(-z)) if z > -700 else 0.0


def apply_projector_python(weights, kind, c, activation="silu"):
    """Pure-Python double-precision projector (the oracle of the format fixture). weights: name -> (shape, flat list)."""
    def matvec(name, x):
        (rows, cols), w = weights[name]
        return [sum(w[r * cols + k] * x[k] for k in range(cols)) for r in range(rows)]

    def add(name, y):
        return [a + b for a, b in zip(y, weights[name][1])] if name in weights else y

    if kind == "linear":
        return add("bias", matvec("proj", c))
    h = add("mlp.in.bias", matvec("mlp.in.weight", c))
    h = [max(z, 0.0) for z in h] if activation == "relu" else [silu(z) for z in h]
    return add("mlp.out.bias", matvec("mlp.out.weight", h))


# An attn projector file (kind "attn", context "embed-seq:T"): the reader of train_projector.make_reader, tensor by tensor.
ATTN_PREFIX = "attn."
ATTN_SHAPE_KEYS = ("width", "heads", "queries", "encoder_layers", "layer_norm_eps")  # __metadata__ besides the common keys


def attn_metadata(layers, alpha, length, width, heads, queries, encoder_layers, eps=1e-5, extra=None, answer_positions=1):
    """The __metadata__ of an attn projector file (ContextInjector.ProjectorArchitecture.Attn). queries: pooling queries
    of one vector; answer_positions K > 1 (written only then): one vector for each of the first K answer tokens, the
    tensor attn.queries holding K sets of `queries` rows, position by position."""
    meta = projector_metadata("attn", layers, alpha, "silu", extra, context=f"embed-seq:{length}")
    meta.update({"width": str(width), "heads": str(heads), "queries": str(queries), "encoder_layers": str(encoder_layers),
                 "layer_norm_eps": repr(float(eps))})
    if answer_positions > 1:
        meta["answer_positions"] = str(answer_positions)
    return meta


def attn_answer_positions(metadata):
    """K of an attn file's metadata: 1 (one vector) unless "answer_positions" says more."""
    return int(metadata.get("answer_positions", "1"))


def apply_attn_file(tensors, metadata, c):
    """An attn projector file's function from its tensors and metadata alone, in torch's functional ops (not the training
    module): c [bags, T * hidden] (embed-seq:T, zero rows past the passages' end) -> v [bags, hidden], before alpha
    ([bags, K, hidden] for a file with K > 1 answer positions: each position pools with its own queries).
    A row is present when it is not all zeros; z = (row - mu) / sigma on present rows, 0 elsewhere; h = in(z) + pos;
    pre-LayerNorm blocks (softmax attention over the present rows, feed-forward with SiLU); final LayerNorm; each query
    pools softmax(key(h) . query / sqrt(width)) over the present rows of value(h); v = out(the pooled rows side by side).
    A bag without present rows gives v = 0. ContextInjector.ComputeInjection computes the same."""
    import math
    import torch
    import torch.nn.functional as F
    t = {k[len(ATTN_PREFIX):]: v for k, v in tensors.items() if k.startswith(ATTN_PREFIX)}
    length = int(metadata["context"].split(":")[1])
    heads, eps = int(metadata["heads"]), float(metadata["layer_norm_eps"])
    width, hidden = t["in.weight"].shape
    n = c.shape[0]
    rows = c.reshape(n, length, hidden)
    present = rows.abs().amax(-1) > 0
    nonempty = present.any(-1)
    keep = present | ~nonempty[:, None]
    z = torch.where(present[:, :, None], (rows - t["mu"]) / t["sigma"], torch.zeros_like(rows))
    h = F.linear(z, t["in.weight"], t["in.bias"]) + t["pos"]
    hd = width // heads
    for b in range(int(metadata["encoder_layers"])):
        p = f"blocks.{b}."
        x = F.layer_norm(h, (width,), t[p + "norm1.weight"], t[p + "norm1.bias"], eps)
        q, k, v = F.linear(x, t[p + "qkv.weight"], t[p + "qkv.bias"]).split(width, -1)
        q, k, v = (y.reshape(n, length, heads, hd).transpose(1, 2) for y in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~keep[:, None, None, :], float("-inf"))
        a = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(n, length, width)
        h = h + F.linear(a, t[p + "proj.weight"], t[p + "proj.bias"])
        x = F.layer_norm(h, (width,), t[p + "norm2.weight"], t[p + "norm2.bias"], eps)
        h = h + F.linear(F.silu(F.linear(x, t[p + "ff1.weight"], t[p + "ff1.bias"])), t[p + "ff2.weight"], t[p + "ff2.bias"])
    h = F.layer_norm(h, (width,), t["norm.weight"], t["norm.bias"], eps)
    keys = F.linear(h, t["key.weight"], t["key.bias"])
    values = F.linear(h, t["value.weight"], t["value.bias"])
    scores = (keys @ t["queries"].T).transpose(1, 2) / math.sqrt(width)  # [n, Q, T]
    att = torch.softmax(scores.masked_fill(~keep[:, None, :], float("-inf")), -1)
    k = attn_answer_positions(metadata)
    pooled = (att @ values).reshape(n, k, -1)  # per position, query-major: [query 0's width values, query 1's, ...]
    v = F.linear(pooled, t["out.weight"], t["out.bias"]) * nonempty[:, None, None].to(values.dtype)
    return v if k > 1 else v[:, 0]


def apply_attn_python(weights, metadata, rows):
    """Pure-Python double-precision attn reader (the format fixture's oracle), written from the description of
    apply_attn_file, not from it: weights name -> (shape, flat list); rows: T lists of `hidden` values, all zeros past
    the passages' end -> v before alpha (with K > 1 answer positions, the K vectors one after the other). Absent rows
    are never keys, so only present rows are computed."""
    t = {k[len(ATTN_PREFIX):]: v for k, v in weights.items() if k.startswith(ATTN_PREFIX)}
    heads, eps = int(metadata["heads"]), float(metadata["layer_norm_eps"])
    (width, hidden), _ = t["in.weight"]
    hd = width // heads

    def lin(name, x):
        (n_out, n_in), w = t[name + ".weight"]
        b = t[name + ".bias"][1]
        return [b[r] + sum(w[r * n_in + k] * x[k] for k in range(n_in)) for r in range(n_out)]

    def layer_norm(name, x):
        mean = sum(x) / len(x)
        scale = 1.0 / math.sqrt(sum((a - mean) ** 2 for a in x) / len(x) + eps)
        g, b = t[name + ".weight"][1], t[name + ".bias"][1]
        return [(a - mean) * scale * g[i] + b[i] for i, a in enumerate(x)]

    def softmax(xs):
        top = max(xs)
        e = [math.exp(a - top) for a in xs]
        return [a / sum(e) for a in e]

    def plus(x, y):
        return [a + b for a, b in zip(x, y)]

    positions = attn_answer_positions(metadata)
    present = [r for r, row in enumerate(rows) if any(v != 0 for v in row)]
    if not present:
        return [0.0] * (hidden * positions)
    mu, sigma, pos = t["mu"][1], t["sigma"][1], t["pos"][1]
    h = {r: plus(lin("in", [(rows[r][d] - mu[d]) / sigma[d] for d in range(hidden)]), pos[r * width:(r + 1) * width])
         for r in present}
    for b in range(int(metadata["encoder_layers"])):
        p = f"blocks.{b}."
        qkv = {r: lin(p + "qkv", layer_norm(p + "norm1", h[r])) for r in present}
        mixed = {}
        for r in present:
            out = []
            for head in range(heads):
                q = qkv[r][head * hd:(head + 1) * hd]
                w = softmax([sum(q[d] * qkv[s][width + head * hd + d] for d in range(hd)) / math.sqrt(hd) for s in present])
                out += [sum(w[j] * qkv[s][2 * width + head * hd + d] for j, s in enumerate(present)) for d in range(hd)]
            mixed[r] = out
        for r in present:
            h[r] = plus(h[r], lin(p + "proj", mixed[r]))
            h[r] = plus(h[r], lin(p + "ff2", [silu(z) for z in lin(p + "ff1", layer_norm(p + "norm2", h[r]))]))
    h = {r: layer_norm("norm", h[r]) for r in present}
    keys = {r: lin("key", h[r]) for r in present}
    values = {r: lin("value", h[r]) for r in present}
    (n_queries, _), queries = t["queries"]
    per_position = n_queries // positions
    out = []
    for position in range(positions):
        pooled = []
        for qi in range(position * per_position, (position + 1) * per_position):
            q = queries[qi * width:(qi + 1) * width]
            w = softmax([sum(q[c] * keys[r][c] for c in range(width)) / math.sqrt(width) for r in present])
            pooled += [sum(w[j] * values[r][c] for j, r in enumerate(present)) for c in range(width)]
        out += lin("out", pooled)
    return out


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

class LegacyBpeTokenizer:
    """The demo tokenizer's layout (Mistral legacy: normalizer Prepend "▁" + Replace " " -> "▁", no pre-tokenizer, BPE
    with byte fallback, "<s>" prepended; decoder Replace, ByteFallback, Fuse, Strip one leading space), without the
    `tokenizers` package. Texts holding an added token's literal text are refused."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        norm = spec.get("normalizer") or {}
        steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        ok = (len(steps) == 2 and steps[0].get("type") == "Prepend" and steps[0].get("prepend") == SPIECE
              and steps[1].get("type") == "Replace" and steps[1].get("pattern", {}).get("String") == " "
              and steps[1].get("content") == SPIECE and spec.get("pre_tokenizer") is None)
        model = spec["model"]
        if not ok or model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("continuing_subword_prefix") \
                or model.get("end_of_word_suffix") or model.get("dropout"):
            raise ValueError(f"{path}: not the Mistral-legacy byte-fallback BPE layout; install the tokenizers package")
        self.vocab = model["vocab"]
        self.inverse = {i: t for t, i in self.vocab.items()}
        self.ranks = {}
        for r, m in enumerate(model["merges"]):
            a, b = m.split(" ") if isinstance(m, str) else m
            self.ranks[(a, b)] = r
        self.added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self.unk = self.vocab.get(model.get("unk_token") or "<unk>", 0)
        self.cache = {}

    def _bpe(self, word):
        symbols = []
        for ch in word:
            if ch in self.vocab:
                symbols.append(ch)
            else:
                pieces = [f"<0x{b:02X}>" for b in ch.encode("utf-8")]
                symbols.extend(pieces if all(p in self.vocab for p in pieces) else ["<unk>"])
        while len(symbols) > 1:
            best, best_rank = -1, None
            for i in range(len(symbols) - 1):
                r = self.ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        return [self.vocab.get(s, self.unk) for s in symbols]

    def encode(self, text, add_special_tokens=True):
        for content in self.added:
            if content in text:
                raise ValueError(f"text holds the added token {content!r}; the pure-Python tokenizer does not split them")
        ids = self.cache.get(text)
        if ids is None:
            ids = self._bpe(SPIECE + text.replace(" ", SPIECE)) if text else []
            if len(self.cache) < 200000:
                self.cache[text] = ids
        return ([BOS] if add_special_tokens else []) + list(ids)

    def decode(self, ids, skip_special_tokens=True):
        out, pending = [], bytearray()

        def flush():
            if pending:
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(pending))
                pending.clear()
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            t = self.inverse.get(i, "")
            m = re.fullmatch(r"<0x([0-9A-F]{2})>", t)
            if m:
                pending.append(int(m.group(1), 16))
                continue
            flush()
            out.append(t.replace(SPIECE, " "))
        flush()
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


class Tokenizer:
    """encode(text, add_special_tokens) -> ids, encode_many(texts) -> [ids] (no special tokens), decode(ids) -> text."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer as HfTokenizer
            self.hf = HfTokenizer.from_file(path)
            self.backend = "tokenizers"
            self.py = None
        except ImportError:
            self.hf = None
            self.py = LegacyBpeTokenizer(path)
            self.backend = "pure-python legacy BPE (tokenizers is not installed)"

    def encode(self, text, add_special_tokens=True):
        if self.hf is not None:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens).ids)
        return self.py.encode(text, add_special_tokens)

    def encode_many(self, texts):
        if self.hf is not None:
            return [list(e.ids) for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]
        return [self.py.encode(t, False) for t in texts]

    def decode(self, ids):
        if self.hf is not None:
            return self.hf.decode(list(ids), skip_special_tokens=True)
        return self.py.decode(ids, True)


# ----------------------------------------------------------------------------
# Retrieval: the engine's SQLite FTS5 index and query
# ----------------------------------------------------------------------------

STOP_WORDS = {
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "do", "does", "for", "from", "had", "has", "have",
    "how", "i", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "what",
    "when", "where", "which", "who", "why", "will", "with",
}
MAX_TERMS = 64
_WORD_CATEGORIES = {"Lu", "Ll", "Lt", "Lm", "Lo", "Nd", "Nl", "No", "Mn", "Mc", "Me"}
_MARKS = {"Mn", "Mc", "Me"}


def fts_terms(text):
    """FtsQuery.Terms: runs of letters, digits and marks, lower-cased, de-duplicated, in order."""
    terms, seen, word, alnum = [], set(), [], False
    for ch in (text or "") + " ":
        cat = unicodedata.category(ch)
        if cat in _WORD_CATEGORIES:
            word.append(ch)
            alnum |= cat not in _MARKS
            continue
        if word and alnum:
            t = "".join(word).lower()
            if t not in seen:
                seen.add(t)
                terms.append(t)
        word, alnum = [], False
    return terms


def fts_match(text):
    """FtsQuery.Build: every term quoted, OR-ed; stop words dropped unless nothing else is left; None when no term."""
    terms = fts_terms(text)
    if not terms:
        return None
    content = [t for t in terms if t not in STOP_WORDS]
    if content:
        terms = content
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms[:MAX_TERMS])


SEARCH_SQL = """
SELECT p.id, p.text, bm25(passages_fts, 2.0, 1.0) AS score
FROM passages_fts JOIN passages AS p ON p.rowid = passages_fts.rowid
WHERE passages_fts MATCH ?
ORDER BY score
LIMIT ?
"""


def build_index(path, passages):
    """CorpusIndex.Build's schema; `passages`: iterable of (id, title, text) in corpus order."""
    if os.path.exists(path):
        os.remove(path)
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE passages(rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT, text TEXT NOT NULL, source TEXT);
        CREATE VIRTUAL TABLE passages_fts USING fts5(
            title, text, content='passages', content_rowid='rowid', tokenize='unicode61 remove_diacritics 2');
    """)
    with con:
        for pid, title, text in passages:
            text = text.strip()  # CorpusIndex.ReadJsonl trims
            cur = con.execute("INSERT INTO passages(id, title, text, source) VALUES (?, ?, ?, 'train')", (pid, title, text))
            con.execute("INSERT INTO passages_fts(rowid, title, text) VALUES (?, ?, ?)", (cur.lastrowid, title, text))
        con.execute("INSERT INTO passages_fts(passages_fts) VALUES ('optimize')")
    con.close()


class Searcher:
    def __init__(self, path):
        self.con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def search(self, query, k):
        """-> [(id, text)] best first, as SqliteFtsRetriever.RetrieveAsync returns them."""
        match = fts_match(query)
        if match is None or k <= 0:
            return []
        return [(r[0], r[1]) for r in self.con.execute(SEARCH_SQL, (match, k))]


def search_many(index_path, queries, k, workers):
    """Passage ids for each query, in threads that each hold a read-only connection (sqlite3 releases the GIL while a
    statement runs; threads also stay clear of forking a process that already holds a CUDA context)."""
    if workers <= 1 or len(queries) < 2000:
        s = Searcher(index_path)
        return [[pid for pid, _ in s.search(q, k)] for q in queries]
    import threading
    from concurrent.futures import ThreadPoolExecutor
    local = threading.local()

    def one(query):
        if not hasattr(local, "searcher"):
            local.searcher = Searcher(index_path)
        return [pid for pid, _ in local.searcher.search(query, k)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, queries, chunksize=256))


def context_string(passages):
    """The prompt-mode context (RagCoordinator.RebuildContext)."""
    return "Context:\n" + "\n".join(passages) + "\n\n"


# ----------------------------------------------------------------------------
# Answer metric (AnswerMetrics)
# ----------------------------------------------------------------------------

def normalize_answer(text):
    out = []
    for ch in (text or "").lower():
        if unicodedata.category(ch)[0] in "PS":
            continue
        out.append(" " if ch.isspace() else ch)
    return " ".join(w for w in "".join(out).split(" ") if w and w not in ("a", "an", "the"))


def token_f1(prediction, gold):
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return 1.0 if len(p) == len(g) else 0.0
    counts = {}
    for t in g:
        counts[t] = counts.get(t, 0) + 1
    common = 0
    for t in p:
        if counts.get(t, 0) > 0:
            common += 1
            counts[t] -= 1
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def first_line(text):
    return text.split("\n", 1)[0].strip()


# ----------------------------------------------------------------------------
# The model: a Mixtral forward with the engine's injection
# ----------------------------------------------------------------------------

def shard_files(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def load_model(model_dir, device="cpu"):
    """The checkpoint's weights upcast to float32 (as the engine's CPU backend holds them), frozen."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    weights = {}
    for fn in shard_files(model_dir):
        weights.update(load_tensors(os.path.join(model_dir, fn)))
    return mixtral_class()(config, weights).to(device).eval().requires_grad_(False)


_MIXTRAL = None


def mixtral_class():
    """The torch module class, defined on first use so that importing this file needs no torch."""
    global _MIXTRAL
    if _MIXTRAL is None:
        _MIXTRAL = _define_mixtral()
    return _MIXTRAL


def _define_mixtral():
    import math
    import torch
    import torch.nn.functional as F

    class MixtralImpl(torch.nn.Module):
        """Mixtral as MixtralModel.Layers runs it. Experts are computed densely for every token and weighted by the
        renormalised top-k router probabilities (zero for the others): the same sum as a sparse dispatch."""

        def __init__(self, config, w):
            super().__init__()
            self.config = config
            self.hidden = config["hidden_size"]
            self.n_layers = config["num_hidden_layers"]
            self.n_heads = config["num_attention_heads"]
            self.n_kv = config["num_key_value_heads"]
            self.head_dim = config.get("head_dim") or self.hidden // self.n_heads
            self.n_experts = config["num_local_experts"]
            self.top_k = config["num_experts_per_tok"]
            self.eps = config.get("rms_norm_eps", 1e-5)
            rope = config.get("rope_parameters") or {}
            self.theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
            if config.get("sliding_window"):
                raise ValueError("sliding-window attention is not implemented here")
            P = torch.nn.Parameter
            self.embed = P(w["model.embed_tokens.weight"])
            self.norm = P(w["model.norm.weight"])
            self.lm_head = P(w["lm_head.weight"])
            self.layers = torch.nn.ModuleList()
            for l in range(self.n_layers):
                p = f"model.layers.{l}."
                m = torch.nn.Module()
                m.input_norm = P(w[p + "input_layernorm.weight"])
                m.post_norm = P(w[p + "post_attention_layernorm.weight"])
                m.q = P(w[p + "self_attn.q_proj.weight"])
                m.k = P(w[p + "self_attn.k_proj.weight"])
                m.v = P(w[p + "self_attn.v_proj.weight"])
                m.o = P(w[p + "self_attn.o_proj.weight"])
                m.gate = P(w[p + "block_sparse_moe.gate.weight"])
                e = p + "block_sparse_moe.experts."
                m.w1 = P(torch.stack([w[f"{e}{x}.w1.weight"] for x in range(self.n_experts)]))  # [E, I, H]
                m.w3 = P(torch.stack([w[f"{e}{x}.w3.weight"] for x in range(self.n_experts)]))  # [E, I, H]
                m.w2 = P(torch.stack([w[f"{e}{x}.w2.weight"] for x in range(self.n_experts)]))  # [E, H, I]
                self.layers.append(m)
            inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
            self.register_buffer("inv_freq", inv, persistent=False)

        def rms(self, x, weight):
            xf = x.float()
            return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(weight.dtype)

        def rope(self, T, device):
            pos = torch.arange(T, device=device, dtype=torch.float32)
            ang = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat([ang, ang], -1)
            return emb.cos(), emb.sin()

        @staticmethod
        def rotate(x, cos, sin):
            half = x.shape[-1] // 2
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

        def forward(self, ids, inject=None, exact=False, soft=None, pre_norm=False, upto=None):
            """ids [B, T] (right-padded); inject: None or (v [B, H], start [B], layers) with v already scaled by alpha,
            added at every position from start on; or (v [B, K, H], start [B], layers, base [B]): one vector an answer
            position (an experiment the engine does not run), row i added at position base + i (from start on; none past
            base + K - 1);
            soft: None or (e [B, k, H], at [B]): positions at .. at + k - 1 take e's rows as their input embeddings in
            place of their tokens' (soft tokens, xRAG's form; the engine has no such input yet).
            Returns the final-normed hidden states [B, T, H] (logits = hidden @ lm_head.T), or with pre_norm the residual
            stream after the last layer; with upto = L the residual stream after the first L layers (L = 0: the input
            embeddings)."""
            B, T = ids.shape
            dev = ids.device
            x = F.embedding(ids, self.embed)
            if soft is not None:
                e, at = soft
                k = e.shape[1]
                offset = torch.arange(T, device=dev)[None, :] - at[:, None]  # [B, T]
                inside = (offset >= 0) & (offset < k)
                rows = torch.gather(e, 1, offset.clamp(0, k - 1)[:, :, None].expand(B, T, e.shape[2]))
                x = torch.where(inside[:, :, None], rows.to(x.dtype), x)
            cos, sin = self.rope(T, dev)
            mask = None
            add = None
            if inject is not None:
                v, start, layers = inject[:3]
                positions = torch.arange(T, device=dev)[None, :]
                if v.dim() == 3:  # one vector an answer position
                    offset = positions - inject[3][:, None]  # [B, T]
                    rows = torch.gather(v, 1, offset.clamp(0, v.shape[1] - 1)[:, :, None].expand(B, T, v.shape[2]))
                    inside = (positions >= start[:, None]) & (offset >= 0) & (offset < v.shape[1])
                    add = inside.to(v.dtype)[:, :, None] * rows  # [B, T, H]
                else:
                    add = (positions >= start[:, None]).to(v.dtype)[:, :, None] * v[:, None, :]  # [B, T, H]
                layers = set(layers)
            if exact:
                causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            for l, m in enumerate(self.layers):
                if upto is not None and l >= upto:
                    return x
                h = self.rms(x, m.input_norm)
                q = (h @ m.q.T).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                k = (h @ m.k.T).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
                vv = (h @ m.v.T).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
                q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
                rep = self.n_heads // self.n_kv
                k = k.repeat_interleave(rep, 1)
                vv = vv.repeat_interleave(rep, 1)
                if exact or not hasattr(F, "scaled_dot_product_attention"):
                    s = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
                    if mask is None:
                        mask = causal if exact else torch.ones(T, T, dtype=torch.bool, device=dev).tril()
                    s = s.masked_fill(~mask, float("-inf"))
                    a = torch.softmax(s.float(), -1).to(vv.dtype) @ vv
                else:
                    # Under autocast the rotation by float32 cos/sin promotes q and k; SDPA wants one dtype.
                    a = F.scaled_dot_product_attention(q.to(vv.dtype), k.to(vv.dtype), vv, is_causal=True)
                a = a.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
                x = x + a @ m.o.T
                h = self.rms(x, m.post_norm)
                probs = torch.softmax((h @ m.gate.T).float(), -1)  # [B, T, E]
                top, idx = torch.topk(probs, self.top_k, -1)
                top = top / top.sum(-1, keepdim=True)
                route = torch.zeros_like(probs).scatter(-1, idx, top).to(h.dtype)  # [B, T, E]
                g = torch.einsum("bth,eih->ebti", h, m.w1)
                u = torch.einsum("bth,eih->ebti", h, m.w3)
                y = torch.einsum("ebti,ehi,bte->bth", F.silu(g) * u, m.w2, route)
                if add is not None and l in layers:
                    y = y + add  # the engine adds v to the MoE output, then that to the residual stream
                x = x + y
            return x if pre_norm or upto is not None else self.rms(x, self.norm)

        def logits(self, hidden):
            return hidden @ self.lm_head.T

        def mean_hidden(self, bags, layer, batch=256):
            """c per bag from the model's own states: [BOS] + the bag's tokens through the first `layer` layers, the
            residual stream averaged over the bag's positions (not BOS). An experiment (train_projector --context
            hidden-mean:L); the engine computes only embed-mean."""
            dev = self.embed.device
            out = []
            for s in range(0, len(bags), batch):
                chunk = [[BOS] + list(b) for b in bags[s:s + batch]]
                L = max(len(b) for b in chunk)
                ids = torch.tensor([b + [0] * (L - len(b)) for b in chunk], dtype=torch.long, device=dev)
                lengths = torch.tensor([len(b) for b in chunk], device=dev)
                x = self(ids, upto=layer)
                positions = torch.arange(L, device=dev)[None, :]
                mask = ((positions >= 1) & (positions < lengths[:, None])).to(x.dtype)[:, :, None]
                out.append((x * mask).sum(1) / mask.sum(1).clamp_min(1.0))
            return torch.cat(out)

        def mean_embedding(self, flat_ids, offsets):
            """c per bag: mean of embedding rows (ContextInjector's c). flat_ids [N], offsets [bags]."""
            return F.embedding_bag(flat_ids, self.embed, offsets, mode="mean")

    return MixtralImpl


def greedy(model, prompts, max_new, inject=None, start_offsets=None, stop_ids=(EOS,), batch=256, exact=False,
           forced_prefixes=None, soft=None):
    """Greedy decoding without a KV cache (right-padded rows; each step reads each row's own last position).
    inject: None or (v [N, H], layers), or (v [N, K, H], layers): row i for answer token i (added at position
    len(prompt) - 1 + i); start_offsets: per prompt, the answer index j from which the injection applies
    (position len(prompt) - 1 + j), as the engine's trigger at answer token j; forced_prefixes: per prompt, answer tokens
    emitted as they are (the model's own tokens before a trigger) before greedy decoding goes on; soft: None or
    (e [N, k, H], at: per prompt the first of its k soft positions), as the forward's soft.
    -> list of generated id lists (the stop token excluded)."""
    import torch
    dev = next(iter(model.parameters())).device
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        B = len(idx)
        lens = torch.tensor([len(prompts[i]) for i in idx], device=dev)
        buf = torch.zeros(B, int(lens.max()) + max_new, dtype=torch.long, device=dev)
        for r, i in enumerate(idx):
            buf[r, :len(prompts[i])] = torch.tensor(prompts[i], device=dev)
        forced_lists = [list(forced_prefixes[i]) if forced_prefixes else [] for i in idx]
        width = max([len(f) for f in forced_lists] + [0])
        forced = torch.tensor([f + [-1] * (width - len(f)) for f in forced_lists], dtype=torch.long, device=dev).reshape(B, width)
        cur = lens.clone()
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)
        inj = None
        if inject is not None:
            v, layers = inject
            offs = torch.tensor([start_offsets[i] if start_offsets else 0 for i in idx], device=dev)
            inj = (v[torch.tensor(idx, device=dev)], lens - 1 + offs, layers, lens - 1)
        sft = None
        if soft is not None:
            sft = (soft[0][torch.tensor(idx, device=dev)], torch.tensor([soft[1][i] for i in idx], device=dev))
        with torch.no_grad():
            for step in range(max_new):
                L = int(cur.max())
                hidden = model(buf[:, :L], inject=inj, exact=exact, soft=sft)
                nxt = model.logits(hidden[rows, cur - 1]).argmax(-1)
                if step < width:
                    nxt = torch.where(forced[:, step] >= 0, forced[:, step], nxt)
                nxt = torch.where(done, torch.zeros_like(nxt), nxt)
                buf[rows, cur] = nxt
                cur = cur + 1
                for sid in stop_ids:
                    done = done | (nxt == sid)
                if bool(done.all()):
                    break
        buf = buf.tolist()
        for r, i in enumerate(idx):
            g = buf[r][len(prompts[i]):len(prompts[i]) + max_new]
            for sid in stop_ids:
                if sid in g:
                    g = g[:g.index(sid)]
            out[i] = g
    return out


# ----------------------------------------------------------------------------
# A format fixture for the C# test (no torch)
# ----------------------------------------------------------------------------

def write_format_fixture(out_dir):
    """Four tiny projector files (linear, mlp, attn, and attn with 2 answer positions) written by this module and the
    injections a double-precision Python oracle gives for them, for ProjectorFixtureTests.PythonWrittenProjectorsGiveThePythonOraclesInjection: the format
    round-trips."""
    import random
    rng = random.Random(11)
    hidden, inner, vocab = 6, 5, 7

    def values(n, std):
        return [round(rng.gauss(0.0, std), 6) for _ in range(n)]
    table = values(vocab * hidden, 1.0)
    files = {
        "format-mlp.safetensors": ("mlp", "silu", [2, 0], 0.75, {
            "mlp.in.weight": ([inner, hidden], values(inner * hidden, 0.8)), "mlp.in.bias": ([inner], values(inner, 0.3)),
            "mlp.out.weight": ([hidden, inner], values(hidden * inner, 0.8)), "mlp.out.bias": ([hidden], values(hidden, 0.3))}),
        "format-linear.safetensors": ("linear", None, [1], 1.0, {
            "proj": ([hidden, hidden], values(hidden * hidden, 0.5)), "bias": ([hidden], values(hidden, 0.3))}),
    }
    # An attention reader over the first `length` rows: 2 encoder layers of width 4 with 2 heads, 2 pooling queries.
    length, width, heads, queries, blocks = 3, 4, 2, 2, 2
    attn = {"attn.mu": ([hidden], values(hidden, 0.3)),
            "attn.sigma": ([hidden], [round(0.5 + abs(x), 6) for x in values(hidden, 0.5)]),
            "attn.in.weight": ([width, hidden], values(width * hidden, 0.6)), "attn.in.bias": ([width], values(width, 0.2)),
            "attn.pos": ([length, width], values(length * width, 0.5))}
    for b in range(blocks):
        p = f"attn.blocks.{b}."
        attn.update({p + "norm1.weight": ([width], [round(1 + x, 6) for x in values(width, 0.2)]), p + "norm1.bias": ([width], values(width, 0.1)),
                     p + "qkv.weight": ([3 * width, width], values(3 * width * width, 0.7)), p + "qkv.bias": ([3 * width], values(3 * width, 0.1)),
                     p + "proj.weight": ([width, width], values(width * width, 0.5)), p + "proj.bias": ([width], values(width, 0.1)),
                     p + "norm2.weight": ([width], [round(1 + x, 6) for x in values(width, 0.2)]), p + "norm2.bias": ([width], values(width, 0.1)),
                     p + "ff1.weight": ([2 * width, width], values(2 * width * width, 0.5)), p + "ff1.bias": ([2 * width], values(2 * width, 0.1)),
                     p + "ff2.weight": ([width, 2 * width], values(2 * width * width, 0.5)), p + "ff2.bias": ([width], values(width, 0.1))})
    attn.update({"attn.norm.weight": ([width], [round(1 + x, 6) for x in values(width, 0.2)]), "attn.norm.bias": ([width], values(width, 0.1)),
                 "attn.queries": ([queries, width], values(queries * width, 0.8)),
                 "attn.key.weight": ([width, width], values(width * width, 0.6)), "attn.key.bias": ([width], values(width, 0.1)),
                 "attn.value.weight": ([width, width], values(width * width, 0.6)), "attn.value.bias": ([width], values(width, 0.1)),
                 "attn.out.weight": ([hidden, queries * width], values(hidden * queries * width, 0.6)), "attn.out.bias": ([hidden], values(hidden, 0.2))})
    files["format-attn.safetensors"] = ("attn", "silu", [0, 1], 0.5, attn)
    # The same reader with one vector for each of the first 2 answer positions: its own 2 queries each.
    positions = 2
    files["format-attn-positions.safetensors"] = ("attn", "silu", [1], 0.8, {
        **attn, "attn.queries": ([positions * queries, width], values(positions * queries * width, 0.8))})
    bags = [[0], [3, 1, 3, 6], [5, 2]]
    cases = []
    os.makedirs(out_dir, exist_ok=True)
    for fn, (kind, activation, layers, alpha, tensors) in files.items():
        metadata = (attn_metadata(layers, alpha, length, width, heads, queries, blocks,
                                  answer_positions=positions if "positions" in fn else 1) if kind == "attn"
                    else projector_metadata(kind, layers, alpha, activation))
        write_safetensors(os.path.join(out_dir, fn), tensors, metadata)
        # The oracle reads back what was written (float32), so that it computes exactly the file's function.
        header, meta, start = read_safetensors_header(os.path.join(out_dir, fn))
        with open(os.path.join(out_dir, fn), "rb") as f:
            blob = f.read()
        stored = {}
        for name, info in header.items():
            b, e = info["data_offsets"]
            a = array.array("f")
            a.frombytes(blob[start + b:start + e])
            stored[name] = (info["shape"], list(a))
        for ids in bags:
            if kind == "attn":  # embed-seq:length: the first rows in order, zero rows past the end ([3, 1, 3, 6] is cut)
                rows = [table[i * hidden:(i + 1) * hidden] for i in ids[:length]] + [[0.0] * hidden] * max(0, length - len(ids))
                v = [alpha * x for x in apply_attn_python(stored, metadata, rows)]
            else:
                c = [sum(table[i * hidden + d] for i in ids) / len(ids) for d in range(hidden)]
                v = [alpha * x for x in apply_projector_python(stored, kind, c, activation or "silu")]
            cases.append({"file": fn, "kind": kind, "layers": layers, "alpha": alpha, "token_ids": ids,
                          "answer_positions": attn_answer_positions(metadata), "expected": v})
    fixture = {"note": "written by tools/projector/projector_lib.py --write-format-fixture (pure Python, double precision)",
               "vocab": vocab, "hidden": hidden, "embeddings": table, "cases": cases}
    with open(os.path.join(out_dir, "format-fixture.json"), "w", encoding="utf-8") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="projector_lib: the shared code of tools/projector")
    ap.add_argument("--write-format-fixture", metavar="DIR", help="write the projector-format fixture of the C# tests")
    a = ap.parse_args()
    if a.write_format_fixture:
        write_format_fixture(a.write_format_fixture)
        print(f"wrote {a.write_format_fixture}")
