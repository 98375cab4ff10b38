using System.Runtime.InteropServices;
using Connector.Core.Caching;
using Connector.Core.Memory;
using Connector.Core.Platform;
using Connector.Core.Storage;

namespace Connector.Server;

/// <summary>
/// Runs REGISTER, STORE, LOOKUP and LOAD once through a throwaway cache over this process's own memory before
/// the socket opens, so the first engine to (re)connect does not pay the JIT for them: a restarted sidecar
/// serves its first registration and store in about a millisecond instead of tens.
/// </summary>
/// <remarks>The real cache is not touched: its chunks, counters and leases stay as they are.</remarks>
internal static unsafe class CacheWarmup
{
    private const int BlockTokens = 16;
    private const int Blocks = 8;
    private const int RowBytes = 64;
    private const int BlockBytes = 2 * BlockTokens * RowBytes;

    public static void Run()
    {
        long bytes = (long)Blocks * BlockBytes;
        byte* pool = (byte*)NativeMemory.AlignedAlloc((nuint)bytes, 4096);
        try
        {
            new Span<byte>(pool, (int)bytes).Clear();
            using var tier = new HostMemoryTier(new HostTierOptions { CapacityBytes = 4L << 20, ExtentBytes = 1L << 20 }, TimeProvider.System);
            using var cache = new KvCacheService(tier, [new HostProcessMemoryProvider()], new CacheLimits { MinChunkBytes = 1 });
            using ProcessIdentity self = ProcessIdentity.Current();
            var layer = new LayerSpec(
                "warmup",
                new EngineMemoryRef(EngineMemoryKind.HostProcess, 0, (ulong)pool, (ulong)bytes, null, null, 0),
                new KvLayout(2, Blocks, BlockTokens, 1, RowBytes, BlockBytes, RowBytes, RowBytes, 0, BlockTokens * RowBytes));
            EngineRegistration registration = cache.Register(0, "kvsidecar-warmup", new NamespaceSpec("warmup", "bfloat16", BlockTokens, 4 * BlockTokens, 1, 0, 0, 1), [layer], self);
            uint[] tokens = new uint[8 * BlockTokens];
            StoreResult stored = cache.Store(registration, "w", null, ChunkSource.FromTokens(tokens), 0, 1, [0, 1, 2, 3], CopyDeadline.After(TimeSpan.FromSeconds(5)));
            cache.Store(registration, "w", null, ChunkSource.FromTokens(tokens.AsSpan(4 * BlockTokens)), 1, 1, [4, 5, 6, 7], CopyDeadline.After(TimeSpan.FromSeconds(5)), stored.Chain);
            cache.Lookup(0, "kvsidecar-warmup", "w", null, tokens, lease: true);
            cache.Load(registration, "w", null, ChunkSource.FromTokens(tokens), 0, 2, [4, 5, 6, 7, 0, 1, 2, 3], CopyDeadline.After(TimeSpan.FromSeconds(5)));
            cache.OnSessionClosed(0);
        }
        finally
        {
            NativeMemory.AlignedFree(pool);
        }
    }
}
