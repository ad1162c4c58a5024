using System.Collections.Concurrent;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;

namespace MoeRagInject.Model.Tokenization;

/// <summary>
/// The BPE model of <c>tokenizer.json</c>: rank-ordered merges over the characters of a word, with SentencePiece-style
/// byte fallback (<c>&lt;0xNN&gt;</c> tokens) and an optional (fused) unknown token.
/// </summary>
internal sealed class BpeModel
{
    private const int CacheCapacity = 10_000;
    private const int CacheMaxWordLength = 256;

    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _vocabBySpan;
    private readonly Dictionary<long, Merge> _merges;
    private readonly int[] _byteIds = new int[256];
    private readonly bool _byteFallback;
    private readonly bool _fuseUnk;
    private readonly bool _ignoreMerges;
    private readonly string? _unkToken;
    private readonly string? _prefix;
    private readonly string? _suffix;
    private readonly ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, int[]>.AlternateLookup<ReadOnlySpan<char>> _cacheBySpan;
    private int _cacheCount;

    [ThreadStatic] private static WordScratch? t_scratch;

    private readonly record struct Merge(int Rank, int NewId);

    private BpeModel(Dictionary<string, int> vocab, Dictionary<long, Merge> merges, bool byteFallback, bool fuseUnk,
        bool ignoreMerges, string? unkToken, string? prefix, string? suffix)
    {
        _vocab = vocab;
        _vocabBySpan = vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        _merges = merges;
        _byteFallback = byteFallback;
        _fuseUnk = fuseUnk;
        _ignoreMerges = ignoreMerges;
        _unkToken = unkToken;
        _prefix = prefix;
        _suffix = suffix;
        _cacheBySpan = _cache.GetAlternateLookup<ReadOnlySpan<char>>();
        for (int b = 0; b < 256; b++)
            _byteIds[b] = vocab.TryGetValue(ByteTokenName(b), out int id) ? id : -1;
        MaxId = -1;
        foreach (int id in vocab.Values) MaxId = Math.Max(MaxId, id);
    }

    /// <summary>The token → id map of the model (added tokens not included).</summary>
    public IReadOnlyDictionary<string, int> Vocab => _vocab;

    public int MaxId { get; }

    public static string ByteTokenName(int b) => string.Create(CultureInfo.InvariantCulture, $"<0x{b:X2}>");

    public static BpeModel FromJson(JsonElement model, TokenizerJson json)
    {
        if (model.ValueKind != JsonValueKind.Object) throw json.Invalid("\"model\" must be a JSON object");
        string type = model.TryGetProperty("type", out var t) && t.ValueKind == JsonValueKind.String
            ? t.GetString()!
            : model.TryGetProperty("merges", out _) ? "BPE" : "(none)";
        if (type != "BPE") throw json.Unsupported("model", type);
        const string where = "model";

        if (!TokenizerJson.IsNullOrMissing(model, "dropout", out var dropout) &&
            (dropout.ValueKind != JsonValueKind.Number || dropout.GetDouble() != 0.0))
            throw json.Invalid($"model.dropout {dropout.GetRawText()} is not supported (deterministic encoding only)");

        if (TokenizerJson.IsNullOrMissing(model, "vocab", out var vocabEl) || vocabEl.ValueKind != JsonValueKind.Object)
            throw json.Invalid("model has no \"vocab\" object");
        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var prop in vocabEl.EnumerateObject())
            vocab[prop.Name] = json.ToInt(prop.Value, $"model.vocab[\"{prop.Name}\"]");

        string? prefix = json.OptionalString(model, "continuing_subword_prefix", where);
        string? suffix = json.OptionalString(model, "end_of_word_suffix", where);
        if (prefix?.Length == 0) prefix = null;
        if (suffix?.Length == 0) suffix = null;

        var merges = new Dictionary<long, Merge>();
        if (!TokenizerJson.IsNullOrMissing(model, "merges", out var mergesEl))
        {
            if (mergesEl.ValueKind != JsonValueKind.Array) throw json.Invalid("model.merges must be an array");
            int rank = 0;
            foreach (var m in mergesEl.EnumerateArray())
            {
                string a, b;
                if (m.ValueKind == JsonValueKind.String)
                {
                    string line = m.GetString()!;
                    if (line.StartsWith("#version", StringComparison.Ordinal)) continue;
                    int sp = line.IndexOf(' ', StringComparison.Ordinal);
                    if (sp < 0 || line.IndexOf(' ', sp + 1) >= 0)
                        throw json.Invalid($"model.merges[{rank}] \"{line}\" is not two tokens separated by one space");
                    a = line[..sp];
                    b = line[(sp + 1)..];
                }
                else if (m.ValueKind == JsonValueKind.Array && m.GetArrayLength() == 2 &&
                         m[0].ValueKind == JsonValueKind.String && m[1].ValueKind == JsonValueKind.String)
                {
                    a = m[0].GetString()!;
                    b = m[1].GetString()!;
                }
                else
                {
                    throw json.Invalid($"model.merges[{rank}] must be a \"a b\" string or a [a, b] pair, found {m.GetRawText()}");
                }

                if (!vocab.TryGetValue(a, out int idA)) throw json.Invalid($"model.merges[{rank}]: token \"{a}\" is not in the vocab");
                if (!vocab.TryGetValue(b, out int idB)) throw json.Invalid($"model.merges[{rank}]: token \"{b}\" is not in the vocab");
                string bPart = prefix != null && b.StartsWith(prefix, StringComparison.Ordinal) ? b[prefix.Length..] : b;
                string merged = a + bPart;
                if (!vocab.TryGetValue(merged, out int newId))
                    throw json.Invalid($"model.merges[{rank}]: merged token \"{merged}\" is not in the vocab");
                merges[PairKey(idA, idB)] = new Merge(rank, newId);
                rank++;
            }
        }

        string? unk = json.OptionalString(model, "unk_token", where);
        return new BpeModel(vocab, merges,
            json.OptionalBool(model, "byte_fallback", false, where),
            json.OptionalBool(model, "fuse_unk", false, where),
            json.OptionalBool(model, "ignore_merges", false, where),
            unk, prefix, suffix);
    }

    private static long PairKey(int a, int b) => ((long)a << 32) | (uint)b;

    public bool TryGetId(string token, out int id) => _vocab.TryGetValue(token, out id);

    /// <summary>Appends the ids of one pre-tokenized word.</summary>
    public void Tokenize(ReadOnlySpan<char> word, List<int> output)
    {
        if (word.IsEmpty) return;
        if (_ignoreMerges && _vocabBySpan.TryGetValue(word, out int whole))
        {
            output.Add(whole);
            return;
        }
        if (_cacheBySpan.TryGetValue(word, out var cached))
        {
            output.AddRange(cached);
            return;
        }
        var scratch = t_scratch ??= new WordScratch();
        scratch.Reset();
        BuildSymbols(word, scratch);
        MergeAll(scratch);
        int start = output.Count;
        for (int i = 0; i < scratch.Count; i++)
            if (scratch.Symbols[i].Alive) output.Add(scratch.Symbols[i].Id);
        if (word.Length < CacheMaxWordLength && Volatile.Read(ref _cacheCount) < CacheCapacity &&
            _cache.TryAdd(word.ToString(), CollectionsMarshal.AsSpan(output)[start..].ToArray()))
            Interlocked.Increment(ref _cacheCount);
    }

    private int UnkId()
    {
        if (_vocab.TryGetValue(_unkToken!, out int id)) return id;
        throw new InvalidDataException($"the BPE unk_token \"{_unkToken}\" is not in the vocab");
    }

    private void BuildSymbols(ReadOnlySpan<char> word, WordScratch w)
    {
        Span<char> buffer = stackalloc char[64];
        Span<byte> utf8 = stackalloc byte[64];
        int pendingUnk = -1; // -1: none, else the unk id waiting to be added (fused)
        int i = 0;
        while (i < word.Length)
        {
            int len = char.IsHighSurrogate(word[i]) && i + 1 < word.Length && char.IsLowSurrogate(word[i + 1]) ? 2 : 1;
            ReadOnlySpan<char> ch = word.Slice(i, len);
            bool isFirst = i == 0;
            bool isLast = i + len == word.Length;
            i += len;

            scoped ReadOnlySpan<char> key = ch;
            if ((_prefix != null && !isFirst) || (_suffix != null && isLast))
            {
                string p = !isFirst ? _prefix ?? "" : "";
                string s = isLast ? _suffix ?? "" : "";
                int total = p.Length + ch.Length + s.Length;
                Span<char> buf = total <= buffer.Length ? buffer[..total] : new char[total];
                p.AsSpan().CopyTo(buf);
                ch.CopyTo(buf[p.Length..]);
                s.AsSpan().CopyTo(buf[(p.Length + ch.Length)..]);
                key = buf;
            }

            if (_vocabBySpan.TryGetValue(key, out int id))
            {
                if (pendingUnk >= 0) { w.Add(pendingUnk); pendingUnk = -1; }
                w.Add(id);
                continue;
            }

            if (_byteFallback)
            {
                int max = Encoding.UTF8.GetMaxByteCount(key.Length);
                Span<byte> bytes = max <= utf8.Length ? utf8 : new byte[max];
                int n = Encoding.UTF8.GetBytes(key, bytes);
                bool all = true;
                for (int k = 0; k < n && all; k++) all = _byteIds[bytes[k]] >= 0;
                if (all)
                {
                    // As in HF, a pending (fused) unk is not flushed here: it follows the byte tokens.
                    for (int k = 0; k < n; k++) w.Add(_byteIds[bytes[k]]);
                    continue;
                }
            }

            if (_unkToken != null)
            {
                int unkId = UnkId();
                if (pendingUnk >= 0 && !_fuseUnk) w.Add(pendingUnk);
                pendingUnk = unkId;
            }
        }
        if (pendingUnk >= 0) w.Add(pendingUnk);
    }

    private void MergeAll(WordScratch w)
    {
        var symbols = w.Symbols;
        var queue = w.Queue;
        int n = w.Count;
        for (int i = 0; i + 1 < n; i++)
        {
            if (_merges.TryGetValue(PairKey(symbols[i].Id, symbols[i + 1].Id), out var m))
                queue.Enqueue(new QueuedMerge(i, m.NewId), Priority(m.Rank, i));
        }
        while (queue.TryDequeue(out var top, out _))
        {
            ref var left = ref symbols[top.Pos];
            if (!left.Alive || left.Next < 0) continue;
            int rightPos = left.Next;
            ref var right = ref symbols[rightPos];
            if (!_merges.TryGetValue(PairKey(left.Id, right.Id), out var current) || current.NewId != top.NewId) continue;

            left.Id = top.NewId;
            left.Next = right.Next;
            right.Alive = false;
            if (left.Next >= 0) symbols[left.Next].Prev = top.Pos;

            if (left.Prev >= 0 && _merges.TryGetValue(PairKey(symbols[left.Prev].Id, left.Id), out var before))
                queue.Enqueue(new QueuedMerge(left.Prev, before.NewId), Priority(before.Rank, left.Prev));
            if (left.Next >= 0 && _merges.TryGetValue(PairKey(left.Id, symbols[left.Next].Id), out var after))
                queue.Enqueue(new QueuedMerge(top.Pos, after.NewId), Priority(after.Rank, top.Pos));
        }
    }

    private static long Priority(int rank, int pos) => ((long)rank << 32) | (uint)pos;

    private readonly record struct QueuedMerge(int Pos, int NewId);

    private struct Symbol
    {
        public int Id;
        public int Prev;
        public int Next;
        public bool Alive;
    }

    /// <summary>Per-thread buffers for merging one word (symbols as a doubly linked list, plus the merge heap).</summary>
    private sealed class WordScratch
    {
        public Symbol[] Symbols = new Symbol[64];
        public int Count;
        public readonly PriorityQueue<QueuedMerge, long> Queue = new();

        public void Reset()
        {
            Count = 0;
            Queue.Clear();
        }

        public void Add(int id)
        {
            if (Count == Symbols.Length) Array.Resize(ref Symbols, Symbols.Length * 2);
            Symbols[Count] = new Symbol { Id = id, Prev = Count - 1, Next = -1, Alive = true };
            if (Count > 0) Symbols[Count - 1].Next = Count;
            Count++;
        }
    }
}
