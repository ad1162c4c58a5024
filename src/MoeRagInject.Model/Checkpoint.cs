using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;

namespace MoeRagInject.Model;

/// <summary>
/// The tensors of a Hugging Face checkpoint folder: <c>model.safetensors</c>, or the shards named by
/// <c>model.safetensors.index.json</c>, memory-mapped; or random weights for <c>--load-format dummy</c>.
/// </summary>
public sealed unsafe class Checkpoint : IDisposable
{
    private readonly List<SafeTensorsFile> _files = [];
    private readonly List<IntPtr> _ownedBuffers = [];
    private readonly Dictionary<string, TensorView> _tensors = new(StringComparer.Ordinal);

    private Checkpoint(string source) => Source = source;

    public string Source { get; }
    public IReadOnlyDictionary<string, TensorView> Tensors => _tensors;

    public static Checkpoint Open(string directory)
    {
        var checkpoint = new Checkpoint(directory);
        try
        {
            var single = Path.Combine(directory, "model.safetensors");
            var index = Path.Combine(directory, "model.safetensors.index.json");
            IEnumerable<string> shards;
            if (File.Exists(index))
                shards = ReadIndex(index, directory);
            else if (File.Exists(single))
                shards = [single];
            else
                throw new FileNotFoundException($"{directory}: no model.safetensors or model.safetensors.index.json in the model folder");
            foreach (var shard in shards)
            {
                if (!File.Exists(shard)) throw new FileNotFoundException($"{shard}: shard named by model.safetensors.index.json is missing", shard);
                var file = new SafeTensorsFile(shard);
                checkpoint._files.Add(file);
                foreach (var (name, view) in file.Tensors) checkpoint._tensors[name] = view;
            }
            return checkpoint;
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }

    private static List<string> ReadIndex(string indexPath, string directory)
    {
        try
        {
            using var document = JsonDocument.Parse(File.ReadAllText(indexPath));
            if (!document.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
                throw new InvalidDataException($"{indexPath}: missing \"weight_map\" object");
            return map.EnumerateObject().Select(p => p.Value.GetString() ?? "").Distinct().Order(StringComparer.Ordinal)
                .Select(f => Path.Combine(directory, f)).ToList();
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{indexPath}: not valid JSON: {e.Message}");
        }
    }

    /// <summary>
    /// Random weights of the config's shapes, for benchmarks: uniform with standard deviation 0.02 (norms 1), each value a
    /// function of (seed, tensor, index) alone (<see cref="DummyValue"/>), so any number of threads, or a GPU filling its own
    /// memory, makes the same weights. Uses <paramref name="threads"/> threads (0: all cores) and reports progress.
    /// </summary>
    public static Checkpoint CreateDummy(ModelConfig config, DType dtype = DType.BF16, ulong seed = 0, int threads = 0,
        Action<string>? progress = null)
    {
        var checkpoint = new Checkpoint("dummy");
        try
        {
            var specs = MixtralWeightNames.Expected(config).ToList();
            var buffers = new (long Count, nint Pointer, bool IsNorm)[specs.Count];
            long totalBytes = 0;
            for (var t = 0; t < specs.Count; t++)
            {
                var (name, shape, isNorm) = specs[t];
                long count = 1;
                foreach (var d in shape) count *= d;
                var bytes = count * dtype.ByteSize();
                var buffer = (byte*)NativeMemory.Alloc((nuint)bytes);
                checkpoint._ownedBuffers.Add((IntPtr)buffer);
                checkpoint._tensors[name] = new TensorView(name, dtype, shape, buffer, bytes);
                buffers[t] = (count, (nint)buffer, isNorm);
                totalBytes += bytes;
            }

            const long chunk = 1 << 20;
            var chunks = new List<(int Tensor, long Start, long End)>();
            for (var t = 0; t < buffers.Length; t++)
                for (long start = 0; start < buffers[t].Count; start += chunk)
                    chunks.Add((t, start, Math.Min(buffers[t].Count, start + chunk)));
            long done = 0;
            var reported = 0;
            var parallel = new ParallelOptions { MaxDegreeOfParallelism = threads > 0 ? threads : Environment.ProcessorCount };
            Parallel.ForEach(chunks, parallel, c =>
            {
                var (count, pointer, isNorm) = buffers[c.Tensor];
                for (var i = c.Start; i < c.End; i++)
                {
                    var value = isNorm ? 1f : DummyValue(seed, c.Tensor, i);
                    switch (dtype)
                    {
                        case DType.F32: ((float*)pointer)[i] = value; break;
                        case DType.BF16: ((ushort*)pointer)[i] = HalfConversion.FloatToBFloat16(value); break;
                        default: ((Half*)pointer)[i] = (Half)value; break;
                    }
                }
                var now = Interlocked.Add(ref done, (c.End - c.Start) * dtype.ByteSize());
                var percent = (int)(100 * now / Math.Max(1, totalBytes));
                var last = Volatile.Read(ref reported);
                if (progress is not null && percent >= last + 10 && Interlocked.CompareExchange(ref reported, percent - percent % 10, last) == last)
                    progress(string.Create(CultureInfo.InvariantCulture, $"dummy weights: {now / 1e9:F2} of {totalBytes / 1e9:F2} GB ({percent}%)"));
            });
            return checkpoint;
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The config's tensors with shapes and no data (null pointers), for a device that fills dummy weights in its own memory
    /// (with the same <see cref="DummyValue"/>, tensor numbers in <see cref="MixtralWeightNames.Expected"/> order).
    /// </summary>
    public static Checkpoint CreateShapes(ModelConfig config, DType dtype = DType.BF16)
    {
        var checkpoint = new Checkpoint("dummy");
        foreach (var (name, shape, _) in MixtralWeightNames.Expected(config))
        {
            long count = 1;
            foreach (var d in shape) count *= d;
            checkpoint._tensors[name] = new TensorView(name, dtype, shape, null, count * dtype.ByteSize());
        }
        return checkpoint;
    }

    /// <summary>Dummy weight <paramref name="index"/> of tensor <paramref name="tensor"/>: uniform on [−0.02·√3, 0.02·√3) (standard deviation 0.02) from a SplitMix64 hash of (seed, tensor, index).</summary>
    public static float DummyValue(ulong seed, int tensor, long index)
    {
        unchecked
        {
            var z = seed ^ ((ulong)tensor << 48) ^ (ulong)index;
            z += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            z ^= z >> 31;
            var u = (float)(z >> 40) * (1f / 16777216f);
            return (2f * u - 1f) * 0.034641016f;
        }
    }

    public TensorView Get(string name, params int[] expectedShape)
    {
        if (!_tensors.TryGetValue(name, out var view))
            throw new InvalidDataException($"{Source}: tensor \"{name}\" not found in the checkpoint");
        if (expectedShape.Length > 0 && !view.Shape.AsSpan().SequenceEqual(expectedShape))
            throw new InvalidDataException($"{Source}: tensor \"{name}\" has shape [{string.Join(", ", view.Shape)}], expected [{string.Join(", ", expectedShape)}]");
        return view;
    }

    public bool Contains(string name) => _tensors.ContainsKey(name);

    public void Dispose()
    {
        foreach (var file in _files) file.Dispose();
        foreach (var buffer in _ownedBuffers) NativeMemory.Free((void*)buffer);
        _files.Clear();
        _ownedBuffers.Clear();
    }
}
