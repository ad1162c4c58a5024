using System.CommandLine;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using MoeRagInject.Cli.CommandLine;
using MoeRagInject.Engine;
using MoeRagInject.Server;

namespace MoeRagInject.Cli.Commands;

/// <summary><c>serve</c>: the HTTP server, listening while the model loads.</summary>
public static class ServeCommand
{
    public static Command Create()
    {
        var host = CliOption.Text("--host", "address to listen on", "HOST", "127.0.0.1");
        var port = CliOption.Int("--port", "port to listen on (0 picks a free one)", "PORT", 30000, min: 0, max: 65535);
        var servedModelName = CliOption.OptionalText("--served-model-name",
            "the model's id in /v1/models and in OpenAI responses (sglang's flag)", "NAME", "the model folder's name");
        var logLevel = CliOption.Choice("--log-level", "server log level", "warning", "debug", "info", "warning", "error");
        var incremental = CliOption.Switch("--incremental-streaming-output", "/generate stream events carry only the new text, not the text so far");
        var metrics = new Option<bool>("--enable-metrics")
        {
            Description = "serve Prometheus metrics at /metrics (--enable-metrics=false turns them off) [default: on]",
            DefaultValueFactory = _ => true,
        };
        var engine = new EngineFlags();

        var command = new Command("serve",
            "Runs the HTTP server: sglang's /generate, /health, /get_model_info, ... and the OpenAI-compatible /v1 routes. "
            + "Without --model-path it serves the embedded tiny model and corpus.")
        {
            host, port, servedModelName, logLevel, incremental, metrics,
        };
        engine.AddTo(command);
        command.SetAction((parse, _) =>
        {
            var engineOptions = engine.ToOptions(parse);
            return RunAsync(new ServerOptions
            {
                Host = parse.GetRequiredValue(host),
                Port = parse.GetValue(port),
                ServedModelName = parse.GetValue(servedModelName),
                Engine = engineOptions,
                IncrementalStreamingOutput = parse.GetValue(incremental),
                EnableMetrics = parse.GetValue(metrics),
                LogLevel = parse.GetRequiredValue(logLevel) switch
                {
                    "debug" => LogLevel.Debug,
                    "info" => LogLevel.Information,
                    "error" => LogLevel.Error,
                    _ => LogLevel.Warning,
                },
            });
        });
        return command;
    }

    /// <summary>Listens, loads the model, serves until Ctrl+C or SIGTERM (the host's own lifetime handles both).</summary>
    private static async Task<int> RunAsync(ServerOptions serverOptions)
    {
        var engineOptions = serverOptions.Engine!;
        using var loadingCancel = new CancellationTokenSource();
        await Console.Error.WriteLineAsync($"loading {engineOptions.ModelPath} on {engineOptions.Runner.Device} (rag mode {engineOptions.Mode.ToString().ToLowerInvariant()}, retriever {engineOptions.Retriever ?? "none"}) ...")
            .ConfigureAwait(false);
        var loading = Task.Run<IGenerationEngine>(() => InferenceEngine.Create(engineOptions, line => Console.Error.WriteLine($"  {line}")),
            loadingCancel.Token);
        var host = ServerHost.Create(serverOptions, loading);
        IGenerationEngine? engine = null;
        try
        {
            // Listen first, so that /health answers 503 while the model loads (as sglang does).
            try
            {
                await host.StartAsync().ConfigureAwait(false);
            }
            catch (IOException e) when (e.InnerException is SocketException || e.Message.Contains("address", StringComparison.OrdinalIgnoreCase))
            {
                throw new CliException($"cannot listen on {serverOptions.Host}:{serverOptions.Port}: {e.Message}");
            }

            var shutdown = host.WaitForShutdownAsync();
            var firstDone = await Task.WhenAny(loading, shutdown).ConfigureAwait(false);
            if (firstDone == shutdown)
            {
                await loadingCancel.CancelAsync().ConfigureAwait(false);
                return 130;
            }
            try
            {
                engine = await loading.ConfigureAwait(false);
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                throw new CliException($"the model failed to load: {Program.Unwrap(e).Message}", e);
            }
            var info = engine.Info;
            await Console.Out.WriteLineAsync(
                $"ready: {info.NumMoeLayers} MoE layers × {info.NumExperts} experts, context {info.ContextLength}; listening on {host.BaseAddress.ToString().TrimEnd('/')}")
                .ConfigureAwait(false);
            await shutdown.ConfigureAwait(false);
            return 0;
        }
        finally
        {
            await host.DisposeAsync().ConfigureAwait(false);
            if (engine is not null) await engine.DisposeAsync().ConfigureAwait(false);
        }
    }
}
