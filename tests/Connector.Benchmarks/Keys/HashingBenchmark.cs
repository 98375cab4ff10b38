using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using Connector.Core.Keys;

namespace Connector.Benchmarks.Keys;

/// <summary>Hashing a 128k-token prompt into 256-token chunk keys, next to one SHA-256 over the same 512 KiB.</summary>
internal static class HashingBenchmark
{
    public static IReadOnlyDictionary<string, double> Run(int iterations)
    {
        const int Tokens = 131072;
        const int ChunkTokens = 256;
        uint[] tokens = new uint[Tokens];
        var rng = new Random(1);
        for (int i = 0; i < tokens.Length; i++)
        {
            tokens[i] = (uint)rng.Next(0, 128_000);
        }

        ChunkKey root = ChunkHasher.Root(new KvNamespace("m", "bfloat16", "fp", 16, ChunkTokens, 1, 0, 0, 1, string.Empty));
        var keys = new ChunkKey[Tokens / ChunkTokens];
        byte[] bytes = MemoryMarshal.AsBytes(tokens.AsSpan()).ToArray();
        byte[] digest = new byte[32];

        double chain = MedianMs(iterations, () => ChunkHasher.ComputeKeys(root, ChunkTokens, tokens, keys));
        double flat = MedianMs(iterations, () => SHA256.HashData(bytes, digest));
        return new Dictionary<string, double>
        {
            ["chain_ms_per_128k_tokens"] = chain,
            ["chain_GBps"] = bytes.Length / (chain / 1000) / 1e9,
            ["baseline_sha256_ms_512KiB"] = flat,
            ["chain_over_baseline"] = chain / flat,
        };
    }

    private static double MedianMs(int iterations, Action action)
    {
        for (int i = 0; i < 5; i++)
        {
            action();
        }

        var ms = new double[iterations];
        for (int i = 0; i < iterations; i++)
        {
            long t = Stopwatch.GetTimestamp();
            action();
            ms[i] = Stopwatch.GetElapsedTime(t).TotalMilliseconds;
        }

        Array.Sort(ms);
        return ms[iterations / 2];
    }
}
