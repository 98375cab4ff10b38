using System.Diagnostics;
using System.Security.Cryptography;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging;
using StackExchange.Redis;
using Xunit;

namespace Connector.Storage.Redis.Tests.Infrastructure;

/// <summary>Keys, chunk bytes and waits shared by the tests.</summary>
internal static class TestSupport
{
    public const ulong Tag = 0x5EED_0001_0002_0003;

    /// <summary>A random chunk key (as SHA-256 keys are: spread over every cluster slot).</summary>
    public static ChunkKey RandomKey() => new(RandomNumberGenerator.GetBytes(ChunkKey.Size));

    /// <summary>Chunk bytes: random (incompressible, like KV) or a compressible pattern.</summary>
    public static byte[] Bytes(int length, int seed, bool compressible = false)
    {
        var data = new byte[length];
        if (compressible)
        {
            for (int i = 0; i < length; i++)
            {
                data[i] = (byte)((i / 97) + seed);
            }
        }
        else
        {
            new Random(seed).NextBytes(data);
        }

        return data;
    }

    public static TierKey Key(ChunkKey key, long length, ulong tag = Tag) => new(key, ChunkKey.None, tag, length);

    public static RedisTierOptions Options(string configuration, string? prefix = null) => new()
    {
        Configuration = configuration,
        KeyPrefix = prefix ?? $"t{Guid.NewGuid():N}"[..12] + ":",
        Ttl = TimeSpan.FromMinutes(10),
        OperationTimeout = TimeSpan.FromSeconds(5),
        ConnectTimeout = TimeSpan.FromSeconds(2),
        BreakerOpenDuration = TimeSpan.FromMilliseconds(200),
        BreakerFailureThreshold = 3,
        LogInterval = TimeSpan.FromSeconds(1),
    };

    /// <summary>Waits (polling, generous ceiling) until the tier's first connection is up.</summary>
    public static async Task WaitConnectedAsync(RedisTier tier)
    {
        await Eventually(() => Task.FromResult(tier.IsConnected), "the tier never connected");
    }

    /// <summary>Polls <paramref name="condition"/> until it holds; fails the test after 60 s (a ceiling, not a timing assert).</summary>
    public static async Task Eventually(Func<Task<bool>> condition, string because)
    {
        var clock = Stopwatch.StartNew();
        while (!await condition())
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), because);
            await Task.Delay(50, TestContext.Current.CancellationToken);
        }
    }

    /// <summary>Offers, flushes and asserts the chunk was written.</summary>
    public static async Task WriteAsync(RedisTier tier, TierKey key, byte[] data)
    {
        Assert.Equal(TierWriteStatus.Accepted, tier.Offer(key, data));
        Assert.True(await tier.FlushAsync(TimeSpan.FromSeconds(60)), "the write queue did not drain");
    }

    public static async Task<(TierReadStatus Status, byte[] Bytes)> ReadAsync(RedisTier tier, TierKey key, CancellationToken cancellation = default)
    {
        var destination = new byte[key.Length];
        TierReadStatus status = await tier.ReadAsync(key, destination, cancellation == default ? TestContext.Current.CancellationToken : cancellation);
        return (status, destination);
    }

    /// <summary>An admin connection for inspecting and tampering with what the tier wrote.</summary>
    public static ConnectionMultiplexer Admin(string configuration) =>
        ConnectionMultiplexer.Connect(configuration + ",allowAdmin=true,abortConnect=false,connectTimeout=2000");

    /// <summary>Every key under <paramref name="prefix"/> on every primary.</summary>
    public static List<RedisKey> KeysUnder(ConnectionMultiplexer admin, string prefix)
    {
        var keys = new List<RedisKey>();
        foreach (System.Net.EndPoint ep in admin.GetEndPoints())
        {
            IServer server = admin.GetServer(ep);
            if (server.IsConnected && !server.IsReplica)
            {
                keys.AddRange(server.Keys(pattern: prefix + "*", pageSize: 1000));
            }
        }

        return keys;
    }
}

/// <summary>Writes the tier's log lines to the test output (they explain a failure).</summary>
internal sealed class TestLogger(ITestOutputHelper? output) : ILogger
{
    private long _warnings;

    public long Warnings => Interlocked.Read(ref _warnings);

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Debug;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        if (logLevel >= LogLevel.Warning)
        {
            Interlocked.Increment(ref _warnings);
        }

        try
        {
            output?.WriteLine($"[{logLevel}] {eventId.Name}: {formatter(state, exception)}");
        }
        catch (InvalidOperationException)
        {
            // The test already ended; a late line from a background loop has nowhere to go.
        }
    }
}
