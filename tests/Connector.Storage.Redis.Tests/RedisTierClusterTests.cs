using Connector.Core.Storage.Tiers;
using Connector.Storage.Redis.Tests.Infrastructure;
using StackExchange.Redis;
using Xunit;
using static Connector.Storage.Redis.Tests.Infrastructure.TestSupport;

namespace Connector.Storage.Redis.Tests;

/// <summary>A real 3-master Redis Cluster shared by the tests of this class.</summary>
public sealed class ClusterFixture : IDisposable
{
    public ClusterFixture()
    {
        if (RedisServerProcess.Available)
        {
            Cluster = RedisClusterProcess.Start(masters: 3, replicasPerMaster: 0);
        }
    }

    internal RedisClusterProcess? Cluster { get; }

    public void Dispose() => Cluster?.Dispose();
}

public sealed class RedisTierClusterTests(ClusterFixture fixture, ITestOutputHelper output) : IClassFixture<ClusterFixture>
{
    private readonly TestLogger _logger = new(output);

    private RedisClusterProcess Cluster
    {
        get
        {
            Assert.SkipUnless(fixture.Cluster is not null, RedisServerProcess.SkipReason);
            return fixture.Cluster!;
        }
    }

    [Fact]
    public async Task ReadAsync_ClusterChunksFrom4KiBTo32MiB_ReturnsSameBytesFromEveryNode()
    {
        RedisTierOptions options = Options(Cluster.Configuration);
        options.PieceBytes = 256 << 10;
        using var tier = new RedisTier(options, _logger);
        await WaitConnectedAsync(tier);
        int[] sizes = [4096, 65536 + 3, 256 << 10, (256 << 10) + 1, (3 << 20) + 5, 32 << 20];
        var chunks = new List<(TierKey Key, byte[] Data)>();
        for (int i = 0; i < 30; i++)
        {
            int size = sizes[i % sizes.Length];
            if (size > 1 << 20 && i >= sizes.Length)
            {
                size = 1 << 20;
            }

            byte[] data = Bytes(size, seed: i, compressible: i % 2 == 1);
            TierKey key = Key(RandomKey(), data.Length);
            Assert.Equal(TierWriteStatus.Accepted, tier.Offer(key, data));
            chunks.Add((key, data));
        }

        Assert.True(await tier.FlushAsync(TimeSpan.FromSeconds(60)));
        foreach ((TierKey key, byte[] data) in chunks)
        {
            (TierReadStatus status, byte[] read) = await ReadAsync(tier, key);
            Assert.Equal(TierReadStatus.Hit, status);
            Assert.True(data.AsSpan().SequenceEqual(read));
        }

        Assert.Equal(chunks.Count, await tier.ProbePrefixAsync(chunks.Select(c => c.Key).ToArray(), TestContext.Current.CancellationToken));

        // Chunks spread over the masters; every key of one chunk is in its manifest's slot; every key has a TTL.
        using ConnectionMultiplexer admin = Admin(Cluster.Configuration);
        var nodesHoldingChunks = 0;
        foreach (RedisServerProcess master in Cluster.Masters())
        {
            IServer server = admin.GetServer(master.EndPoint);
            List<RedisKey> keys = server.Keys(pattern: options.KeyPrefix + "*", pageSize: 1000).ToList();
            nodesHoldingChunks += keys.Count > 0 ? 1 : 0;
            foreach (RedisKey k in keys)
            {
                string name = k!;
                string manifest = name[..(name.IndexOf('}', StringComparison.Ordinal) + 1)];
                Assert.Equal(admin.HashSlot(manifest), admin.HashSlot(k));
                Assert.NotNull(await admin.GetDatabase().KeyTimeToLiveAsync(k));
            }
        }

        Assert.True(nodesHoldingChunks >= 2, "30 random keys all landed on one master");
        Assert.Equal(chunks.Count, await tier.ClearAsync(TestContext.Current.CancellationToken));
        Assert.Empty(KeysUnder(admin, options.KeyPrefix));
    }
}

/// <summary>A 3-master, 3-replica cluster of its own: a master is killed and its replica takes over.</summary>
public sealed class RedisTierFailoverTests(ITestOutputHelper output)
{
    private readonly TestLogger _logger = new(output);

    [Fact]
    public async Task ReadAsync_MasterKilledAndFailedOver_MissesWithoutExceptionsThenRecovers()
    {
        Assert.SkipUnless(RedisServerProcess.Available, RedisServerProcess.SkipReason);
        using RedisClusterProcess cluster = RedisClusterProcess.Start(masters: 3, replicasPerMaster: 1);
        RedisTierOptions options = Options(cluster.Configuration);
        options.PieceBytes = 64 << 10;
        options.OperationTimeout = TimeSpan.FromSeconds(1);
        using var tier = new RedisTier(options, _logger);
        await WaitConnectedAsync(tier);
        var chunks = new List<(TierKey Key, byte[] Data)>();
        for (int i = 0; i < 24; i++)
        {
            byte[] data = Bytes(i % 2 == 0 ? 4096 : 300 << 10, seed: i);
            TierKey key = Key(RandomKey(), data.Length);
            Assert.Equal(TierWriteStatus.Accepted, tier.Offer(key, data));
            chunks.Add((key, data));
        }

        Assert.True(await tier.FlushAsync(TimeSpan.FromSeconds(60)));
        cluster.WaitUntilOk(replicasInSync: true);
        RedisServerProcess victim = cluster.Masters()[0];
        RedisClusterProcess.WaitReplicated(victim);
        victim.Kill();
        var sinceKill = System.Diagnostics.Stopwatch.StartNew();

        // While the cluster notices and promotes the replica: reads are hits, misses or errors, never exceptions.
        CancellationToken ct = TestContext.Current.CancellationToken;
        foreach ((TierKey key, byte[] data) in chunks)
        {
            (TierReadStatus status, byte[] read) = await ReadAsync(tier, key);
            Assert.True(status is TierReadStatus.Hit or TierReadStatus.Miss or TierReadStatus.Error, status.ToString());
            if (status == TierReadStatus.Hit)
            {
                Assert.True(data.AsSpan().SequenceEqual(read));
            }

            _ = await tier.ProbePrefixAsync(new[] { key }, ct);
            TierWriteStatus offer = tier.Offer(Key(RandomKey(), 4096), Bytes(4096, 1));
            Assert.NotEqual(TierWriteStatus.QueueFull, offer);
        }

        // Recovery: once the replica is promoted, every slot takes writes and serves them again.
        await Eventually(
            async () =>
            {
                var fresh = new List<(TierKey Key, byte[] Data)>();
                for (int i = 0; i < 12; i++)
                {
                    byte[] data = Bytes(i % 2 == 0 ? 4096 : 200 << 10, seed: 100 + i);
                    TierKey key = Key(RandomKey(), data.Length);
                    if (tier.Offer(key, data) != TierWriteStatus.Accepted)
                    {
                        return false;
                    }

                    fresh.Add((key, data));
                }

                await tier.FlushAsync(TimeSpan.FromSeconds(60));
                foreach ((TierKey key, byte[] data) in fresh)
                {
                    (TierReadStatus status, byte[] read) = await ReadAsync(tier, key);
                    if (status != TierReadStatus.Hit || !data.AsSpan().SequenceEqual(read))
                    {
                        return false;
                    }
                }

                return true;
            },
            "the tier never recovered after the failover");
        output.WriteLine($"recovered {sinceKill.Elapsed.TotalSeconds:0.0} s after the kill");

        // The promoted replica had the old chunks (replicated before the kill): they are hits again.
        int hits = 0;
        foreach ((TierKey key, byte[] data) in chunks)
        {
            (TierReadStatus status, byte[] read) = await ReadAsync(tier, key);
            Assert.NotEqual(TierReadStatus.Corrupt, status);
            hits += status == TierReadStatus.Hit && data.AsSpan().SequenceEqual(read) ? 1 : 0;
        }

        Assert.Equal(chunks.Count, hits);
        Assert.Equal(0, tier.GetStats().Corrupt);
    }
}
