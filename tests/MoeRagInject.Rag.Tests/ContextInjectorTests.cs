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

    /// <summary>The MLP projector v = α·(W_out·act(W_in·c + b_in) + b_out), computed here in doubles from the arrays written.</summary>
    private static double[] MlpOracle(ArrayEmbeddings embeddings, int[] ids, int inner, float[] w1, float[]? b1, float[] w2, float[]? b2, string activation, double alpha)
    {
        int hidden = embeddings.HiddenSize;
        var c = new double[hidden];
        foreach (int id in ids)
        {
            for (int i = 0; i < hidden; i++)
            {
                c[i] += embeddings.Table[(id * hidden) + i] / (double)ids.Length;
            }
        }

        var h = new double[inner];
        for (int j = 0; j < inner; j++)
        {
            double z = b1?[j] ?? 0;
            for (int i = 0; i < hidden; i++)
            {
                z += w1[(j * hidden) + i] * c[i];
            }

            h[j] = activation == "relu" ? Math.Max(0, z) : z / (1 + Math.Exp(-z));
        }

        var v = new double[hidden];
        for (int i = 0; i < hidden; i++)
        {
            double o = b2?[i] ?? 0;
            for (int j = 0; j < inner; j++)
            {
                o += w2[(i * inner) + j] * h[j];
            }

            v[i] = alpha * o;
        }

        return v;
    }

    [Theory]
    [InlineData("silu", true)]
    [InlineData("relu", true)]
    [InlineData("silu", false)]
    public void MlpProjectorFileMatchesAScalarOracle(string activation, bool biases)
    {
        using var dir = new TempDir();
        const int Hidden = 12;
        const int Inner = 20;
        var embeddings = ArrayEmbeddings.Random(30, Hidden, 21);
        var w1 = ArrayEmbeddings.Random(Inner, Hidden, 22).Table;
        var b1 = biases ? ArrayEmbeddings.Random(1, Inner, 23).Table : null;
        var w2 = ArrayEmbeddings.Random(Hidden, Inner, 24).Table;
        var b2 = biases ? ArrayEmbeddings.Random(1, Hidden, 25).Table : null;
        string path = dir.File("mlp.safetensors");
        ContextInjector.SaveMlp(path, Hidden, Inner, w1, b1, w2, b2, activation, layers: [3, 1], alpha: 0.5f);

        var injector = ContextInjector.LoadFromFile(embeddings, path);
        Assert.Equal(ProjectionKind.File, injector.Kind);
        Assert.Equal(ProjectorArchitecture.Mlp, injector.Architecture);
        Assert.Equal([3, 1], injector.Layers);
        Assert.Equal(0.5f, injector.Alpha);
        Assert.Contains($"[{Hidden}→{Inner}→{Hidden}]", injector.Description, StringComparison.Ordinal);
        Assert.Contains(activation, injector.Description, StringComparison.Ordinal);
        var info = ContextInjector.ReadFileInfo(path);
        Assert.Equal(ProjectorArchitecture.Mlp, info.Architecture);
        Assert.Equal([3, 1], info.Layers);
        Assert.Equal(0.5f, info.Alpha);

        // Relu must see both signs of pre-activation for the test to mean anything.
        foreach (var ids in new[] { new[] { 4, 9, 4, 28 }, new[] { 0 }, new[] { 29, 1, 17 } })
        {
            var actual = new float[Hidden];
            double norm = injector.ComputeInjection(ids, 1.5f, actual);
            var expected = MlpOracle(embeddings, ids, Inner, w1, b1, w2, b2, activation, 1.5);
            for (int i = 0; i < Hidden; i++)
            {
                Assert.Equal(expected[i], actual[i], 1e-5);
            }

            Assert.Equal(Math.Sqrt(expected.Sum(x => x * x)), norm, 1e-4);
        }
    }

    [Fact]
    public void LinearFileWithMetadataNamesItsLayersAndOldFilesNone()
    {
        using var dir = new TempDir();
        const int Hidden = 4;
        var embeddings = ArrayEmbeddings.Random(6, Hidden, 2);
        var proj = ArrayEmbeddings.Random(Hidden, Hidden, 3).Table;
        string path = dir.File("linear.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(path, [("proj", [Hidden, Hidden], proj)], metadata: new Dictionary<string, string>
        {
            ["format"] = ContextInjector.FormatName,
            ["kind"] = "linear",
            ["context"] = "embed-mean",
            ["layers"] = "0, 2",
        });
        var injector = ContextInjector.LoadFromFile(embeddings, path);
        Assert.Equal(ProjectorArchitecture.Linear, injector.Architecture);
        Assert.Equal([0, 2], injector.Layers);
        Assert.Null(injector.Alpha);
        var identity = new float[Hidden];
        ContextInjector.CreateIdentity(embeddings).ComputeInjection([1, 5], 1f, identity);
        var actual = new float[Hidden];
        injector.ComputeInjection([1, 5], 1f, actual);
        for (int row = 0; row < Hidden; row++)
        {
            Assert.Equal(Enumerable.Range(0, Hidden).Sum(col => (double)proj[(row * Hidden) + col] * identity[col]), actual[row], 1e-5);
        }

        string old = dir.File("old.safetensors");
        ContextInjector.SaveProjection(old, proj, Hidden);
        var oldInjector = ContextInjector.LoadFromFile(embeddings, old);
        Assert.Equal(ProjectorArchitecture.Linear, oldInjector.Architecture);
        Assert.Null(oldInjector.Layers);
        Assert.Null(oldInjector.Alpha);
    }

    [Theory]
    [InlineData("kind", "conv", "\"kind\"")]
    [InlineData("activation", "gelu", "\"activation\"")]
    [InlineData("context", "hidden:1", "embed-mean")]
    [InlineData("format", "something-else", "\"format\"")]
    [InlineData("layers", "1,x", "\"layers\"")]
    [InlineData("layers", "1,1", "\"layers\"")]
    [InlineData("layers", "", "no layer")]
    [InlineData("alpha", "NaN", "\"alpha\"")]
    public void MlpFilesWithMetadataThisEngineCannotHonourAreRejected(string key, string value, string mentioned)
    {
        using var dir = new TempDir();
        var embeddings = ArrayEmbeddings.Random(4, 4, 1);
        var metadata = new Dictionary<string, string> { ["kind"] = "mlp", ["activation"] = "silu", [key] = value };
        string path = dir.File("bad.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(path, [("mlp.in.weight", [3, 4], new float[12]), ("mlp.out.weight", [4, 3], new float[12])], metadata: metadata);
        var ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, path));
        Assert.Contains(path, ex.Message, StringComparison.Ordinal);
        Assert.Contains(mentioned, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void MlpFilesWithMissingOrMisshapenTensorsAreRejected()
    {
        using var dir = new TempDir();
        var embeddings = ArrayEmbeddings.Random(4, 4, 1);
        var kind = new Dictionary<string, string> { ["kind"] = "mlp" };
        (string Name, int[] Shape, float[] Data)[][] cases =
        [
            [("mlp.in.weight", [3, 4], new float[12])],
            [("mlp.in.weight", [3, 5], new float[15]), ("mlp.out.weight", [4, 3], new float[12])],
            [("mlp.in.weight", [3, 4], new float[12]), ("mlp.out.weight", [4, 2], new float[8])],
            [("mlp.in.weight", [3, 4], new float[12]), ("mlp.in.bias", [4], new float[4]), ("mlp.out.weight", [4, 3], new float[12])],
            [("mlp.in.weight", [3, 4], new float[12]), ("mlp.out.weight", [4, 3], new float[12]), ("mlp.out.bias", [3], new float[3])],
            [("mlp.in.weight", [3, 4], [.. Enumerable.Repeat(float.PositiveInfinity, 12)]), ("mlp.out.weight", [4, 3], new float[12])],
        ];
        for (int i = 0; i < cases.Length; i++)
        {
            string path = dir.File($"bad{i}.safetensors");
            MoeRagInject.Model.SafeTensorsFile.Write(path, cases[i], metadata: kind);
            var ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, path));
            Assert.Contains("mlp.", ex.Message, StringComparison.Ordinal);
        }

        // Without "kind", the MLP tensors alone make it an MLP; a file with neither is still told it lacks "proj".
        string implicitMlp = dir.File("implicit.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(implicitMlp, [("mlp.in.weight", [3, 4], new float[12]), ("mlp.out.weight", [4, 3], new float[12])]);
        Assert.Equal(ProjectorArchitecture.Mlp, ContextInjector.LoadFromFile(embeddings, implicitMlp).Architecture);
        Assert.Throws<ArgumentException>(() => ContextInjector.SaveMlp(dir.File("x"), 4, 3, new float[11], null, new float[12], null));
        Assert.Throws<ArgumentException>(() => ContextInjector.SaveMlp(dir.File("x"), 4, 3, new float[12], null, new float[12], null, "tanh"));
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
