using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace Connector.Storage.Disk.Tests;

public sealed class DiskTierTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    internal static DiskTierOptions Small(string path, int admitAfter = 1) => new()
    {
        Path = path,
        SegmentBytes = 256 << 10,
        CapacityBytes = 64L << 20,
        WriteQueueBytes = 8 << 20,
        AdmitAfterSightings = admitAfter,
    };

    internal static async Task WriteAllAsync(DiskTier tier, IEnumerable<TierKey> keys)
    {
        foreach (TierKey key in keys)
        {
            // A full queue is the tier's back-pressure (tested on its own): here, let the writer catch up and offer again.
            TierWriteStatus status;
            while ((status = tier.Offer(key, TestChunks.Data(key))) == TierWriteStatus.QueueFull)
            {
                await tier.FlushAsync();
            }

            Assert.Equal(TierWriteStatus.Accepted, status);
        }

        await tier.FlushAsync();
    }

    [Fact]
    public async Task ReadAsync_ManyChunksOfManySizes_ReturnsExactBytes()
    {
        using var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        int[] lengths = [1, 100, 4096 - 128, 4096, 4097, 65_536, 100_003];
        var keys = new List<TierKey>();
        for (int chain = 0; chain < lengths.Length; chain++)
        {
            keys.AddRange(TestChunks.Chain(chain, 30, lengths[chain]));
        }

        await WriteAllAsync(tier, keys);

        foreach (TierKey key in keys)
        {
            (TierReadStatus status, bool exact) = await TestChunks.ReadAsync(tier, key);
            Assert.Equal(TierReadStatus.Hit, status);
            Assert.True(exact, $"chunk {key.Key} came back with other bytes");
        }

        TierStats stats = tier.GetStats();
        Assert.Equal("disk", stats.Name);
        Assert.Equal(keys.Count, stats.Writes);
        Assert.Equal(keys.Count, stats.Chunks);
        Assert.Equal(keys.Count, stats.Hits);
        Assert.Equal(keys.Sum(k => k.Length), stats.BytesWritten);
        Assert.Equal(keys.Sum(k => k.Length), stats.BytesRead);
        Assert.Equal(0, stats.Corrupt);
        Assert.Equal(0, stats.Errors);
        Assert.Equal(0, stats.QueueDepth);
        Assert.True(tier.SegmentCount > 1, "the chunks should span several segments");
    }

    [Fact]
    public async Task Dispose_ThenReopen_ServesEveryChunkWithoutScanning()
    {
        TierKey[] keys = [.. TestChunks.Chain(1, 40, 30_000), .. TestChunks.Chain(2, 25, 5_000)];
        using (var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance))
        {
            await WriteAllAsync(tier, keys);
        }

        using var reopened = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        Assert.True(reopened.IsAvailable);
        Assert.Equal(keys.Length, reopened.RecoveredChunks);
        Assert.Equal(0, reopened.RebuiltIndexFiles);
        Assert.Equal(0, reopened.SkippedRecords);
        Assert.Equal(40, reopened.CountPresentPrefix(keys.AsSpan(0, 40)));
        foreach (TierKey key in keys)
        {
            (TierReadStatus status, bool exact) = await TestChunks.ReadAsync(reopened, key);
            Assert.Equal(TierReadStatus.Hit, status);
            Assert.True(exact);
        }

        // New writes after a restart go to a new segment and survive the next restart too.
        TierKey[] more = TestChunks.Chain(3, 10, 7_000);
        await WriteAllAsync(reopened, more);
        reopened.Dispose();
        using var again = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        Assert.Equal(keys.Length + more.Length, again.RecoveredChunks);
        Assert.Equal(10, again.CountPresentPrefix(more));
    }

    [Fact]
    public async Task CountPresentPrefix_GapOrMismatch_StopsThere()
    {
        using var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        TierKey[] chain = TestChunks.Chain(5, 10, 3_000);
        await WriteAllAsync(tier, chain.Where((_, i) => i != 6));

        Assert.Equal(6, tier.CountPresentPrefix(chain));
        Assert.Equal(0, tier.CountPresentPrefix(chain.AsSpan(6)));
        Assert.Equal(3, tier.CountPresentPrefix(chain.AsSpan(7)));

        TierKey otherNamespace = chain[2] with { NamespaceTag = 99 };
        Assert.Equal(2, tier.CountPresentPrefix([chain[0], chain[1], otherNamespace, chain[3]]));
        TierKey otherLength = chain[1] with { Length = 3_001 };
        Assert.Equal(1, tier.CountPresentPrefix([chain[0], otherLength]));
        Assert.Equal(6, await tier.ProbePrefixAsync(chain, TestContext.Current.CancellationToken));
    }

    [Fact]
    public async Task ReadAsync_ChunkStillQueued_ServedFromQueueButNotCountedPresent()
    {
        using var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        TierKey key = TestChunks.Chain(8, 1, 50_000)[0];
        tier.PauseWriter();
        Assert.Equal(TierWriteStatus.Accepted, tier.Offer(key, TestChunks.Data(key)));

        (TierReadStatus status, bool exact) = await TestChunks.ReadAsync(tier, key);
        Assert.Equal(TierReadStatus.Hit, status);
        Assert.True(exact);
        Assert.Equal(0, tier.CountPresentPrefix([key])); // not acknowledged until it is on disk
        Assert.Equal(1, tier.GetStats().QueueDepth);
        Assert.Equal(TierWriteStatus.AlreadyPresent, tier.Offer(key, TestChunks.Data(key)));

        tier.ResumeWriter();
        await tier.FlushAsync();
        Assert.Equal(1, tier.CountPresentPrefix([key]));
        Assert.Equal(0, tier.GetStats().QueueDepth);
        Assert.Equal(1, tier.GetStats().Writes);
    }

    [Fact]
    public async Task Offer_FirstSighting_NotAdmittedUntilSeenAgain()
    {
        using var tier = new DiskTier(Small(_dir.Path, admitAfter: 2), NullLogger.Instance);
        TierKey key = TestChunks.Chain(9, 1, 10_000)[0];
        byte[] data = TestChunks.Data(key);

        Assert.Equal(TierWriteStatus.NotAdmitted, tier.Offer(key, data));
        await tier.FlushAsync();
        Assert.Equal(0, tier.CountPresentPrefix([key]));
        Assert.Equal(1, tier.GetStats().NotAdmitted);
        Assert.Equal(0, tier.GetStats().Writes);

        Assert.Equal(TierWriteStatus.Accepted, tier.Offer(key, data));
        await tier.FlushAsync();
        Assert.Equal(1, tier.CountPresentPrefix([key]));
        Assert.Equal(TierWriteStatus.AlreadyPresent, tier.Offer(key, data));
        Assert.Equal(1, tier.GetStats().Writes);
        Assert.Equal(1, tier.GetStats().NotAdmitted);
    }

    [Fact]
    public async Task Offer_QueueFull_ReturnsQueueFullAndCountsDrops()
    {
        DiskTierOptions options = Small(_dir.Path);
        options.WriteQueueBytes = 4 * 64 * 1024; // four 64 KiB records
        using var tier = new DiskTier(options, NullLogger.Instance);
        TierKey[] keys = TestChunks.Chain(10, 10, (64 * 1024) - 128);
        tier.PauseWriter();

        TierWriteStatus[] statuses = [.. keys.Select(k => tier.Offer(k, TestChunks.Data(k)))];

        Assert.Equal(4, statuses.Count(s => s == TierWriteStatus.Accepted));
        Assert.Equal(6, statuses.Count(s => s == TierWriteStatus.QueueFull));
        Assert.Equal(6, tier.GetStats().Drops);
        Assert.Equal(4, tier.GetStats().QueueDepth);
        tier.ResumeWriter();
        await tier.FlushAsync();
        Assert.Equal(4, tier.GetStats().Writes);
        Assert.Equal(4, tier.CountPresentPrefix(keys));
        Assert.Equal(TierWriteStatus.Accepted, tier.Offer(keys[4], TestChunks.Data(keys[4])));
    }

    [Fact]
    public void Offer_ChunkLargerThanASegment_NotAdmitted()
    {
        using var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        TierKey key = TestChunks.Chain(11, 1, 256 << 10)[0]; // payload + header > one 256 KiB segment

        Assert.Equal(TierWriteStatus.NotAdmitted, tier.Offer(key, new byte[key.Length]));
        Assert.Equal(1, tier.GetStats().NotAdmitted);
    }

    [Fact]
    public async Task OfferAndRead_WrongSizes_Throw()
    {
        using var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        TierKey key = TestChunks.Chain(12, 1, 1_000)[0];

        Assert.Throws<ArgumentException>(() => tier.Offer(key, new byte[999]));
        await Assert.ThrowsAsync<ArgumentException>(async () => await tier.ReadAsync(key, new byte[1_001], TestContext.Current.CancellationToken));
    }

    [Fact]
    public async Task ReadAsync_CancelledToken_ReturnsCancelled()
    {
        using var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        TierKey key = TestChunks.Chain(13, 1, 1_000)[0];
        await WriteAllAsync(tier, [key]);

        Assert.Equal(TierReadStatus.Cancelled, await tier.ReadAsync(key, new byte[1_000], new CancellationToken(canceled: true)));
        Assert.Equal(TierReadStatus.Miss, await tier.ReadAsync(TestChunks.Chain(14, 1, 1_000)[0], new byte[1_000], TestContext.Current.CancellationToken));
        Assert.Equal(1, tier.GetStats().Misses);
    }

    [Fact]
    public async Task ReadAsync_OtherNamespaceTag_CorruptAndDropped()
    {
        using var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        TierKey key = TestChunks.Chain(15, 1, 2_000)[0];
        await WriteAllAsync(tier, [key]);

        Assert.Equal(TierReadStatus.Corrupt, await tier.ReadAsync(key with { NamespaceTag = 1 }, new byte[2_000], TestContext.Current.CancellationToken));
        Assert.Equal(1, tier.GetStats().Corrupt);
        Assert.Equal(0, tier.CountPresentPrefix([key]));
    }

    [Fact]
    public async Task ClearAsync_StoredAndQueuedChunks_RemovesEverything()
    {
        TierKey[] keys = TestChunks.Chain(16, 30, 20_000);
        using (var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance))
        {
            await WriteAllAsync(tier, keys[..20]);
            tier.PauseWriter();
            foreach (TierKey key in keys[20..])
            {
                Assert.Equal(TierWriteStatus.Accepted, tier.Offer(key, TestChunks.Data(key)));
            }

            Task<long> clear = tier.ClearAsync(TestContext.Current.CancellationToken).AsTask();
            tier.ResumeWriter();
            Assert.Equal(20, await clear);
            await tier.FlushAsync();
            Assert.Equal(0, tier.CountPresentPrefix(keys));
            Assert.Equal(0, tier.GetStats().Chunks);
            Assert.Equal(0, tier.GetStats().UsedBytes);
            Assert.Equal(TierReadStatus.Miss, (await TestChunks.ReadAsync(tier, keys[25])).Status);
            Assert.Empty(Directory.GetFiles(_dir.Path, "seg-*"));

            await WriteAllAsync(tier, keys[..3]);
            Assert.Equal(3, tier.CountPresentPrefix(keys));
        }

        using var reopened = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        Assert.Equal(3, reopened.RecoveredChunks);
    }

    [Fact]
    public async Task Constructor_PathUnderARegularFile_StartsUnavailableWithoutThrowing()
    {
        string file = _dir.Sub("a-file");
        await File.WriteAllTextAsync(file, "not a directory", TestContext.Current.CancellationToken);
        var logger = new CollectingLogger();

        using var tier = new DiskTier(Small(Path.Combine(file, "sub")), logger);

        Assert.False(tier.IsAvailable);
        Assert.NotNull(tier.UnavailableReason);
        Assert.Equal(1, logger.Count("Disk tier disabled"));
        TierKey key = TestChunks.Chain(17, 1, 100)[0];
        Assert.Equal(TierWriteStatus.Unavailable, tier.Offer(key, new byte[100]));
        Assert.Equal(TierReadStatus.Miss, await tier.ReadAsync(key, new byte[100], TestContext.Current.CancellationToken));
        Assert.Equal(0, tier.CountPresentPrefix([key]));
        Assert.Equal(0, await tier.ClearAsync(TestContext.Current.CancellationToken));
        Assert.Equal(1, tier.GetStats().Errors);
    }

    [Fact]
    public void Constructor_DirectoryInUseByAnotherTier_StartsUnavailable()
    {
        using var first = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        var logger = new CollectingLogger();

        using var second = new DiskTier(Small(_dir.Path), logger);

        Assert.True(first.IsAvailable);
        Assert.False(second.IsAvailable);
        Assert.Contains("lock", second.UnavailableReason, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Constructor_DirectIoRefused_FallsBackToBufferedAndSaysSoOnce()
    {
        DiskTierOptions options = Small(_dir.Path);
        options.SimulateDirectIoRefusal = true;
        var logger = new CollectingLogger();
        TierKey[] keys = TestChunks.Chain(18, 20, 40_000);

        using (var tier = new DiskTier(options, logger))
        {
            Assert.True(tier.IsAvailable);
            Assert.False(tier.DirectIo);
            await WriteAllAsync(tier, keys);
            foreach (TierKey key in keys)
            {
                Assert.True((await TestChunks.ReadAsync(tier, key)).Exact);
            }
        }

        Assert.Equal(1, logger.Count("refuses O_DIRECT"));
        using var reopened = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        Assert.Equal(keys.Length, reopened.RecoveredChunks);
        Assert.True((await TestChunks.ReadAsync(reopened, keys[7])).Exact);
    }

    [Fact]
    public void Constructor_DirectIoDisabled_ReportsBuffered()
    {
        DiskTierOptions options = Small(_dir.Path);
        options.UseDirectIo = false;
        using var tier = new DiskTier(options, NullLogger.Instance);
        Assert.False(tier.DirectIo);
        Assert.Equal("disk", tier.Name);
        Assert.True(tier.HasLocalIndex);
    }

    public static TheoryData<string, Action<DiskTierOptions>> BadSettings => new()
    {
        { "Path", o => o.Path = " " },
        { "SegmentBytes", o => o.SegmentBytes = 4096 },
        { "SegmentBytes", o => o.SegmentBytes = (256 << 10) + 1 },
        { "SegmentBytes", o => o.SegmentBytes = 2L << 30 },
        { "CapacityBytes", o => o.CapacityBytes = 3 * o.SegmentBytes },
        { "WriteQueueBytes", o => o.WriteQueueBytes = 100 },
        { "AdmitAfterSightings", o => o.AdmitAfterSightings = 0 },
        { "AdmitAfterSightings", o => o.AdmitAfterSightings = 16 },
        { "ErrorBackoff", o => o.ErrorBackoff = TimeSpan.Zero },
    };

    [Theory]
    [MemberData(nameof(BadSettings))]
    public void Validate_BadSetting_ThrowsNamingIt(string setting, Action<DiskTierOptions> spoil)
    {
        DiskTierOptions options = Small(_dir.Path);
        options.Validate();
        spoil(options);

        ArgumentException ex = Assert.Throws<ArgumentException>(options.Validate);
        Assert.Contains(setting, ex.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => new DiskTier(options, NullLogger.Instance));
    }

    [Fact]
    public void Validate_Defaults_AreValidWithAPath()
    {
        var options = new DiskTierOptions { Path = _dir.Path };
        options.Validate();
        Assert.Equal(256L << 20, options.SegmentBytes);
        Assert.Equal(256L << 20, options.WriteQueueBytes);
        Assert.Equal(2, options.AdmitAfterSightings);
        Assert.True(options.UseDirectIo);
    }

    [Fact]
    public async Task Offer_ConcurrentWritersAndReaders_EveryAcceptedChunkReadsBackExact()
    {
        using var tier = new DiskTier(Small(_dir.Path), NullLogger.Instance);
        TierKey[][] chains = [.. Enumerable.Range(100, 8).Select(c => TestChunks.Chain(c, 40, 9_000 + c))];

        await Parallel.ForEachAsync(chains, TestContext.Current.CancellationToken, async (chain, ct) =>
        {
            foreach (TierKey key in chain)
            {
                TierWriteStatus status;
                while ((status = tier.Offer(key, TestChunks.Data(key))) == TierWriteStatus.QueueFull)
                {
                    await Task.Yield();
                }

                Assert.Equal(TierWriteStatus.Accepted, status);
                (TierReadStatus read, bool exact) = await TestChunks.ReadAsync(tier, key);
                Assert.True(read is TierReadStatus.Hit && exact, $"read of a just-offered chunk: {read}");
            }
        });

        await tier.FlushAsync();
        foreach (TierKey[] chain in chains)
        {
            Assert.Equal(chain.Length, tier.CountPresentPrefix(chain));
        }
    }
}
