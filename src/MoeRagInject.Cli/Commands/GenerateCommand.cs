using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using MoeRagInject.Cli.Flags;
using MoeRagInject.Engine;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Server.Contracts;
using MoeRagInject.Server.Generation;
using MoeRagInject.Server.Requests;

namespace MoeRagInject.Cli.Commands;

public static class GenerateCommand
{
    public static FlagSet Flags() => new FlagSet(
            "generate", "generate \"<prompt>\" [flags]",
            "Generates from one prompt in-process (no HTTP): prints the text as it comes, then one JSON line per RAG event.\n"
            + "The '[MoE-RAG] ... triggering RAG' notices go to stderr.")
        .Add(new("temperature", FlagKind.Double, "sampling temperature; 0 is greedy", "0", "T"))
        .Add(new("max-new-tokens", FlagKind.Int, "tokens to generate at most", "128", "N"))
        .Add(new("min-new-tokens", FlagKind.Int, "tokens to generate at least", "0", "N"))
        .Add(new("top-p", FlagKind.Double, "nucleus sampling mass", "1", "P"))
        .Add(new("top-k", FlagKind.Int, "sample from the K most likely tokens; -1 is all", "-1", "K"))
        .Add(new("min-p", FlagKind.Double, "drop tokens below min-p × the top probability", "0", "P"))
        .Add(new("repetition-penalty", FlagKind.Double, "penalty on tokens already present", "1", "R"))
        .Add(new("seed", FlagKind.Int, "sampling seed", null, "N"))
        .Add(new("stop", FlagKind.List, "stop strings, comma-separated", null, "S1,S2"))
        .Add(new("ignore-eos", FlagKind.Bool, "keep generating past the EOS token"))
        .Add(new("chat", FlagKind.Bool, "wrap the prompt as a user message in the model's chat template"))
        .Add(new("json", FlagKind.Bool, "print the whole result as one JSON object (the shape /generate returns) instead"))
        .AddRange(EngineFlags.Specs());

    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        if (Flags().ParseOrPrintHelp(args) is not { } flags) return 0;
        if (flags.Positionals.Count != 1)
            throw new UsageException(flags.Positionals.Count == 0
                ? $"generate needs a prompt: {Program.Name} generate \"What is Quantum?\""
                : $"generate takes one prompt (got {flags.Positionals.Count} arguments; quote the prompt)");
        var prompt = flags.Positionals[0];
        if (prompt.Length == 0) throw new UsageException("the prompt is empty");

        var sampling = new SamplingParams
        {
            Temperature = (float)(flags.DoubleIn("temperature", 0) ?? 0),
            MaxNewTokens = flags.IntIn("max-new-tokens", 0) ?? 128,
            MinNewTokens = flags.IntIn("min-new-tokens", 0) ?? 0,
            TopP = (float)(flags.Double("top-p") ?? 1),
            TopK = flags.Int("top-k") ?? -1,
            MinP = (float)(flags.Double("min-p") ?? 0),
            RepetitionPenalty = (float)(flags.Double("repetition-penalty") ?? 1),
            Seed = flags.IntIn("seed", 0) is { } seed ? (ulong)seed : null,
            Stop = flags.List("stop") ?? [],
            IgnoreEos = flags.Bool("ignore-eos"),
        };
        if (sampling.Validate() is { } invalid)
            throw new UsageException(invalid.Replace("sampling_params.", "--", StringComparison.Ordinal).Replace('_', '-'));
        var json = flags.Bool("json");
        var chat = flags.Bool("chat");
        // stdout carries only the text and the events; the engine's notices go to stderr.
        var options = EngineFlags.ToOptions(flags) with { Notices = Console.Error };

        using var cancel = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) =>
        {
            e.Cancel = true;
            cancel.Cancel();
        };
        Console.CancelKeyPress += onCancel;
        try
        {
            IGenerationEngine engine;
            try
            {
                engine = await InferenceEngine.CreateAsync(options, cancel.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                throw new CliException($"the model failed to load: {Program.Unwrap(e).Message}", e);
            }
            await using (engine.ConfigureAwait(false))
                return await GenerateAsync(engine, prompt, chat, sampling, json, cancel.Token).ConfigureAwait(false);
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
        }
    }

    private static async Task<int> GenerateAsync(
        IGenerationEngine engine, string prompt, bool chat, SamplingParams sampling, bool json, CancellationToken cancellationToken)
    {
        var ids = chat
            ? OpenAiRequestParser.EncodeChat(engine.Tokenizer, [new ChatMessage("user", prompt)])
            : engine.Tokenizer.Encode(prompt);
        var request = new GenerationRequest { PromptIds = ids, Sampling = sampling };
        var output = new RequestOutput(engine.Tokenizer, returnLogprob: false, returnRouterEntropy: false);
        var started = Stopwatch.GetTimestamp();
        var stdout = Console.Out;
        var events = new List<MoeRagInject.Rag.RagEvent>();

        IAsyncEnumerable<GenerationUpdate> updates;
        try
        {
            updates = engine.GenerateAsync(request, cancellationToken);
        }
        catch (ArgumentException e)
        {
            throw new CliException(e.Message, e);
        }
        try
        {
            await foreach (var update in updates.ConfigureAwait(false))
            {
                output.Add(update);
                events.AddRange(update.NewEvents);
                if (!json) await stdout.WriteAsync(update.NewText).ConfigureAwait(false);
                if (!json) await stdout.FlushAsync(cancellationToken).ConfigureAwait(false);
            }
        }
        catch (ArgumentException e)
        {
            throw new CliException(e.Message, e);
        }
        var seconds = Stopwatch.GetElapsedTime(started).TotalSeconds;

        if (json)
        {
            await stdout.WriteLineAsync(JsonSerializer.Serialize(output.ToGenerateResponse(seconds), ApiJsonContext.Wire.GenerateResponse))
                .ConfigureAwait(false);
        }
        else
        {
            await stdout.WriteLineAsync().ConfigureAwait(false);
            foreach (var ragEvent in events)
                await stdout.WriteLineAsync(ragEvent.ToJson().ToJsonString(ApiJsonContext.Wire.Options)).ConfigureAwait(false);
            var finish = output.Finish is null ? "none" : JsonSerializer.Serialize(RequestOutput.ToJson(output.Finish), ApiJsonContext.Wire.FinishReasonJson);
            await Console.Error.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"[{output.PromptTokens} prompt + {output.CompletionTokens} completion tokens in {seconds:F2} s, finish {finish}, {events.Count} RAG events]"))
                .ConfigureAwait(false);
        }
        return output.Finish is { Kind: FinishKind.Abort } ? 1 : 0;
    }
}
