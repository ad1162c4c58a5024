using System.Text.Json;

namespace MoeRagInject.Model.Tokenization;

/// <summary>
/// A Hugging Face <c>tokenizer.json</c> tokenizer of the Mistral/Llama family: BPE with byte fallback and the
/// <c>▁</c> space convention, plus the special tokens and chat template of <c>tokenizer_config.json</c>.
/// </summary>
/// <remarks>
/// Encoding follows the Hugging Face pipeline: added tokens that are not normalized are split out of the raw text,
/// every other piece is normalized, then added tokens that are normalized are split out, the rest is pre-tokenized
/// and run through the BPE model; the post-processor (or add_bos_token/add_eos_token) adds BOS/EOS.
/// Instances are immutable and safe to use from several threads.
/// </remarks>
public sealed class Tokenizer
{
    public const string TokenizerFileName = "tokenizer.json";
    public const string ConfigFileName = "tokenizer_config.json";

    private readonly BpeModel _model;
    private readonly TextNormalizer? _normalizer;
    private readonly PreTokenizer? _preTokenizer;
    private readonly TokenDecoder? _decoder;
    private readonly SpecialTokenTemplate? _template;
    private readonly AddedTokenMatcher _rawMatcher;
    private readonly AddedTokenMatcher _normalizedMatcher;
    private readonly Dictionary<string, AddedToken> _addedByContent;
    private readonly HashSet<string> _specialContents;
    private readonly string?[] _idToToken;
    private readonly TokenizerConfig _config;
    private readonly Lazy<JinjaTemplate?> _chatTemplate;

    private Tokenizer(BpeModel model, TextNormalizer? normalizer, PreTokenizer? preTokenizer, TokenDecoder? decoder,
        SpecialTokenTemplate? postProcessor, List<AddedToken> addedTokens, TokenizerConfig config, string? chatTemplate)
    {
        _model = model;
        _normalizer = normalizer;
        _preTokenizer = preTokenizer;
        _decoder = decoder;
        _config = config;

        // Special tokens of tokenizer_config.json that tokenizer.json does not list become added special tokens (as transformers does).
        _addedByContent = new Dictionary<string, AddedToken>(StringComparer.Ordinal);
        foreach (var t in addedTokens) _addedByContent.TryAdd(t.Content, t);
        foreach (var t in config.AddedTokensDecoder)
        {
            if (_addedByContent.ContainsKey(t.Content)) continue;
            _addedByContent[t.Content] = t;
            addedTokens.Add(t);
        }
        foreach (var content in new[] { config.BosToken, config.EosToken, config.UnkToken, config.PadToken })
        {
            if (content is null || _addedByContent.ContainsKey(content) || !model.TryGetId(content, out int id)) continue;
            var t = new AddedToken(id, content, false, false, false, false, true);
            _addedByContent[content] = t;
            addedTokens.Add(t);
        }

        int maxId = model.MaxId;
        foreach (var t in addedTokens) maxId = Math.Max(maxId, t.Id);
        VocabSize = maxId + 1;
        _idToToken = new string?[VocabSize];
        foreach (var (token, id) in model.Vocab)
            if (id >= 0) _idToToken[id] = token;
        foreach (var t in addedTokens)
            if (t.Id >= 0) _idToToken[t.Id] = t.Content;
        _specialContents = new HashSet<string>(addedTokens.Where(t => t.Special).Select(t => t.Content), StringComparer.Ordinal);

        _rawMatcher = new AddedTokenMatcher(addedTokens.Where(t => !t.Normalized).Select(t => (t.Content, t)));
        _normalizedMatcher = new AddedTokenMatcher(addedTokens.Where(t => t.Normalized)
            .Select(t => (normalizer?.Normalize(t.Content) ?? t.Content, t)));

        _template = postProcessor;
        if (_template is null && (config.AddBosToken == true || config.AddEosToken == true))
        {
            int? bos = config.AddBosToken == true ? TokenToId(config.BosToken) : null;
            int? eos = config.AddEosToken == true ? TokenToId(config.EosToken) : null;
            _template = new SpecialTokenTemplate(bos is int b ? [b] : [], eos is int e ? [e] : []);
        }

        BosTokenId = TokenToId(config.BosToken);
        EosTokenId = TokenToId(config.EosToken);
        if (BosTokenId is null && config.BosToken is null && postProcessor is { Prefix.Length: 1 }) BosTokenId = postProcessor.Prefix[0];
        ChatTemplate = chatTemplate;
        _chatTemplate = new Lazy<JinjaTemplate?>(() => chatTemplate is null ? null : JinjaTemplate.Parse(chatTemplate));
    }

    /// <summary>Loads <c>tokenizer.json</c> and (when present) <c>tokenizer_config.json</c> from a model folder.</summary>
    /// <summary>
    /// A byte-fallback tokenizer of <paramref name="vocabSize"/> ids for model folders that hold only a config (dummy weights):
    /// &lt;unk&gt;, &lt;s&gt;, &lt;/s&gt;, the 256 byte tokens, then placeholder words "▁w3", "▁w4", …; text encodes to byte tokens.
    /// </summary>
    public static Tokenizer CreateSynthetic(int vocabSize)
    {
        if (vocabSize < 260) throw new ArgumentOutOfRangeException(nameof(vocabSize), vocabSize, "a synthetic tokenizer needs at least 260 ids");
        var vocab = new System.Text.StringBuilder();
        vocab.Append("\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2");
        for (var b = 0; b < 256; b++) vocab.Append(System.Globalization.CultureInfo.InvariantCulture, $", \"<0x{b:X2}>\": {3 + b}");
        for (var id = 259; id < vocabSize; id++) vocab.Append(System.Globalization.CultureInfo.InvariantCulture, $", \"\u2581w{id}\": {id}");
        var json = """
            {"version": "1.0", "truncation": null, "padding": null,
             "added_tokens": [{"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                              {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                              {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
             "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
             "pre_tokenizer": null,
             "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
             "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
             "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null, "end_of_word_suffix": null,
                       "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": {VOCAB}, "merges": []}}
            """.Replace("VOCAB", vocab.ToString(), StringComparison.Ordinal);
        return FromJson(json, """{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": true}""", "synthetic");
    }

    public static Tokenizer Load(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        string tokenizerPath = Path.Combine(directory, TokenizerFileName);
        string configPath = Path.Combine(directory, ConfigFileName);
        return LoadFiles(tokenizerPath, File.Exists(configPath) ? configPath : null);
    }

    /// <summary>
    /// Loads a <c>tokenizer.json</c> and an optional <c>tokenizer_config.json</c> given by path. When the config has no
    /// chat template, a <c>chat_template.jinja</c> or <c>chat_template.json</c> beside it (or beside tokenizer.json) is used.
    /// </summary>
    public static Tokenizer LoadFiles(string tokenizerJsonPath, string? tokenizerConfigPath)
    {
        ArgumentNullException.ThrowIfNull(tokenizerJsonPath);
        if (!File.Exists(tokenizerJsonPath))
            throw new FileNotFoundException($"{tokenizerJsonPath}: tokenizer file not found", tokenizerJsonPath);
        string? configText = null;
        if (tokenizerConfigPath != null)
        {
            if (!File.Exists(tokenizerConfigPath))
                throw new FileNotFoundException($"{tokenizerConfigPath}: tokenizer config file not found", tokenizerConfigPath);
            configText = File.ReadAllText(tokenizerConfigPath);
        }
        var config = configText is null ? TokenizerConfig.Empty : TokenizerConfig.Parse(configText, tokenizerConfigPath!);
        string? chatTemplate = config.ChatTemplate;
        if (chatTemplate is null)
        {
            var dirs = new List<string>();
            if (tokenizerConfigPath != null) dirs.Add(Path.GetDirectoryName(Path.GetFullPath(tokenizerConfigPath))!);
            dirs.Add(Path.GetDirectoryName(Path.GetFullPath(tokenizerJsonPath))!);
            foreach (var dir in dirs)
            {
                string jinja = Path.Combine(dir, "chat_template.jinja");
                string jsonFile = Path.Combine(dir, "chat_template.json");
                if (File.Exists(jinja)) chatTemplate = File.ReadAllText(jinja);
                else if (File.Exists(jsonFile)) chatTemplate = TokenizerConfig.ParseChatTemplateJson(File.ReadAllText(jsonFile), jsonFile);
                if (chatTemplate != null) break;
            }
        }
        return Create(File.ReadAllText(tokenizerJsonPath), tokenizerJsonPath, config, chatTemplate);
    }

    /// <summary>Builds a tokenizer from the text of a tokenizer.json (and optionally of a tokenizer_config.json).</summary>
    /// <param name="sourceName">Name used for the tokenizer.json in error messages.</param>
    public static Tokenizer FromJson(string tokenizerJson, string? tokenizerConfigJson = null, string sourceName = TokenizerFileName)
    {
        ArgumentNullException.ThrowIfNull(tokenizerJson);
        var config = tokenizerConfigJson is null ? TokenizerConfig.Empty : TokenizerConfig.Parse(tokenizerConfigJson, ConfigFileName);
        return Create(tokenizerJson, sourceName, config, config.ChatTemplate);
    }

    private static Tokenizer Create(string text, string fileName, TokenizerConfig config, string? chatTemplate)
    {
        var json = new TokenizerJson(fileName);
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(text, new JsonDocumentOptions { MaxDepth = 256 });
        }
        catch (JsonException e)
        {
            throw json.Invalid($"malformed JSON: {e.Message}");
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw json.Invalid("the top level must be a JSON object");
            if (TokenizerJson.IsNullOrMissing(root, "model", out var modelEl)) throw json.Invalid("no \"model\"");

            var added = new List<AddedToken>();
            if (!TokenizerJson.IsNullOrMissing(root, "added_tokens", out var addedEl))
            {
                if (addedEl.ValueKind != JsonValueKind.Array) throw json.Invalid("added_tokens must be an array");
                int i = 0;
                foreach (var t in addedEl.EnumerateArray())
                {
                    string where = $"added_tokens[{i++}]";
                    if (t.ValueKind != JsonValueKind.Object) throw json.Invalid($"{where} must be an object");
                    added.Add(new AddedToken(
                        json.RequiredInt(t, "id", where),
                        json.RequiredString(t, "content", where),
                        json.OptionalBool(t, "single_word", false, where),
                        json.OptionalBool(t, "lstrip", false, where),
                        json.OptionalBool(t, "rstrip", false, where),
                        json.OptionalBool(t, "normalized", true, where),
                        json.OptionalBool(t, "special", false, where)));
                }
            }

            var model = BpeModel.FromJson(modelEl, json);
            var normalizer = TextNormalizer.FromJson(Get(root, "normalizer"), json);
            var preTokenizer = PreTokenizer.FromJson(Get(root, "pre_tokenizer"), json);
            var postProcessor = SpecialTokenTemplate.FromJson(Get(root, "post_processor"), json);
            var decoder = TokenDecoder.FromJson(Get(root, "decoder"), json);
            return new Tokenizer(model, normalizer, preTokenizer, decoder, postProcessor, added, config, chatTemplate);
        }
    }

    private static JsonElement Get(JsonElement root, string name) => root.TryGetProperty(name, out var v) ? v : NullElement;

    private static readonly JsonElement NullElement = JsonDocument.Parse("null").RootElement.Clone();

    /// <summary>Number of ids (the largest id + 1, added tokens included).</summary>
    public int VocabSize { get; }

    public int? BosTokenId { get; }

    public int? EosTokenId { get; }

    /// <summary>The BOS / EOS / UNK token text of tokenizer_config.json (null when not set).</summary>
    public string? BosToken => _config.BosToken;

    public string? EosToken => _config.EosToken;

    public string? UnkToken => _config.UnkToken;

    /// <summary>The text of the chat template in tokenizer_config.json, or null when it has none.</summary>
    public string? ChatTemplate { get; }

    /// <summary>The id of a token (added tokens first, then the model vocabulary), or null.</summary>
    public int? TokenToId(string? token)
    {
        if (token is null) return null;
        if (_addedByContent.TryGetValue(token, out var added)) return added.Id;
        return _model.TryGetId(token, out int id) ? id : null;
    }

    /// <summary>The token text of an id, or null when the id has none.</summary>
    public string? IdToToken(int id) => id >= 0 && id < _idToToken.Length ? _idToToken[id] : null;

    /// <summary>True for a byte-fallback token (<c>&lt;0xNN&gt;</c>): one byte of a character the vocabulary has no token for.</summary>
    public bool IsByteFallbackToken(int id) => IdToToken(id) is { } token && ByteFallbackDecoder.TryParseByte(token, out _);

    /// <summary>The raw byte a byte-fallback token (<c>&lt;0xNN&gt;</c>) stands for.</summary>
    public bool TryGetFallbackByte(int id, out byte value)
    {
        value = 0;
        return IdToToken(id) is { } token && ByteFallbackDecoder.TryParseByte(token, out value);
    }

    /// <summary>Ids of <paramref name="text"/>; with <paramref name="addSpecialTokens"/> the post-processor's BOS is added.</summary>
    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length / 3 + 4);
        if (addSpecialTokens && _template != null) ids.AddRange(_template.Prefix);
        EncodeCore(text, ids);
        if (addSpecialTokens && _template != null) ids.AddRange(_template.Suffix);
        return ids.ToArray();
    }

    private void EncodeCore(string text, List<int> ids)
    {
        var rawSegments = new List<TextSegment>();
        var normSegments = new List<TextSegment>();
        var words = new List<TextPiece>();
        _rawMatcher.Split(text, rawSegments);
        foreach (var seg in rawSegments)
        {
            if (seg.Id >= 0)
            {
                ids.Add(seg.Id);
                continue;
            }
            string piece = text[seg.Start..seg.End];
            string normalized = _normalizer?.Normalize(piece) ?? piece;
            normSegments.Clear();
            _normalizedMatcher.Split(normalized, normSegments);
            foreach (var sub in normSegments)
            {
                if (sub.Id >= 0)
                {
                    ids.Add(sub.Id);
                    continue;
                }
                var textPiece = new TextPiece(normalized[sub.Start..sub.End], seg.Start == 0 && sub.Start == 0);
                if (_preTokenizer is null)
                {
                    _model.Tokenize(textPiece.Text, ids);
                    continue;
                }
                words.Clear();
                _preTokenizer.PreTokenize(textPiece, words);
                foreach (var w in words) _model.Tokenize(w.Text, ids);
            }
        }
    }

    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens = true)
    {
        var tokens = new List<string>(ids.Length);
        foreach (int id in ids)
        {
            string? token = IdToToken(id);
            if (token is null) continue;
            if (skipSpecialTokens && _specialContents.Contains(token)) continue;
            tokens.Add(token);
        }
        string text = _decoder is null ? string.Join(' ', tokens) : string.Concat(_decoder.DecodeChain(tokens));
        return _config.CleanUpTokenizationSpaces ? CleanUpTokenizationSpaces(text) : text;
    }

    /// <summary>transformers' clean_up_tokenization (applied when tokenizer_config.json asks for it).</summary>
    private static string CleanUpTokenizationSpaces(string text) => text
        .Replace(" .", ".", StringComparison.Ordinal).Replace(" ?", "?", StringComparison.Ordinal)
        .Replace(" !", "!", StringComparison.Ordinal).Replace(" ,", ",", StringComparison.Ordinal)
        .Replace(" ' ", "'", StringComparison.Ordinal).Replace(" n't", "n't", StringComparison.Ordinal)
        .Replace(" 'm", "'m", StringComparison.Ordinal).Replace(" 's", "'s", StringComparison.Ordinal)
        .Replace(" 've", "'ve", StringComparison.Ordinal).Replace(" 're", "'re", StringComparison.Ordinal);

    /// <summary>True for ids of added special tokens (BOS, EOS, UNK, ...).</summary>
    public bool IsSpecial(int id)
    {
        string? token = IdToToken(id);
        return token != null && _specialContents.Contains(token) && _addedByContent.TryGetValue(token, out var t) && t.Id == id;
    }

    /// <summary>Renders the chat template (Jinja subset) for the messages.</summary>
    /// <exception cref="InvalidOperationException">The tokenizer has no chat template.</exception>
    /// <exception cref="JinjaException">The template is invalid or rejected the conversation (raise_exception).</exception>
    public string ApplyChatTemplate(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt)
    {
        ArgumentNullException.ThrowIfNull(messages);
        var template = _chatTemplate.Value ?? throw new InvalidOperationException("the tokenizer has no chat template");
        var list = new List<object?>(messages.Count);
        foreach (var m in messages) list.Add(JinjaValues.FromClr(m));
        var variables = new Dictionary<string, object?>(StringComparer.Ordinal)
        {
            ["messages"] = list,
            ["add_generation_prompt"] = addGenerationPrompt,
            ["tools"] = null,
            ["documents"] = null,
        };
        if (_config.BosToken != null) variables["bos_token"] = _config.BosToken;
        if (_config.EosToken != null) variables["eos_token"] = _config.EosToken;
        if (_config.UnkToken != null) variables["unk_token"] = _config.UnkToken;
        if (_config.PadToken != null) variables["pad_token"] = _config.PadToken;
        return template.Render(variables);
    }
}

public sealed record ChatMessage(string Role, string Content);
