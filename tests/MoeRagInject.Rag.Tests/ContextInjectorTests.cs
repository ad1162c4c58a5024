using System.Buffers.Binary;
using System.Text;

namespace MoeRagInject.Rag.Tests;

public class ContextInjectorTests
{
    [Fact]
    public void IdentityGivesExactlyTheScaledMeanEmbedding()
    {
        const int Hidden = 37;
        var embeddings = ArrayEmbeddings.Random(vocab: 20, Hidden, seed: 7);
        int[] ids = [3, 1, 3, 7, 19];
        const float Alpha = 0.75f;

        var expected = new float[Hidden];
        foreach (int id in ids)
        {
            for (int i = 0; i < Hidden; i++)
            {
                expected[i] += embeddings.Table[(id * Hidden) + i];
            }
        }

        double expectedNormSquared = 0;
        for (int i = 0; i < Hidden; i++)
        {
            expected[i] = Alpha * (expected[i] / ids.Length);
            expectedNormSquared += (double)expected[i] * expected[i];
        }

        var injector = ContextInjector.CreateIdentity(embeddings);
        Assert.Equal(ProjectionKind.Identity, injector.Kind);
        var actual = new float[Hidden];
        double norm = injector.ComputeInjection(ids, Alpha, actual);
        Assert.Equal(expected, actual);
        Assert.Equal(Math.Sqrt(expectedNormSquared), norm, 1e-9);
    }

    [Fact]
    public void EmptyTokensGiveZero()
    {
        var embeddings = ArrayEmbeddings.Random(10, 8, 1);
        var destination = Enumerable.Repeat(5f, 8).ToArray();
        Assert.Equal(0, ContextInjector.CreateRandom(embeddings).ComputeInjection([], 2f, destination));
        Assert.All(destination, v => Assert.Equal(0f, v));
    }

    [Fact]
    public void BadArgumentsAreRejected()
    {
        var injector = ContextInjector.CreateIdentity(ArrayEmbeddings.Random(10, 8, 1));
        Assert.Throws<ArgumentException>(() => injector.ComputeInjection([1], 1f, new float[7]));
        Assert.Throws<ArgumentOutOfRangeException>(() => injector.ComputeInjection([10], 1f, new float[8]));
        Assert.Throws<ArgumentOutOfRangeException>(() => injector.ComputeInjection([-1], 1f, new float[8]));
    }

    [Fact]
    public void RandomProjectionIsDeterministicAndRoughlyNormPreserving()
    {
        const int Hidden = 512;
        var embeddings = ArrayEmbeddings.Random(64, Hidden, 3);
        var a = ContextInjector.CreateRandom(embeddings, seed: 42);
        var b = ContextInjector.CreateRandom(embeddings, seed: 42);
        var c = ContextInjector.CreateRandom(embeddings, seed: 43);
        Assert.Equal(ProjectionKind.Random, a.Kind);
        Assert.Contains("42", a.Description, StringComparison.Ordinal);

        var identity = ContextInjector.CreateIdentity(embeddings);
        var va = new float[Hidden];
        var vb = new float[Hidden];
        var vc = new float[Hidden];
        var mean = new float[Hidden];
        for (int trial = 0; trial < 5; trial++)
        {
            int[] ids = [.. Enumerable.Range(trial * 7, 5)];
            double na = a.ComputeInjection(ids, 1f, va);
            b.ComputeInjection(ids, 1f, vb);
            c.ComputeInjection(ids, 1f, vc);
            double meanNorm = identity.ComputeInjection(ids, 1f, mean);
            Assert.Equal(va, vb);
            Assert.NotEqual(va, vc);
            double ratio = na / meanNorm;
            Assert.InRange(ratio, 0.85, 1.15); // ‖P·c‖/‖c‖ ~ sqrt(chi²_512/512): sd ≈ 0.03
        }

        double scaled = a.ComputeInjection([1, 2], 2f, va);
        double unscaled = a.ComputeInjection([1, 2], 1f, vb);
        Assert.Equal(2 * unscaled, scaled, 1e-4);
    }

    [Fact]
    public void RandomProjectionEntriesHaveVarianceOneOverHidden()
    {
        // With one-hot embeddings, P·e_j is column j of P: its squared norm averages hidden · (1/hidden) = 1.
        const int Hidden = 256;
        var table = new float[Hidden * Hidden];
        for (int i = 0; i < Hidden; i++)
        {
            table[(i * Hidden) + i] = 1f;
        }

        var injector = ContextInjector.CreateRandom(new ArrayEmbeddings(table, Hidden, Hidden), seed: 0);
        var v = new float[Hidden];
        double sum = 0;
        double sumSquares = 0;
        for (int j = 0; j < Hidden; j++)
        {
            injector.ComputeInjection([j], 1f, v);
            foreach (float x in v)
            {
                sum += x;
                sumSquares += (double)x * x;
            }
        }

        double n = (double)Hidden * Hidden;
        double variance = (sumSquares / n) - ((sum / n) * (sum / n));
        Assert.InRange(variance * Hidden, 0.97, 1.03);
        Assert.InRange(sum / n, -0.01 / Math.Sqrt(Hidden), 0.01 / Math.Sqrt(Hidden));
    }

    [Fact]
    public void SavedProjectionLoadsBackAndMatchesAScalarProduct()
    {
        using var dir = new TempDir();
        const int Hidden = 24;
        var embeddings = ArrayEmbeddings.Random(30, Hidden, 11);
        var proj = ArrayEmbeddings.Random(Hidden, Hidden, 99).Table;
        var bias = ArrayEmbeddings.Random(1, Hidden, 5).Table;
        string path = dir.File("proj.safetensors");
        string withBias = dir.File("proj-bias.safetensors");
        ContextInjector.SaveProjection(path, proj, Hidden);
        ContextInjector.SaveProjection(withBias, proj, Hidden, bias);

        // The file is valid safetensors: header length, JSON header, data aligned to 8 bytes.
        byte[] bytes = File.ReadAllBytes(path);
        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        Assert.Equal(0UL, (8 + headerLength) % 8);
        Assert.Equal(8 + (long)headerLength + (Hidden * Hidden * 4), bytes.Length);
        Assert.Contains("\"proj\"", Encoding.UTF8.GetString(bytes, 8, (int)headerLength), StringComparison.Ordinal);

        int[] ids = [4, 9, 4, 28];
        var c = new double[Hidden];
        foreach (int id in ids)
        {
            for (int i = 0; i < Hidden; i++)
            {
                c[i] += embeddings.Table[(id * Hidden) + i] / (double)ids.Length;
            }
        }

        foreach (var (file, b) in new[] { (path, (float[]?)null), (withBias, bias) })
        {
            var injector = ContextInjector.LoadFromFile(embeddings, file);
            Assert.Equal(ProjectionKind.File, injector.Kind);
            Assert.Contains("proj", injector.Description, StringComparison.Ordinal);
            var actual = new float[Hidden];
            injector.ComputeInjection(ids, 0.5f, actual);
            for (int row = 0; row < Hidden; row++)
            {
                double expected = 0;
                for (int col = 0; col < Hidden; col++)
                {
                    expected += proj[(row * Hidden) + col] * c[col];
                }

                expected = 0.5 * (expected + (b?[row] ?? 0));
                Assert.Equal(expected, actual[row], 1e-5);
            }
        }
    }

    [Theory]
    [InlineData("F16")]
    [InlineData("BF16")]
    public void HalfPrecisionFilesAreRead(string dtype)
    {
        using var dir = new TempDir();
        const int Hidden = 4;
        // A permutation-and-scale matrix with values exact in both half formats.
        float[] proj = new float[Hidden * Hidden];
        proj[(0 * Hidden) + 1] = 2f;
        proj[(1 * Hidden) + 0] = -0.5f;
        proj[(2 * Hidden) + 3] = 0.25f;
        proj[(3 * Hidden) + 2] = 1f;
        string path = dir.File("half.safetensors");
        WriteHalfFile(path, dtype, proj, Hidden);

        var table = new float[] { 1f, 2f, 4f, 8f, 3f, 3f, 3f, 3f };
        var injector = ContextInjector.LoadFromFile(new ArrayEmbeddings(table, 2, Hidden), path);
        var v = new float[Hidden];
        injector.ComputeInjection([0], 1f, v);
        Assert.Equal(new[] { 4f, -0.5f, 2f, 4f }, v);
        Assert.Contains(dtype, injector.Description, StringComparison.Ordinal);
    }

    [Fact]
    public void BadFilesAreRejectedNamingFileAndProblem()
    {
        using var dir = new TempDir();
        var embeddings = ArrayEmbeddings.Random(4, 4, 1);

        string wrongShape = dir.File("shape.safetensors");
        ContextInjector.SaveProjection(wrongShape, new float[9], 3);
        var ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, wrongShape));
        Assert.Contains(wrongShape, ex.Message, StringComparison.Ordinal);
        Assert.Contains("[3, 3]", ex.Message, StringComparison.Ordinal);
        Assert.Contains("[4, 4]", ex.Message, StringComparison.Ordinal);

        string noProj = dir.File("noproj.safetensors");
        WriteRaw(noProj, "{\"weight\":{\"dtype\":\"F32\",\"shape\":[4,4],\"data_offsets\":[0,64]}}", new byte[64]);
        ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, noProj));
        Assert.Contains("proj", ex.Message, StringComparison.Ordinal);
        Assert.Contains("weight", ex.Message, StringComparison.Ordinal);
        Assert.Contains(noProj, ex.Message, StringComparison.Ordinal);

        string badDtype = dir.File("i32.safetensors");
        WriteRaw(badDtype, "{\"proj\":{\"dtype\":\"I32\",\"shape\":[4,4],\"data_offsets\":[0,64]}}", new byte[64]);
        ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, badDtype));
        Assert.Contains("I32", ex.Message, StringComparison.Ordinal);

        string shortData = dir.File("short.safetensors");
        WriteRaw(shortData, "{\"proj\":{\"dtype\":\"F32\",\"shape\":[4,4],\"data_offsets\":[0,64]}}", new byte[10]);
        ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, shortData));
        Assert.Contains("data_offsets", ex.Message, StringComparison.Ordinal);

        string wrongBytes = dir.File("mismatch.safetensors");
        WriteRaw(wrongBytes, "{\"proj\":{\"dtype\":\"F32\",\"shape\":[4,4],\"data_offsets\":[0,32]}}", new byte[64]);
        Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, wrongBytes));

        string badBias = dir.File("bias.safetensors");
        WriteRaw(badBias, "{\"proj\":{\"dtype\":\"F32\",\"shape\":[4,4],\"data_offsets\":[0,64]},\"bias\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[64,76]}}", new byte[76]);
        ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, badBias));
        Assert.Contains("bias", ex.Message, StringComparison.Ordinal);

        string garbage = dir.Write("garbage.safetensors", "this is not a tensor file at all");
        Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, garbage));

        string tiny = dir.Write("tiny.safetensors", "abc");
        Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, tiny));

        string notJson = dir.File("notjson.safetensors");
        WriteRaw(notJson, "{proj: nope", []);
        Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, notJson));

        string nan = dir.File("nan.safetensors");
        ContextInjector.SaveProjection(nan, [.. Enumerable.Repeat(float.NaN, 16)], 4);
        Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, nan));

        Assert.Throws<FileNotFoundException>(() => ContextInjector.LoadFromFile(embeddings, dir.File("missing.safetensors")));
        Assert.Throws<ArgumentException>(() => ContextInjector.SaveProjection(dir.File("x"), new float[10], 3));
    }

    private static void WriteRaw(string path, string header, byte[] data)
    {
        byte[] headerBytes = Encoding.UTF8.GetBytes(header);
        using var stream = File.Create(path);
        Span<byte> prefix = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)headerBytes.Length);
        stream.Write(prefix);
        stream.Write(headerBytes);
        stream.Write(data);
    }

    private static void WriteHalfFile(string path, string dtype, float[] values, int hidden)
    {
        var data = new byte[values.Length * 2];
        for (int i = 0; i < values.Length; i++)
        {
            ushort bits = dtype == "F16"
                ? BitConverter.HalfToUInt16Bits((Half)values[i])
                : (ushort)(BitConverter.SingleToUInt32Bits(values[i]) >> 16);
            BinaryPrimitives.WriteUInt16LittleEndian(data.AsSpan(2 * i), bits);
        }

        WriteRaw(path, $"{{\"__metadata__\":{{\"k\":\"v\"}},\"proj\":{{\"dtype\":\"{dtype}\",\"shape\":[{hidden},{hidden}],\"data_offsets\":[0,{data.Length}]}}}}", data);
    }
}
