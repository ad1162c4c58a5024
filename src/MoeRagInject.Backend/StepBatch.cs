namespace MoeRagInject.Backend;

/// <summary>
/// Host-side description of one forward step over several sequences: each sequence contributes a run of
/// consecutive rows (a whole prompt, or one decode token). Built by the engine, read by the backend.
/// </summary>
public sealed class StepBatch
{
    public StepBatch(int hiddenSize, int layers, IReadOnlyList<SequenceStep> sequences)
    {
        HiddenSize = hiddenSize;
        Layers = layers;
        Sequences = sequences;
        var rows = 0;
        foreach (var s in sequences) rows += s.TokenIds.Count;
        RowCount = rows;
        TokenIds = new int[rows];
        Positions = new int[rows];
        RowSequence = new int[rows];
        var logitRows = new List<int>();
        InjectionVectors = new float[sequences.Count * hiddenSize];
        InjectionScales = new float[sequences.Count * layers];
        InjectionStart = new int[sequences.Count];
        FirstRow = new int[sequences.Count];
        var row = 0;
        for (var s = 0; s < sequences.Count; s++)
        {
            var seq = sequences[s];
            FirstRow[s] = row;
            for (var i = 0; i < seq.TokenIds.Count; i++)
            {
                TokenIds[row + i] = seq.TokenIds[i];
                Positions[row + i] = seq.StartPosition + i;
                RowSequence[row + i] = s;
                if (seq.AllLogits || i == seq.TokenIds.Count - 1) logitRows.Add(row + i);
            }
            row += seq.TokenIds.Count;
            InjectionStart[s] = int.MaxValue;
            if (seq.Injection is { } injection)
            {
                injection.Vector.CopyTo(InjectionVectors.AsSpan(s * hiddenSize, hiddenSize));
                foreach (var layer in injection.Layers) InjectionScales[s * layers + layer] = 1f;
                InjectionStart[s] = injection.StartPosition;
            }
        }
        LogitRows = logitRows.ToArray();
    }

    public int HiddenSize { get; }
    public int Layers { get; }
    public IReadOnlyList<SequenceStep> Sequences { get; }
    public int RowCount { get; }
    public int[] TokenIds { get; }
    public int[] Positions { get; }
    /// <summary>Index into <see cref="Sequences"/> of each row.</summary>
    public int[] RowSequence { get; }
    public int[] FirstRow { get; }
    /// <summary>Rows whose logits the step returns, in order: the last row of each sequence, or all its rows when it asks.</summary>
    public int[] LogitRows { get; }
    /// <summary>[sequence, hidden]: the vector to add (already scaled by α).</summary>
    public float[] InjectionVectors { get; }
    /// <summary>[sequence, layer]: 1 where the vector is added after that layer, else 0.</summary>
    public float[] InjectionScales { get; }
    /// <summary>First position of each sequence that receives the injection (int.MaxValue: none).</summary>
    public int[] InjectionStart { get; }
}

/// <summary>One sequence's part of a step: tokens at positions StartPosition.. and the KV blocks holding its context.</summary>
public sealed record SequenceStep(
    IReadOnlyList<int> TokenIds,
    int StartPosition,
    IReadOnlyList<int> BlockTable,
    bool AllLogits = false,
    InjectionInput? Injection = null);

/// <summary>A vector added to the residual stream after the given layers, from a position on.</summary>
public sealed record InjectionInput(float[] Vector, IReadOnlyList<int> Layers, int StartPosition);
