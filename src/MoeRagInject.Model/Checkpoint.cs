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

    /// <summary>Random weights of the config's shapes (normal, std 0.02; norms 1), for benchmarks.</summary>
    public static Checkpoint CreateDummy(ModelConfig config, DType dtype = DType.BF16, ulong seed = 0)
    {
        var checkpoint = new Checkpoint("dummy");
        var rng = new SplitMix64(seed);
        foreach (var (name, shape, isNorm) in MixtralWeightNames.Expected(config))
        {
            long count = 1;
            foreach (var d in shape) count *= d;
            var bytes = count * dtype.ByteSize();
            var buffer = (byte*)NativeMemory.Alloc((nuint)bytes);
            checkpoint._ownedBuffers.Add((IntPtr)buffer);
            for (long i = 0; i < count; i++)
            {
                var value = isNorm ? 1f : (float)(rng.NextGaussian() * 0.02);
                switch (dtype)
                {
                    case DType.F32: ((float*)buffer)[i] = value; break;
                    case DType.BF16: ((ushort*)buffer)[i] = HalfConversion.FloatToBFloat16(value); break;
                    default: ((Half*)buffer)[i] = (Half)value; break;
                }
            }
            checkpoint._tensors[name] = new TensorView(name, dtype, shape, buffer, bytes);
        }
        return checkpoint;
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
