#!/usr/bin/env python3
"""Build the WordNet demo corpus and the evaluation question files.

Reads the WordNet 3.0 database files installed by the Debian package
`wordnet-base` (/usr/share/wordnet/{index,data}.{noun,verb,adj,adv}) and writes

    assets/corpus/wordnet/wordnet-demo.jsonl.gz   one passage per term
    assets/corpus/wordnet/LICENSE-WordNet.txt     WordNet's licence notice
    assets/eval/wordnet-qa.jsonl                  "What is <term>?" for every term
    assets/eval/wordnet-qa-small.jsonl            20 taught + 20 held-out questions

Only the Python standard library is used.  Every random choice uses a fixed
seed, so running the script again gives byte-identical output.

Usage (from the repository root):
    apt-get install -y wordnet-base
    python3 tools/demo/build_corpus.py
"""

import argparse
import collections
import gzip
import io
import json
import os
import random
import re
import sys

POS_NAMES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
INDEX_FILES = ["index.noun", "index.verb", "index.adj", "index.adv"]
DATA_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj"}

TARGET_TOTAL = 5000
TARGET_SHARE = {"noun": 0.70, "verb": 0.15, "adj": 0.15}
SPLIT_SEED = 2026          # taught / held-out shuffle of the sorted term list
READING_SEED = 2027        # which taught terms are "reading only"
SELECT_SEED = 2025         # which candidates make up the demo subset
SMALL_SEED = 2028          # the 40-question smoke set
HELDOUT_SHARE = 0.20
READING_ONLY_SHARE = 0.25
MIN_DEF_WORDS, MAX_DEF_WORDS = 4, 25
MAX_EXAMPLE_CHARS = 160

# "quantum" has two noun senses in WordNet; the demo uses the physics one.
FORCED = {"quantum": ("noun", "05855517")}

TERM_RE = re.compile(r"^[a-z]{3,14}$")
QUOTE_RE = re.compile(r'"([^"]*)"')


def is_ascii_printable(s):
    return all(32 <= ord(c) <= 126 for c in s)


def sense_counts(wn_dir):
    """Number of synsets of every lemma across all four parts of speech."""
    counts = collections.Counter()
    for fn in INDEX_FILES:
        with open(os.path.join(wn_dir, fn), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # licence header
                parts = line.split()
                # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
                counts[parts[0]] += int(parts[2])
    return counts


def split_gloss(gloss):
    """WordNet gloss -> (definition, [examples]).  Examples are the quoted
    strings that follow the definition, separated by semicolons."""
    gloss = gloss.strip()
    q = gloss.find('"')
    if q < 0:
        definition, rest = gloss, ""
    else:
        definition, rest = gloss[:q], gloss[q:]
    definition = definition.strip().rstrip(";").strip()
    examples = [e.strip() for e in QUOTE_RE.findall(rest) if e.strip()]
    return definition, examples


def parse_data(path, pos_name):
    """Yield (offset, pos_name, [lemmas], definition, examples) for each synset."""
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset = fields[0]
            ss_type = fields[2]
            w_cnt = int(fields[3], 16)
            words = []
            for i in range(w_cnt):
                w = fields[4 + 2 * i]
                w = re.sub(r"\([a-z]+\)$", "", w)  # adjective position markers: (a) (p) (ip)
                words.append(w.replace("_", " "))
            assert POS_NAMES[ss_type] == pos_name or (pos_name == "adj" and ss_type in "as"), (path, line[:40])
            definition, examples = split_gloss(gloss)
            yield offset, pos_name, words, definition, examples


def passage_text(term, pos, definition, examples):
    text = f"{term} ({pos}): {definition}."
    if examples:
        ex = examples[0]
        if ex[-1] not in ".!?":
            ex += "."
        text += f" Example: {ex}"
    return text


def build(wn_dir):
    counts = sense_counts(wn_dir)
    candidates = {"noun": [], "verb": [], "adj": []}
    forced = {}
    for pos_name, fn in DATA_FILES.items():
        for offset, pos, words, definition, examples in parse_data(os.path.join(wn_dir, fn), pos_name):
            examples = [e for e in examples if is_ascii_printable(e) and len(e) <= MAX_EXAMPLE_CHARS]
            for w in words:
                if w in FORCED and FORCED[w] == (pos, offset):
                    forced[w] = dict(term=w, pos=pos, definition=definition, examples=examples)
            n_words = len(definition.split())
            if not (MIN_DEF_WORDS <= n_words <= MAX_DEF_WORDS) or not is_ascii_printable(definition):
                continue
            # At most one term per synset, so that no two passages share a definition.
            for w in words:
                if TERM_RE.match(w) and counts[w] == 1 and w not in FORCED:
                    candidates[pos].append(dict(term=w, pos=pos, definition=definition, examples=examples))
                    break
    missing = set(FORCED) - set(forced)
    if missing:
        sys.exit(f"forced terms not found: {sorted(missing)}")

    rng = random.Random(SELECT_SEED)
    n_forced = len(forced)
    chosen = list(forced.values())
    avail = {p: len(c) for p, c in candidates.items()}
    want = {p: round(TARGET_SHARE[p] * TARGET_TOTAL) for p in TARGET_SHARE}
    want["noun"] -= sum(1 for f in forced.values() if f["pos"] == "noun")
    for p in ("noun", "verb", "adj"):
        pool = sorted(candidates[p], key=lambda e: e["term"])
        rng.shuffle(pool)
        chosen.extend(pool[:min(want[p], len(pool))])
    chosen.sort(key=lambda e: e["term"])
    terms = [e["term"] for e in chosen]
    assert len(set(terms)) == len(terms)

    # Split: seeded shuffle of the sorted term list; the first 80 % are taught.
    order = list(terms)
    random.Random(SPLIT_SEED).shuffle(order)
    n_held = round(HELDOUT_SHARE * len(order))
    heldout = set(order[len(order) - n_held:])
    for f in forced:  # forced terms are always taught
        if f in heldout:
            heldout.remove(f)
            for t in order[:len(order) - n_held]:
                if t not in heldout and t not in forced:
                    heldout.add(t)
                    break
    # No held-out term may occur as a word in a taught passage (the model must never have seen it):
    # move such terms to the taught side until no taught passage mentions a held-out term.
    text_of = {e["term"]: passage_text(e["term"], e["pos"], e["definition"], e["examples"]) for e in chosen}
    words_of = {t: set(re.findall(r"[a-z]+", x.lower())) for t, x in text_of.items()}
    moved = []
    while True:
        hits = sorted({w for t in terms if t not in heldout for w in words_of[t]} & heldout)
        if not hits:
            break
        heldout -= set(hits)
        moved.extend(hits)
    taught = sorted(t for t in terms if t not in heldout)
    pool = [t for t in taught if t not in forced]
    random.Random(READING_SEED).shuffle(pool)
    reading_only = set(pool[:round(READING_ONLY_SHARE * len(taught))])

    records = []
    for e in chosen:
        t = e["term"]
        rec = {
            "id": f"wn-{e['pos']}-{t}",
            "term": t,
            "pos": e["pos"],
            "definition": e["definition"],
            "examples": e["examples"],
            "title": t,
            "text": passage_text(t, e["pos"], e["definition"], e["examples"]),
            "split": "heldout" if t in heldout else "taught",
            "reading_only": t in reading_only,
        }
        records.append(rec)
    stats = {"candidates": avail, "forced": n_forced, "moved_to_taught": moved}
    return records, stats


def qa_record(r):
    return {
        "id": f"qa-{r['term']}",
        "question": f"What is {r['term']}?",
        "answer": r["definition"],
        "passage_id": r["id"],
        "split": r["split"],
        "reading_only": r["reading_only"],
    }


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", default="/usr/share/wordnet")
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    ap.add_argument("--license", default="/usr/share/wordnet/data.noun",
                    help="file whose two-space header lines hold WordNet's licence")
    args = ap.parse_args()
    root = os.path.abspath(args.root)

    records, stats = build(args.wordnet)
    corpus_dir = os.path.join(root, "assets", "corpus", "wordnet")
    eval_dir = os.path.join(root, "assets", "eval")
    os.makedirs(corpus_dir, exist_ok=True)
    os.makedirs(eval_dir, exist_ok=True)

    # gzip with mtime 0 and no file name, so that the bytes are reproducible.
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    gz_path = os.path.join(corpus_dir, "wordnet-demo.jsonl.gz")
    with open(gz_path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as g:
            g.write(raw)

    # Licence: the notice as it appears in the header of every WordNet data file.
    lic = []
    with open(args.license, encoding="latin-1") as f:
        for line in f:
            if not line.startswith("  "):
                break
            m = re.match(r"^  \d+ ?(.*)$", line.rstrip("\n"))
            lic.append(m.group(1).rstrip() if m else line.strip())
    with open(os.path.join(corpus_dir, "LICENSE-WordNet.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lic).strip() + "\n")

    qa = [qa_record(r) for r in records]
    write_jsonl(os.path.join(eval_dir, "wordnet-qa.jsonl"), qa)
    rng = random.Random(SMALL_SEED)
    taught = [q for q in qa if q["split"] == "taught" and not q["reading_only"]]
    held = [q for q in qa if q["split"] == "heldout"]
    small = rng.sample(taught, 20) + rng.sample(held, 20)
    write_jsonl(os.path.join(eval_dir, "wordnet-qa-small.jsonl"), small)

    c = collections.Counter((r["pos"], r["split"]) for r in records)
    n_ro = sum(r["reading_only"] for r in records)
    n_ex = sum(1 for r in records if r["examples"])
    print(f"candidates per part of speech: {stats['candidates']}")
    print(f"held-out terms moved to taught because a taught passage mentions them: {len(stats['moved_to_taught'])}")
    print(f"terms: {len(records)}; by (pos, split): {dict(sorted(c.items()))}")
    print(f"taught {sum(r['split'] == 'taught' for r in records)} (reading only {n_ro}), "
          f"held out {sum(r['split'] == 'heldout' for r in records)}; with an example {n_ex}")
    print(f"wrote {gz_path} ({os.path.getsize(gz_path)} bytes, {len(raw)} uncompressed)")
    q = next(r for r in records if r["term"] == "quantum")
    print("quantum:", json.dumps(q, ensure_ascii=False))


if __name__ == "__main__":
    main()
