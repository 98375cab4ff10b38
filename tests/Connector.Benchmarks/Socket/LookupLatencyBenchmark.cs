using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using Connector.Client;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Connector.Testing;

namespace Connector.Benchmarks.Socket;

/// <summary>
/// LOOKUP round trip over the Unix socket (a 1024-token prompt whose four 256-token chunks are all
/// present, so the sidecar hashes and finds every chunk; a 32k-token prompt is reported too) next to Redis PING on loopback TCP in the same run, both with
/// one request in flight, plus redis-benchmark's own p50 for PING with one client.
/// </summary>
internal static class LookupLatencyBenchmark
{
    public static IReadOnlyDictionary<string, double> Run(int iterations)
    {
        var figures = new Dictionary<string, double>();
        using Process? redis = StartRedis(out int port);
        using var sidecar = SidecarProcess.Start();
        using var engine = TestPool.StartEngine();
        try
        {
            engine.Command("fill 1");
            using var worker = engine.Connect(sidecar.SocketPath, "bench", "worker");
            using var scheduler = SidecarClient.Connect(sidecar.SocketPath, "bench", "scheduler", multiplexed: false);
            RegisterRequest register = TestPool.Register(engine);
            register.Namespace!.ChunkTokens = ChunkTokens;
            worker.Call<RegisterReply>(Opcode.Register, register);

            // A 32k-token prompt fully cached; the headline lookup asks for its first 1024 tokens (4 chunks).
            uint[] tokens = TestPool.Tokens(32 * 1024, 1);
            int chunks = tokens.Length / ChunkTokens;
            worker.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, chunks, Enumerable.Range(0, chunks * BlocksPerChunk).Select(b => b % TestPool.Blocks).ToArray()));
            LookupRequest small = TestPool.Lookup(tokens[..1024], lease: false);
            LookupRequest large = TestPool.Lookup(tokens, lease: false);
            var ping = new PingMessage { Nonce = 1 };
            using System.Net.Sockets.Socket? redisSocket = redis is null ? null : ConnectRedis(port);
            byte[] redisPing = "PING\r\n"u8.ToArray();
            byte[] pong = new byte[7];

            var series = new List<(string Name, Action Call, long[] Samples)>
            {
                ("lookup", () => Expect(scheduler.Call<LookupReply>(Opcode.Lookup, small), 4), new long[iterations]),
                ("sidecar_ping", () => scheduler.Call<PingMessage>(Opcode.Ping, ping), new long[iterations]),
            };
            if (redisSocket is not null)
            {
                series.Add(("redis_ping", () =>
                {
                    redisSocket.Send(redisPing);
                    for (int n = 0; n < pong.Length;)
                    {
                        n += redisSocket.Receive(pong.AsSpan(n));
                    }
                }, new long[iterations]));
            }

            Measure(series, iterations, figures, suffix: string.Empty);

            long[] largeSamples = new long[Math.Max(200, iterations / 20)];
            for (int i = 0; i < largeSamples.Length; i++)
            {
                long start = Stopwatch.GetTimestamp();
                Expect(scheduler.Call<LookupReply>(Opcode.Lookup, large), chunks);
                largeSamples[i] = Stopwatch.GetTimestamp() - start;
            }

            figures["lookup_32k_tokens_p50_us"] = Percentiles.Of(Percentiles.Sorted(largeSamples), 50);

            // LOOKUP cost must not depend on history: 100k leasing lookups that miss, then the same series again.
            const int Misses = 100_000;
            uint[] missTokens = TestPool.Tokens(1024, 77);
            for (int i = 0; i < Misses; i++)
            {
                missTokens[0] = (uint)i;
                Expect(scheduler.Call<LookupReply>(Opcode.Lookup, TestPool.Lookup(missTokens, requestId: $"miss-{i}", lease: true)), 0);
            }

            Measure(series, iterations, figures, suffix: "_after_100k_misses");
            figures["lookup_after_100k_misses_over_before"] = figures["lookup_after_100k_misses_p50_us"] / figures["lookup_p50_us"];
            if (redisSocket is not null)
            {
                figures["lookup_p50_over_redis_p50"] = figures["lookup_p50_us"] / figures["redis_ping_p50_us"];
                figures["sidecar_ping_p50_over_redis_p50"] = figures["sidecar_ping_p50_us"] / figures["redis_ping_p50_us"];
                if (RedisBenchmarkP50(port, iterations) is double toolP50)
                {
                    figures["redis_benchmark_ping_p50_us"] = toolP50;
                }
            }
        }
        finally
        {
            if (redis is not null)
            {
                redis.Kill();
                redis.WaitForExit();
            }
        }

        return figures;
    }

    /// <summary>Runs the series interleaved, so that every series sees the same noise from the rest of the machine.</summary>
    private static void Measure(List<(string Name, Action Call, long[] Samples)> series, int iterations, Dictionary<string, double> figures, string suffix)
    {
        for (int i = -Math.Min(2000, iterations); i < iterations; i++)
        {
            foreach (var (_, call, samples) in series)
            {
                long start = Stopwatch.GetTimestamp();
                call();
                if (i >= 0)
                {
                    samples[i] = Stopwatch.GetTimestamp() - start;
                }
            }
        }

        foreach (var (name, _, samples) in series)
        {
            double[] us = Percentiles.Sorted(samples);
            figures[$"{name}{suffix}_p50_us"] = Percentiles.Of(us, 50);
            figures[$"{name}{suffix}_p99_us"] = Percentiles.Of(us, 99);
        }
    }

    private static void Expect(LookupReply reply, int chunks)
    {
        if (reply.HitChunks != chunks)
        {
            throw new InvalidOperationException($"lookup found {reply.HitChunks} of {chunks} chunks");
        }
    }

    private static System.Net.Sockets.Socket ConnectRedis(int port)
    {
        var socket = new System.Net.Sockets.Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        socket.Connect(new IPEndPoint(IPAddress.Loopback, port));
        return socket;
    }

    private const int ChunkTokens = 256;
    private const int BlocksPerChunk = ChunkTokens / TestPool.BlockTokens;

    private static Process? StartRedis(out int port)
    {
        port = 0;
        if (!File.Exists("/usr/bin/redis-server"))
        {
            return null;
        }

        using (var probe = new TcpListener(IPAddress.Loopback, 0))
        {
            probe.Start();
            port = ((IPEndPoint)probe.LocalEndpoint).Port;
        }

        var psi = new ProcessStartInfo("/usr/bin/redis-server") { RedirectStandardOutput = true, UseShellExecute = false };
        foreach (string a in new[] { "--port", port.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no" })
        {
            psi.ArgumentList.Add(a);
        }

        Process p = Process.Start(psi)!;
        for (int i = 0; i < 100; i++)
        {
            try
            {
                using var c = new TcpClient();
                c.Connect(IPAddress.Loopback, port);
                return p;
            }
            catch (SocketException)
            {
                Thread.Sleep(50);
            }
        }

        p.Kill();
        return null;
    }

    private static double? RedisBenchmarkP50(int port, int requests)
    {
        if (!File.Exists("/usr/bin/redis-benchmark"))
        {
            return null;
        }

        var psi = new ProcessStartInfo("/usr/bin/redis-benchmark") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in new[] { "-h", "127.0.0.1", "-p", port.ToString(CultureInfo.InvariantCulture), "-t", "ping", "-c", "1", "-n", requests.ToString(CultureInfo.InvariantCulture), "--csv" })
        {
            psi.ArgumentList.Add(a);
        }

        using Process p = Process.Start(psi)!;
        string output = p.StandardOutput.ReadToEnd();
        p.WaitForExit();

        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",... ; PING_INLINE comes first.
        string[] lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        if (lines.Length < 2)
        {
            return null;
        }

        string[] head = lines[0].Split(',');
        string[] row = lines[1].Split(',');
        int col = Array.IndexOf(head, "\"p50_latency_ms\"");
        return col >= 0 && double.TryParse(row[col].Trim('"'), CultureInfo.InvariantCulture, out double ms) ? ms * 1000 : null;
    }
}
