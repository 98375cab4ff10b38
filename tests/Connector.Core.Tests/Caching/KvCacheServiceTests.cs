using Connector.Testing;
using Connector.Core.Caching;
using Connector.Core.Memory;
using Connector.Core.Storage;
using Microsoft.Extensions.Time.Testing;
using Xunit;

namespace Connector.Core.Tests.Caching;

public sealed class KvCacheServiceTests : IDisposable
{
    private const int ChunkTokens = 64;
    private readonly FakeTimeProvider _time = new();
    private readonly KvCacheService _cache;
    private readonly InProcessPool _pool = new(layers: 3, blocks: 32);

    public KvCacheServiceTests()
    {
        var tier = new HostMemoryTier(new HostTierOptions { CapacityBytes = 16L << 20, ExtentBytes = 1L << 20, LeaseTtl = TimeSpan.FromSeconds(30) }, _time);
        _cache = new KvCacheService(tier, [new HostProcessMemoryProvider()]);
    }

    public void Dispose()
    {
        _cache.Dispose();
        _pool.Dispose();
    }

    private static NamespaceSpec Ns(int tpSize = 1, int tpRank = 0) => new("m", "bfloat16", InProcessPool.BlockTokens, ChunkTokens, tpSize, tpRank, 0, 1);

    private static uint[] Tokens(int n, uint seed) => Enumerable.Range(0, n).Select(i => (uint)((i * 2654435761u) ^ seed) % 100_000).ToArray();

    [Fact]
    public void StoreThenLoad_OtherBlocks_BytesIdentical()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        _pool.Fill(5);
        uint[] tokens = Tokens(2 * ChunkTokens, 1);
        int[] from = [0, 1, 2, 3, 10, 11, 12, 13];
        int[] to = [20, 21, 22, 23, 4, 5, 6, 7];
        byte[][] expected = Enumerable.Range(0, 3).SelectMany(l => from.Select(b => _pool.Block(l, b).ToArray())).ToArray();

        Assert.Equal(new StoreResult(2, 0, 0), _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 2, from, CopyDeadline.None));
        Assert.Equal(2, _cache.Load(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 2, to, CopyDeadline.None));

        byte[][] actual = Enumerable.Range(0, 3).SelectMany(l => to.Select(b => _pool.Block(l, b).ToArray())).ToArray();
        Assert.Equal(expected, actual);
    }

    [Fact]
    public void Store_ResumedFromChainState_KeysEqualAWholePrefixStore()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        uint[] tokens = Tokens(3 * ChunkTokens, 21);
        StoreResult first = _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens.AsSpan(0, 2 * ChunkTokens)), 0, 2, [0, 1, 2, 3, 4, 5, 6, 7], CopyDeadline.None);
        Assert.NotNull(first.Chain);

        // Only the third chunk's tokens travel, with the chain state of chunk 1.
        StoreResult next = _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens.AsSpan(2 * ChunkTokens)), 2, 1, [8, 9, 10, 11], CopyDeadline.None, first.Chain);
        Assert.Equal(1, next.Stored);
        Assert.Equal(3, _cache.Lookup(2, "i", "q", null, tokens, lease: false).HitChunks);
    }

    [Fact]
    public void Store_ChainStateOfAnotherSaltOrAtFirstChunk_BadRequestNothingStored()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        uint[] tokens = Tokens(2 * ChunkTokens, 22);
        byte[] chain = _cache.Store(reg, "r", "tenant-a", ChunkSource.FromTokens(tokens.AsSpan(0, ChunkTokens)), 0, 1, [0, 1, 2, 3], CopyDeadline.None).Chain!;
        var otherSalt = Assert.Throws<CacheException>(() => _cache.Store(reg, "r", "tenant-b", ChunkSource.FromTokens(tokens.AsSpan(ChunkTokens)), 1, 1, [4, 5, 6, 7], CopyDeadline.None, chain));
        Assert.Equal(CacheError.BadRequest, otherSalt.Code);
        var notBefore = Assert.Throws<CacheException>(() => _cache.Store(reg, "r", "tenant-a", ChunkSource.FromTokens(tokens), 0, 1, [4, 5, 6, 7], CopyDeadline.None, chain));
        Assert.Equal(CacheError.BadRequest, notBefore.Code);
        Assert.Equal(1, _cache.GetStats().Chunks);
    }

    [Fact]
    public void Lookup_StopsAtFirstMissingChunk()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        uint[] tokens = Tokens(3 * ChunkTokens + 5, 2);
        _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [0, 1, 2, 3], CopyDeadline.None);
        _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 2, 1, [8, 9, 10, 11], CopyDeadline.None);

        LookupResult r = _cache.Lookup(2, "i", "r", null, tokens, lease: false);
        Assert.Equal(1, r.HitChunks);
        Assert.Equal(ChunkTokens, r.HitTokens);
    }

    [Fact]
    public void Lookup_SaltedStore_OnlySameSaltHits()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        uint[] tokens = Tokens(ChunkTokens, 3);
        _cache.Store(reg, "r", "a", ChunkSource.FromTokens(tokens), 0, 1, [0, 1, 2, 3], CopyDeadline.None);
        Assert.Equal(1, _cache.Lookup(2, "i", "r", "a", tokens, false).HitChunks);
        Assert.Equal(0, _cache.Lookup(2, "i", "r", "b", tokens, false).HitChunks);
        Assert.Equal(0, _cache.Lookup(2, "i", "r", null, tokens, false).HitChunks);
    }

    [Fact]
    public void Lookup_LeasedChunks_SurviveClearUntilLoaded()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        uint[] tokens = Tokens(ChunkTokens, 4);
        _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [0, 1, 2, 3], CopyDeadline.None);
        LookupResult r = _cache.Lookup(2, "i", "req", null, tokens, lease: true);
        Assert.NotEqual(0UL, r.LeaseId);

        Assert.Equal(0, _cache.Clear());
        Assert.Equal(1, _cache.Load(reg, "req", null, ChunkSource.FromTokens(tokens), 0, 1, [4, 5, 6, 7], CopyDeadline.None));
        Assert.Equal(1, _cache.Clear());
        Assert.Throws<CacheException>(() => _cache.Release(r.LeaseId, "i"));
    }

    [Fact]
    public void Lookup_LeaseExpiresAfterTtl()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        uint[] tokens = Tokens(ChunkTokens, 6);
        _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [0, 1, 2, 3], CopyDeadline.None);
        _cache.Lookup(2, "i", "req", null, tokens, lease: true);
        Assert.Equal(0, _cache.Clear());
        _time.Advance(TimeSpan.FromSeconds(31));
        _cache.ExpireLeases();
        Assert.Equal(1, _cache.Clear());
    }

    [Fact]
    public void OnSessionClosed_ReleasesLeasesAndRegistrations()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        uint[] tokens = Tokens(ChunkTokens, 7);
        _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [0, 1, 2, 3], CopyDeadline.None);
        _cache.Lookup(2, "i", "req", null, tokens, lease: true);
        _cache.OnSessionClosed(2);
        Assert.Equal(1, _cache.Clear());
        _cache.OnSessionClosed(1);
        Assert.Equal(LookupOutcome.NotRegistered, _cache.Lookup(2, "i", "r", null, tokens, false).State);
        Assert.Throws<CacheException>(() => _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [0, 1, 2, 3], CopyDeadline.None));
    }

    [Fact]
    public void Lookup_TwoRanks_MinimumOfBoth()
    {
        using var other = new InProcessPool(layers: 3, blocks: 32);
        EngineRegistration r0 = _cache.Register(1, "tp", Ns(2, 0), _pool.Layers());
        EngineRegistration r1 = _cache.Register(3, "tp", Ns(2, 1), other.Layers());
        uint[] tokens = Tokens(3 * ChunkTokens, 8);
        _cache.Store(r0, "r", null, ChunkSource.FromTokens(tokens), 0, 3, Enumerable.Range(0, 12).ToArray(), CopyDeadline.None);
        Assert.Equal(0, _cache.Lookup(2, "tp", "r", null, tokens, false).HitChunks);
        _cache.Store(r1, "r", null, ChunkSource.FromTokens(tokens), 0, 2, Enumerable.Range(0, 8).ToArray(), CopyDeadline.None);
        Assert.Equal(2, _cache.Lookup(2, "tp", "r", null, tokens, false).HitChunks);
    }

    [Theory]
    [InlineData(new[] { 0, 1, 2, 32 })]
    [InlineData(new[] { 0, -1, 2, 3 })]
    public void Store_BlockIdOutOfRange_Throws(int[] blocks)
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        var ex = Assert.Throws<CacheException>(() => _cache.Store(reg, "r", null, ChunkSource.FromTokens(Tokens(ChunkTokens, 9)), 0, 1, blocks, CopyDeadline.None));
        Assert.Equal(CacheError.OutOfRange, ex.Code);
        Assert.Equal(0, _cache.GetStats().Chunks);
    }

    [Fact]
    public void Store_TooFewTokensOrBlockIds_BadRequest()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        Assert.Equal(CacheError.BadRequest, Assert.Throws<CacheException>(() => _cache.Store(reg, "r", null, ChunkSource.FromTokens(Tokens(ChunkTokens - 1, 1)), 0, 1, [0, 1, 2, 3], CopyDeadline.None)).Code);
        Assert.Equal(CacheError.BadRequest, Assert.Throws<CacheException>(() => _cache.Store(reg, "r", null, ChunkSource.FromTokens(Tokens(ChunkTokens, 1)), 0, 1, [0, 1, 2], CopyDeadline.None)).Code);
    }

    [Fact]
    public void Register_LayoutBeyondRegion_BadLayout()
    {
        var ex = Assert.Throws<CacheException>(() => _cache.Register(1, "i", Ns(), _pool.Layers(numBlocksOverride: 33)));
        Assert.Equal(CacheError.BadLayout, ex.Code);
    }

    [Fact]
    public void Register_ChunkNotMultipleOfBlock_BadRequest()
    {
        var ns = new NamespaceSpec("m", "bf16", 16, 40, 1, 0, 0, 1);
        Assert.Equal(CacheError.BadRequest, Assert.Throws<CacheException>(() => _cache.Register(1, "i", ns, _pool.Layers())).Code);
    }

    [Fact]
    public void StoreAndLoad_ManagedAllocation_DoesNotGrowWithChunkCount()
    {
        EngineRegistration reg = _cache.Register(1, "i", Ns(), _pool.Layers());
        int[] blocks = Enumerable.Range(0, 32).ToArray();
        long Allocated(Action a)
        {
            long before = GC.GetAllocatedBytesForCurrentThread();
            a();
            return GC.GetAllocatedBytesForCurrentThread() - before;
        }

        // Warm up every path (pools, JIT, dictionary capacity).
        for (uint s = 0; s < 20; s++)
        {
            uint[] warm = Tokens(8 * ChunkTokens, 1000 + s);
            _cache.Store(reg, "r", null, ChunkSource.FromTokens(warm), 0, 8, blocks, CopyDeadline.None);
            _cache.Load(reg, "w", null, ChunkSource.FromTokens(warm), 0, 8, blocks, CopyDeadline.None);
        }

        _cache.Clear();
        uint[] one = Tokens(ChunkTokens, 1);
        uint[] eight = Tokens(8 * ChunkTokens, 2);
        long storeOne = Allocated(() => _cache.Store(reg, "r", null, ChunkSource.FromTokens(one), 0, 1, blocks.AsSpan(0, 4), CopyDeadline.None));
        long storeEight = Allocated(() => _cache.Store(reg, "r", null, ChunkSource.FromTokens(eight), 0, 8, blocks, CopyDeadline.None));
        long loadOne = Allocated(() => _cache.Load(reg, "a", null, ChunkSource.FromTokens(one), 0, 1, blocks.AsSpan(0, 4), CopyDeadline.None));
        long loadEight = Allocated(() => _cache.Load(reg, "b", null, ChunkSource.FromTokens(eight), 0, 8, blocks, CopyDeadline.None));
        Assert.Equal(storeOne, storeEight);
        Assert.Equal(loadOne, loadEight);
    }
}

public sealed class KvCacheServiceDeadlineTests : IDisposable
{
    private readonly KvCacheService _cache = new(
        new HostMemoryTier(new HostTierOptions { CapacityBytes = 16L << 20, ExtentBytes = 1L << 20 }, new FakeTimeProvider()),
        [new HostProcessMemoryProvider()]);

    private readonly InProcessPool _pool = new(layers: 2, blocks: 16);

    public void Dispose()
    {
        _cache.Dispose();
        _pool.Dispose();
    }

    [Fact]
    public void Store_CopyEndsAfterEnginesDeadline_DiscardedNotCommitted()
    {
        EngineRegistration reg = _cache.Register(1, "i", new NamespaceSpec("m", "bf16", 16, 64, 1, 0, 0, 1), _pool.Layers());
        uint[] tokens = Enumerable.Range(0, 128).Select(i => (uint)i).ToArray();
        StoreResult late = _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 2, Enumerable.Range(0, 8).ToArray(), new CopyDeadline(0, CancellationToken.None));
        Assert.Equal(new StoreResult(0, 0, 2), late);
        Assert.Equal(0, _cache.GetStats().Chunks);
        Assert.Equal(1, _cache.GetStats().LateStores);
        Assert.Equal(0, _cache.Lookup(2, "i", "r", null, tokens, false).HitChunks);

        StoreResult onTime = _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 2, Enumerable.Range(0, 8).ToArray(), CopyDeadline.After(TimeSpan.FromSeconds(60)));
        Assert.Equal(2, onTime.Stored);
        Assert.Equal(2, _cache.Lookup(2, "i", "r", null, tokens, false).HitChunks);
    }
}
