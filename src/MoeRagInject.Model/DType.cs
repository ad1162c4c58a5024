namespace MoeRagInject.Model;

/// <summary>Element types a checkpoint tensor may have.</summary>
public enum DType
{
    F32,
    F16,
    BF16,
}

public static class DTypeExtensions
{
    public static int ByteSize(this DType dtype) => dtype == DType.F32 ? 4 : 2;

    /// <summary>Parses the safetensors dtype name ("F32", "F16", "BF16").</summary>
    public static DType? FromSafetensorsName(string name) => name switch
    {
        "F32" => DType.F32,
        "F16" => DType.F16,
        "BF16" => DType.BF16,
        _ => null,
    };

    public static string SafetensorsName(this DType dtype) => dtype switch
    {
        DType.F32 => "F32",
        DType.F16 => "F16",
        _ => "BF16",
    };
}
