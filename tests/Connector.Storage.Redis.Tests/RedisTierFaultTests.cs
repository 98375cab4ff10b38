using System.Net;
using System.Net.Sockets;
using Connector.Core.Storage.Tiers;
using Connector.Storage.Redis.Tests.Infrastructure;
using Microsoft.Extensions.Time.Testing;
using Xunit;
using static Connector.Storage.Redis.Tests.Infrastructure.TestSupport;

namespace Connector.Storage.Redis.Tests;

/// <summary>A Redis that is down, killed, restarted or never there is a miss, never an exception or a stall.</summary>
public sealed class RedisTierFaultTests(ITestOutputHelper output)
{
    private readonly TestLogger _logger = new(output);

    private static int UnusedPort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    [Fact]
    public async Task Constructor_NothingListening_NeverThrowsAndEverythingMisses()
    {
        RedisTierOptions options = Options($"127.0.0.1:{UnusedPort()}");
        using var tier = new RedisTier(options, _logger);
        CancellationToken ct = TestContext.Current.CancellationToken;
        TierKey key = Key(RandomKey(), 4096);
        for (int i = 0; i < 20; i++)
        {
            TierReadStatus status = (await ReadAsync(tier, key)).Status;
            Assert.True(status is TierReadStatus.Miss or TierReadStatus.Error, status.ToString());
            Assert.Equal(0, await tier.ProbePrefixAsync(new[] { key }, ct));
            TierWriteStatus offer = tier.Offer(Key(RandomKey(), 4096), Bytes(4096, i));
            Assert.True(offer is TierWriteStatus.Unavailable or TierWriteStatus.Accepted, offer.ToString());
        }

        Assert.Equal(0, await tier.ClearAsync(ct));
        Assert.Equal(0, tier.GetStats().Hits);
        Assert.True(await tier.FlushAsync(TimeSpan.FromSeconds(60)));
    }

    [Fact]
    public async Task ReadAsync_ServerKilledThenRestarted_MissesWithoutExceptionsThenRecovers()
    {
        Assert.SkipUnless(RedisServerProcess.Available, RedisServerProcess.SkipReason);
        using RedisServerProcess server = RedisServerProcess.Start();
        using var tier = new RedisTier(Options(server.EndPoint), _logger);
        await WaitConnectedAsync(tier);
        CancellationToken ct = TestContext.Current.CancellationToken;
        TierKey key = Key(RandomKey(), 3 << 20);
        await WriteAsync(tier, key, Bytes(3 << 20, 1));
        Assert.Equal(TierReadStatus.Hit, (await ReadAsync(tier, key)).Status);

        server.Kill();
        var statuses = new List<TierReadStatus>();
        for (int i = 0; i < 20; i++)
        {
            statuses.Add((await ReadAsync(tier, key)).Status);
            Assert.Equal(0, await tier.ProbePrefixAsync(new[] { key }, ct));
            TierWriteStatus offer = tier.Offer(Key(RandomKey(), 64 << 10), Bytes(64 << 10, i));
            Assert.True(offer is TierWriteStatus.Unavailable or TierWriteStatus.Accepted, offer.ToString());
        }

        Assert.All(statuses, s => Assert.True(s is TierReadStatus.Miss or TierReadStatus.Error, s.ToString()));
        Assert.True(tier.BreakerOpenings >= 1, "the circuit never opened");
        Assert.True(tier.ShortCircuits > 0, "no read failed fast while the circuit was open");
        Assert.True(tier.GetStats().Errors >= 3);

        // The log is rate-limited: 20 failed rounds do not make 20 warning lines.
        Assert.True(_logger.Warnings < 20, $"{_logger.Warnings} warnings");

        server.Restart();
        TierKey fresh = Key(RandomKey(), 2 << 20);
        byte[] data = Bytes(2 << 20, 9);
        await Eventually(
            async () =>
            {
                if (tier.Offer(fresh, data) == TierWriteStatus.Accepted)
                {
                    await tier.FlushAsync(TimeSpan.FromSeconds(60));
                }

                (TierReadStatus status, byte[] read) = await ReadAsync(tier, fresh);
                return status == TierReadStatus.Hit && read.AsSpan().SequenceEqual(data);
            },
            "writes and reads never recovered after the restart");
        Assert.Equal(BreakerState.Closed, tier.BreakerState);

        // The restarted server kept nothing (no persistence): the old chunk is a plain miss.
        Assert.Equal(TierReadStatus.Miss, (await ReadAsync(tier, key)).Status);
        Assert.Equal(1, await tier.ProbePrefixAsync(new[] { fresh, key }, ct));
    }

    [Fact]
    public async Task Breaker_FailuresThenServerBack_OpensHalfOpensAndCloses()
    {
        Assert.SkipUnless(RedisServerProcess.Available, RedisServerProcess.SkipReason);
        using RedisServerProcess server = RedisServerProcess.Start();
        var time = new FakeTimeProvider(DateTimeOffset.UnixEpoch);
        RedisTierOptions options = Options(server.EndPoint);
        options.BreakerOpenDuration = TimeSpan.FromMinutes(1);
        using var tier = new RedisTier(options, _logger, time);
        await WaitConnectedAsync(tier);
        TierKey key = Key(RandomKey(), 4096);
        await WriteAsync(tier, key, Bytes(4096, 1));

        server.Kill();
        for (int i = 0; i < options.BreakerFailureThreshold; i++)
        {
            Assert.Equal(TierReadStatus.Error, (await ReadAsync(tier, key)).Status);
        }

        Assert.Equal(BreakerState.Open, tier.BreakerState);
        long errors = tier.GetStats().Errors;
        Assert.Equal(TierReadStatus.Miss, (await ReadAsync(tier, key)).Status);
        Assert.Equal(TierWriteStatus.Unavailable, tier.Offer(Key(RandomKey(), 4096), Bytes(4096, 2)));
        Assert.Equal(errors, tier.GetStats().Errors);

        // After the open period one trial runs; the server is still down, so it reopens.
        time.Advance(options.BreakerOpenDuration);
        Assert.Equal(TierReadStatus.Error, (await ReadAsync(tier, key)).Status);
        Assert.Equal(BreakerState.Open, tier.BreakerState);
        Assert.Equal(2, tier.BreakerOpenings);

        server.Restart();
        await WaitConnectedAsync(tier);
        await Eventually(
            async () =>
            {
                time.Advance(options.BreakerOpenDuration);
                return (await ReadAsync(tier, key)).Status == TierReadStatus.Miss && tier.BreakerState == BreakerState.Closed;
            },
            "the circuit never closed after the server came back");
        await WriteAsync(tier, key, Bytes(4096, 1));
        Assert.Equal(TierReadStatus.Hit, (await ReadAsync(tier, key)).Status);
    }

    [Fact]
    public void Dispose_WithQueuedWrites_ReturnsAndDrops()
    {
        Assert.SkipUnless(RedisServerProcess.Available, RedisServerProcess.SkipReason);
        using RedisServerProcess server = RedisServerProcess.Start();
        var tier = new RedisTier(Options(server.EndPoint), _logger);
        server.Pause();
        try
        {
            for (int i = 0; i < 8; i++)
            {
                tier.Offer(Key(RandomKey(), 1 << 20), Bytes(1 << 20, i));
            }

            tier.Dispose();
            Assert.Equal(0, tier.GetStats().QueueDepth);
            Assert.Equal(TierWriteStatus.Unavailable, tier.Offer(Key(RandomKey(), 4096), Bytes(4096, 1)));
        }
        finally
        {
            server.Resume();
        }
    }
}
