using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using MoeRagInject.Cli.CommandLine;
using MoeRagInject.Engine;
using MoeRagInject.Model.Tokenization;
using MoeRagInject.Server.Contracts;
using MoeRagInject.Server.Generation;
using MoeRagInject.Server.Requests;

namespace MoeRagInject.Cli.Commands;

/// <summary>
/// <c>generate</c>: one generation in-process. stdout carries the generated text alone, so that it can be piped; the
/// <c>[MoE-RAG]</c> notices, the RAG events (one JSON line each) and a summary go to stderr. With --json, stdout carries the
/// text and then, on its last line, one JSON object: the response sglang's /generate gives, events in meta_info.rag.
/// </summary>
public static class GenerateCommand
{
    public static Command Create()
    {
        var prompt = new Argument<string?>("prompt")
        {
            Description = "the prompt (quote it)",
            Arity = ArgumentArity.ZeroOrOne,
        };
        var temperature = CliOption.Double("--temperature", "sampling temperature; 0 is greedy", "T", 0, min: 0);
        var maxNewTokens = CliOption.Int("--max-new-tokens", "tokens to generate at most", "N", 128, min: 0);
        var minNewTokens = CliOption.Int("--min-new-tokens", "tokens to generate at least", "N", 0, min: 0);
        var topP = CliOption.Double("--top-p", "nucleus sampling mass", "P", 1);
        var topK = CliOption.Int("--top-k", "sample from the K most likely tokens; -1 is all", "K", -1);
        var minP = CliOption.Double("--min-p", "drop tokens below min-p × the top probability", "P", 0);
        var repetitionPenalty = CliOption.Double("--repetition-penalty", "penalty on tokens already present", "R", 1);
        var seed = CliOption.OptionalInt("--seed", "sampling seed", "N", min: 0);
        var stop = CliOption.List("--stop", "stop strings, comma-separated", "S1,S2", shownDefault: null);
        var ignoreEos = CliOption.Switch("--ignore-eos", "keep generating past the EOS token");
        var chat = CliOption.Switch("--chat", "wrap the prompt as a user message in the model's chat template");
        var json = CliOption.Switch("--json",
            "after the text, print one line of JSON: the whole result in the shape /generate returns (RAG events in meta_info.rag)");
        var engine = new EngineFlags();

        var command = new Command("generate",
            "Generates from one prompt in-process (no HTTP). stdout: the text as it comes (with --json, then one JSON line). "
            + "stderr: the '[MoE-RAG] ... triggering RAG' notices, one JSON line per RAG event, and a summary.")
        {
            prompt, temperature, maxNewTokens, minNewTokens, topP, topK, minP, repetitionPenalty, seed, stop, ignoreEos, chat, json,
        };
        engine.AddTo(command);
        command.Validators.Add(result =>
        {
            if (result.GetValue(prompt) is not { } text)
                result.AddError($"generate needs a prompt: {Program.Name} generate \"What is Quantum?\"");
            else if (text.Length == 0)
                result.AddError("the prompt is empty");
        });
        command.SetAction((parse, _) =>
        {
            var sampling = new SamplingParams
            {
                Temperature = (float)parse.GetValue(temperature),
                MaxNewTokens = parse.GetValue(maxNewTokens),
                MinNewTokens = parse.GetValue(minNewTokens),
                TopP = (float)parse.GetValue(topP),
                TopK = parse.GetValue(topK),
                MinP = (float)parse.GetValue(minP),
                RepetitionPenalty = (float)parse.GetValue(repetitionPenalty),
                Seed = parse.GetValue(seed) is { } s ? (ulong)s : null,
                Stop = parse.GetValue(stop) ?? [],
                IgnoreEos = parse.GetValue(ignoreEos),
            };
            // The request's own checks (top_p in (0, 1], ...), said in the flags' names.
            if (sampling.Validate() is { } invalid)
                throw new UsageException(invalid.Replace("sampling_params.", "--", StringComparison.Ordinal).Replace('_', '-'));
            // stdout carries only the text; the engine's notices go to stderr.
            var options = engine.ToOptions(parse) with { Notices = Console.Error };
            return RunAsync(options, parse.GetRequiredValue(prompt)!, parse.GetValue(chat), sampling, parse.GetValue(json));
        });
        return command;
    }

    private static async Task<int> RunAsync(EngineOptions options, string prompt, bool chat, SamplingParams sampling, bool json)
    {
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
        var (stdout, stderr) = (Console.Out, Console.Error);
        var events = 0;

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
                await stdout.WriteAsync(update.NewText).ConfigureAwait(false);
                await stdout.FlushAsync(cancellationToken).ConfigureAwait(false);
                // Each event as it happens, on stderr beside the [MoE-RAG] notice that announced it.
                foreach (var ragEvent in update.NewEvents)
                {
                    events++;
                    await stderr.WriteLineAsync(ragEvent.ToJson().ToJsonString(ApiJsonContext.Wire.Options)).ConfigureAwait(false);
                }
            }
        }
        catch (ArgumentException e)
        {
            throw new CliException(e.Message, e);
        }
        var seconds = Stopwatch.GetElapsedTime(started).TotalSeconds;

        await stdout.WriteLineAsync().ConfigureAwait(false);
        if (json)
            await stdout.WriteLineAsync(JsonSerializer.Serialize(output.ToGenerateResponse(seconds), ApiJsonContext.Wire.GenerateResponse))
                .ConfigureAwait(false);
        var finish = output.Finish is null ? "none" : JsonSerializer.Serialize(RequestOutput.ToJson(output.Finish), ApiJsonContext.Wire.FinishReasonJson);
        await stderr.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
            $"[{output.PromptTokens} prompt + {output.CompletionTokens} completion tokens in {seconds:F2} s, finish {finish}, {events} RAG events]"))
            .ConfigureAwait(false);
        return output.Finish is { Kind: FinishKind.Abort } ? 1 : 0;
    }
}
