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

    /// <summary>The tensors and metadata of a valid attn projector (tools/projector's layout), random from <paramref name="seed"/>.</summary>
    private static (List<(string Name, int[] Shape, float[] Data)> Tensors, Dictionary<string, string> Metadata) AttnFile(
        int hidden, int length, int width, int heads, int queries, int layers, uint seed, int? feedForward = null)
    {
        int ff = feedForward ?? (2 * width);
        var tensors = new List<(string, int[], float[])>();
        uint next = seed;
        void Add(string name, int[] shape, float scale = 1f, float offset = 0f)
        {
            int count = shape.Aggregate(1, (a, b) => a * b);
            var values = ArrayEmbeddings.Random(1, count, next++).Table.Select(v => offset + (scale * v)).ToArray();
            tensors.Add(("attn." + name, shape, values));
        }

        Add("mu", [hidden], 0.1f);
        Add("sigma", [hidden], 0.2f, 1f);
        Add("in.weight", [width, hidden]);
        Add("in.bias", [width]);
        Add("pos", [length, width]);
        for (int b = 0; b < layers; b++)
        {
            string p = $"blocks.{b}.";
            Add(p + "norm1.weight", [width], 0.2f, 1f);
            Add(p + "norm1.bias", [width], 0.1f);
            Add(p + "qkv.weight", [3 * width, width]);
            Add(p + "qkv.bias", [3 * width], 0.1f);
            Add(p + "proj.weight", [width, width]);
            Add(p + "proj.bias", [width], 0.1f);
            Add(p + "norm2.weight", [width], 0.2f, 1f);
            Add(p + "norm2.bias", [width], 0.1f);
            Add(p + "ff1.weight", [ff, width]);
            Add(p + "ff1.bias", [ff], 0.1f);
            Add(p + "ff2.weight", [width, ff]);
            Add(p + "ff2.bias", [width], 0.1f);
        }

        Add("norm.weight", [width], 0.2f, 1f);
        Add("norm.bias", [width], 0.1f);
        Add("queries", [queries, width]);
        Add("key.weight", [width, width]);
        Add("key.bias", [width], 0.1f);
        Add("value.weight", [width, width]);
        Add("value.bias", [width], 0.1f);
        Add("out.weight", [hidden, queries * width]);
        Add("out.bias", [hidden], 0.1f);
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal)
        {
            ["format"] = ContextInjector.FormatName,
            ["kind"] = "attn",
            ["activation"] = "silu",
            ["context"] = $"embed-seq:{length}",
            ["layers"] = "0,2",
            ["alpha"] = "0.8",
            ["width"] = $"{width}",
            ["heads"] = $"{heads}",
            ["queries"] = $"{queries}",
            ["encoder_layers"] = $"{layers}",
            ["layer_norm_eps"] = "1e-05",
        };
        return (tensors, metadata);
    }

    [Fact]
    public void AttnProjectorFileLoadsAndReadsTheFirstTPresentRows()
    {
        using var dir = new TempDir();
        const int Hidden = 10;
        const int Length = 6;
        var embeddings = ArrayEmbeddings.Random(20, Hidden, 31);
        Array.Clear(embeddings.Table, 7 * Hidden, Hidden); // token 7's row is all zeros: an absent row
        var (tensors, metadata) = AttnFile(Hidden, Length, width: 8, heads: 2, queries: 3, layers: 2, seed: 40);
        string path = dir.File("attn.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(path, tensors, metadata: metadata);

        var injector = ContextInjector.LoadFromFile(embeddings, path);
        Assert.Equal(ProjectionKind.File, injector.Kind);
        Assert.Equal(ProjectorArchitecture.Attn, injector.Architecture);
        Assert.Equal(Length, injector.SequenceLength);
        Assert.Equal([0, 2], injector.Layers);
        Assert.Equal(0.8f, injector.Alpha);
        Assert.Contains("attn F32 [6 rows, width 8, 2 heads, 3 queries, 2 layers], embed-seq:6", injector.Description, StringComparison.Ordinal);
        var info = ContextInjector.ReadFileInfo(path);
        Assert.Equal(ProjectorArchitecture.Attn, info.Architecture);
        Assert.Equal([0, 2], info.Layers);
        Assert.Equal(0.8f, info.Alpha);
        Assert.Null(ContextInjector.CreateIdentity(embeddings).SequenceLength);

        float[] Inject(int[] ids, float scale = 1f)
        {
            var v = new float[Hidden];
            double norm = injector.ComputeInjection(ids, scale, v);
            Assert.Equal(Math.Sqrt(v.Sum(x => (double)x * x)), norm, 1e-9);
            return v;
        }

        var full = Inject([1, 2, 3, 4, 5, 6]);
        Assert.Contains(full, x => Math.Abs(x) > 1e-3f);
        // Ids past T are not read (but are still checked against the vocabulary).
        Assert.Equal(full, Inject([1, 2, 3, 4, 5, 6, 9, 11, 19]));
        Assert.Throws<ArgumentOutOfRangeException>(() => injector.ComputeInjection([1, 2, 3, 4, 5, 6, 20], 1f, new float[Hidden]));
        // Order matters (positions), and an absent row at the end is as no row.
        Assert.NotEqual(full, Inject([6, 5, 4, 3, 2, 1]));
        Assert.Equal(Inject([1, 2, 3]), Inject([1, 2, 3, 7]));
        Assert.NotEqual(Inject([1, 2, 3]), Inject([7, 1, 2, 3]));
        // Scale is linear; only absent rows give v = 0 and norm 0.
        var scaled = Inject([1, 2, 3, 4, 5, 6], -2f);
        for (int i = 0; i < Hidden; i++)
        {
            Assert.Equal(-2f * full[i], scaled[i], 1e-5f);
        }

        var destination = Enumerable.Repeat(3f, Hidden).ToArray();
        Assert.Equal(0, injector.ComputeInjection([7, 7], 1f, destination));
        Assert.All(destination, x => Assert.Equal(0f, x));
        // No shared scratch: threads at once give the same vectors.
        var results = new float[16][];
        Parallel.For(0, results.Length, k => results[k] = Inject([1 + (k % 5), 2, 3, 4, 5, 6, 8]));
        for (int k = 0; k < results.Length; k++)
        {
            Assert.Equal(Inject([1 + (k % 5), 2, 3, 4, 5, 6, 8]), results[k]);
        }
    }

    /// <summary>
    /// The attn reader in double precision, one scalar at a time, as the file's format describes it (tools/projector's
    /// make_reader("attn")): the rows present among the first T, standardised, in-map plus position, pre-LayerNorm
    /// blocks, final LayerNorm, pooling by each learned query, out-map, times <paramref name="scale"/>.
    /// </summary>
    private static double[] AttnOracle(ArrayEmbeddings embeddings, List<(string Name, int[] Shape, float[] Data)> tensors, int hidden,
        int length, int width, int heads, int queries, int layers, int[] ids, double scale)
    {
        float[] T(string name) => tensors.Single(t => t.Name == "attn." + name).Data;
        double[] Linear(float[] w, float[] b, double[] x)
        {
            var y = new double[b.Length];
            for (int o = 0; o < y.Length; o++)
            {
                double sum = b[o];
                for (int i = 0; i < x.Length; i++) sum += (double)w[(o * x.Length) + i] * x[i];
                y[o] = sum;
            }

            return y;
        }

        double[] LayerNorm(double[] x, float[] w, float[] b)
        {
            double mean = x.Average();
            double variance = x.Select(v => (v - mean) * (v - mean)).Average();
            return [.. x.Select((v, i) => ((v - mean) / Math.Sqrt(variance + 1e-5) * w[i]) + b[i])];
        }

        double[] Softmax(double[] s)
        {
            double max = s.Max();
            var e = s.Select(v => Math.Exp(v - max)).ToArray();
            double total = e.Sum();
            return [.. e.Select(v => v / total)];
        }

        var h = new List<double[]>();
        for (int t = 0; t < Math.Min(length, ids.Length); t++)
        {
            var row = embeddings.Table.AsSpan(ids[t] * hidden, hidden).ToArray();
            if (row.All(v => v == 0)) continue;
            var z = row.Select((v, i) => (v - (double)T("mu")[i]) / T("sigma")[i]).ToArray();
            h.Add([.. Linear(T("in.weight"), T("in.bias"), z).Select((v, i) => v + T("pos")[(t * width) + i])]);
        }

        int n = h.Count, d = width / heads;
        for (int b = 0; b < layers; b++)
        {
            string p = $"blocks.{b}.";
            var qkv = h.Select(r => Linear(T(p + "qkv.weight"), T(p + "qkv.bias"), LayerNorm(r, T(p + "norm1.weight"), T(p + "norm1.bias")))).ToList();
            var attended = Enumerable.Range(0, n).Select(_ => new double[width]).ToList();
            for (int head = 0; head < heads; head++)
            {
                for (int i = 0; i < n; i++)
                {
                    var s = Softmax([.. Enumerable.Range(0, n).Select(j =>
                        Enumerable.Range(0, d).Sum(k => qkv[i][(head * d) + k] * qkv[j][width + (head * d) + k]) / Math.Sqrt(d))]);
                    for (int k = 0; k < d; k++)
                        attended[i][(head * d) + k] = Enumerable.Range(0, n).Sum(j => s[j] * qkv[j][(2 * width) + (head * d) + k]);
                }
            }

            for (int i = 0; i < n; i++)
            {
                var a = Linear(T(p + "proj.weight"), T(p + "proj.bias"), attended[i]);
                h[i] = [.. h[i].Select((v, k) => v + a[k])];
                var f = Linear(T(p + "ff1.weight"), T(p + "ff1.bias"), LayerNorm(h[i], T(p + "norm2.weight"), T(p + "norm2.bias")));
                var g = Linear(T(p + "ff2.weight"), T(p + "ff2.bias"), [.. f.Select(v => v / (1 + Math.Exp(-v)))]);
                h[i] = [.. h[i].Select((v, k) => v + g[k])];
            }
        }

        var normed = h.Select(r => LayerNorm(r, T("norm.weight"), T("norm.bias"))).ToList();
        var keys = normed.Select(r => Linear(T("key.weight"), T("key.bias"), r)).ToList();
        var values = normed.Select(r => Linear(T("value.weight"), T("value.bias"), r)).ToList();
        var pooled = new double[queries * width];
        for (int q = 0; q < queries; q++)
        {
            var s = Softmax([.. keys.Select(k => Enumerable.Range(0, width).Sum(i => k[i] * T("queries")[(q * width) + i]) / Math.Sqrt(width))]);
            for (int i = 0; i < width; i++) pooled[(q * width) + i] = Enumerable.Range(0, n).Sum(j => s[j] * values[j][i]);
        }

        return [.. Linear(T("out.weight"), T("out.bias"), pooled).Select(v => v * scale)];
    }

    [Theory]
    [InlineData(11, 1, 32)] // 11 rows: blocks of 4 and 3 left over, in every product
    [InlineData(4, 2, 32)]
    [InlineData(1, 1, 32)]
    [InlineData(7, 1, 64)] // a feed-forward wider than q, k and v together
    public void AttnReaderMatchesAScalarOracleAtVectorWidths(int rows, int layers, int feedForward)
    {
        using var dir = new TempDir();
        // Widths that the vectorised products take (multiples of 8), with row and output counts that are not multiples of 4.
        const int Hidden = 24, Width = 16, Heads = 2, Queries = 3, Length = 12;
        var embeddings = ArrayEmbeddings.Random(30, Hidden, 55);
        var (tensors, metadata) = AttnFile(Hidden, Length, Width, Heads, Queries, layers, seed: 90, feedForward);
        string path = dir.File("attn.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(path, tensors, metadata: metadata);
        var injector = ContextInjector.LoadFromFile(embeddings, path);
        int[] ids = [.. Enumerable.Range(0, rows).Select(i => 1 + ((7 * i) % 29))];
        var actual = new float[Hidden];
        injector.ComputeInjection(ids, 0.7f, actual);
        var expected = AttnOracle(embeddings, tensors, Hidden, Length, Width, Heads, Queries, layers, ids, 0.7);
        for (int i = 0; i < Hidden; i++)
        {
            Assert.True(Math.Abs(expected[i] - actual[i]) < 2e-5 * Math.Max(1, Math.Abs(expected[i])), $"v[{i}] = {actual[i]}, oracle {expected[i]}");
        }
    }

    [Fact]
    public void AnAttnFileWithAnswerPositionsGivesOneVectorForEachFromItsOwnQueries()
    {
        using var dir = new TempDir();
        const int Hidden = 10;
        var embeddings = ArrayEmbeddings.Random(20, Hidden, 33);
        var (tensors, metadata) = AttnFile(Hidden, 6, width: 8, heads: 2, queries: 3, layers: 1, seed: 70);
        string single = dir.File("single.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(single, tensors, metadata: metadata);
        // The same reader with 2 answer positions: position 0 keeps the file's 3 queries, position 1 gets 3 others.
        var queries = tensors.Single(t => t.Name == "attn.queries").Data;
        float[] other = [.. queries.Select((q, i) => q * -0.7f + (0.05f * i))];
        var two = tensors.Select(t => t.Name == "attn.queries" ? (t.Name, new[] { 6, 8 }, (float[])[.. queries, .. other]) : t).ToList();
        var twoMetadata = new Dictionary<string, string>(metadata) { ["answer_positions"] = "2" };
        string positions = dir.File("positions.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(positions, two, metadata: twoMetadata);

        var one = ContextInjector.LoadFromFile(embeddings, single);
        var each = ContextInjector.LoadFromFile(embeddings, positions);
        Assert.Equal(1, one.AnswerPositions);
        Assert.Equal(2, each.AnswerPositions);
        Assert.Contains("3 queries, 1 layers, 2 answer positions]", each.Description, StringComparison.Ordinal);
        int[] ids = [1, 2, 3, 4];
        var v = new float[Hidden];
        one.ComputeInjection(ids, 0.5f, v);
        var both = new float[2 * Hidden];
        double norm = each.ComputeInjection(ids, 0.5f, both);
        Assert.Equal(Math.Sqrt(both.Sum(x => (double)x * x)), norm, 1e-9);
        // Position 0 pools with the single file's queries and shares its output map: the same vector.
        Assert.Equal(v, both[..Hidden]);
        Assert.NotEqual(v, both[Hidden..]);
        var ex = Assert.Throws<ArgumentException>(() => each.ComputeInjection(ids, 1f, new float[Hidden]));
        Assert.Contains("2 vectors of the hidden size 10", ex.Message, StringComparison.Ordinal);
        // No present row: every vector is zero.
        Array.Clear(embeddings.Table, 5 * Hidden, Hidden);
        Assert.Equal(0, each.ComputeInjection([5], 1f, both));
        Assert.All(both, x => Assert.Equal(0f, x));
    }

    [Theory]
    [InlineData("context", null, "embed-seq:T")]
    [InlineData("context", "embed-mean", "embed-seq:T")]
    [InlineData("context", "embed-seq:0", "\"context\"")]
    [InlineData("context", "embed-seq:x", "\"context\"")]
    [InlineData("context", "embed-seq:5", "\"attn.pos\"")]
    [InlineData("heads", null, "\"heads\"")]
    [InlineData("heads", "3", "does not divide")]
    [InlineData("heads", "0", "\"heads\"")]
    [InlineData("encoder_layers", null, "\"encoder_layers\"")]
    [InlineData("encoder_layers", "3", "block 2 lacks")]
    [InlineData("encoder_layers", "1", "\"attn.blocks.1.")]
    [InlineData("layer_norm_eps", null, "\"layer_norm_eps\"")]
    [InlineData("layer_norm_eps", "-1", "\"layer_norm_eps\"")]
    [InlineData("activation", "relu", "silu")]
    [InlineData("width", "16", "\"width\"")]
    [InlineData("queries", "2", "\"queries\"")]
    [InlineData("answer_positions", "0", "\"answer_positions\"")]
    [InlineData("answer_positions", "two", "\"answer_positions\"")]
    [InlineData("answer_positions", "2", "\"answer_positions\" 2 does not divide")]
    [InlineData("answer_positions", "3", "\"queries\" is \"3\"")]
    [InlineData("kind", "mlp", "mlp projector, which reads only")]
    public void AttnFilesWithMetadataThisEngineCannotHonourAreRejected(string key, string? value, string mentioned)
    {
        using var dir = new TempDir();
        var embeddings = ArrayEmbeddings.Random(10, 6, 1);
        var (tensors, metadata) = AttnFile(6, 4, width: 8, heads: 2, queries: 3, layers: 2, seed: 50);
        if (value is null) metadata.Remove(key);
        else metadata[key] = value;
        string path = dir.File("bad.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(path, tensors, metadata: metadata);
        var ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, path));
        Assert.Contains(path, ex.Message, StringComparison.Ordinal);
        Assert.Contains(mentioned, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void AttnFilesWithMissingOrMisshapenTensorsAreRejected()
    {
        using var dir = new TempDir();
        var embeddings = ArrayEmbeddings.Random(10, 6, 1);
        var (valid, metadata) = AttnFile(6, 4, width: 8, heads: 2, queries: 3, layers: 1, seed: 60);
        string ok = dir.File("ok.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(ok, valid, metadata: metadata);
        Assert.Equal(ProjectorArchitecture.Attn, ContextInjector.LoadFromFile(embeddings, ok).Architecture);

        (string Name, int[]? Shape, string Mentioned)[] cases =
        [
            ("attn.mu", null, "\"attn.mu\""),
            ("attn.out.bias", null, "\"attn.out.bias\""),
            ("attn.blocks.0.ff2.weight", null, "block 0 lacks \"attn.blocks.0.ff2.weight\""),
            ("attn.in.weight", [8, 5], "\"attn.in.weight\""),
            ("attn.in.weight", [8], "\"attn.in.weight\""),
            ("attn.pos", [4, 7], "\"attn.pos\""),
            ("attn.blocks.0.qkv.weight", [16, 8], "\"attn.blocks.0.qkv.weight\""),
            ("attn.blocks.0.ff2.weight", [8, 8], "\"attn.blocks.0.ff2.weight\""),
            ("attn.queries", [2, 8], "\"queries\" is \"3\""),
            ("attn.out.weight", [6, 16], "\"attn.out.weight\""),
            ("attn.norm.bias", [6], "\"attn.norm.bias\""),
        ];
        for (int i = 0; i < cases.Length; i++)
        {
            var (name, shape, mentioned) = cases[i];
            var tensors = valid.Where(t => t.Name != name).ToList();
            if (shape is not null)
            {
                tensors.Add((name, shape, new float[shape.Aggregate(1, (a, b) => a * b)]));
            }

            string path = dir.File($"bad{i}.safetensors");
            MoeRagInject.Model.SafeTensorsFile.Write(path, tensors, metadata: metadata);
            var ex = Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, path));
            Assert.Contains(mentioned, ex.Message, StringComparison.Ordinal);
        }

        // A deviation of 0 would divide by zero; a non-finite weight is refused as in the other kinds.
        foreach (var (name, value, mentioned) in new[] { ("attn.sigma", 0f, "must be positive"), ("attn.key.weight", float.NaN, "non-finite") })
        {
            var tensors = valid.Select(t => t.Name == name ? (t.Name, t.Shape, t.Data.Select(_ => value).ToArray()) : t).ToList();
            string path = dir.File($"{name}.safetensors");
            MoeRagInject.Model.SafeTensorsFile.Write(path, tensors, metadata: metadata);
            Assert.Contains(mentioned, Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, path)).Message, StringComparison.Ordinal);
        }

        // Without "kind", the attn tensors make it an attn projector; linear and mlp files cannot read embed-seq:T.
        metadata.Remove("kind");
        string implicitAttn = dir.File("implicit.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(implicitAttn, valid, metadata: metadata);
        Assert.Equal(ProjectorArchitecture.Attn, ContextInjector.ReadFileInfo(implicitAttn).Architecture);
        string linear = dir.File("linear.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(linear, [("proj", [6, 6], new float[36])], metadata: new Dictionary<string, string> { ["kind"] = "linear", ["context"] = "embed-seq:4" });
        Assert.Contains("a linear projector, which reads only \"embed-mean\"", Assert.Throws<InvalidDataException>(() => ContextInjector.LoadFromFile(embeddings, linear)).Message, StringComparison.Ordinal);
        string mlp = dir.File("mlp.safetensors");
        MoeRagInject.Model.SafeTensorsFile.Write(mlp, [("mlp.in.weight", [3, 6], new float[18]), ("mlp.out.weight", [6, 3], new float[18])], metadata: new Dictionary<string, string> { ["context"] = "embed-seq:4" });
        Assert.Contains("mlp projector, which reads only", Assert.Throws<InvalidDataException>(() => ContextInjector.ReadFileInfo(mlp)).Message, StringComparison.Ordinal);
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
