using MoeRagInject.Engine;
using MoeRagInject.Server.Requests;

namespace MoeRagInject.Server.Generation;

/// <summary>
/// The engine as the routes see it: the host may start listening before the model has loaded (so /health can answer 503),
/// so routes that need the engine ask here and get a 503 error until it is ready.
/// </summary>
/// <param name="onReady">Run once with the loaded engine before any route is given it (the metrics exporter subscribes here,
/// so that it sees every request).</param>
public sealed class EngineHolder(Task<IGenerationEngine> loading, Action<IGenerationEngine>? onReady = null)
{
    private readonly Lock _gate = new();
    private volatile IGenerationEngine? _ready;

    public Task<IGenerationEngine> Loading { get; } = loading;

    public IGenerationEngine? Current
    {
        get
        {
            if (_ready is { } ready) return ready;
            if (!Loading.IsCompletedSuccessfully) return null;
            lock (_gate)
            {
                if (_ready is null)
                {
                    onReady?.Invoke(Loading.Result);
                    _ready = Loading.Result;
                }
                return _ready;
            }
        }
    }

    /// <summary>Why loading failed, or null while it runs or once it succeeded.</summary>
    public string? LoadError => Loading.IsFaulted ? Loading.Exception!.GetBaseException().Message : Loading.IsCanceled ? "loading was cancelled" : null;

    public IGenerationEngine Require()
        => Current ?? throw new ApiException(503, LoadError is { } error ? $"the model failed to load: {error}" : "the model is still loading", "service_unavailable");
}
