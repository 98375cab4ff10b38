using Connector.Core.Keys;
using Connector.Core.Storage;
using Microsoft.Extensions.Time.Testing;
using Xunit;

namespace Connector.Core.Tests.Storage;

public sealed class HostMemoryTierTests
{
    private const long Chunk = 4096;

    /// <summary>
    /// Room for the tier's own metadata, which the budget counts: up to 16 entries (about 140 bytes each) and an
    /// index of up to 17 slots need about 3.1 KiB. Less than a chunk, so it never holds an extra chunk.
    /// </summary>
    private const long MetadataHeadroom = 3584;

    private readonly FakeTimeProvider _time = new();

    private HostMemoryTier Tier(int chunks, long extent = 4 * Chunk) =>
        new(new HostTierOptions { CapacityBytes = (chunks * Chunk) + MetadataHeadroom, ExtentBytes = extent, LeaseTtl = TimeSpan.FromSeconds(10) }, _time);

    internal static ChunkKey K(int i)
    {
        Span<byte> b = stackalloc byte[32];
        b.Clear();
        BitConverter.TryWriteBytes(b, i + 1);
        return new ChunkKey(b);
    }

    private static void Put(HostMemoryTier tier, int key, int parent = -1, long bytes = Chunk, byte fill = 0)
    {
        Assert.Equal(StoreBegin.Reserved, tier.TryBeginStore(K(key), parent < 0 ? ChunkKey.None : K(parent), bytes, out SlabRef slab));
        unsafe
        {
            new Span<byte>((void*)slab.Address, (int)slab.Length).Fill(fill == 0 ? (byte)key : fill);
        }

        tier.CommitStore(slab);
    }

    private static bool Has(HostMemoryTier tier, int key) => tier.CountPresentPrefix([K(key)]) == 1;

    [Fact]
    public void Store_ThenLookupAndPin_ReadsSameBytes()
    {
        using var tier = Tier(8);
        Put(tier, 1, fill: 0xAB);
        Assert.True(tier.TryPinForRead(K(1), out SlabRef slab));
        unsafe
        {
            Assert.All(new Span<byte>((void*)slab.Address, (int)slab.Length).ToArray(), b => Assert.Equal(0xAB, b));
        }

        tier.Unpin(slab);
        Assert.Equal(1, tier.GetStats().Chunks);
        Assert.Equal(Chunk, tier.GetStats().UsedBytes);
    }

    [Fact]
    public void TryBeginStore_SameKeyTwice_AlreadyPresentOrInProgress()
    {
        using var tier = Tier(8);
        Assert.Equal(StoreBegin.Reserved, tier.TryBeginStore(K(1), ChunkKey.None, Chunk, out SlabRef slab));
        Assert.Equal(StoreBegin.InProgress, tier.TryBeginStore(K(1), ChunkKey.None, Chunk, out _));
        Assert.False(Has(tier, 1));
        tier.CommitStore(slab);
        Assert.Equal(StoreBegin.AlreadyPresent, tier.TryBeginStore(K(1), ChunkKey.None, Chunk, out _));
    }

    [Fact]
    public void AbortStore_FreesTheSlabAndHidesTheChunk()
    {
        using var tier = Tier(1, extent: Chunk);
        Assert.Equal(StoreBegin.Reserved, tier.TryBeginStore(K(1), ChunkKey.None, Chunk, out SlabRef slab));
        tier.AbortStore(slab);
        Assert.False(Has(tier, 1));
        Assert.Equal(0, tier.GetStats().UsedBytes);
        Put(tier, 2);
        Assert.Throws<InvalidOperationException>(() => tier.CommitStore(slab));
    }

    [Fact]
    public void CountPresentPrefix_StopsAtFirstGap_CountsHitsAndMisses()
    {
        using var tier = Tier(8);
        Put(tier, 0);
        Put(tier, 1, 0);
        Put(tier, 3, 2);
        Assert.Equal(2, tier.CountPresentPrefix([K(0), K(1), K(2), K(3)]));
        HostTierStats s = tier.GetStats();
        Assert.Equal(2, s.Hits);
        Assert.Equal(1, s.Misses);
    }

    [Fact]
    public void Eviction_LeastRecentlyUsedFirst()
    {
        using var tier = Tier(4);
        for (int i = 0; i < 4; i++)
        {
            Put(tier, i);
        }

        Assert.True(Has(tier, 0)); // 0 is now the most recent; 1 is the oldest
        Put(tier, 10);
        Assert.False(Has(tier, 1));
        Assert.True(Has(tier, 0));
        Assert.Equal(1, tier.GetStats().Evictions);
    }

    [Fact]
    public void Eviction_SuffixesBeforePrefix_EvenWhenPrefixIsOlder()
    {
        using var tier = Tier(4);
        Put(tier, 0);        // chain k0 <- k1 <- k2, stored first: the oldest
        Put(tier, 1, 0);
        Put(tier, 2, 1);
        Put(tier, 9);        // an unrelated, newer chunk
        Put(tier, 20);       // evicts k2: k0 and k1 are older but have suffixes
        Put(tier, 21);       // evicts k1, not the older k0
        Assert.False(Has(tier, 2));
        Assert.False(Has(tier, 1));
        Assert.True(Has(tier, 0));
        Assert.True(Has(tier, 9));
        Assert.Equal(2, tier.GetStats().Evictions);
    }

    [Fact]
    public void Lease_ProtectsFromEvictionUntilReleased_ThenNoSpaceWhenAllLeased()
    {
        using var tier = Tier(2, extent: Chunk);
        Put(tier, 0);
        Put(tier, 1);
        LeaseId lease = tier.AcquireLease(7, [K(0), K(1), K(5)]);
        Assert.NotEqual(LeaseId.None, lease);
        Assert.Equal(StoreBegin.NoSpace, tier.TryBeginStore(K(2), ChunkKey.None, Chunk, out _));
        Assert.True(Has(tier, 0) && Has(tier, 1));
        Assert.Equal(2, tier.ReleaseLease(lease));
        Assert.Equal(0, tier.ReleaseLease(lease));
        Put(tier, 2);
    }

    [Fact]
    public void Lease_ExpiresAfterTtl()
    {
        using var tier = Tier(1, extent: Chunk);
        Put(tier, 0);
        tier.AcquireLease(7, [K(0)]);
        Assert.Equal(StoreBegin.NoSpace, tier.TryBeginStore(K(1), ChunkKey.None, Chunk, out _));
        _time.Advance(TimeSpan.FromSeconds(11));
        Put(tier, 1);
        Assert.Equal(0, tier.GetStats().ActiveLeases);
    }

    [Fact]
    public void ReleaseOwner_EndsOnlyThatOwnersLeases()
    {
        using var tier = Tier(4);
        Put(tier, 0);
        Put(tier, 1);
        tier.AcquireLease(1, [K(0)]);
        LeaseId other = tier.AcquireLease(2, [K(1)]);
        Assert.Equal(1, tier.ReleaseOwner(1));
        Assert.Equal(1, tier.Clear());
        Assert.True(tier.IsLeaseActive(other));
        Assert.True(Has(tier, 1));
    }

    [Fact]
    public void Pinned_SurvivesClearAndEviction()
    {
        using var tier = Tier(1, extent: Chunk);
        Put(tier, 0);
        Assert.True(tier.TryPinForRead(K(0), out SlabRef pin));
        Assert.Equal(0, tier.Clear());
        Assert.Equal(StoreBegin.NoSpace, tier.TryBeginStore(K(1), ChunkKey.None, Chunk, out _));
        tier.Unpin(pin);
        Assert.Equal(1, tier.Clear());
    }

    [Fact]
    public void SlabClasses_ShareTheBudget_EmptyExtentReturned()
    {
        using var tier = Tier(4, extent: 2 * Chunk);
        Put(tier, 0);
        Put(tier, 1);
        Put(tier, 2, bytes: 2 * Chunk);
        Assert.Equal(4 * Chunk, tier.GetStats().AllocatedBytes);
        Put(tier, 3, bytes: 2 * Chunk); // replaces the other big chunk (same size goes first)
        Assert.False(Has(tier, 2));
        tier.AcquireLease(1, [K(3)]);

        // No big chunk can go: the small chunks are evicted and their emptied extent handed to the big class.
        Put(tier, 4, bytes: 2 * Chunk);
        Assert.True(Has(tier, 3) && Has(tier, 4));
        Assert.False(Has(tier, 0) || Has(tier, 1));
        Assert.Equal(4 * Chunk, tier.GetStats().AllocatedBytes);
    }

    [Fact]
    public void StoredBytes_StayIntactWhileOtherChunksChurn()
    {
        using var tier = Tier(8);
        Put(tier, 0, fill: 0x5A);
        tier.AcquireLease(1, [K(0)]);
        for (int i = 1; i < 200; i++)
        {
            Put(tier, i, fill: (byte)(i | 1));
        }

        Assert.True(tier.TryPinForRead(K(0), out SlabRef slab));
        unsafe
        {
            Assert.All(new Span<byte>((void*)slab.Address, (int)slab.Length).ToArray(), b => Assert.Equal(0x5A, b));
        }

        tier.Unpin(slab);
    }

    [Fact]
    public void WarmTier_StoreLookupPinCycles_AllocateNothing()
    {
        using var tier = Tier(64);
        ChunkKey[] keys = Enumerable.Range(0, 256).Select(K).ToArray();
        void Cycle(int i)
        {
            if (tier.TryBeginStore(keys[i % 256], i % 256 == 0 ? ChunkKey.None : keys[(i % 256) - 1], Chunk, out SlabRef s) == StoreBegin.Reserved)
            {
                tier.CommitStore(s);
            }

            tier.CountPresentPrefix(keys.AsSpan(0, 8));
            if (tier.TryPinForRead(keys[i % 256], out SlabRef p))
            {
                tier.Unpin(p);
            }
        }

        for (int i = 0; i < 2000; i++)
        {
            Cycle(i);
        }

        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 10_000; i++)
        {
            Cycle(i);
        }

        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }

    [Fact]
    public void TryBeginStore_EvictionCannotMakeRoom_NoSpaceAndNothingEvicted()
    {
        using var tier = Tier(4, extent: Chunk);
        for (int i = 0; i < 4; i++)
        {
            Put(tier, i);
        }

        tier.AcquireLease(1, [K(0), K(1), K(2)]);

        // Two chunks' worth is needed but only one chunk may go: refused before anything is evicted.
        Assert.Equal(StoreBegin.NoSpace, tier.TryBeginStore(K(9), ChunkKey.None, 2 * Chunk, out _));
        Assert.True(Has(tier, 3));
        Assert.Equal(0, tier.GetStats().Evictions);
    }

    [Fact]
    public void TryBeginStore_ChunkLargerThanCapacity_NoSpaceAndNothingEvicted()
    {
        using var tier = Tier(4, extent: Chunk);
        Put(tier, 0);
        Assert.Equal(StoreBegin.NoSpace, tier.TryBeginStore(K(9), ChunkKey.None, 64 * Chunk, out _));
        Assert.True(Has(tier, 0));
        Assert.Equal(0, tier.GetStats().Evictions);
    }

    [Fact]
    public void ConcurrentStoresAndLookups_KeepInvariants()
    {
        using var tier = Tier(16);
        void Worker(int seed)
        {
            var rng = new Random(seed);
            for (int i = 0; i < 3000; i++)
            {
                int k = rng.Next(64);
                if (tier.TryBeginStore(K(k), ChunkKey.None, Chunk, out SlabRef s) == StoreBegin.Reserved)
                {
                    if (rng.Next(4) == 0)
                    {
                        tier.AbortStore(s);
                    }
                    else
                    {
                        tier.CommitStore(s);
                    }
                }

                if (tier.TryPinForRead(K(rng.Next(64)), out SlabRef p))
                {
                    tier.Unpin(p);
                }

                HostTierStats st = tier.GetStats();
                Assert.True(st.UsedBytes <= st.CapacityBytes);
                Assert.True(st.AllocatedBytes <= st.CapacityBytes);
            }
        }

        Parallel.Invoke(() => Worker(1), () => Worker(2));
        HostTierStats end = tier.GetStats();
        Assert.Equal(end.Chunks * Chunk, end.UsedBytes);
    }

    [Fact]
    public void Options_Invalid_Rejected()
    {
        Assert.Throws<ArgumentException>(() => new HostMemoryTier(new HostTierOptions { CapacityBytes = 0 }, _time));
        Assert.Throws<ArgumentException>(() => new HostMemoryTier(new HostTierOptions { ExtentBytes = 100 }, _time));
        Assert.Throws<ArgumentException>(() => new HostMemoryTier(new HostTierOptions { LeaseTtl = TimeSpan.Zero }, _time));
    }
}

public sealed class HostMemoryTierDisposeTests
{
    [Fact]
    public void Dispose_WhileAChunkIsPinned_KeepsItsMemoryReadable()
    {
        // A 1 MiB extent is mmapped by the allocator: read after a free would fault, not return stale bytes.
        var tier = new HostMemoryTier(new HostTierOptions { CapacityBytes = 4 << 20, ExtentBytes = 1 << 20 }, new FakeTimeProvider());
        Span<byte> keyBytes = stackalloc byte[32];
        keyBytes[0] = 7;
        var key = new ChunkKey(keyBytes);
        Assert.Equal(StoreBegin.Reserved, tier.TryBeginStore(key, ChunkKey.None, 4096, out SlabRef slab));
        unsafe
        {
            new Span<byte>((void*)slab.Address, 4096).Fill(0x42);
        }

        tier.CommitStore(slab);
        Assert.True(tier.TryPinForRead(key, out SlabRef pinned));
        tier.Dispose();
        unsafe
        {
            Assert.All(new Span<byte>((void*)pinned.Address, 4096).ToArray(), b => Assert.Equal(0x42, b));
        }
    }
}

/// <summary>Tests that measure the whole managed heap: they run alone, since a forced collection or another
/// test's allocations would disturb every other heap measurement running at the same time.</summary>
[CollectionDefinition(nameof(HeapMeasurements), DisableParallelization = true)]
public sealed class HeapMeasurements;

[Collection(nameof(HeapMeasurements))]
public sealed class HostMemoryTierMetadataTests
{
    private static ChunkKey Key(int i) => HostMemoryTierTests.K(i);

    [Fact]
    public void Metadata_FilledWithSmall256TokenChunks_MeasuredUnderOnePercentAndCountedInBudget()
    {
        // The smallest realistic 256-token chunk: 1 layer x K,V x 256 tokens x 64-byte rows = 32 KiB (a Llama-8B
        // chunk is 32 MiB). Extents are native and never touched here, so the managed heap growth is the metadata.
        const long ChunkBytes = 2L * 256 * 64;
        const int Chunks = 8192;
        long heapBefore = GC.GetTotalMemory(forceFullCollection: true);
        using var tier = new HostMemoryTier(new HostTierOptions { CapacityBytes = (Chunks * ChunkBytes) + (4L << 20), ExtentBytes = 32L << 20 }, new FakeTimeProvider());
        for (int i = 0; i < Chunks; i++)
        {
            Assert.Equal(StoreBegin.Reserved, tier.TryBeginStore(Key(i), i == 0 ? ChunkKey.None : Key(i - 1), ChunkBytes, out SlabRef slab));
            tier.CommitStore(slab);
        }

        long measured = GC.GetTotalMemory(forceFullCollection: true) - heapBefore;
        long used = tier.GetStats().UsedBytes;
        Assert.Equal(Chunks * ChunkBytes, used);
        Assert.True(measured <= used / 100, $"metadata measured at {measured} bytes for {used} bytes of chunks ({(double)measured / used:P3})");

        // The budget charges the estimate, so it must not undercount what the heap really holds.
        Assert.True(tier.MetadataBytesEstimate >= measured * 8 / 10, $"estimate {tier.MetadataBytesEstimate} vs measured {measured}");
        Assert.True(tier.GetStats().AllocatedBytes + tier.MetadataBytesEstimate <= tier.GetStats().CapacityBytes);
    }
}
