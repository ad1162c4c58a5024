using System.Globalization;
using System.Text;
using MoeRagInject.Backend.Cuda.Interop;

namespace MoeRagInject.Backend.Cuda;

/// <summary>
/// Where a step's time goes on the GPU, op by op: with MOE_RAG_INJECT_PROFILE=1 the backend records a timing event into
/// the stream before and after every op and, when the next step begins, adds the time between each pair to the op's row
/// (op name, rows of the step); the table is printed when the backend is disposed. Graphs are not captured while
/// profiling (a replayed graph has no ops to time), so launch gaps that a graph would hide show as the difference between
/// a step's span on the GPU and the sum of its ops. The first step of each size is left out (lazy module loads).
/// </summary>
internal sealed class OpProfile(CudaDevice device, CudaStream stream) : IDisposable
{
    private readonly Dictionary<(int Rows, string Op), (int Calls, double Milliseconds)> _ops = [];
    private readonly Dictionary<int, (int Seen, int Counted, double SpanMilliseconds)> _steps = [];
    private readonly List<(string Op, CudaEvent Start, CudaEvent End)> _pending = [];
    private readonly Stack<CudaEvent> _free = new();
    private int _stepRows = -1;

    public static OpProfile? FromEnvironment(CudaDevice device, CudaStream stream) =>
        Environment.GetEnvironmentVariable("MOE_RAG_INJECT_PROFILE") is "1" or "true" ? new OpProfile(device, stream) : null;

    /// <summary>Starts timing an op of the current step (filed under the step's rows, not the op's).</summary>
    public Scope Time(string op)
    {
        var start = Take();
        start.Record(stream);
        return new Scope(this, op, start);
    }

    /// <summary>A step of <paramref name="rows"/> rows begins (called at its embedding): the previous step's times are added up.</summary>
    public void Step(int rows)
    {
        Flush();
        _stepRows = rows;
        var (seen, counted, span) = _steps.GetValueOrDefault(rows);
        _steps[rows] = (seen + 1, counted, span);
    }

    private CudaEvent Take() => _free.Count > 0 ? _free.Pop() : device.CreateEvent(timing: true);

    private void End(string op, CudaEvent start)
    {
        var end = Take();
        end.Record(stream);
        _pending.Add((op, start, end));
    }

    private void Flush()
    {
        if (_pending.Count == 0) return;
        _pending[^1].End.Synchronize();
        var (seen, counted, span) = _steps.GetValueOrDefault(_stepRows);
        if (seen > 1)
        {
            foreach (var (op, start, end) in _pending)
            {
                var (calls, total) = _ops.GetValueOrDefault((_stepRows, op));
                _ops[(_stepRows, op)] = (calls + 1, total + CudaEvent.ElapsedMilliseconds(start, end));
            }
            _steps[_stepRows] = (seen, counted + 1, span + CudaEvent.ElapsedMilliseconds(_pending[0].Start, _pending[^1].End));
        }
        foreach (var (_, start, end) in _pending)
        {
            _free.Push(start);
            _free.Push(end);
        }
        _pending.Clear();
    }

    /// <summary>One table per step size: each op's calls and GPU time per step, and its share of the ops' sum.</summary>
    public string Report()
    {
        Flush();
        var text = new StringBuilder("op profile (MOE_RAG_INJECT_PROFILE=1: timing events around every op, graphs off; first step of each size left out)\n");
        foreach (var rows in _ops.Keys.Select(k => k.Rows).Distinct().Order())
        {
            var (_, counted, span) = _steps[rows];
            var ops = _ops.Where(o => o.Key.Rows == rows).OrderByDescending(o => o.Value.Milliseconds).ToList();
            var total = ops.Where(o => !IsPart(o.Key.Op)).Sum(o => o.Value.Milliseconds);
            text.Append(CultureInfo.InvariantCulture,
                $"  steps of {rows} rows: {counted} steps, {total / counted:F3} ms of ops a step, {span / counted:F3} ms from the first op's start to the last one's end\n");
            foreach (var ((_, op), (calls, milliseconds)) in ops)
                text.Append(CultureInfo.InvariantCulture,
                    $"    {op,-48} {calls / (double)counted,6:F1} calls {milliseconds / counted,9:F3} ms {100 * milliseconds / total,6:F1}%\n");
        }
        return text.ToString();
    }

    public void Dispose()
    {
        foreach (var (_, start, end) in _pending)
        {
            start.Dispose();
            end.Dispose();
        }
        while (_free.Count > 0) _free.Pop().Dispose();
    }

    /// <summary>A part of another op (its name starts with "  "): listed, not added to the step's total a second time.</summary>
    private static bool IsPart(string op) => op.StartsWith("  ", StringComparison.Ordinal);

    public readonly struct Scope(OpProfile? profile, string op, CudaEvent? start) : IDisposable
    {
        public void Dispose() => profile?.End(op, start!);
    }
}
