namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Embedding
{
    public static void Lookup(CpuWeight table, int[] tokenIds, CpuActivation output)
    {
        for (var r = 0; r < tokenIds.Length; r++)
        {
            var row = output.Row(r);
            table.View.ReadFloats((long)tokenIds[r] * table.Columns, row);
        }
    }
}
