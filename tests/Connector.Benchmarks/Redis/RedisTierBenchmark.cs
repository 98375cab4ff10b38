using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using Connector.Storage.Redis;
using Microsoft.Extensions.Logging.Abstractions;

namespace Connector.Benchmarks.Redis;

/// <summary>
/// SET and GET throughput of chunk-sized values through the Redis tier (Offer until written, ReadAsync with the
/// checksum verified), next to <c>redis-benchmark -t set,get -d SIZE -n N -P 16 -c 4 --csv</c> against the same
/// server in the same run, with SIZE the chunk size and with SIZE the piece size (what the tier actually sends).
/// Each figure in GB/s (1e9 bytes) with the ratios to both baselines, and the CPU seconds per GB of this process and
/// of redis-server (where the time goes).
/// </summary>
/// <remarks>
/// Usage: <c>redis [--json] [--quick] [--server host:port] [--sizes 1m,4m,32m] [--piece 1m] [--pipeline 4m] [--clients 4]</c>.
/// Without <c>--server</c> it starts its own redis-server (no persistence) on a free loopback port.
/// </remarks>
public static class RedisTierBenchmark
{
    private static readonly JsonSerializerOptions JsonOptions = new() { WriteIndented = true, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals };

    /// <summary>Runs the benchmark and prints its figures; returns the process exit code (0, or 2 when it cannot run).</summary>
    public static int Run(string[] args)
    {
        ArgumentNullException.ThrowIfNull(args);
        bool json = args.Contains("--json");
        bool quick = args.Contains("--quick");
        int clients = int.Parse(Arg(args, "--clients") ?? "4", CultureInfo.InvariantCulture);
        int pieceBytes = (int)ParseSize(Arg(args, "--piece") ?? "1m");
        long pipelineBytes = ParseSize(Arg(args, "--pipeline") ?? "4m");
        long[] sizes = (Arg(args, "--sizes") ?? (quick ? "4m" : "1m,4m,32m")).Split(',').Select(ParseSize).ToArray();
        long bytesPerRun = quick ? 256L << 20 : 1L << 30;

        string? endPoint = Arg(args, "--server");
        using LocalRedis? local = endPoint is null ? LocalRedis.TryStart() : null;
        endPoint ??= local?.EndPoint;
        if (endPoint is null || Which("redis-benchmark") is null || Which("redis-cli") is null)
        {
            Console.Error.WriteLine("redis: needs redis-server, redis-cli and redis-benchmark on PATH (scripts/setup.sh installs them), or --server host:port");
            return 2;
        }

        var figures = new Dictionary<string, double> { ["piece_bytes"] = pieceBytes, ["pipeline_bytes"] = pipelineBytes, ["clients"] = clients, ["processors"] = Environment.ProcessorCount };

        // The tier sends pieces: redis-benchmark at the piece size is what the server does for the same bytes.
        (double pieceSet, double pieceGet) = RedisBenchmarkGBps(endPoint, pieceBytes, (int)Math.Max(64, bytesPerRun / pieceBytes), clients);
        figures["piece_redis_benchmark_set_GBps"] = pieceSet;
        figures["piece_redis_benchmark_get_GBps"] = pieceGet;
        foreach (long size in sizes)
        {
            string s = SizeName(size);
            int chunks = (int)Math.Max(16, bytesPerRun / size);
            (double baseSet, double baseGet) = RedisBenchmarkGBps(endPoint, size, (int)Math.Max(64, bytesPerRun / size), clients);
            figures[$"{s}_redis_benchmark_set_GBps"] = baseSet;
            figures[$"{s}_redis_benchmark_get_GBps"] = baseGet;
            foreach (string codec in new[] { "Lz4", "None" })
            {
                TierRun run = MeasureTier(endPoint, codec, size, chunks, pieceBytes, pipelineBytes, clients);
                string p = $"{s}_tier_{codec.ToLowerInvariant()}";
                figures[$"{p}_set_GBps"] = run.SetGBps;
                figures[$"{p}_get_GBps"] = run.GetGBps;
                figures[$"{p}_set_over_redis_benchmark"] = run.SetGBps / baseSet;
                figures[$"{p}_get_over_redis_benchmark"] = run.GetGBps / baseGet;
                figures[$"{p}_set_over_redis_benchmark_piece"] = run.SetGBps / pieceSet;
                figures[$"{p}_get_over_redis_benchmark_piece"] = run.GetGBps / pieceGet;
                figures[$"{p}_set_client_cpu_s_per_GB"] = run.SetClientCpu;
                figures[$"{p}_set_server_cpu_s_per_GB"] = run.SetServerCpu;
                figures[$"{p}_get_client_cpu_s_per_GB"] = run.GetClientCpu;
                figures[$"{p}_get_server_cpu_s_per_GB"] = run.GetServerCpu;
                figures[$"{p}_set_managed_bytes_per_GB"] = run.SetAllocatedPerGB;
                figures[$"{p}_get_managed_bytes_per_GB"] = run.GetAllocatedPerGB;
                figures[$"{p}_gen2_collections"] = run.Gen2Collections;
            }
        }

        if (json)
        {
            Console.WriteLine(JsonSerializer.Serialize(new Dictionary<string, Dictionary<string, double>> { ["redis"] = figures }, JsonOptions));
        }
        else
        {
            Console.WriteLine("== redis");
            foreach ((string key, double value) in figures)
            {
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {key,-44} {value,14:0.###}"));
            }
        }

        return 0;
    }

    private readonly record struct TierRun(double SetGBps, double GetGBps, double SetClientCpu, double SetServerCpu, double GetClientCpu, double GetServerCpu, double SetAllocatedPerGB, double GetAllocatedPerGB, int Gen2Collections);

    /// <summary>Offers <paramref name="chunks"/> random chunks (incompressible, like KV: the honest case for LZ4) until all are written, then reads them all back.</summary>
    private static TierRun MeasureTier(string endPoint, string codec, long size, int chunks, int pieceBytes, long pipelineBytes, int readers)
    {
        const int Distinct = 8;
        byte[][] data = Enumerable.Range(0, Distinct).Select(i =>
        {
            var b = new byte[size];
            new Random(i).NextBytes(b);
            return b;
        }).ToArray();
        byte[][] destinations = Enumerable.Range(0, readers).Select(_ => new byte[size]).ToArray();
        TierKey[] keys = Enumerable.Range(0, chunks).Select(_ => new TierKey(new ChunkKey(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)), ChunkKey.None, 7, size)).ToArray();
        using IChunkTier tier = CreateTier(endPoint, codec, pieceBytes, pipelineBytes);
        WarmUp(tier, size);

        (long clientCpu, long serverCpu) = Cpu(endPoint);
        long allocated = GC.GetTotalAllocatedBytes();
        int gen2 = GC.CollectionCount(2);
        long start = Stopwatch.GetTimestamp();
        for (int i = 0; i < chunks; i++)
        {
            TierWriteStatus status;
            while ((status = tier.Offer(keys[i], data[i % Distinct])) == TierWriteStatus.QueueFull)
            {
                // Back-pressure: wait for room without spinning (a spinning core is one Redis does not get).
                Thread.Sleep(1);
            }

            if (status != TierWriteStatus.Accepted)
            {
                throw new InvalidOperationException($"offer {i}: {status}");
            }
        }

        WaitWritten(tier);
        double setSeconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        long allocated2 = GC.GetTotalAllocatedBytes();
        (long clientCpu2, long serverCpu2) = Cpu(endPoint);
        if (tier.GetStats() is { Writes: var writes } && writes < chunks)
        {
            throw new InvalidOperationException($"only {writes} of {chunks} chunks were written ({tier.GetStats()})");
        }

        long allocated3 = GC.GetTotalAllocatedBytes();
        start = Stopwatch.GetTimestamp();
        int next = -1;
        int hits = 0;
        Task[] workers = Enumerable.Range(0, readers).Select(r => Task.Run(async () =>
        {
            byte[] destination = destinations[r];
            for (int i = Interlocked.Increment(ref next); i < chunks; i = Interlocked.Increment(ref next))
            {
                if (await tier.ReadAsync(keys[i], destination, CancellationToken.None) == TierReadStatus.Hit)
                {
                    Interlocked.Increment(ref hits);
                }
            }
        })).ToArray();
        Task.WaitAll(workers);
        double getSeconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        long allocated4 = GC.GetTotalAllocatedBytes();
        (long clientCpu3, long serverCpu3) = Cpu(endPoint);
        if (hits != chunks)
        {
            throw new InvalidOperationException($"{hits} of {chunks} reads hit ({tier.GetStats()})");
        }

        tier.ClearAsync(CancellationToken.None).AsTask().GetAwaiter().GetResult();
        double gb = (double)size * chunks / 1e9;
        gen2 = GC.CollectionCount(2) - gen2;
        return new TierRun(
            gb / setSeconds,
            gb / getSeconds,
            (clientCpu2 - clientCpu) / 1e7 / gb,
            (serverCpu2 - serverCpu) / 1e6 / gb,
            (clientCpu3 - clientCpu2) / 1e7 / gb,
            (serverCpu3 - serverCpu2) / 1e6 / gb,
            (allocated2 - allocated) / gb,
            (allocated4 - allocated3) / gb,
            gen2);
    }

    private static RedisTier CreateTier(string endPoint, string codec, int pieceBytes, long pipelineBytes) => new(
        new RedisTierOptions
        {
            Configuration = endPoint,
            KeyPrefix = $"bench{Environment.ProcessId}:",
            Compression = Enum.Parse<RedisCompression>(codec),
            PieceBytes = pieceBytes,
            PipelineBytes = pipelineBytes,
            CapacityBytes = 64L << 30,
            OperationTimeout = TimeSpan.FromSeconds(10),
        },
        NullLogger.Instance);

    /// <summary>
    /// Waits for the first connection, runs the paths (JIT) and offers two queues' worth of chunks as fast as they
    /// are taken, so the tier's buffer pool is as full as in a long-lived sidecar after its first burst before
    /// anything is timed; then clears.
    /// </summary>
    private static void WarmUp(IChunkTier tier, long size)
    {
        var data = new byte[size];
        new Random(99).NextBytes(data);
        var watch = Stopwatch.StartNew();
        int chunks = (int)Math.Max(3, (512L << 20) / size);
        var keys = new List<TierKey>();
        for (int i = 0; i < chunks; i++)
        {
            var key = new TierKey(new ChunkKey(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)), ChunkKey.None, 7, size);
            TierWriteStatus status;
            while ((status = tier.Offer(key, data)) != TierWriteStatus.Accepted)
            {
                if (watch.Elapsed > TimeSpan.FromSeconds(60))
                {
                    throw new InvalidOperationException($"the tier did not take a chunk within 60 s ({status})");
                }

                Thread.Sleep(status == TierWriteStatus.QueueFull ? 0 : 10);
            }

            keys.Add(key);
        }

        WaitWritten(tier);
        foreach (TierKey key in keys.Take(3))
        {
            if (tier.ReadAsync(key, data, CancellationToken.None).AsTask().GetAwaiter().GetResult() != TierReadStatus.Hit)
            {
                throw new InvalidOperationException($"warm-up read missed ({tier.GetStats()})");
            }
        }

        tier.ClearAsync(CancellationToken.None).AsTask().GetAwaiter().GetResult();
    }

    private static void WaitWritten(IChunkTier tier)
    {
        while (tier.GetStats().QueueDepth > 0)
        {
            Thread.Sleep(1);
        }
    }

    /// <summary>Runs redis-benchmark with the same value size and returns its SET and GET GB/s.</summary>
    private static (double Set, double Get) RedisBenchmarkGBps(string endPoint, long size, int requests, int clients)
    {
        (string host, string port) = Split(endPoint);
        string output = RunTool("redis-benchmark", "-h", host, "-p", port, "-t", "set,get", "-d", size.ToString(CultureInfo.InvariantCulture), "-n", requests.ToString(CultureInfo.InvariantCulture), "-P", "16", "-c", clients.ToString(CultureInfo.InvariantCulture), "--csv");
        double set = 0;
        double get = 0;
        foreach (string line in output.Split('\n'))
        {
            string[] f = line.Split(',');
            if (f.Length > 1 && double.TryParse(f[1].Trim('"'), NumberStyles.Float, CultureInfo.InvariantCulture, out double rps))
            {
                if (f[0] == "\"SET\"")
                {
                    set = rps * size / 1e9;
                }
                else if (f[0] == "\"GET\"")
                {
                    get = rps * size / 1e9;
                }
            }
        }

        RunTool("redis-cli", "-h", host, "-p", port, "del", "key:__rand_int__");
        return set > 0 && get > 0 ? (set, get) : throw new InvalidOperationException("redis-benchmark printed no SET/GET figures:\n" + output);
    }

    /// <summary>This process's CPU time (100 ns ticks) and redis-server's (microseconds, INFO cpu).</summary>
    private static (long Client, long Server) Cpu(string endPoint)
    {
        (string host, string port) = Split(endPoint);
        string info = RunTool("redis-cli", "-h", host, "-p", port, "info", "cpu");
        double server = 0;
        foreach (string line in info.Split('\n', StringSplitOptions.TrimEntries))
        {
            if (line.StartsWith("used_cpu_sys:", StringComparison.Ordinal) || line.StartsWith("used_cpu_user:", StringComparison.Ordinal))
            {
                server += double.Parse(line[(line.IndexOf(':', StringComparison.Ordinal) + 1)..], CultureInfo.InvariantCulture);
            }
        }

        using var self = Process.GetCurrentProcess();
        return (self.TotalProcessorTime.Ticks, (long)(server * 1e6));
    }

    private static string RunTool(string tool, params string[] arguments)
    {
        var start = new ProcessStartInfo(tool) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in arguments)
        {
            start.ArgumentList.Add(a);
        }

        using Process p = Process.Start(start) ?? throw new InvalidOperationException($"{tool} did not start");
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        string stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return p.ExitCode == 0 ? stdout : throw new InvalidOperationException($"{tool} exited {p.ExitCode}: {stderr.Result}");
    }

    private static (string Host, string Port) Split(string endPoint)
    {
        int colon = endPoint.LastIndexOf(':');
        return colon < 0 ? (endPoint, "6379") : (endPoint[..colon], endPoint[(colon + 1)..]);
    }

    private static string? Arg(string[] args, string name)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
    }

    private static long ParseSize(string text)
    {
        text = text.Trim().ToLowerInvariant();
        long unit = text[^1] switch { 'k' => 1L << 10, 'm' => 1L << 20, 'g' => 1L << 30, _ => 1 };
        return long.Parse(unit == 1 ? text : text[..^1], CultureInfo.InvariantCulture) * unit;
    }

    private static string SizeName(long size) => size % (1 << 20) == 0 ? $"{size >> 20}MiB" : size % 1024 == 0 ? $"{size >> 10}KiB" : $"{size}B";

    private static string? Which(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries).Select(d => Path.Combine(d, name)).FirstOrDefault(File.Exists);

    /// <summary>A redis-server of the benchmark's own: free loopback port, no persistence, killed at the end.</summary>
    private sealed class LocalRedis : IDisposable
    {
        private readonly Process _process;
        private readonly string _directory;

        private LocalRedis(Process process, string directory, int port)
        {
            _process = process;
            _directory = directory;
            EndPoint = $"127.0.0.1:{port}";
        }

        public string EndPoint { get; }

        public static LocalRedis? TryStart()
        {
            if (Which("redis-server") is not { } server)
            {
                return null;
            }

            int port;
            using (var listener = new TcpListener(IPAddress.Loopback, 0))
            {
                listener.Start();
                port = ((IPEndPoint)listener.LocalEndpoint).Port;
            }

            string directory = Directory.CreateTempSubdirectory("kvsc-bench-redis-").FullName;
            var start = new ProcessStartInfo(server) { UseShellExecute = false, RedirectStandardOutput = true };
            foreach (string a in new[] { "--port", port.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory, "--loglevel", "warning" })
            {
                start.ArgumentList.Add(a);
            }

            Process process = Process.Start(start)!;
            process.OutputDataReceived += (_, _) => { };
            process.BeginOutputReadLine();
            var redis = new LocalRedis(process, directory, port);
            var watch = Stopwatch.StartNew();
            while (true)
            {
                try
                {
                    RunTool("redis-cli", "-p", port.ToString(CultureInfo.InvariantCulture), "ping");
                    return redis;
                }
                catch (InvalidOperationException) when (watch.Elapsed < TimeSpan.FromSeconds(20) && !process.HasExited)
                {
                    Thread.Sleep(20);
                }
            }
        }

        public void Dispose()
        {
            if (!_process.HasExited)
            {
                _process.Kill();
                _process.WaitForExit();
            }

            _process.Dispose();
            Directory.Delete(_directory, recursive: true);
        }
    }
}
