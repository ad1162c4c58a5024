using System.Globalization;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using MoeRagInject.Engine;
using MoeRagInject.Server.Contracts;
using MoeRagInject.Server.Generation;
using MoeRagInject.Server.Observability;
using MoeRagInject.Server.Routes;

namespace MoeRagInject.Server;

public sealed record ServerOptions
{
    public string Host { get; init; } = "127.0.0.1";
    /// <summary>0 lets the OS choose; <see cref="ServerHost.BaseAddress"/> then tells which port was bound.</summary>
    public int Port { get; init; } = 30000;
    /// <summary>The model id in /v1/models and OpenAI responses (sglang's --served-model-name); null uses the model folder's name.</summary>
    public string? ServedModelName { get; init; }
    /// <summary>The engine's flags, reported by /get_server_info; null reports only host and port.</summary>
    public EngineOptions? Engine { get; init; }
    /// <summary>/generate streams carry only the new text in each event, not the text so far (sglang's --incremental-streaming-output).</summary>
    public bool IncrementalStreamingOutput { get; init; }
    /// <summary>Least severe log level written to the console; <see cref="LogLevel.None"/> silences the server.</summary>
    public LogLevel LogLevel { get; init; } = LogLevel.Warning;
    /// <summary>GET /metrics in the Prometheus text format (sglang's --enable-metrics; on by default here).</summary>
    public bool EnableMetrics { get; init; } = true;

    /// <summary>
    /// The id clients name the model by: --served-model-name, else the last folder of the model path ("moe-wordnet-demo",
    /// "Mixtral-8x7B-v0.1"), as a Hugging Face id names it, rather than a path of the machine that happens to serve it.
    /// </summary>
    public string ModelName(string modelPath)
    {
        ArgumentNullException.ThrowIfNull(modelPath);
        return ServedModelName ?? Path.GetFileName(Path.TrimEndingDirectorySeparator(modelPath));
    }
}

/// <summary>
/// Kestrel around an <see cref="IGenerationEngine"/>: sglang's native routes, the OpenAI-compatible /v1 routes, and
/// /metrics, /rag_events and /dashboard.
/// The engine may still be loading when the host starts; until it is ready /health answers 503 and so do the routes that need it.
/// </summary>
public sealed class ServerHost : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly PrometheusEndpoint? _metrics;
    private bool _started;

    private ServerHost(WebApplication app, ServerOptions options, EngineHolder engine, PrometheusEndpoint? metrics)
    {
        _app = app;
        _metrics = metrics;
        Options = options;
        Engine = engine;
    }

    public ServerOptions Options { get; }
    public EngineHolder Engine { get; }

    /// <summary>The address Kestrel bound (with the real port when <see cref="ServerOptions.Port"/> was 0); valid after <see cref="StartAsync"/>.</summary>
    public Uri BaseAddress { get; private set; } = new("http://127.0.0.1/");

    public static ServerHost Create(ServerOptions options, IGenerationEngine engine) => Create(options, Task.FromResult(engine));

    public static ServerHost Create(ServerOptions options, Task<IGenerationEngine> engine)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(engine);
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions
        {
            ApplicationName = typeof(ServerHost).Assembly.GetName().Name,
            ContentRootPath = AppContext.BaseDirectory,
        });
        builder.WebHost.UseUrls(ListenUrl(options.Host, options.Port));
        builder.Logging.ClearProviders();
        if (options.LogLevel != LogLevel.None)
        {
            builder.Logging.AddSimpleConsole(o => { o.SingleLine = true; o.TimestampFormat = "HH:mm:ss "; });
            builder.Logging.SetMinimumLevel(options.LogLevel);
            // A failed start (port in use) is thrown from StartAsync for the caller to report; the host's own log of it is a stack trace.
            builder.Logging.AddFilter("Microsoft.Extensions.Hosting.Internal.Host", LogLevel.None);
        }
        builder.Services.Configure<ConsoleLifetimeOptions>(o => o.SuppressStatusMessages = true);
        builder.Services.ConfigureHttpJsonOptions(o => o.SerializerOptions.TypeInfoResolverChain.Insert(0, ApiJsonContext.Wire));

        var metrics = options.EnableMetrics ? new PrometheusEndpoint() : null;
        var holder = new EngineHolder(engine, metrics is null ? null : metrics.Attach);
        builder.Services.AddSingleton(holder);
        builder.Services.AddSingleton(options);

        var app = builder.Build();
        app.Use(ErrorHandling.Middleware);
        SglangRoutes.Map(app);
        OpenAiRoutes.Map(app);
        ObservabilityRoutes.Map(app, metrics);
        app.MapFallback(static context => ErrorHandling.WriteAsync(
            context, StatusCodes.Status404NotFound, $"no route {context.Request.Method} {context.Request.Path}", "not_found"));
        return new ServerHost(app, options, holder, metrics);
    }

    public async Task StartAsync(CancellationToken cancellationToken = default)
    {
        await _app.StartAsync(cancellationToken).ConfigureAwait(false);
        _started = true;
        var addresses = _app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()?.Addresses;
        var bound = addresses?.FirstOrDefault() ?? ListenUrl(Options.Host, Options.Port);
        BaseAddress = new Uri(bound.EndsWith('/') ? bound : bound + "/");
    }

    /// <summary>Completes when the host is asked to stop (Ctrl+C, SIGTERM, or <see cref="StopAsync"/>).</summary>
    public Task WaitForShutdownAsync(CancellationToken cancellationToken = default) => _app.WaitForShutdownAsync(cancellationToken);

    public async Task StopAsync(CancellationToken cancellationToken = default)
    {
        if (!_started) return;
        _started = false;
        await _app.StopAsync(cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Stops and disposes the web host. The engine belongs to the caller, who disposes it after the host.</summary>
    public async ValueTask DisposeAsync()
    {
        await StopAsync().ConfigureAwait(false);
        await _app.DisposeAsync().ConfigureAwait(false);
        _metrics?.Dispose();
    }

    private static string ListenUrl(string host, int port)
    {
        var h = host.Contains(':', StringComparison.Ordinal) && !host.StartsWith('[') ? $"[{host}]" : host;
        return string.Create(CultureInfo.InvariantCulture, $"http://{h}:{port}");
    }
}
