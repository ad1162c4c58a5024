using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using MoeRagInject.Engine;
using MoeRagInject.Server.Generation;
using OpenTelemetry;
using OpenTelemetry.Metrics;

namespace MoeRagInject.Server.Observability;

/// <summary>
/// GET /metrics: OpenTelemetry's Prometheus exporter over the served engine's meter, and no other. The meter provider is
/// built once the engine has loaded, before any route is given the engine (<see cref="Attach"/> runs as the
/// <see cref="EngineHolder"/>'s ready step), so every request is counted. Series are written as instrumented (names already
/// carry the unit and <c>_total</c>), without OpenTelemetry's scope labels or target_info.
/// </summary>
internal sealed class PrometheusEndpoint : IDisposable
{
    private readonly Lock _gate = new();
    private MeterProvider? _provider;
    private RequestDelegate? _scrape;

    /// <summary>Subscribes to the engine's meter and starts its labelled counters at zero.</summary>
    public void Attach(IGenerationEngine engine)
    {
        var meter = engine.Metrics.Meter;
        var provider = Sdk.CreateMeterProviderBuilder()
            .AddMeter(meter.Name)
            // Another engine in the same process (tests) has a meter of the same name: only this one's instruments count.
            .AddView(instrument => ReferenceEquals(instrument.Meter, meter) ? null : MetricStreamConfiguration.Drop)
            .AddPrometheusExporter(o =>
            {
                o.ScopeInfoEnabled = false;
                o.TargetInfoEnabled = false;
                o.ScrapeResponseCacheDurationMilliseconds = 0;
            })
            .Build();
        engine.Metrics.PublishZeroes();
        lock (_gate) _provider = provider;
    }

    /// <summary>Answers a scrape through the exporter's middleware (its pipeline built on the first scrape).</summary>
    public Task ScrapeAsync(HttpContext context, IApplicationBuilder app)
    {
        RequestDelegate scrape;
        lock (_gate)
        {
            if (_provider is null)
                return Task.FromException(new Requests.ApiException(503, "the model is still loading", "service_unavailable"));
            scrape = _scrape ??= app.New().UseOpenTelemetryPrometheusScrapingEndpoint(_provider, _ => true, null, null, null).Build();
        }
        return scrape(context);
    }

    public void Dispose()
    {
        lock (_gate)
        {
            _provider?.Dispose();
            _provider = null;
        }
    }
}
