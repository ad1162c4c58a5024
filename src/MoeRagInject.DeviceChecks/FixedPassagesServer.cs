using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;

namespace MoeRagInject.DeviceChecks;

/// <summary>
/// An HTTP retriever on loopback that answers every query with the same passages, in order: the injection reference's
/// cases need their exact passages (check-device's engine checks and InjectionReferenceTests).
/// </summary>
public sealed class FixedPassagesServer : IDisposable
{
    private readonly HttpListener _listener = new();
    private readonly CancellationTokenSource _stop = new();

    public FixedPassagesServer(IReadOnlyList<string> passages)
    {
        int port;
        using (var probe = new TcpListener(IPAddress.Loopback, 0))
        {
            probe.Start();
            port = ((IPEndPoint)probe.LocalEndpoint).Port;
        }
        Url = $"http://127.0.0.1:{port}/search";
        _listener.Prefixes.Add($"http://127.0.0.1:{port}/");
        _listener.Start();
        var body = Encoding.UTF8.GetBytes(new JsonObject
        {
            ["passages"] = new JsonArray([.. passages.Select((p, i) => (JsonNode?)new JsonObject { ["id"] = $"p{i}", ["text"] = p })]),
        }.ToJsonString());
        _ = Task.Run(async () =>
        {
            while (!_stop.IsCancellationRequested)
            {
                HttpListenerContext context;
                try
                {
                    context = await _listener.GetContextAsync().ConfigureAwait(false);
                }
                catch (Exception)
                {
                    return;
                }
                context.Response.ContentType = "application/json";
                await context.Response.OutputStream.WriteAsync(body).ConfigureAwait(false);
                context.Response.Close();
            }
        });
    }

    public string Url { get; }

    public void Dispose()
    {
        _stop.Cancel();
        _listener.Close();
        _stop.Dispose();
    }
}
