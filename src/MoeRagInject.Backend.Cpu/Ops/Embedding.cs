namespace MoeRagInject.Backend.Cpu.Ops;

internal static class Embedding
{
    public static void Lookup(CpuWeight table, int[] tokenIds, CpuActivation output, int rows)
    {
        for (var r = 0; r < rows; r++) table.ReadRow(tokenIds[r], output.Row(r));
    }
}
