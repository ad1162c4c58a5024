using System.Buffers.Binary;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;

namespace MoeRagInject.Rag;

/// <summary>Minimal safetensors reader/writer for small fp32/fp16/bf16 tensors.</summary>
internal static class SafeTensors
{
    internal const long MaxHeaderBytes = 100L * 1024 * 1024;

    internal sealed record TensorInfo(string Name, string DType, long[] Shape, long Begin, long End)
    {
        public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);

        public string ShapeText => "[" + string.Join(", ", Shape) + "]";
    }

    internal sealed class File : IDisposable
    {
        private readonly FileStream _stream;

        private File(string path, FileStream stream, long dataStart, Dictionary<string, TensorInfo> tensors)
        {
            Path = path;
            _stream = stream;
            DataStart = dataStart;
            Tensors = tensors;
        }

        public string Path { get; }

        public long DataStart { get; }

        public IReadOnlyDictionary<string, TensorInfo> Tensors { get; }

        public static File Open(string path)
        {
            var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
            try
            {
                long length = stream.Length;
                if (length < 8)
                {
                    throw Bad(path, $"the file is {length} bytes long, too short for a safetensors file");
                }

                Span<byte> prefix = stackalloc byte[8];
                stream.ReadExactly(prefix);
                ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(prefix);
                if (headerLength < 2 || headerLength > (ulong)Math.Min(MaxHeaderBytes, length - 8))
                {
                    throw Bad(path, $"the header length {headerLength} does not fit the file ({length} bytes); not a safetensors file");
                }

                byte[] header = new byte[(int)headerLength];
                stream.ReadExactly(header);
                long dataStart = 8 + (long)headerLength;
                long dataLength = length - dataStart;
                var tensors = ParseHeader(path, header, dataLength);
                return new File(path, stream, dataStart, tensors);
            }
            catch
            {
                stream.Dispose();
                throw;
            }
        }

        /// <summary>Reads a tensor of F32, F16 or BF16 into fp32.</summary>
        public float[] ReadAsSingle(TensorInfo tensor)
        {
            int elementSize = ElementSize(tensor.DType) ?? throw Bad(Path, $"tensor \"{tensor.Name}\" has dtype {tensor.DType}; expected F32, F16 or BF16");
            long count = tensor.ElementCount;
            if (count > Array.MaxLength)
            {
                throw Bad(Path, $"tensor \"{tensor.Name}\" is too large ({count} elements)");
            }

            var result = new float[count];
            _stream.Position = DataStart + tensor.Begin;
            byte[] chunk = new byte[Math.Min(1 << 20, Math.Max(elementSize, (int)Math.Min(count * elementSize, int.MaxValue)))];
            int chunkElements = chunk.Length / elementSize;
            long done = 0;
            while (done < count)
            {
                int n = (int)Math.Min(chunkElements, count - done);
                var bytes = chunk.AsSpan(0, n * elementSize);
                _stream.ReadExactly(bytes);
                var target = result.AsSpan((int)done, n);
                switch (tensor.DType)
                {
                    case "F32":
                        for (int i = 0; i < n; i++)
                        {
                            target[i] = BinaryPrimitives.ReadSingleLittleEndian(bytes[(4 * i)..]);
                        }

                        break;
                    case "F16":
                        for (int i = 0; i < n; i++)
                        {
                            target[i] = (float)BinaryPrimitives.ReadHalfLittleEndian(bytes[(2 * i)..]);
                        }

                        break;
                    default: // BF16: the upper half of an fp32
                        for (int i = 0; i < n; i++)
                        {
                            target[i] = BitConverter.Int32BitsToSingle(BinaryPrimitives.ReadUInt16LittleEndian(bytes[(2 * i)..]) << 16);
                        }

                        break;
                }

                done += n;
            }

            return result;
        }

        public void Dispose() => _stream.Dispose();
    }

    internal static int? ElementSize(string dtype) => dtype switch
    {
        "F32" => 4,
        "F16" or "BF16" => 2,
        _ => null,
    };

    /// <summary>Writes fp32 tensors as a safetensors file (header padded to 8 bytes), atomically via a temporary file.</summary>
    internal static void WriteF32(string path, IReadOnlyList<(string Name, long[] Shape, float[] Data)> tensors)
    {
        var header = new StringBuilder("{");
        long offset = 0;
        foreach (var (name, shape, data) in tensors)
        {
            long bytes = (long)data.Length * 4;
            header.Append(JsonSerializer.Serialize(name))
                .Append(":{\"dtype\":\"F32\",\"shape\":[")
                .Append(string.Join(",", shape.Select(s => s.ToString(CultureInfo.InvariantCulture))))
                .Append("],\"data_offsets\":[")
                .Append(offset.ToString(CultureInfo.InvariantCulture)).Append(',')
                .Append((offset + bytes).ToString(CultureInfo.InvariantCulture)).Append("]},");
            offset += bytes;
        }

        header.Append("\"__metadata__\":{\"format\":\"pt\",\"producer\":\"moe-rag-inject\"}}");
        byte[] headerBytes = Encoding.UTF8.GetBytes(header.ToString());
        int padded = (headerBytes.Length + 7) / 8 * 8;

        string fullPath = System.IO.Path.GetFullPath(path);
        string? directory = System.IO.Path.GetDirectoryName(fullPath);
        if (!string.IsNullOrEmpty(directory))
        {
            Directory.CreateDirectory(directory);
        }

        string temporary = fullPath + ".tmp-" + Guid.NewGuid().ToString("N");
        try
        {
            using (var stream = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 16))
            {
                Span<byte> prefix = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)padded);
                stream.Write(prefix);
                stream.Write(headerBytes);
                for (int i = headerBytes.Length; i < padded; i++)
                {
                    stream.WriteByte((byte)' ');
                }

                byte[] buffer = new byte[1 << 16];
                foreach (var (_, _, data) in tensors)
                {
                    if (BitConverter.IsLittleEndian)
                    {
                        stream.Write(MemoryMarshal.AsBytes(data.AsSpan()));
                        continue;
                    }

                    for (int i = 0; i < data.Length;)
                    {
                        int n = Math.Min(buffer.Length / 4, data.Length - i);
                        for (int j = 0; j < n; j++)
                        {
                            BinaryPrimitives.WriteSingleLittleEndian(buffer.AsSpan(4 * j), data[i + j]);
                        }

                        stream.Write(buffer, 0, 4 * n);
                        i += n;
                    }
                }

                stream.Flush(flushToDisk: true);
            }

            System.IO.File.Move(temporary, fullPath, overwrite: true);
        }
        finally
        {
            if (System.IO.File.Exists(temporary))
            {
                System.IO.File.Delete(temporary);
            }
        }
    }

    private static Dictionary<string, TensorInfo> ParseHeader(string path, byte[] header, long dataLength)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(header);
        }
        catch (JsonException ex)
        {
            throw Bad(path, $"the header is not valid JSON ({ex.Message})");
        }

        using (document)
        {
            if (document.RootElement.ValueKind != JsonValueKind.Object)
            {
                throw Bad(path, "the header is not a JSON object");
            }

            var tensors = new Dictionary<string, TensorInfo>(StringComparer.Ordinal);
            foreach (var property in document.RootElement.EnumerateObject())
            {
                if (property.Name == "__metadata__")
                {
                    continue;
                }

                var entry = property.Value;
                if (entry.ValueKind != JsonValueKind.Object
                    || !entry.TryGetProperty("dtype", out var dtype) || dtype.ValueKind != JsonValueKind.String
                    || !entry.TryGetProperty("shape", out var shape) || shape.ValueKind != JsonValueKind.Array
                    || !entry.TryGetProperty("data_offsets", out var offsets) || offsets.ValueKind != JsonValueKind.Array || offsets.GetArrayLength() != 2)
                {
                    throw Bad(path, $"tensor \"{property.Name}\" lacks a string dtype, an array shape or two data_offsets");
                }

                long[] dims = new long[shape.GetArrayLength()];
                int d = 0;
                foreach (var dim in shape.EnumerateArray())
                {
                    if (dim.ValueKind != JsonValueKind.Number || !dim.TryGetInt64(out dims[d]) || dims[d] < 0)
                    {
                        throw Bad(path, $"tensor \"{property.Name}\" has a bad shape entry {dim.GetRawText()}");
                    }

                    d++;
                }

                if (!offsets[0].TryGetInt64(out long begin) || !offsets[1].TryGetInt64(out long end) || begin < 0 || end < begin || end > dataLength)
                {
                    throw Bad(path, $"tensor \"{property.Name}\" has data_offsets {offsets.GetRawText()} outside the {dataLength}-byte data section");
                }

                var info = new TensorInfo(property.Name, dtype.GetString()!, dims, begin, end);
                if (ElementSize(info.DType) is int size && info.ElementCount * size != end - begin)
                {
                    throw Bad(path, $"tensor \"{property.Name}\" ({info.DType} {info.ShapeText}) needs {info.ElementCount * size} bytes but its data_offsets span {end - begin}");
                }

                tensors[property.Name] = info;
            }

            return tensors;
        }
    }

    internal static InvalidDataException Bad(string path, string problem) => new($"{path}: {problem}.");
}
