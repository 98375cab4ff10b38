using System.Diagnostics;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace Connector.Storage.Disk.Tests;

/// <summary>Damaged, cut-short and disagreeing files on disk: nothing wrong is ever served, everything intact still is.</summary>
public sealed class DiskTierRecoveryTests : IDisposable
{
    private const int ChunkBytes = 20_000; // 24 KiB records: ten of them fit one 256 KiB segment

    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    private DiskTier Open(CollectingLogger? logger = null) => new(DiskTierTests.Small(_dir.Path), (Microsoft.Extensions.Logging.ILogger?)logger ?? NullLogger.Instance);

    /// <summary>Writes a chain into a fresh tier and closes it; returns the keys and where each record went.</summary>
    private async Task<(TierKey[] Keys, (string Path, long Offset, long Bytes)[] Where)> WriteAndCloseAsync(int count)
    {
        TierKey[] keys = TestChunks.Chain(1, count, ChunkBytes);
        using var tier = Open();
        await DiskTierTests.WriteAllAsync(tier, keys);
        var where = new (string, long, long)[count];
        for (int i = 0; i < count; i++)
        {
            Assert.True(tier.TryGetLocation(keys[i].Key, out string path, out long offset, out long bytes));
            where[i] = (path, offset, bytes);
        }

        return (keys, where);
    }

    private static void FlipByte(string path, long offset)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        file.Position = offset;
        int b = file.ReadByte();
        file.Position = offset;
        file.WriteByte((byte)(b ^ 0x5A));
    }

    private static string IndexPathOf(string segmentPath) => Path.ChangeExtension(segmentPath, ".idx");

    [Fact]
    public async Task ReadAsync_FlippedPayloadByte_CorruptThenMissOthersStillHit()
    {
        var (keys, where) = await WriteAndCloseAsync(8);
        FlipByte(where[5].Path, where[5].Offset + 128 + 12_345);
        var logger = new CollectingLogger();

        using var tier = Open(logger);

        Assert.Equal(8, tier.CountPresentPrefix(keys)); // the index cannot know yet; the read finds out
        Assert.Equal(TierReadStatus.Corrupt, (await TestChunks.ReadAsync(tier, keys[5])).Status);
        Assert.Equal(TierReadStatus.Miss, (await TestChunks.ReadAsync(tier, keys[5])).Status);
        Assert.Equal(5, tier.CountPresentPrefix(keys));
        Assert.Equal(1, tier.GetStats().Corrupt);
        Assert.Equal(1, logger.Count("failed verification (the payload fails its checksum)"));
        for (int i = 0; i < 8; i++)
        {
            if (i != 5)
            {
                Assert.True((await TestChunks.ReadAsync(tier, keys[i])).Exact, $"chunk {i}");
            }
        }

        // Stored again, it is served again.
        Assert.Equal(TierWriteStatus.Accepted, tier.Offer(keys[5], TestChunks.Data(keys[5])));
        await tier.FlushAsync();
        Assert.True((await TestChunks.ReadAsync(tier, keys[5])).Exact);
        Assert.Equal(8, tier.CountPresentPrefix(keys));
    }

    [Fact]
    public async Task ReadAsync_FlippedByteWhileOpen_Corrupt()
    {
        TierKey[] keys = TestChunks.Chain(2, 6, ChunkBytes);
        using var tier = Open();
        await DiskTierTests.WriteAllAsync(tier, keys);
        Assert.True(tier.TryGetLocation(keys[2].Key, out string path, out long offset, out _));

        FlipByte(path, offset + 128 + ChunkBytes - 1);

        Assert.Equal(TierReadStatus.Corrupt, (await TestChunks.ReadAsync(tier, keys[2])).Status);
        Assert.True((await TestChunks.ReadAsync(tier, keys[3])).Exact);
    }

    [Theory]
    [InlineData(131_072, 4096 + 5)] // payload in its own blocks, read straight into an aligned destination
    [InlineData(131_072, 4096 + 131_071)]
    [InlineData(100_003, 4096 + 100_000)] // in the partial last block, which passes through the small buffer
    [InlineData(100_003, 4096 + 50_000)]
    [InlineData(100_003, 3_000)] // in the header block, past the header: padding, not covered by any checksum
    public async Task ReadAsync_LargeChunkFlippedByte_CorruptOnEveryReadPath(int length, int flipAt)
    {
        TierKey[] keys = TestChunks.Chain(3, 3, length);
        using (var tier = Open())
        {
            await DiskTierTests.WriteAllAsync(tier, keys);
            Assert.True(tier.TryGetLocation(keys[1].Key, out string path, out long offset, out long bytes));
            Assert.Equal(RecordFormat.AlignUp(4096 + length), bytes);
            FlipByte(path, offset + flipAt);
        }

        bool padding = flipAt < 4096;
        foreach (bool aligned in (bool[])[true, false])
        {
            using var tier = Open();
            var (status, exact) = aligned ? await TestChunks.ReadAlignedAsync(tier, keys[1]) : await TestChunks.ReadAsync(tier, keys[1]);
            Assert.Equal(padding ? TierReadStatus.Hit : TierReadStatus.Corrupt, status);
            Assert.Equal(padding, exact);
            Assert.True((aligned ? await TestChunks.ReadAlignedAsync(tier, keys[2]) : await TestChunks.ReadAsync(tier, keys[2])).Exact);
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task ReadAsync_LargeChunksIntoAlignedAndUnalignedMemory_ExactBytes(bool directIo)
    {
        DiskTierOptions options = DiskTierTests.Small(_dir.Path);
        options.UseDirectIo = directIo;
        TierKey[] keys = [.. TestChunks.Chain(4, 4, 65_536), .. TestChunks.Chain(5, 4, 100_003), .. TestChunks.Chain(6, 4, 70_000)];
        using var tier = new DiskTier(options, NullLogger.Instance);
        await DiskTierTests.WriteAllAsync(tier, keys);
        foreach (TierKey key in keys)
        {
            Assert.True((await TestChunks.ReadAlignedAsync(tier, key)).Exact);
            Assert.True((await TestChunks.ReadAsync(tier, key)).Exact);
        }
    }

    [Theory]
    [InlineData(0)] // magic
    [InlineData(20)] // key
    [InlineData(90)] // length
    [InlineData(100)] // payload checksum
    public async Task ReadAsync_FlippedHeaderByte_Corrupt(int headerOffset)
    {
        var (keys, where) = await WriteAndCloseAsync(4);
        FlipByte(where[1].Path, where[1].Offset + headerOffset);

        using var tier = Open();

        // Sealed segments come back from their index file, so the damage shows at the read.
        Assert.Equal(TierReadStatus.Corrupt, (await TestChunks.ReadAsync(tier, keys[1])).Status);
        Assert.True((await TestChunks.ReadAsync(tier, keys[0])).Exact);
        Assert.True((await TestChunks.ReadAsync(tier, keys[2])).Exact);
    }

    [Fact]
    public async Task Reopen_TruncatedTailWithoutIndexFile_SkipsTheCutRecordServesTheRest()
    {
        var (keys, where) = await WriteAndCloseAsync(10);
        Assert.All(where, w => Assert.Equal(where[0].Path, w.Path));
        File.Delete(IndexPathOf(where[9].Path)); // as after a crash: the open segment was never sealed
        using (var file = new FileStream(where[9].Path, FileMode.Open))
        {
            file.SetLength(where[9].Offset + 10_000);
        }

        using (var tier = Open())
        {
            Assert.Equal(9, tier.RecoveredChunks);
            Assert.Equal(1, tier.SkippedRecords);
            Assert.Equal(9, tier.CountPresentPrefix(keys));
            Assert.Equal(TierReadStatus.Miss, (await TestChunks.ReadAsync(tier, keys[9])).Status);
            for (int i = 0; i < 9; i++)
            {
                Assert.True((await TestChunks.ReadAsync(tier, keys[i])).Exact);
            }
        }

        // The scan wrote an index file: the next start reads it instead.
        using var again = Open();
        Assert.Equal(9, again.RecoveredChunks);
        Assert.Equal(0, again.SkippedRecords);
        Assert.True((await TestChunks.ReadAsync(again, keys[8])).Exact);
    }

    [Fact]
    public async Task Reopen_UnsealedTailOfLargeRecords_ScansHeaderToHeader()
    {
        DiskTierOptions options = DiskTierTests.Small(_dir.Path);
        options.SegmentBytes = 32 << 20;
        options.CapacityBytes = 256L << 20;
        TierKey[] keys = TestChunks.Chain(7, 12, (3 << 19) + 77); // 1.5 MiB and a bit: each record larger than a scan window
        using (var tier = new DiskTier(options, NullLogger.Instance))
        {
            await DiskTierTests.WriteAllAsync(tier, keys);
            Assert.True(tier.TryGetLocation(keys[6].Key, out string path, out long offset, out _));
            FlipByte(path, offset + 8); // a damaged header in the middle of the tail
        }

        foreach (string index in Directory.GetFiles(_dir.Path, "seg-*.idx"))
        {
            File.Delete(index);
        }

        using var reopened = new DiskTier(options, NullLogger.Instance);
        Assert.Equal(11, reopened.RecoveredChunks);
        Assert.Equal(1, reopened.SkippedRecords);
        Assert.Equal(6, reopened.CountPresentPrefix(keys));
        Assert.True((await TestChunks.ReadAlignedAsync(reopened, keys[5])).Exact);
        Assert.True((await TestChunks.ReadAsync(reopened, keys[11])).Exact);
    }

    [Fact]
    public async Task Reopen_DamagedHeaderInUnsealedTail_SkipsOnlyThatRecord()
    {
        var (keys, where) = await WriteAndCloseAsync(10);
        File.Delete(IndexPathOf(where[0].Path));
        FlipByte(where[4].Path, where[4].Offset + 40);

        using var tier = Open();

        Assert.Equal(9, tier.RecoveredChunks);
        Assert.Equal(1, tier.SkippedRecords);
        Assert.Equal(4, tier.CountPresentPrefix(keys));
        Assert.Equal(5, tier.CountPresentPrefix(keys.AsSpan(5)));
        Assert.Equal(TierReadStatus.Miss, (await TestChunks.ReadAsync(tier, keys[4])).Status);
        Assert.True((await TestChunks.ReadAsync(tier, keys[9])).Exact);
    }

    [Fact]
    public async Task Reopen_IndexFileListsPastTheSegmentsEnd_RebuildsFromRecords()
    {
        var (keys, where) = await WriteAndCloseAsync(10);
        using (var file = new FileStream(where[9].Path, FileMode.Open))
        {
            file.SetLength(where[9].Offset); // the index file still lists the tenth record
        }

        var logger = new CollectingLogger();
        using var tier = Open(logger);

        Assert.Equal(1, tier.RebuiltIndexFiles);
        Assert.Equal(1, logger.Count("the segment was cut short"));
        Assert.Equal(9, tier.RecoveredChunks);
        Assert.Equal(9, tier.CountPresentPrefix(keys));
        Assert.True((await TestChunks.ReadAsync(tier, keys[8])).Exact);
    }

    [Fact]
    public async Task Reopen_GarbledIndexFile_RebuildsFromRecords()
    {
        var (keys, where) = await WriteAndCloseAsync(10);
        FlipByte(IndexPathOf(where[0].Path), SegmentIndexFile.HeaderSize + 50);

        using var tier = Open();

        Assert.Equal(1, tier.RebuiltIndexFiles);
        Assert.Equal(10, tier.RecoveredChunks);
        foreach (TierKey key in keys)
        {
            Assert.True((await TestChunks.ReadAsync(tier, key)).Exact);
        }
    }

    [Fact]
    public async Task Reopen_ForgedIndexFileThatDisagrees_NeverServesWrongBytes()
    {
        var (keys, where) = await WriteAndCloseAsync(10);
        string indexPath = IndexPathOf(where[0].Path);
        long segmentId = long.Parse(Path.GetFileNameWithoutExtension(indexPath)[4..], System.Globalization.CultureInfo.InvariantCulture);
        Assert.True(SegmentIndexFile.TryDecode(await File.ReadAllBytesAsync(indexPath, TestContext.Current.CancellationToken), segmentId, out long dataLength, out IndexRecord[] records, out _));
        // A well-formed index (valid checksum) that is wrong: chunks 2 and 3 swapped, and a chunk never written pointed at chunk 6.
        int two = Array.FindIndex(records, r => r.Key == keys[2].Key);
        int three = Array.FindIndex(records, r => r.Key == keys[3].Key);
        (long offsetTwo, long offsetThree) = (records[two].Offset, records[three].Offset);
        records[two] = records[two] with { Offset = offsetThree };
        records[three] = records[three] with { Offset = offsetTwo };
        TierKey stranger = TestChunks.Chain(77, 1, ChunkBytes)[0];
        IndexRecord six = records.Single(r => r.Key == keys[6].Key);
        records = [.. records, six with { Key = stranger.Key, Parent = ChunkKey.None }];
        SegmentIndexFile.Write(indexPath, segmentId, dataLength, records);

        using var tier = Open();

        Assert.Equal(0, tier.RebuiltIndexFiles); // the forgery is well formed: only the reads can tell
        Assert.Equal(TierReadStatus.Corrupt, (await TestChunks.ReadAsync(tier, keys[2])).Status);
        Assert.Equal(TierReadStatus.Corrupt, (await TestChunks.ReadAsync(tier, keys[3])).Status);
        Assert.Equal(TierReadStatus.Corrupt, (await TestChunks.ReadAsync(tier, stranger)).Status);
        Assert.Equal(3, tier.GetStats().Corrupt);
        Assert.Equal(TierReadStatus.Miss, (await TestChunks.ReadAsync(tier, keys[2])).Status);
        Assert.True((await TestChunks.ReadAsync(tier, keys[6])).Exact);
        Assert.True((await TestChunks.ReadAsync(tier, keys[9])).Exact);
    }

    [Fact]
    public async Task Reopen_LeftoverTemporaryAndOrphanIndexFiles_Ignored()
    {
        var (keys, where) = await WriteAndCloseAsync(3);
        await File.WriteAllTextAsync(Path.Combine(_dir.Path, "seg-0000000099.idx"), "orphan", TestContext.Current.CancellationToken);
        await File.WriteAllTextAsync(IndexPathOf(where[0].Path) + ".tmp", "half-written", TestContext.Current.CancellationToken);

        using var tier = Open();

        Assert.Equal(3, tier.RecoveredChunks);
        Assert.Equal(0, tier.RebuiltIndexFiles);
        Assert.False(File.Exists(Path.Combine(_dir.Path, "seg-0000000099.idx")));
        Assert.False(File.Exists(IndexPathOf(where[0].Path) + ".tmp"));
        Assert.True((await TestChunks.ReadAsync(tier, keys[2])).Exact);
    }

    [Fact]
    public async Task Reopen_HundredThousandChunks_AllRecovered()
    {
        // 1,000 prompts of 100 small chunks (4 KiB records), 64 MiB segments. Correctness only; the time is printed,
        // and the benchmark (tests/Connector.Benchmarks/Disk) is where it is measured against its target.
        const int Chains = 1_000;
        const int PerChain = 100;
        var options = new DiskTierOptions
        {
            Path = _dir.Path,
            SegmentBytes = 64 << 20,
            CapacityBytes = 2L << 30,
            WriteQueueBytes = 64 << 20,
            AdmitAfterSightings = 1,
            UseDirectIo = false,
        };
        TierKey[][] chains = [.. Enumerable.Range(0, Chains).Select(c => TestChunks.Chain(c, PerChain, 64))];
        using (var tier = new DiskTier(options, NullLogger.Instance))
        {
            byte[] data = new byte[64];
            foreach (TierKey key in chains.SelectMany(c => c))
            {
                TestChunks.Fill(key.Key, data);
                while (tier.Offer(key, data) == TierWriteStatus.QueueFull)
                {
                    Thread.Yield();
                }
            }

            await tier.FlushAsync();
            Assert.Equal(Chains * PerChain, tier.GetStats().Writes);
        }

        var clock = Stopwatch.StartNew();
        using (var tier = new DiskTier(options, NullLogger.Instance))
        {
            clock.Stop();
            TestContext.Current.TestOutputHelper?.WriteLine($"recovery of {tier.RecoveredChunks} chunks from index files: {clock.Elapsed.TotalMilliseconds:0.0} ms (tier: {tier.RecoveryTime.TotalMilliseconds:0.0} ms)");
            Assert.Equal(Chains * PerChain, tier.RecoveredChunks);
            Assert.Equal(0, tier.RebuiltIndexFiles);
            Assert.All(chains, c => Assert.Equal(PerChain, tier.CountPresentPrefix(c)));
            Assert.True((await TestChunks.ReadAsync(tier, chains[Chains - 1][PerChain - 1])).Exact);
        }

        // As after a crash: the newest segment has no index file and is scanned.
        string newest = Directory.GetFiles(_dir.Path, "seg-*.idx").Max()!;
        File.Delete(newest);
        clock.Restart();
        using (var tier = new DiskTier(options, NullLogger.Instance))
        {
            clock.Stop();
            TestContext.Current.TestOutputHelper?.WriteLine($"recovery of {tier.RecoveredChunks} chunks, newest segment scanned: {clock.Elapsed.TotalMilliseconds:0.0} ms (tier: {tier.RecoveryTime.TotalMilliseconds:0.0} ms)");
            Assert.Equal(Chains * PerChain, tier.RecoveredChunks);
            Assert.Equal(0, tier.SkippedRecords);
            Assert.True((await TestChunks.ReadAsync(tier, chains[Chains - 1][PerChain - 1])).Exact);
        }
    }
}
