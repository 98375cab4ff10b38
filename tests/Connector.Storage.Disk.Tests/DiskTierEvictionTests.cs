using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace Connector.Storage.Disk.Tests;

/// <summary>The byte budget: least recently used leaves go first, so prefixes outlive their suffixes; space comes back by compaction.</summary>
public sealed class DiskTierEvictionTests : IDisposable
{
    private const int ChunkBytes = 3_000; // 4 KiB records
    private const int PerChain = 50;

    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>
    /// 64 KiB segments, 1 MiB budget: new records keep the footprint under 960 KiB, live data under 864 KiB (216 records,
    /// a little over four chains of 50).
    /// </summary>
    private DiskTierOptions Budgeted() => new()
    {
        Path = _dir.Path,
        SegmentBytes = 64 << 10,
        CapacityBytes = 1 << 20,
        WriteQueueBytes = 1 << 20,
        AdmitAfterSightings = 1,
    };

    private static bool[] PresentFlags(DiskTier tier, TierKey[] chain) => [.. chain.Select(k => TestChunks.Present(tier, k))];

    [Fact]
    public async Task Offer_OverBudget_EvictsSuffixesBeforePrefixes()
    {
        TierKey[][] chains = [.. Enumerable.Range(0, 8).Select(c => TestChunks.Chain(c, PerChain, ChunkBytes))];
        using (var tier = new DiskTier(Budgeted(), NullLogger.Instance))
        {
            foreach (TierKey[] chain in chains)
            {
                await DiskTierTests.WriteAllAsync(tier, chain);
            }

            TierStats stats = tier.GetStats();
            Assert.True(stats.Evictions > 0);
            Assert.True(stats.UsedBytes <= stats.CapacityBytes, $"footprint {stats.UsedBytes} over the budget {stats.CapacityBytes}");
            Assert.Equal(8 * PerChain, stats.Writes);
            Assert.True(stats.Chunks <= 216, $"{stats.Chunks} chunks stored, more than the live target allows");
            Assert.Equal(PerChain, tier.CountPresentPrefix(chains[7])); // the newest prompt is whole
            Assert.Equal(0, tier.CountPresentPrefix(chains[0])); // the oldest is gone

            foreach (TierKey[] chain in chains)
            {
                bool[] present = PresentFlags(tier, chain);
                for (int i = 1; i < present.Length; i++)
                {
                    Assert.False(present[i] && !present[i - 1], $"chunk {i} of a prompt kept without chunk {i - 1}");
                }

                // Whatever compaction moved reads back exact.
                for (int i = 0; i < present.Length && present[i]; i++)
                {
                    Assert.True((await TestChunks.ReadAsync(tier, chain[i])).Exact);
                }
            }
        }

        // Compacted segments and their index files come back after a restart.
        using var reopened = new DiskTier(Budgeted(), NullLogger.Instance);
        Assert.Equal(PerChain, reopened.CountPresentPrefix(chains[7]));
        Assert.True((await TestChunks.ReadAsync(reopened, chains[7][0])).Exact);
        Assert.True(reopened.GetStats().UsedBytes <= reopened.GetStats().CapacityBytes);
    }

    [Fact]
    public async Task Offer_OverBudget_RecentlyReadPromptSurvivesOlderOnes()
    {
        TierKey[][] chains = [.. Enumerable.Range(20, 6).Select(c => TestChunks.Chain(c, PerChain, ChunkBytes))];
        using var tier = new DiskTier(Budgeted(), NullLogger.Instance);
        for (int c = 0; c < 4; c++)
        {
            await DiskTierTests.WriteAllAsync(tier, chains[c]);
        }

        Assert.Equal(0, tier.GetStats().Evictions);
        foreach (TierKey key in chains[0])
        {
            Assert.True((await TestChunks.ReadAsync(tier, key)).Exact);
        }

        for (int c = 4; c < 6; c++)
        {
            await DiskTierTests.WriteAllAsync(tier, chains[c]);
        }

        // 300 records against room for about 216: some 100 evicted, in the order prompt 1, 2, 3 (least recently used
        // first), never reaching prompt 0, which was read after they were written (that would take over 150).
        long evictions = tier.GetStats().Evictions;
        TestContext.Current.TestOutputHelper?.WriteLine($"evictions {evictions}, present per prompt: {string.Join(", ", chains.Select(c => tier.CountPresentPrefix(c)))}");
        Assert.InRange(evictions, 60, 140);
        Assert.Equal(PerChain, tier.CountPresentPrefix(chains[0]));
        Assert.Equal(0, tier.CountPresentPrefix(chains[1]));
        Assert.True(tier.CountPresentPrefix(chains[2]) < PerChain);
        Assert.Equal(PerChain, tier.CountPresentPrefix(chains[4]));
        Assert.Equal(PerChain, tier.CountPresentPrefix(chains[5]));
        foreach (TierKey[] chain in chains)
        {
            bool[] present = PresentFlags(tier, chain);
            Assert.Equal(tier.CountPresentPrefix(chain), present.Count(p => p));
        }
    }

    [Fact]
    public async Task Offer_ChurnWellPastTheBudget_FootprintStaysUnderAndEverythingStoredReadsBack()
    {
        using var tier = new DiskTier(Budgeted(), NullLogger.Instance);
        var all = new List<TierKey>();
        for (int c = 0; c < 40; c++)
        {
            TierKey[] chain = TestChunks.Chain(1_000 + c, 10, ChunkBytes + (c * 50));
            all.AddRange(chain);
            await DiskTierTests.WriteAllAsync(tier, chain);
            if (c % 3 == 0)
            {
                // Keep an early prompt warm so its records have to be moved by compaction rather than dropped.
                foreach (TierKey key in all.Take(10))
                {
                    await TestChunks.ReadAsync(tier, key);
                }
            }

            Assert.True(tier.GetStats().UsedBytes <= tier.GetStats().CapacityBytes);
        }

        Assert.Equal(10, tier.CountPresentPrefix([.. all.Take(10)]));
        int present = 0;
        foreach (TierKey key in all)
        {
            if (TestChunks.Present(tier, key))
            {
                present++;
                Assert.True((await TestChunks.ReadAsync(tier, key)).Exact);
            }
        }

        Assert.Equal(tier.GetStats().Chunks, present);
        Assert.Equal(0, tier.GetStats().Corrupt);
    }
}
