using MoeRagInject.Model;
using MoeRagInject.Rag;

namespace MoeRagInject.Engine;

/// <summary>The model's token embedding table as the injector reads it (host memory, converted to fp32 per row).</summary>
internal sealed class EmbeddingTable(TensorView table) : ITokenEmbeddings
{
    public int HiddenSize => table.RowLength;
    public int VocabSize => table.Rows;

    public void AccumulateRow(int tokenId, Span<float> accumulator)
    {
        Span<float> row = stackalloc float[HiddenSize];
        table.ReadFloats((long)tokenId * HiddenSize, row);
        System.Numerics.Tensors.TensorPrimitives.Add(accumulator, row, accumulator);
    }
}

/// <summary>
/// The embedding table of dummy weights, computed row by row from <see cref="Checkpoint.DummyValue"/> (tensor 0 is the
/// embedding) and rounded to bf16, as every device's dummy weights are: nothing is held in memory.
/// </summary>
internal sealed class DummyEmbeddings(ModelConfig config, ulong Seed) : ITokenEmbeddings
{
    public int HiddenSize => config.HiddenSize;
    public int VocabSize => config.VocabSize;

    public void AccumulateRow(int tokenId, Span<float> accumulator)
    {
        var start = (long)tokenId * HiddenSize;
        for (var i = 0; i < HiddenSize; i++)
            accumulator[i] += BitConverter.UInt32BitsToSingle((uint)HalfConversion.FloatToBFloat16(Checkpoint.DummyValue(Seed, 0, start + i)) << 16);
    }
}
