using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using MoeRagInject.Server.Contracts;
using MoeRagInject.Server.Generation;
using MoeRagInject.Server.Observability;
using MoeRagInject.Server.Requests;

namespace MoeRagInject.Server.Routes;

/// <summary>What a team watching the server reads: /metrics (Prometheus), /rag_events (the last RAG events) and /dashboard.</summary>
internal static class ObservabilityRoutes
{
    public const int DefaultEventLimit = 50;

    /// <param name="metrics">The Prometheus endpoint; null when metrics are disabled (then /metrics is not found).</param>
    public static void Map(WebApplication app, PrometheusEndpoint? metrics)
    {
        var group = app.MapGroup("").WithGroupName("observability");
        if (metrics is not null)
        {
            group.MapGet("/metrics", (HttpContext context, EngineHolder engine) =>
            {
                engine.Require();
                return metrics.ScrapeAsync(context, app);
            });
        }
        group.MapGet("/rag_events", (HttpContext context, EngineHolder engine) => RagEvents(context, engine));
        group.MapGet("/dashboard", (HttpContext context) => Dashboard(context, "index.html"));
        group.MapGet("/dashboard/{**path}", (HttpContext context, string? path) => Dashboard(context, string.IsNullOrEmpty(path) ? "index.html" : path));
    }

    /// <summary>The newest events first; <c>?limit=N</c> (1 to the history's capacity, default 50).</summary>
    private static IResult RagEvents(HttpContext context, EngineHolder holder)
    {
        var history = holder.Require().RagEvents;
        var limit = DefaultEventLimit;
        if (context.Request.Query["limit"] is { Count: > 0 } given)
        {
            if (!int.TryParse(given[0], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out limit)
                || limit < 1 || limit > history.Capacity)
                throw ApiException.BadRequest($"limit must be an integer in [1, {history.Capacity}]");
        }
        var events = history.Latest(limit).Select(e => e.ToJson()).ToArray();
        return Results.Json(new RagEventsResponse(events, history.Capacity), ApiJsonContext.Wire.RagEventsResponse);
    }

    private static IResult Dashboard(HttpContext context, string path)
    {
        if (!DashboardAssets.TryGet(path, out var bytes, out var contentType))
            throw new ApiException(404, $"no dashboard file {path}", "not_found");
        context.Response.Headers.CacheControl = "no-cache";
        return Results.Bytes(bytes, contentType);
    }
}
