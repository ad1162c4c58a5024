using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using MoeRagInject.Backend;
using MoeRagInject.Backend.Cpu;
using MoeRagInject.Backend.Cuda;
using MoeRagInject.Cli.CommandLine;
using MoeRagInject.DeviceChecks;

namespace MoeRagInject.Cli.Commands;

/// <summary>
/// Checks a device: every op against the CPU backend on random inputs, graph replay against op-by-op steps, the model on the
/// committed reference checkpoints against transformers, and the engine's batch safety with graphs and injections.
/// </summary>
public static class CheckDeviceCommand
{
    public static Command Create()
    {
        string[] allGroups = ["ops", "graph", "models", "engine"];
        var device = EngineFlags.DeviceOption("cuda", "the device to check", "cuda|cuda:N|cpu", allowNull: false);
        // "none" runs only --case (tools/gpu/run.sh's parity check).
        var groups = CliOption.List("--groups",
            "which checks; none with --case checks only that checkpoint; gemm-bench times the GEMM paths and tiles at Mixtral-8x7B's shape (not a check)",
            "ops,graph,models,engine", "ops,graph,models,engine", [.. allGroups, "none", "gemm-bench"]);
        var seed = CliOption.Int("--seed", "seed of the random inputs", "N", 1, min: 0);
        var extraCase = CliOption.OptionalText("--case",
            "also check this checkpoint folder against its reference/ folder (as tools/gpu writes them)", "DIR");
        var json = CliOption.OptionalText("--json", "also write the results as JSON to this file", "FILE");
        var command = new Command("check-device",
            "Checks a compute device: ops against the CPU backend (normalised error, NaN/inf, guard rows), decode steps replayed "
            + "from graphs against op-by-op steps, the model against transformers' reference outputs (tests/data/reference), and "
            + "the engine's batch safety. Prints one line per check; exits 1 when any fails.")
        {
            device, groups, seed, extraCase, json,
        };
        command.SetAction((parse, _) => RunAsync(parse.GetRequiredValue(device), parse.GetValue(groups) ?? allGroups, parse.GetValue(seed),
            parse.GetValue(extraCase), parse.GetValue(json)));
        return command;
    }

    private static async Task<int> RunAsync(string device, IReadOnlyList<string> groups, int seed, string? extraCase, string? jsonPath)
    {
        var home = Home.Locate();
        var factory = EngineFlags.Runner(device, null);
        void Progress(string line) => Console.Error.WriteLine($"  {line}");
        if (factory is CudaRunnerFactory && !CudaRunnerFactory.IsAvailable(out var reason))
        {
            Console.Out.WriteLine($"check-device: skipped, no CUDA device here: {reason}");
            return 0;
        }

        var results = new List<CheckResult>();
        void Report(IEnumerable<CheckResult> batch)
        {
            foreach (var result in batch)
            {
                results.Add(result);
                Console.Out.WriteLine(result);
            }
        }
        var demo = Path.Combine(home, "assets", "models", "moe-wordnet-demo");
        if (groups.Contains("ops"))
        {
            using (var backend = factory is CudaRunnerFactory cuda ? CudaRunnerFactory.OpenBackend(cuda.Ordinal, false, Progress) : new CpuBackend(2))
            {
                using (var ops = new OpChecks(backend, seed, r => Console.Out.WriteLine(r)))
                    results.AddRange(ops.Run());
                if (backend is CudaBackend compiled)
                {
                    // ptxas's advice when it compiled the kernels: a serialised wgmma pipeline is correct but slow (session 28
                    // found every moe_tma kernel from N = 32 so, and the batch-256 step 10% longer for it).
                    var serialised = compiled.SerialisedWgmmaKernels;
                    Report([new CheckResult("compile", "ptxas serialised no kernel's wgmma (C7514, C7515, C7520)", serialised.Count == 0, serialised.Count, 0,
                        serialised.Count == 0 ? "no such advice" : $"serialised in {string.Join(", ", serialised)}")]);
                }
            }
            if (factory is CudaRunnerFactory boxing)
            {
                // The experts in the layout the checks above did not take (boxed on a Hopper card unless MOE_RAG_INJECT_BOXED=1
                // made the checks above boxed): every MoE path that reads it, against the CPU backend.
                using var backend = (CudaBackend)CudaRunnerFactory.OpenBackend(boxing.Ordinal, false, Progress);
                if (backend.CanBoxExperts)
                {
                    backend.BoxExperts = !backend.BoxExperts;
                    var layout = backend.BoxExperts ? "boxed" : "row-major";
                    Console.Out.WriteLine($"-- the experts in the {layout} layout");
                    using var ops = new OpChecks(backend, seed + 3, r => Console.Out.WriteLine(r));
                    results.AddRange(ops.RunMoe($" ({layout} experts)"));
                }
            }
            if (factory is CudaRunnerFactory deterministic)
            {
                Console.Out.WriteLine("-- the deterministic backend (--deterministic)");
                using var backend = CudaRunnerFactory.OpenBackend(deterministic.Ordinal, true, Progress);
                using var ops = new OpChecks(backend, seed + 1, r => Console.Out.WriteLine(r));
                results.AddRange(ops.RunBatchInvariance());
            }
            else
            {
                // The CPU backend promises batch invariance in every mode.
                using var backend = new CpuBackend(2);
                using var ops = new OpChecks(backend, seed + 1, r => Console.Out.WriteLine(r));
                results.AddRange(ops.RunInvariance());
            }
        }
        if (groups.Contains("gemm-bench") && factory is CudaRunnerFactory bench)
        {
            var mixtral = Model.ModelConfig.Load(Path.Combine(home, "assets", "configs", "mixtral-8x7b"));
            CudaGemmBench.Run(bench.Ordinal, mixtral, [1, 2, 4, 8, 16, 64, 128, 256, 512, 2048], false, line => Console.Out.WriteLine(line));
            CudaGemmBench.Run(bench.Ordinal, mixtral, [1, 8, 64, 256], true, line => Console.Out.WriteLine(line));
        }
        if (groups.Contains("graph") && factory is CudaRunnerFactory) Report([ModelChecks.GraphReplay(factory, demo)]);
        if (groups.Contains("models"))
        {
            Report(ModelChecks.Run(factory, Path.Combine(home, "tests", "data", "reference"), demo, Progress));
            if (factory is CudaRunnerFactory)
                Report(ModelChecks.Run(factory, Path.Combine(home, "tests", "data", "reference"), demo, Progress, deterministic: true));
        }
        if (extraCase is { } extra)
            Report(ModelChecks.RunCase(factory, Path.GetFileName(Path.GetFullPath(extra)), extra, Path.Combine(extra, "reference"), Progress));
        if (groups.Contains("engine"))
            Report(await EngineChecks.RunAsync(factory, demo, Path.Combine(home, "assets", "corpus", "wordnet", "wordnet-demo.jsonl.gz"),
                Path.Combine(Path.GetTempPath(), "moe-rag-inject-check-device"), Path.Combine(home, "tests", "data", "reference", "demo-injection"))
                .ConfigureAwait(false));

        var failed = results.Count(r => !r.Passed);
        Console.Out.WriteLine($"check-device {device}: {results.Count - failed} passed, {failed} failed");
        if (jsonPath is { } path)
        {
            var json = new JsonArray([.. results.Select(r => (JsonNode)new JsonObject
            {
                ["group"] = r.Group, ["name"] = r.Name, ["passed"] = r.Passed, ["error"] = double.IsFinite(r.Error) ? r.Error : null,
                ["tolerance"] = r.Tolerance, ["detail"] = r.Detail,
            })]);
            await File.WriteAllTextAsync(path, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true })).ConfigureAwait(false);
        }
        return failed == 0 ? 0 : 1;
    }
}
