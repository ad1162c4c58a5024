using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using MoeRagInject.Cli.Flags;
using MoeRagInject.Engine;
using MoeRagInject.Server;

namespace MoeRagInject.Cli.Commands;

public static class ServeCommand
{
    public static FlagSet Flags() => new FlagSet(
            "serve", "serve [flags]",
            "Runs the HTTP server: sglang's /generate, /health, /get_model_info, ... and the OpenAI-compatible /v1 routes.\n"
            + "Without --model-path it serves the embedded tiny model and corpus.")
        .Add(new("host", FlagKind.String, "address to listen on", "127.0.0.1", "HOST"))
        .Add(new("port", FlagKind.Int, "port to listen on (0 picks a free one)", "30000", "PORT"))
        .Add(new("served-model-name", FlagKind.String, "model id in OpenAI responses", "the model path", "NAME"))
        .Add(new("log-level", FlagKind.String, "server log level", "warning", "debug|info|warning|error"))
        .Add(new("incremental-streaming-output", FlagKind.Bool, "/generate stream events carry only the new text, not the text so far"))
        .Add(new("enable-metrics", FlagKind.Bool, "serve Prometheus metrics at /metrics (--enable-metrics=false turns them off)", "on"))
        .AddRange(EngineFlags.Specs());

    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        if (Flags().ParseOrPrintHelp(args) is not { } flags) return 0;
        if (flags.Positionals.Count > 0)
            throw new UsageException($"serve takes no arguments (got '{flags.Positionals[0]}'); see {Program.Name} serve --help");

        var engineOptions = EngineFlags.ToOptions(flags);
        var serverOptions = new ServerOptions
        {
            Host = flags.String("host") ?? "127.0.0.1",
            Port = flags.IntIn("port", 0, 65535) ?? 30000,
            ServedModelName = flags.String("served-model-name"),
            Engine = engineOptions,
            IncrementalStreamingOutput = flags.Bool("incremental-streaming-output"),
            EnableMetrics = !flags.Has("enable-metrics") || flags.Bool("enable-metrics"),
            LogLevel = flags.Choice("log-level", "debug", "info", "warning", "error") switch
            {
                "debug" => LogLevel.Debug,
                "info" => LogLevel.Information,
                "error" => LogLevel.Error,
                _ => LogLevel.Warning,
            },
        };

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
