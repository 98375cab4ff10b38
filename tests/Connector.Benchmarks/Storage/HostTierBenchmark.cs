using System.Diagnostics;
using Connector.Core.Keys;
using Connector.Core.Storage;

namespace Connector.Benchmarks.Storage;

/// <summary>L1 metadata operations: a 512-chunk prefix lookup and store with eviction, next to plain Dictionary lookups of the same keys.</summary>
internal static class HostTierBenchmark
{
    public static IReadOnlyDictionary<string, double> Run()
    {
        const int Chain = 512;
        const long ChunkBytes = 4096;
        using var tier = new HostMemoryTier(new HostTierOptions { CapacityBytes = Chain * ChunkBytes, ExtentBytes = 1 << 20 }, TimeProvider.System);
        ChunkKey[] keys = Keys(Chain, 1);
        for (int i = 0; i < Chain; i++)
        {
            tier.TryBeginStore(keys[i], i == 0 ? ChunkKey.None : keys[i - 1], ChunkBytes, out SlabRef slab);
            tier.CommitStore(slab);
        }

        var dict = keys.Select((k, i) => (k, i)).ToDictionary(p => p.k, p => p.i);
        const int Rounds = 2000;
        double prefixNs = NsPer(Rounds, () => tier.CountPresentPrefix(keys));
        double dictNs = NsPer(Rounds, () =>
        {
            int n = 0;
            foreach (ChunkKey k in keys)
            {
                n += dict.TryGetValue(k, out _) ? 1 : 0;
            }

            return n;
        });

        ChunkKey[] fresh = Keys(Rounds * 4, 2);
        int next = 0;
        double storeNs = NsPer(Rounds * 4, () =>
        {
            ChunkKey k = fresh[next++];
            if (tier.TryBeginStore(k, ChunkKey.None, ChunkBytes, out SlabRef s) == StoreBegin.Reserved)
            {
                tier.CommitStore(s);
            }

            return 0;
        }) * 1;

        return new Dictionary<string, double>
        {
            ["prefix_lookup_512_chunks_us"] = prefixNs / 1000,
            ["baseline_dictionary_512_lookups_us"] = dictNs / 1000,
            ["prefix_over_baseline"] = prefixNs / dictNs,
            ["store_with_eviction_ns"] = storeNs,
        };
    }

    private static ChunkKey[] Keys(int n, byte salt)
    {
        var keys = new ChunkKey[n];
        Span<byte> b = stackalloc byte[32];
        for (int i = 0; i < n; i++)
        {
            b.Clear();
            BitConverter.TryWriteBytes(b, i * 2654435761L);
            b[31] = salt;
            keys[i] = new ChunkKey(b);
        }

        return keys;
    }

    private static double NsPer(int rounds, Func<int> action)
    {
        long t = Stopwatch.GetTimestamp();
        for (int i = 0; i < rounds; i++)
        {
            action();
        }

        return Stopwatch.GetElapsedTime(t).TotalNanoseconds / rounds;
    }
}
