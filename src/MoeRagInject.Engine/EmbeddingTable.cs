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
