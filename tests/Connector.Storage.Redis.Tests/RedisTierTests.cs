using System.Runtime.InteropServices;
using Connector.Core.Storage.Tiers;
using Connector.Storage.Redis.Tests.Infrastructure;
using StackExchange.Redis;
using Xunit;
using static Connector.Storage.Redis.Tests.Infrastructure.TestSupport;

namespace Connector.Storage.Redis.Tests;

/// <summary>The tier against one real redis-server per test.</summary>
public sealed class RedisTierTests(ITestOutputHelper output) : IDisposable
{
    private readonly RedisServerProcess? _server = RedisServerProcess.Available ? RedisServerProcess.Start() : null;
    private readonly TestLogger _logger = new(output);

    private RedisServerProcess Server
    {
        get
        {
            Assert.SkipUnless(_server is not null, RedisServerProcess.SkipReason);
            return _server!;
        }
    }

    public void Dispose() => _server?.Dispose();

    private async Task<RedisTier> TierAsync(Action<RedisTierOptions>? configure = null)
    {
        RedisTierOptions options = Options(Server.EndPoint);
        configure?.Invoke(options);
        var tier = new RedisTier(options, _logger);
        await WaitConnectedAsync(tier);
        return tier;
    }

    public static TheoryData<RedisCompression, int, long> Codecs => new()
    {
        { RedisCompression.Lz4, 1 << 20, 4L << 20 },
        { RedisCompression.None, 1 << 20, 4L << 20 },
        { RedisCompression.Lz4, 256 << 10, 256 << 10 },
    };

    [Theory]
    [MemberData(nameof(Codecs))]
    public async Task ReadAsync_ChunksFrom4KiBTo32MiB_ReturnsSameBytes(RedisCompression codec, int pieceBytes, long pipelineBytes)
    {
        using RedisTier tier = await TierAsync(o =>
        {
            o.Compression = codec;
            o.PieceBytes = pieceBytes;
            o.PipelineBytes = pipelineBytes;
        });
        int[] sizes = [4096, 4096 + 1, 65536 + 3, pieceBytes, pieceBytes + 1, (3 * pieceBytes) + 5, 8 << 20, 32 << 20];
        var chunks = new List<(TierKey Key, byte[] Data)>();
        for (int i = 0; i < sizes.Length * 2; i++)
        {
            byte[] data = Bytes(sizes[i % sizes.Length], seed: i, compressible: i >= sizes.Length);
            TierKey key = Key(RandomKey(), data.Length);
            Assert.Equal(TierWriteStatus.Accepted, tier.Offer(key, data));
            chunks.Add((key, data));
        }

        Assert.True(await tier.FlushAsync(TimeSpan.FromSeconds(60)));
        foreach ((TierKey key, byte[] data) in chunks)
        {
            (TierReadStatus status, byte[] read) = await ReadAsync(tier, key);
            Assert.Equal(TierReadStatus.Hit, status);
            Assert.True(data.AsSpan().SequenceEqual(read), $"bytes differ for a chunk of {data.Length}");
        }

        TierStats stats = tier.GetStats();
        Assert.Equal(chunks.Count, stats.Writes);
        Assert.Equal(chunks.Count, stats.Hits);
        Assert.Equal(0, stats.Corrupt + stats.Errors + stats.Drops);
        Assert.Equal(chunks.Count, stats.Chunks);
        Assert.True(stats.UsedBytes > 0);
        if (codec == RedisCompression.Lz4)
        {
            Assert.True(tier.WireBytesWritten < chunks.Sum(c => (long)c.Data.Length), "compressible chunks should shrink on the wire");
        }
    }

    [Fact]
    public async Task ReadAsync_IntoNativeMemory_ReturnsSameBytes()
    {
        using RedisTier tier = await TierAsync();
        byte[] data = Bytes((5 << 20) + 17, seed: 3);
        TierKey key = Key(RandomKey(), data.Length);
        await WriteAsync(tier, key, data);
        nint slab = Marshal.AllocHGlobal(data.Length);
        try
        {
            using var memory = new NativeMemoryManager(slab, data.Length);
            Assert.Equal(TierReadStatus.Hit, await tier.ReadAsync(key, memory.Memory, TestContext.Current.CancellationToken));
            Assert.True(data.AsSpan().SequenceEqual(memory.GetSpan()));
        }
        finally
        {
            Marshal.FreeHGlobal(slab);
        }
    }

    [Fact]
    public async Task ReadAsync_NeverWritten_IsMiss()
    {
        using RedisTier tier = await TierAsync();
        (TierReadStatus status, _) = await ReadAsync(tier, Key(RandomKey(), 4096));
        Assert.Equal(TierReadStatus.Miss, status);
        Assert.Equal(1, tier.GetStats().Misses);
    }

    [Fact]
    public async Task ProbePrefixAsync_GapInChain_CountsLeadingPresent()
    {
        using RedisTier tier = await TierAsync();
        var keys = new TierKey[150];
        for (int i = 0; i < keys.Length; i++)
        {
            keys[i] = Key(RandomKey(), 8192);
            if (i != 130)
            {
                Assert.Equal(TierWriteStatus.Accepted, tier.Offer(keys[i], Bytes(8192, i)));
            }
        }

        Assert.True(await tier.FlushAsync(TimeSpan.FromSeconds(60)));
        CancellationToken ct = TestContext.Current.CancellationToken;
        Assert.Equal(130, await tier.ProbePrefixAsync(keys, ct));
        Assert.Equal(19, await tier.ProbePrefixAsync(keys.AsMemory(131), ct));
        Assert.Equal(0, await tier.ProbePrefixAsync(ReadOnlyMemory<TierKey>.Empty, ct));

        // The same keys asked for under another namespace or length are not present.
        Assert.Equal(0, await tier.ProbePrefixAsync(new[] { keys[0] with { NamespaceTag = Tag + 1 } }, ct));
        Assert.Equal(0, await tier.ProbePrefixAsync(new[] { keys[0] with { Length = 4096 } }, ct));
    }

    [Fact]
    public async Task Offer_EveryKeyWritten_HasTtl()
    {
        RedisTierOptions options = Options(Server.EndPoint);
        options.Ttl = TimeSpan.FromMinutes(7);
        options.PieceBytes = 64 << 10;
        using var tier = new RedisTier(options, _logger);
        await WaitConnectedAsync(tier);
        await WriteAsync(tier, Key(RandomKey(), 4096), Bytes(4096, 1));
        await WriteAsync(tier, Key(RandomKey(), 1 << 20), Bytes(1 << 20, 2));

        using ConnectionMultiplexer admin = Admin(Server.EndPoint);
        IDatabase db = admin.GetDatabase();
        List<RedisKey> keys = KeysUnder(admin, options.KeyPrefix);
        Assert.Equal(1 + 1 + 16, keys.Count);
        foreach (RedisKey k in keys)
        {
            TimeSpan? ttl = await db.KeyTimeToLiveAsync(k);
            Assert.NotNull(ttl);
            Assert.InRange(ttl.Value, TimeSpan.FromMinutes(6), options.Ttl + options.OperationTimeout + TimeSpan.FromSeconds(31));
        }
    }

    [Fact]
    public async Task Offer_AlreadyInRedis_IsWrittenOnce()
    {
        RedisTierOptions options = Options(Server.EndPoint);
        using var first = new RedisTier(options, _logger);
        using var second = new RedisTier(options, _logger);
        await WaitConnectedAsync(first);
        await WaitConnectedAsync(second);
        TierKey small = Key(RandomKey(), 4096);
        TierKey large = Key(RandomKey(), 3 << 20);
        await WriteAsync(first, small, Bytes(4096, 1));
        await WriteAsync(first, large, Bytes(3 << 20, 2));
        await WriteAsync(second, small, Bytes(4096, 1));
        await WriteAsync(second, large, Bytes(3 << 20, 2));
        Assert.Equal(2, second.Deduplicated);
        Assert.Equal(0, second.GetStats().Writes);
        Assert.Equal(TierReadStatus.Hit, (await ReadAsync(second, large)).Status);
    }

    [Fact]
    public async Task ClearAsync_ChunksUnderPrefix_RemovesThemOnly()
    {
        using RedisTier tier = await TierAsync();
        for (int i = 0; i < 5; i++)
        {
            await WriteAsync(tier, Key(RandomKey(), 2 << 20), Bytes(2 << 20, i));
        }

        using ConnectionMultiplexer admin = Admin(Server.EndPoint);
        await admin.GetDatabase().StringSetAsync("someone-else:key", "stays");
        Assert.Equal(5, await tier.ClearAsync(TestContext.Current.CancellationToken));
        Assert.Empty(KeysUnder(admin, "t"));
        Assert.Equal("stays", (string?)await admin.GetDatabase().StringGetAsync("someone-else:key"));
        Assert.Equal(0, tier.GetStats().Chunks);
    }

    [Fact]
    public async Task Offer_ChunkLargerThanQueue_QueueFullAndCounted()
    {
        using RedisTier tier = await TierAsync(o => o.WriteQueueBytes = 1 << 20);
        Assert.Equal(TierWriteStatus.QueueFull, tier.Offer(Key(RandomKey(), 2 << 20), Bytes(2 << 20, 1)));
        Assert.Equal(1, tier.GetStats().Drops);
    }

    [Fact]
    public async Task Offer_ServerFrozen_QueueFillsThenDropsAndNeverBlocks()
    {
        using RedisTier tier = await TierAsync(o =>
        {
            o.WriteQueueBytes = 4 << 20;
            o.OperationTimeout = TimeSpan.FromSeconds(30);
        });
        Server.Pause();
        try
        {
            var statuses = new List<TierWriteStatus>();
            TierKey repeated = Key(RandomKey(), 1 << 20);
            statuses.Add(tier.Offer(repeated, Bytes(1 << 20, 0)));
            Assert.Equal(TierWriteStatus.AlreadyPresent, tier.Offer(repeated, Bytes(1 << 20, 0)));
            for (int i = 1; i < 12; i++)
            {
                statuses.Add(tier.Offer(Key(RandomKey(), 1 << 20), Bytes(1 << 20, i)));
            }

            Assert.Equal(4, statuses.Count(s => s == TierWriteStatus.Accepted));
            Assert.Equal(8, statuses.Count(s => s == TierWriteStatus.QueueFull));
            TierStats stats = tier.GetStats();
            Assert.Equal(8, stats.Drops);
            Assert.Equal(4, stats.QueueDepth);
        }
        finally
        {
            Server.Resume();
        }

        Assert.True(await tier.FlushAsync(TimeSpan.FromSeconds(60)));
        Assert.Equal(4, tier.GetStats().Writes);
    }

    [Fact]
    public async Task Offer_BudgetSpent_NotAdmitted()
    {
        using RedisTier tier = await TierAsync(o => o.CapacityBytes = 40 << 10);
        int accepted = 0;
        for (int i = 0; i < 6; i++)
        {
            TierWriteStatus status = tier.Offer(Key(RandomKey(), 8 << 10), Bytes(8 << 10, i));
            if (status == TierWriteStatus.Accepted)
            {
                accepted++;
                Assert.True(await tier.FlushAsync(TimeSpan.FromSeconds(60)));
            }
            else
            {
                Assert.Equal(TierWriteStatus.NotAdmitted, status);
            }
        }

        Assert.Equal(4, accepted);
        Assert.Equal(2, tier.GetStats().NotAdmitted);
        Assert.InRange(tier.GetStats().UsedBytes, 4 * 8 << 10, 40 << 10);
    }

    [Fact]
    public async Task ReadAsync_CallerCancels_Cancelled()
    {
        using RedisTier tier = await TierAsync(o => o.OperationTimeout = TimeSpan.FromSeconds(60));
        TierKey key = Key(RandomKey(), 4096);
        await WriteAsync(tier, key, Bytes(4096, 1));
        Server.Pause();
        try
        {
            using var cancel = new CancellationTokenSource();
            Task<(TierReadStatus, byte[])> read = ReadAsync(tier, key, cancel.Token);
            await cancel.CancelAsync();
            (TierReadStatus status, _) = await read.WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
            Assert.Equal(TierReadStatus.Cancelled, status);
            Assert.Equal(0, tier.GetStats().Errors);
        }
        finally
        {
            Server.Resume();
        }
    }

    [Fact]
    public async Task ReadAsync_ServerFrozen_ErrorAfterTimeoutThenRecovers()
    {
        using RedisTier tier = await TierAsync(o => o.OperationTimeout = TimeSpan.FromMilliseconds(300));
        TierKey key = Key(RandomKey(), 3 << 20);
        byte[] data = Bytes(3 << 20, 7);
        await WriteAsync(tier, key, data);
        Server.Pause();
        try
        {
            // The ceiling only keeps a broken tier from hanging the run; the tier's own deadline is 300 ms.
            (TierReadStatus status, _) = await ReadAsync(tier, key).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
            Assert.Equal(TierReadStatus.Error, status);
            Assert.Equal(0, await tier.ProbePrefixAsync(new[] { key }, TestContext.Current.CancellationToken).AsTask().WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken));
        }
        finally
        {
            Server.Resume();
        }

        await Eventually(async () => (await ReadAsync(tier, key)).Status == TierReadStatus.Hit, "reads never recovered after the server thawed");
        Assert.True(tier.GetStats().Errors >= 2);
    }
}
