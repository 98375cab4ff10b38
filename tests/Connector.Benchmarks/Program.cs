using System.Globalization;
using System.Text.Json;
using Connector.Benchmarks.Socket;

namespace Connector.Benchmarks;

/// <summary>
/// Benchmark commands. Each prints its figures next to a baseline measured in the same run (these
/// machines are noisy: compare the ratios). Usage: Connector.Benchmarks [all|lookup|storeload|hash|gather|tier|disk|redis] [--json] [--quick]
/// </summary>
internal static class Program
{
    private static readonly JsonSerializerOptions JsonOptions = new() { WriteIndented = true, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals };

    public static int Main(string[] args)
    {
        bool json = args.Contains("--json");
        bool quick = args.Contains("--quick");
        string command = args.FirstOrDefault(a => !a.StartsWith("--", StringComparison.Ordinal)) ?? "all";
        if (command == "redis")
        {
            // Its own options (--server, --sizes, --piece, --pipeline, --clients): docs/storage-redis.md.
            return Redis.RedisTierBenchmark.Run(args);
        }

        var results = new Dictionary<string, IReadOnlyDictionary<string, double>>();
        var commands = new Dictionary<string, Func<IReadOnlyDictionary<string, double>>>
        {
            ["hash"] = () => Benchmarks.Keys.HashingBenchmark.Run(quick ? 20 : 200),
            ["tier"] = () => Benchmarks.Storage.HostTierBenchmark.Run(),
            ["gather"] = () => Benchmarks.Memory.GatherBenchmark.Run(),
            ["lookup"] = () => LookupLatencyBenchmark.Run(quick ? 2_000 : 20_000),
            ["storeload"] = () => StoreLoadBenchmark.Run(quick ? 2 : 5),
            ["disk"] = () => Disk.DiskTierBenchmark.Measure(null, quick, dropCaches: false),
        };

        // "all" leaves out the storage tiers: they need dd on a real disk and redis-server (docs/storage-*.md).
        IEnumerable<string> selected = command == "all" ? commands.Keys.Where(k => k is not "disk") : [command];
        foreach (string name in selected)
        {
            if (!commands.TryGetValue(name, out var run))
            {
                Console.Error.WriteLine($"unknown benchmark '{name}'; choose one of: all, {string.Join(", ", commands.Keys)}");
                return 2;
            }

            IReadOnlyDictionary<string, double> figures = run();
            results[name] = figures;
            if (!json)
            {
                Console.WriteLine($"== {name}");
                foreach (var (key, value) in figures)
                {
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {key,-40} {value,14:0.###}"));
                }
            }
        }

        if (json)
        {
            Console.WriteLine(JsonSerializer.Serialize(results, JsonOptions));
        }

        return 0;
    }
}
