using System.Collections.Concurrent;
using System.Net;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace MoeRagInject.Rag.Tests;

/// <summary>A real Kestrel server on 127.0.0.1 (ephemeral port) answering like retrieval backends, good and bad.</summary>
public sealed class FakeSearchServer : IAsyncLifetime
{
    private WebApplication? _app;

    public Uri BaseUri { get; private set; } = null!;

    /// <summary>Request bodies received, by path.</summary>
    public ConcurrentDictionary<string, JsonNode?> LastBodies { get; } = new();

    public Uri Url(string path) => new(BaseUri, path);

    public async Task InitializeAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0));
        builder.Logging.ClearProviders();
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(2));
        var app = builder.Build();

        app.MapPost("/generic", async (HttpContext ctx) =>
        {
            var body = await Record(ctx);
            string query = (string?)body?["query"] ?? "";
            int k = (int?)body?["top_k"] ?? -1;
            return Results.Json(new JsonObject
            {
                ["passages"] = new JsonArray(
                    new JsonObject { ["text"] = $"echo:{query}:{k}", ["id"] = "p1", ["title"] = "First", ["score"] = 2.5 },
                    new JsonObject { ["text"] = "second passage", ["id"] = 7 },
                    "a bare string passage"),
            });
        });
        app.MapPost("/results", () => Results.Json(new JsonObject
        {
            ["results"] = new JsonArray(new JsonObject { ["text"] = "from results", ["score"] = 1 }),
        }));
        app.MapPost("/bare", () => Results.Json(new JsonArray("one", "two", "three")));
        app.MapPost("/none", () => Results.Json(new JsonObject { ["passages"] = new JsonArray() }));
        app.MapPost("/html", () => Results.Content("<!DOCTYPE html><html><body><h1>Welcome to nginx!</h1></body></html>", "text/html"));
        app.MapPost("/wrong-shape", () => Results.Json(new JsonObject { ["answer"] = 42, ["docs"] = "none" }));
        app.MapPost("/no-text", () => Results.Json(new JsonObject { ["passages"] = new JsonArray(new JsonObject { ["body"] = "x" }) }));
        app.MapPost("/numbers", () => Results.Json(new JsonArray(1, 2)));
        app.MapPost("/fail", () => Results.Text("internal kaboom", "text/plain", statusCode: 500));
        app.MapPost("/empty", () => Results.Text("", "application/json"));
        app.MapPost("/truncated", () => Results.Text("{\"passages\": [{\"text\": \"cut", "application/json"));
        app.MapPost("/slow", async (HttpContext ctx) =>
        {
            try
            {
                await Task.Delay(TimeSpan.FromSeconds(30), ctx.RequestAborted);
            }
            catch (OperationCanceledException)
            {
            }

            return Results.Json(new JsonArray("too late"));
        });
        app.MapPost("/wiki/_search", async (HttpContext ctx) =>
        {
            var body = await Record(ctx);
            string query = (string?)body?["query"]?["match"]?["text"] ?? "(missing)";
            int size = (int?)body?["size"] ?? -1;
            return Results.Json(EsAnswer(
                Hit("doc-1", 7.25, new JsonObject { ["text"] = $"match:{query}:{size}", ["title"] = "Doc one" }),
                Hit("doc-2", 3.5, new JsonObject { ["text"] = "another document" }),
                Hit("doc-3", null, new JsonObject { ["other"] = "no text field here" })));
        });
        app.MapPost("/prefix/kb/_search", async (HttpContext ctx) =>
        {
            var body = await Record(ctx);
            string query = (string?)body?["query"]?["match"]?["content"] ?? "(missing)";
            return Results.Json(EsAnswer(Hit("c-1", 1.0, new JsonObject { ["content"] = $"content:{query}" })));
        });
        app.MapPost("/es-error/_search", () => Results.Json(
            new JsonObject { ["error"] = new JsonObject { ["type"] = "index_not_found_exception" }, ["status"] = 404 }, statusCode: 404));
        app.MapPost("/es-shape/_search", () => Results.Json(new JsonObject { ["took"] = 1 }));

        await app.StartAsync();
        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.Single();
        BaseUri = new Uri(address.TrimEnd('/') + "/");
        Assert.Equal("127.0.0.1", BaseUri.Host);
        _app = app;
    }

    public async Task DisposeAsync()
    {
        if (_app is not null)
        {
            await _app.StopAsync();
            await _app.DisposeAsync();
        }
    }

    /// <summary>A loopback port with nothing listening on it.</summary>
    public static int ClosedPort()
    {
        var listener = new System.Net.Sockets.TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int port = ((IPEndPoint)listener.LocalEndpoint).Port;
        listener.Stop();
        return port;
    }

    private async Task<JsonNode?> Record(HttpContext ctx)
    {
        var body = await JsonNode.ParseAsync(ctx.Request.Body);
        LastBodies[ctx.Request.Path.Value!] = body;
        return body;
    }

    private static JsonObject Hit(string id, double? score, JsonObject source) => new()
    {
        ["_index"] = "wiki",
        ["_id"] = id,
        ["_score"] = score,
        ["_source"] = source,
    };

    private static JsonObject EsAnswer(params JsonObject[] hits) => new()
    {
        ["took"] = 3,
        ["timed_out"] = false,
        ["hits"] = new JsonObject
        {
            ["total"] = new JsonObject { ["value"] = hits.Length, ["relation"] = "eq" },
            ["max_score"] = 7.25,
            ["hits"] = new JsonArray([.. hits]),
        },
    };
}
