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
        using (var sidecar = SidecarProcess.Start())
        using (var engine = TestPool.StartEngine())
        {
            engine.Command("fill 1");
            using var worker = SidecarClient.Connect(sidecar.SocketPath, "bench", "worker");
            using var scheduler = SidecarClient.Connect(sidecar.SocketPath, "bench", "scheduler", multiplexed: false);
            RegisterRequest register = TestPool.Register(engine);
            register.Namespace!.ChunkTokens = ChunkTokens;
            worker.Call<RegisterReply>(Opcode.Register, register);

            // A 32k-token prompt fully cached; the headline lookup asks for its first 1024 tokens (4 chunks).
            uint[] tokens = TestPool.Tokens(32 * 1024, 1);
            int chunks = tokens.Length / ChunkTokens;
            worker.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, chunks, Enumerable.Range(0, chunks * BlocksPerChunk).Select(b => b % TestPool.Blocks).ToArray()));
            long[] samples = MeasureLookup(scheduler, tokens[..1024], 4, iterations);
            long[] large = MeasureLookup(scheduler, tokens, chunks, Math.Max(200, iterations / 20));
            double[] largeUs = Percentiles.Sorted(large);
            figures["lookup_32k_tokens_p50_us"] = Percentiles.Of(largeUs, 50);
            var ping = new PingMessage { Nonce = 1 };
            double[] pingUs = Percentiles.Sorted(Measure(iterations, () => scheduler.Call<PingMessage>(Opcode.Ping, ping)));
            figures["sidecar_ping_p50_us"] = Percentiles.Of(pingUs, 50);
            double[] us = Percentiles.Sorted(samples);
            figures["lookup_p50_us"] = Percentiles.Of(us, 50);
            figures["lookup_p99_us"] = Percentiles.Of(us, 99);
        }

        using Process? redis = StartRedis(out int port);
        if (redis is null)
        {
            figures["redis_ping_p50_us"] = double.NaN;
            return figures;
        }

        try
        {
            using var socket = new System.Net.Sockets.Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            socket.Connect(new IPEndPoint(IPAddress.Loopback, port));
            byte[] ping = "PING\r\n"u8.ToArray();
            byte[] pong = new byte[7];
            long[] samples = Measure(iterations, () =>
            {
                socket.Send(ping);
                for (int n = 0; n < pong.Length;)
                {
                    n += socket.Receive(pong.AsSpan(n));
                }
            });
            double[] us = Percentiles.Sorted(samples);
            figures["redis_ping_p50_us"] = Percentiles.Of(us, 50);
            figures["redis_ping_p99_us"] = Percentiles.Of(us, 99);
            figures["lookup_p50_over_redis_p50"] = figures["lookup_p50_us"] / figures["redis_ping_p50_us"];
            double? toolP50 = RedisBenchmarkP50(port, iterations);
            if (toolP50 is double p50)
            {
                figures["redis_benchmark_ping_p50_us"] = p50;
            }
        }
        finally
        {
            redis.Kill();
            redis.WaitForExit();
        }

        return figures;
    }

    private const int ChunkTokens = 256;
    private const int BlocksPerChunk = ChunkTokens / TestPool.BlockTokens;

    private static long[] MeasureLookup(SidecarClient scheduler, uint[] tokens, int expectedChunks, int iterations)
    {
        LookupRequest request = TestPool.Lookup(tokens, lease: false);
        return Measure(iterations, () =>
        {
            LookupReply r = scheduler.Call<LookupReply>(Opcode.Lookup, request);
            if (r.HitChunks != expectedChunks)
            {
                throw new InvalidOperationException($"lookup found {r.HitChunks} of {expectedChunks} chunks");
            }
        });
    }

    private static long[] Measure(int iterations, Action call)
    {
        for (int i = 0; i < Math.Min(2000, iterations); i++)
        {
            call();
        }

        long[] samples = new long[iterations];
        for (int i = 0; i < iterations; i++)
        {
            long start = Stopwatch.GetTimestamp();
            call();
            samples[i] = Stopwatch.GetTimestamp() - start;
        }

        return samples;
    }

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
