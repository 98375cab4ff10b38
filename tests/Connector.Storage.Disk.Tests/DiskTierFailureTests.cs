using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Time.Testing;
using Xunit;

namespace Connector.Storage.Disk.Tests;

/// <summary>A real ENOSPC, on a tmpfs of a few MiB that another writer fills.</summary>
public sealed class DiskTierFailureTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public async Task Offer_FilesystemFills_CountsErrorPausesWritesKeepsStoredChunks()
    {
        using SmallFilesystem? fs = SmallFilesystem.TryMount(_dir.Sub("mnt"), 8, out string why);
        Assert.SkipWhen(fs is null, why);
        var time = new FakeTimeProvider();
        var logger = new CollectingLogger();
        var options = new DiskTierOptions
        {
            Path = Path.Combine(fs!.Path, "tier"),
            SegmentBytes = 256 << 10,
            CapacityBytes = 64L << 20, // more than the filesystem holds: lowered at start
            WriteQueueBytes = 4 << 20,
            AdmitAfterSightings = 1,
            ErrorBackoff = TimeSpan.FromSeconds(30),
        };
        TierKey[] keys = TestChunks.Chain(1, 12, (64 << 10) - 128);
        using var tier = new DiskTier(options, logger, time);
        Assert.True(tier.IsAvailable);
        Assert.True(tier.BudgetBytes < 8 << 20, $"budget {tier.BudgetBytes} should have been lowered to the filesystem");
        Assert.Equal(1, logger.Count("is more than the filesystem"));
        await DiskTierTests.WriteAllAsync(tier, keys[..10]);

        // Another tenant takes the rest of the filesystem.
        string filler = Path.Combine(fs.Path, "filler");
        await using (var stream = new FileStream(filler, FileMode.Create))
        {
            byte[] block = new byte[64 << 10];
            try
            {
                while (true)
                {
                    stream.Write(block);
                    stream.Flush();
                }
            }
            catch (IOException)
            {
            }
        }

        Assert.Equal(TierWriteStatus.Accepted, tier.Offer(keys[10], TestChunks.Data(keys[10])));
        await tier.FlushAsync();

        TierStats stats = tier.GetStats();
        Assert.True(stats.Errors >= 1);
        Assert.Equal(10, stats.Writes);
        Assert.Equal(1, logger.Count("is full"));
        Assert.Equal(TierWriteStatus.Unavailable, tier.Offer(keys[11], TestChunks.Data(keys[11]))); // paused, not blocked
        Assert.Equal(TierReadStatus.Miss, (await TestChunks.ReadAsync(tier, keys[10])).Status);
        for (int i = 0; i < 10; i++)
        {
            Assert.True((await TestChunks.ReadAsync(tier, keys[i])).Exact, $"chunk {i} lost to a full disk");
        }

        Assert.Equal(10, tier.CountPresentPrefix(keys));

        // Room again and the back-off over: writes resume.
        File.Delete(filler);
        time.Advance(TimeSpan.FromSeconds(31));
        Assert.Equal(TierWriteStatus.Accepted, tier.Offer(keys[10], TestChunks.Data(keys[10])));
        await tier.FlushAsync();
        Assert.Equal(11, tier.GetStats().Writes);
        Assert.True((await TestChunks.ReadAsync(tier, keys[10])).Exact);
    }

    [Fact]
    public async Task Offer_ManyFailuresInARow_LogsOncePerInterval()
    {
        using SmallFilesystem? fs = SmallFilesystem.TryMount(_dir.Sub("mnt"), 4, out string why);
        Assert.SkipWhen(fs is null, why);
        var time = new FakeTimeProvider();
        var logger = new CollectingLogger();
        var options = new DiskTierOptions
        {
            Path = Path.Combine(fs!.Path, "tier"),
            SegmentBytes = 64 << 10,
            CapacityBytes = 64L << 20,
            WriteQueueBytes = 1 << 20,
            AdmitAfterSightings = 1,
            ErrorBackoff = TimeSpan.FromSeconds(1),
        };
        using var tier = new DiskTier(options, logger, time);
        string filler = Path.Combine(fs.Path, "filler");
        await using (var stream = new FileStream(filler, FileMode.Create))
        {
            try
            {
                while (true)
                {
                    stream.Write(new byte[4096]);
                    stream.Flush();
                }
            }
            catch (IOException)
            {
            }
        }

        TierKey[] keys = TestChunks.Chain(2, 5, 10_000);
        foreach (TierKey key in keys)
        {
            tier.Offer(key, TestChunks.Data(key));
            await tier.FlushAsync();
            time.Advance(TimeSpan.FromSeconds(2)); // past the back-off, within the 10 s log interval
        }

        Assert.True(tier.GetStats().Errors >= 5);
        Assert.Equal(1, logger.Count("is full"));
        Assert.Equal(0, tier.GetStats().Writes);
    }
}
