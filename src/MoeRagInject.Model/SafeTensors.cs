using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Text.Json;

namespace MoeRagInject.Model;

/// <summary>A read-only view of one tensor: its element type, shape and bytes (memory-mapped or in memory).</summary>
public readonly unsafe struct TensorView
{
    private readonly byte* _data;

    public TensorView(string name, DType dtype, int[] shape, byte* data, long byteLength)
    {
        Name = name;
        DType = dtype;
        Shape = shape;
        _data = data;
        ByteLength = byteLength;
    }

    public string Name { get; }
    public DType DType { get; }
    public int[] Shape { get; }
    public long ByteLength { get; }
    public long ElementCount => ByteLength / DType.ByteSize();
    public byte* Pointer => _data;

    public int Rows => Shape.Length == 0 ? 1 : Shape[0];
    public int RowLength => Shape.Length <= 1 ? (int)ElementCount : (int)(ElementCount / Shape[0]);

    public ReadOnlySpan<byte> Bytes => new(_data, checked((int)ByteLength));

    /// <summary>Converts element range [start, start + destination.Length) to fp32.</summary>
    public void ReadFloats(long start, Span<float> destination) =>
        HalfConversion.ToFloat(DType, _data + start * DType.ByteSize(), destination);

    public float[] ToFloatArray()
    {
        var result = new float[ElementCount];
        ReadFloats(0, result);
        return result;
    }
}

/// <summary>Conversions of bf16/fp16 storage to fp32.</summary>
public static unsafe class HalfConversion
{
    public static void ToFloat(DType dtype, byte* source, Span<float> destination)
    {
        switch (dtype)
        {
            case DType.F32:
                new ReadOnlySpan<float>(source, destination.Length).CopyTo(destination);
                break;
            case DType.BF16:
                BFloat16ToFloat(new ReadOnlySpan<ushort>(source, destination.Length), destination);
                break;
            case DType.F16:
                var halves = new ReadOnlySpan<Half>(source, destination.Length);
                for (var i = 0; i < destination.Length; i++) destination[i] = (float)halves[i];
                break;
        }
    }

    /// <summary>bf16 is the top half of an fp32: shifting the bits left by 16 is exact.</summary>
    public static void BFloat16ToFloat(ReadOnlySpan<ushort> source, Span<float> destination)
    {
        var bits = MemoryMarshal.Cast<float, uint>(destination);
        var i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i + 16 <= source.Length; i += 16)
            {
                var packed = Vector256.Create<ushort>(source.Slice(i, 16));
                var (lo, hi) = Vector256.Widen(packed);
                Vector256.ShiftLeft(lo, 16).CopyTo(bits.Slice(i, 8));
                Vector256.ShiftLeft(hi, 16).CopyTo(bits.Slice(i + 8, 8));
            }
        }
        for (; i < source.Length; i++) bits[i] = (uint)source[i] << 16;
    }

    /// <summary>Round-to-nearest-even fp32 → bf16, as torch does.</summary>
    public static ushort FloatToBFloat16(float value)
    {
        var bits = BitConverter.SingleToUInt32Bits(value);
        if (float.IsNaN(value)) return 0x7FC0;
        var rounding = 0x7FFFu + ((bits >> 16) & 1);
        return (ushort)((bits + rounding) >> 16);
    }
}

/// <summary>
/// A memory-mapped .safetensors file: 8-byte little-endian header length, a JSON header
/// {name: {dtype, shape, data_offsets: [begin, end]}}, then the data.
/// </summary>
public sealed unsafe class SafeTensorsFile : IDisposable
{
    private readonly MemoryMappedFile _file;
    private readonly MemoryMappedViewAccessor _view;
    private readonly byte* _base;
    private readonly Dictionary<string, TensorView> _tensors = new(StringComparer.Ordinal);
    private readonly Dictionary<string, string> _metadata = new(StringComparer.Ordinal);

    public SafeTensorsFile(string path)
    {
        Path = path;
        var length = new FileInfo(path).Length;
        if (length < 8) throw new InvalidDataException($"{path}: not a safetensors file (only {length} bytes)");
        _file = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        _view = _file.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
        byte* pointer = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
        _base = pointer + _view.PointerOffset;
        try
        {
            ParseHeader(length);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    public string Path { get; }
    public IReadOnlyDictionary<string, TensorView> Tensors => _tensors;
    /// <summary>The header's "__metadata__" (string to string, as the format defines it); empty when there is none.</summary>
    public IReadOnlyDictionary<string, string> Metadata => _metadata;

    private void ParseHeader(long fileLength)
    {
        var headerLength = (long)BitConverter.ToUInt64(new ReadOnlySpan<byte>(_base, 8));
        if (headerLength <= 0 || 8 + headerLength > fileLength)
            throw new InvalidDataException($"{Path}: header length {headerLength} does not fit a file of {fileLength} bytes");
        JsonDocument header;
        try
        {
            header = JsonDocument.Parse(new ReadOnlyMemory<byte>(new ReadOnlySpan<byte>(_base + 8, (int)headerLength).ToArray()));
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{Path}: header is not valid JSON: {e.Message}");
        }
        using (header)
        {
            var dataStart = _base + 8 + headerLength;
            var dataLength = fileLength - 8 - headerLength;
            foreach (var entry in header.RootElement.EnumerateObject())
            {
                if (entry.Name == "__metadata__")
                {
                    if (entry.Value.ValueKind != JsonValueKind.Object)
                        throw new InvalidDataException($"{Path}: __metadata__ is not an object");
                    foreach (var item in entry.Value.EnumerateObject())
                        _metadata[item.Name] = item.Value.ValueKind == JsonValueKind.String ? item.Value.GetString()!
                            : throw new InvalidDataException($"{Path}: __metadata__ value \"{item.Name}\" is not a string");
                    continue;
                }
                var t = entry.Value;
                var dtypeName = t.GetProperty("dtype").GetString() ?? "";
                var dtype = DTypeExtensions.FromSafetensorsName(dtypeName)
                    ?? throw new InvalidDataException($"{Path}: tensor {entry.Name} has dtype {dtypeName}; supported: F32, F16, BF16");
                var shape = t.GetProperty("shape").EnumerateArray().Select(d => d.GetInt32()).ToArray();
                var offsets = t.GetProperty("data_offsets");
                var begin = offsets[0].GetInt64();
                var end = offsets[1].GetInt64();
                var elements = shape.Aggregate(1L, (a, b) => a * b);
                if (begin < 0 || end > dataLength || end - begin != elements * dtype.ByteSize())
                    throw new InvalidDataException($"{Path}: tensor {entry.Name} data_offsets [{begin}, {end}] do not match shape [{string.Join(", ", shape)}] of {dtypeName} within {dataLength} data bytes");
                _tensors[entry.Name] = new TensorView(entry.Name, dtype, shape, dataStart + begin, end - begin);
            }
        }
    }

    public void Dispose()
    {
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _file.Dispose();
    }

    /// <summary>Writes tensors (fp32 data) as a safetensors file, with an optional string-to-string "__metadata__".</summary>
    public static void Write(string path, IEnumerable<(string Name, int[] Shape, float[] Data)> tensors, DType dtype = DType.F32,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        long offset = 0;
        var headerJson = new System.Text.StringBuilder("{");
        var first = true;
        if (metadata is { Count: > 0 })
        {
            headerJson.Append("\"__metadata__\":{");
            var firstItem = true;
            foreach (var (key, value) in metadata)
            {
                if (!firstItem) headerJson.Append(',');
                firstItem = false;
                headerJson.Append(JsonSerializer.Serialize(key, ModelJsonContext.Default.String)).Append(':')
                    .Append(JsonSerializer.Serialize(value, ModelJsonContext.Default.String));
            }
            headerJson.Append('}');
            first = false;
        }
        foreach (var (name, shape, data) in list)
        {
            var bytes = (long)data.Length * dtype.ByteSize();
            if (!first) headerJson.Append(',');
            first = false;
            headerJson.Append(JsonSerializer.Serialize(name, ModelJsonContext.Default.String))
                .Append(":{\"dtype\":\"").Append(dtype.SafetensorsName()).Append("\",\"shape\":[")
                .Append(string.Join(",", shape)).Append("],\"data_offsets\":[").Append(offset).Append(',').Append(offset + bytes).Append("]}");
            offset += bytes;
        }
        headerJson.Append('}');
        while ((headerJson.Length + 8) % 8 != 0) headerJson.Append(' ');
        var headerBytes = System.Text.Encoding.UTF8.GetBytes(headerJson.ToString());
        using var stream = File.Create(path);
        stream.Write(BitConverter.GetBytes((ulong)headerBytes.Length));
        stream.Write(headerBytes);
        foreach (var (_, _, data) in list)
        {
            switch (dtype)
            {
                case DType.F32:
                    stream.Write(MemoryMarshal.AsBytes(data.AsSpan()));
                    break;
                case DType.BF16:
                    var bf = new ushort[data.Length];
                    for (var i = 0; i < data.Length; i++) bf[i] = HalfConversion.FloatToBFloat16(data[i]);
                    stream.Write(MemoryMarshal.AsBytes(bf.AsSpan()));
                    break;
                default:
                    var h = new Half[data.Length];
                    for (var i = 0; i < data.Length; i++) h[i] = (Half)data[i];
                    stream.Write(MemoryMarshal.AsBytes(h.AsSpan()));
                    break;
            }
        }
    }
}
