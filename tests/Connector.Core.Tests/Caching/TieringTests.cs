using Connector.Core.Caching;
using Connector.Core.Keys;
using Connector.Core.Memory;
using Connector.Core.Storage;
using Connector.Core.Storage.Tiers;
using Connector.Storage.Disk;
using Connector.Storage.Redis;
using Connector.Testing;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Time.Testing;
using Xunit;

namespace Connector.Core.Tests.Caching;

/// <summary>
/// The cache core over real tiers below L1: a disk tier in a temporary directory (write-back demotion,
/// write-through offers, promotion answering Pending) and a Redis tier whose server is not there (a miss, not a
/// stall). Bytes are checked in the engine's memory after the load.
/// </summary>
public sealed class TieringTests : IDisposable
{
    private const int ChunkTokens = 64;
    private const int BlocksPerChunk = ChunkTokens / InProcessPool.BlockTokens;
    private const long ChunkBytes = 3L * BlocksPerChunk * InProcessPool.BlockBytes;

    private readonly InProcessPool _pool = new(layers: 3, blocks: 256);
    private readonly string _dir = Directory.CreateTempSubdirectory("kvsc-tiering-").FullName;
    private readonly List<IDisposable> _owned = [];

    public void Dispose()
    {
        foreach (IDisposable d in Enumerable.Reverse(_owned))
        {
            d.Dispose();
        }

        _pool.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    [Fact]
    public void ChunksEvictedFromL1_AreDemotedToDisk_AndComeBackThroughAPendingLookup_ByteForByte()
    {
        var disk = new DiskTier(new DiskTierOptions { Path = _dir, CapacityBytes = 64L << 20, SegmentBytes = 1L << 20, AdmitAfterSightings = 1 }, NullLogger.Instance);
        (KvCacheService cache, HostMemoryTier _) = Create(new TierSlot(disk, TierWritePolicy.WriteBack), l1Chunks: 12);
        EngineRegistration reg = cache.Register(1, "i", Ns(), _pool.Layers());
        _pool.Fill(7);
        uint[] a = Tokens(8 * ChunkTokens, 1);
        Assert.Equal(8, cache.Store(reg, "a", null, ChunkSource.FromTokens(a), 0, 8, Blocks(0, 8), CopyDeadline.None).Stored);

        // A second prompt needs the room: A's chunks leave L1 for the disk.
        uint[] b = Tokens(10 * ChunkTokens, 2);
        cache.Store(reg, "b", null, ChunkSource.FromTokens(b), 0, 10, Blocks(8 * BlocksPerChunk, 10), CopyDeadline.None);
        // Eviction takes suffixes first: A's leading chunks may still be in L1, the rest went down to the disk.
        int inL1 = cache.Lookup(1, "i", "probe", null, a, lease: false).HitChunks;
        Assert.True(inL1 < 8, "A should have been evicted from L1");
        WaitFor(() => disk.CountPresentPrefix(TierKeys(cache, reg, a).AsSpan(inL1)) == 8 - inL1, "A's evicted chunks on disk");

        LookupResult first = cache.Lookup(1, "i", "a2", null, a, lease: true);
        Assert.Equal(LookupOutcome.Pending, first.State);
        LookupResult answer = WaitForReady(cache, "a2", a);
        Assert.Equal(8, answer.HitChunks);
        Assert.NotEqual(0UL, answer.LeaseId);
        Assert.Equal(0, cache.ActivePromotions); // collected by the lookup that found everything in L1, pins released

        byte[] expected = Snapshot(0, 8 * BlocksPerChunk);
        Assert.Equal(8, cache.Load(reg, "a2", null, ChunkSource.FromTokens(a), 0, 8, Blocks(200 - (8 * BlocksPerChunk), 8), CopyDeadline.None));
        Assert.Equal(expected, Snapshot(200 - (8 * BlocksPerChunk), 8 * BlocksPerChunk));
        TierChainStats stats = Assert.Single(cache.Tiers!.GetStats());
        Assert.Equal(8 - inL1, stats.Promotions);
        Assert.True(stats.Demotions >= 8 - inL1);
    }

    [Fact]
    public void WriteThroughTier_ReceivesEveryStoredChunk_AndAPromptInL1AloneIsAnsweredReadyAtOnce()
    {
        var disk = new DiskTier(new DiskTierOptions { Path = _dir, CapacityBytes = 64L << 20, SegmentBytes = 1L << 20, AdmitAfterSightings = 1 }, NullLogger.Instance);
        (KvCacheService cache, _) = Create(new TierSlot(disk, TierWritePolicy.WriteThrough), l1Chunks: 32);
        EngineRegistration reg = cache.Register(1, "i", Ns(), _pool.Layers());
        _pool.Fill(3);
        uint[] a = Tokens(4 * ChunkTokens, 5);
        Assert.Equal(4, cache.Store(reg, "a", null, ChunkSource.FromTokens(a), 0, 4, Blocks(0, 4), CopyDeadline.None).Stored);

        WaitFor(() => disk.CountPresentPrefix(TierKeys(cache, reg, a)) == 4, "every stored chunk on disk");
        Assert.Equal(4, Assert.Single(cache.Tiers!.GetStats()).WriteThroughOffers);
        LookupResult hit = cache.Lookup(1, "i", "r", null, a, lease: true);
        Assert.Equal((LookupOutcome.Ready, 4), (hit.State, hit.HitChunks));
    }

    [Fact]
    public void RedisThatIsNotThere_IsAMiss_NotAStall()
    {
        var redis = new RedisTier(new RedisTierOptions { Configuration = "127.0.0.1:1", ConnectTimeout = TimeSpan.FromMilliseconds(200), OperationTimeout = TimeSpan.FromMilliseconds(200) }, NullLogger.Instance);
        (KvCacheService cache, _) = Create(new TierSlot(redis, TierWritePolicy.WriteThrough), l1Chunks: 16);
        EngineRegistration reg = cache.Register(1, "i", Ns(), _pool.Layers());
        uint[] a = Tokens(4 * ChunkTokens, 9);
        Assert.Equal(4, cache.Store(reg, "a", null, ChunkSource.FromTokens(a), 0, 4, Blocks(0, 4), CopyDeadline.None).Stored);

        uint[] unseen = Tokens(4 * ChunkTokens, 10);
        Assert.Equal(LookupOutcome.Pending, cache.Lookup(1, "i", "u", null, unseen, lease: true).State);
        LookupResult answer = WaitForReady(cache, "u", unseen);
        Assert.Equal(0, answer.HitChunks);
        // Asked again (vLLM re-asks a request it could not schedule): the settled outcome stands, no new promotion.
        Assert.Equal(LookupOutcome.Ready, cache.Lookup(1, "i", "u", null, unseen, lease: true).State);
        Assert.Equal(1, cache.PromotionCounts.Started);
        Assert.Equal(4, cache.Lookup(1, "i", "a2", null, a, lease: false).HitChunks);
    }

    private (KvCacheService Cache, HostMemoryTier L1) Create(TierSlot slot, int l1Chunks)
    {
        var chain = new TierChain([slot]);
        long extent = 4 * ChunkBytes;
        var l1 = new HostMemoryTier(new HostTierOptions { CapacityBytes = (l1Chunks * ChunkBytes) + (256 << 10), ExtentBytes = extent, EvictionSink = chain }, new FakeTimeProvider());
        var cache = new KvCacheService(l1, [new HostProcessMemoryProvider()], new CacheLimits { MinChunkBytes = 4096 }, null, chain, new TieringOptions { PromotionTimeout = TimeSpan.FromSeconds(10) });
        _owned.Add(chain);
        _owned.Add(cache);
        return (cache, l1);
    }

    private static NamespaceSpec Ns() => new("m", "bfloat16", InProcessPool.BlockTokens, ChunkTokens, 1, 0, 0, 1);

    private static uint[] Tokens(int n, uint seed) => Enumerable.Range(0, n).Select(i => (uint)((i * 2654435761u) ^ (seed * 40503u)) % 100_000).ToArray();

    private static int[] Blocks(int first, int chunks) => Enumerable.Range(first, chunks * BlocksPerChunk).ToArray();

    private static TierKey[] TierKeys(KvCacheService cache, EngineRegistration reg, uint[] tokens)
    {
        _ = cache;
        int n = tokens.Length / ChunkTokens;
        var keys = new ChunkKey[n];
        ChunkHasher.ComputeKeys(reg.RootKey(null), ChunkTokens, tokens, keys);
        return [.. keys.Select((k, i) => new TierKey(k, i == 0 ? ChunkKey.None : keys[i - 1], reg.RootKey(null).Tag, ChunkBytes))];
    }

    private byte[] Snapshot(int firstBlock, int blocks)
    {
        var bytes = new List<byte>();
        for (int l = 0; l < _pool.LayerCount; l++)
        {
            for (int b = firstBlock; b < firstBlock + blocks; b++)
            {
                bytes.AddRange(_pool.Block(l, b).ToArray());
            }
        }

        return [.. bytes];
    }

    private static LookupResult WaitForReady(KvCacheService cache, string requestId, uint[] tokens)
    {
        LookupResult r = default;
        WaitFor(() => (r = cache.Lookup(1, "i", requestId, null, tokens, lease: true)).State == LookupOutcome.Ready, "a Ready lookup");
        return r;
    }

    private static void WaitFor(Func<bool> condition, string what)
    {
        // A bound on a correctness wait, not a timing assertion: the work is milliseconds.
        DateTime until = DateTime.UtcNow.AddSeconds(20);
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < until, $"gave up waiting for {what}");
            Thread.Sleep(5);
        }
    }
}
