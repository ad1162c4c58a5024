namespace MoeRagInject.Rag.Tests;

/// <summary>A fresh temporary directory, deleted on dispose.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "moe-rag-tests-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public string Write(string name, string content)
    {
        string path = File(name);
        System.IO.File.WriteAllText(path, content);
        return path;
    }

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>An in-memory embedding table [vocab, hidden] whose AccumulateRow is a plain scalar loop.</summary>
internal sealed class ArrayEmbeddings(float[] table, int vocab, int hidden) : ITokenEmbeddings
{
    public int HiddenSize => hidden;

    public int VocabSize => vocab;

    public float[] Table => table;

    public void AccumulateRow(int tokenId, Span<float> accumulator)
    {
        for (int i = 0; i < hidden; i++)
        {
            accumulator[i] += table[(tokenId * hidden) + i];
        }
    }

    /// <summary>A table of values from a simple LCG (independent of the code under test), roughly uniform in [-1, 1).</summary>
    public static ArrayEmbeddings Random(int vocab, int hidden, uint seed)
    {
        var table = new float[vocab * hidden];
        uint state = seed;
        for (int i = 0; i < table.Length; i++)
        {
            state = unchecked((state * 1664525u) + 1013904223u);
            table[i] = ((state >> 8) / (float)(1 << 24) * 2f) - 1f;
        }

        return new ArrayEmbeddings(table, vocab, hidden);
    }
}
