using System.Text;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using Connector.Storage.Redis.Tests.Infrastructure;
using StackExchange.Redis;
using Xunit;
using static Connector.Storage.Redis.Tests.Infrastructure.TestSupport;

namespace Connector.Storage.Redis.Tests;

/// <summary>Whatever sits under our keys that is not exactly what was offered is never a hit.</summary>
public sealed class RedisTierCorruptionTests(ITestOutputHelper output) : IDisposable
{
    private readonly RedisServerProcess? _server = RedisServerProcess.Available ? RedisServerProcess.Start() : null;
    private readonly TestLogger _logger = new(output);
    private ConnectionMultiplexer? _admin;

    private RedisServerProcess Server
    {
        get
        {
            Assert.SkipUnless(_server is not null, RedisServerProcess.SkipReason);
            return _server!;
        }
    }

    private IDatabase Db => (_admin ??= Admin(Server.EndPoint)).GetDatabase();

    public void Dispose()
    {
        _admin?.Dispose();
        _server?.Dispose();
    }

    private async Task<(RedisTier Tier, RedisTierOptions Options)> TierAsync(RedisCompression codec = RedisCompression.Lz4)
    {
        RedisTierOptions options = Options(Server.EndPoint);
        options.PieceBytes = 64 << 10;
        options.Compression = codec;
        var tier = new RedisTier(options, _logger);
        await WaitConnectedAsync(tier);
        return (tier, options);
    }

    private static RedisKey ManifestKey(RedisTierOptions options, ChunkKey key) => options.KeyPrefix + "{" + key + "}";

    private static RedisKey PieceKey(RedisTierOptions options, ChunkKey key, ulong writeId, int index) =>
        options.KeyPrefix + "{" + key + "}:" + writeId.ToString("x16", System.Globalization.CultureInfo.InvariantCulture) + ":" + index.ToString(System.Globalization.CultureInfo.InvariantCulture);

    private async Task<ChunkManifest> ManifestOfAsync(RedisTierOptions options, TierKey key)
    {
        byte[]? value = await Db.StringGetAsync(ManifestKey(options, key.Key));
        Assert.NotNull(value);
        Assert.Equal(ManifestCheck.Valid, ChunkManifest.TryParse(value, key.Key, key.NamespaceTag, key.Length, headerOnly: false, out ChunkManifest manifest));
        return manifest;
    }

    public static TheoryData<string> Garbage => new() { "empty", "short", "random-104", "random-large", "other-magic" };

    [Theory]
    [MemberData(nameof(Garbage))]
    public async Task ReadAsync_GarbageUnderKey_CorruptNeverHit(string kind)
    {
        (RedisTier tier, RedisTierOptions options) = await TierAsync();
        using (tier)
        {
            TierKey key = Key(RandomKey(), 4096);
            byte[] value = kind switch
            {
                "empty" => [],
                "short" => Encoding.ASCII.GetBytes("KVSR"),
                "random-104" => Bytes(ChunkManifest.HeaderSize, 1),
                "random-large" => Bytes(ChunkManifest.HeaderSize + 4096, 2),
                _ => Encoding.ASCII.GetBytes(new string('x', ChunkManifest.HeaderSize + 4096)),
            };
            await Db.StringSetAsync(ManifestKey(options, key.Key), value);
            (TierReadStatus status, _) = await ReadAsync(tier, key);
            Assert.Equal(TierReadStatus.Corrupt, status);
            Assert.Equal(1, tier.GetStats().Corrupt);
            Assert.Equal(0, tier.GetStats().Hits);
            Assert.Equal(0, await tier.ProbePrefixAsync(new[] { key }, TestContext.Current.CancellationToken));

            // Dropped, so it is not read again (the delete is fire-and-forget: wait for it).
            await Eventually(async () => !await Db.KeyExistsAsync(ManifestKey(options, key.Key)), "the corrupt value was not dropped");
        }
    }

    [Fact]
    public async Task ReadAsync_NotAString_CorruptNeverHit()
    {
        (RedisTier tier, RedisTierOptions options) = await TierAsync();
        using (tier)
        {
            TierKey key = Key(RandomKey(), 4096);
            await Db.ListRightPushAsync(ManifestKey(options, key.Key), "x");
            Assert.Equal(TierReadStatus.Corrupt, (await ReadAsync(tier, key)).Status);
            Assert.Equal(0, tier.GetStats().Errors);
        }
    }

    [Theory]
    [InlineData(4096)]
    [InlineData(300 << 10)]
    public async Task ReadAsync_ValueOfAnotherLength_CorruptNeverHit(int length)
    {
        (RedisTier tier, _) = await TierAsync();
        using (tier)
        {
            TierKey key = Key(RandomKey(), length);
            await WriteAsync(tier, key, Bytes(length, 1));
            (TierReadStatus status, _) = await ReadAsync(tier, key with { Length = length + 1 });
            Assert.Equal(TierReadStatus.Corrupt, status);
            (status, _) = await ReadAsync(tier, key with { Length = length - 1 });
            Assert.NotEqual(TierReadStatus.Hit, status);
        }
    }

    [Theory]
    [InlineData(4096)]
    [InlineData(300 << 10)]
    public async Task ReadAsync_OtherNamespaceValue_CorruptNeverHit(int length)
    {
        (RedisTier tier, _) = await TierAsync();
        using (tier)
        {
            TierKey theirs = Key(RandomKey(), length, tag: 0xA11CE);
            await WriteAsync(tier, theirs, Bytes(length, 1));
            TierKey ours = theirs with { NamespaceTag = 0xB0B };
            Assert.Equal(0, await tier.ProbePrefixAsync(new[] { ours }, TestContext.Current.CancellationToken));
            Assert.Equal(TierReadStatus.Corrupt, (await ReadAsync(tier, ours)).Status);
            Assert.Equal(1, tier.GetStats().Corrupt);
        }
    }

    [Fact]
    public async Task ReadAsync_ManifestCopiedUnderAnotherKey_CorruptNeverHit()
    {
        (RedisTier tier, RedisTierOptions options) = await TierAsync();
        using (tier)
        {
            TierKey original = Key(RandomKey(), 4096);
            await WriteAsync(tier, original, Bytes(4096, 1));
            TierKey other = Key(RandomKey(), 4096);
            byte[]? value = await Db.StringGetAsync(ManifestKey(options, original.Key));
            await Db.StringSetAsync(ManifestKey(options, other.Key), value);
            Assert.Equal(TierReadStatus.Corrupt, (await ReadAsync(tier, other)).Status);
        }
    }

    [Fact]
    public async Task ReadAsync_PiecesWithoutManifest_MissNeverHit()
    {
        (RedisTier tier, RedisTierOptions options) = await TierAsync();
        using (tier)
        {
            // A writer that died after its pieces and before its manifest leaves exactly this.
            TierKey key = Key(RandomKey(), 200 << 10);
            byte[] data = Bytes(200 << 10, 1);
            for (int i = 0; i < 4; i++)
            {
                int from = i * (64 << 10);
                await Db.StringSetAsync(PieceKey(options, key.Key, 42, i), data.AsMemory(from, Math.Min(64 << 10, data.Length - from)));
            }

            Assert.Equal(0, await tier.ProbePrefixAsync(new[] { key }, TestContext.Current.CancellationToken));
            Assert.Equal(TierReadStatus.Miss, (await ReadAsync(tier, key)).Status);
        }
    }

    [Fact]
    public async Task ReadAsync_ManifestWithoutPieces_MissAndManifestDropped()
    {
        (RedisTier tier, RedisTierOptions options) = await TierAsync();
        using (tier)
        {
            TierKey key = Key(RandomKey(), 200 << 10);
            await WriteAsync(tier, key, Bytes(200 << 10, 1));
            ChunkManifest manifest = await ManifestOfAsync(options, key);
            Assert.Equal(4, manifest.PieceCount);
            Assert.True(await Db.KeyDeleteAsync(PieceKey(options, key.Key, manifest.WriteId, 2)));

            Assert.Equal(TierReadStatus.Miss, (await ReadAsync(tier, key)).Status);
            Assert.Equal(1, tier.GetStats().Evictions);
            await Eventually(async () => !await Db.KeyExistsAsync(ManifestKey(options, key.Key)), "the dangling manifest was not dropped");
            Assert.Equal(0, await tier.ProbePrefixAsync(new[] { key }, TestContext.Current.CancellationToken));
        }
    }

    public static TheoryData<RedisCompression, string> Tampering => new()
    {
        { RedisCompression.None, "flip" },
        { RedisCompression.None, "truncate" },
        { RedisCompression.None, "extend" },
        { RedisCompression.Lz4, "flip" },
        { RedisCompression.Lz4, "truncate" },
        { RedisCompression.Lz4, "swap" },
    };

    [Theory]
    [MemberData(nameof(Tampering))]
    public async Task ReadAsync_TamperedPiece_CorruptNeverHit(RedisCompression codec, string how)
    {
        (RedisTier tier, RedisTierOptions options) = await TierAsync(codec);
        using (tier)
        {
            TierKey key = Key(RandomKey(), 200 << 10);
            await WriteAsync(tier, key, Bytes(200 << 10, 1, compressible: codec == RedisCompression.Lz4));
            ChunkManifest manifest = await ManifestOfAsync(options, key);
            RedisKey piece = PieceKey(options, key.Key, manifest.WriteId, 1);
            byte[] value = (byte[])(await Db.StringGetAsync(piece))!;
            switch (how)
            {
                case "flip":
                    value[value.Length / 2] ^= 0x40;
                    break;
                case "truncate":
                    value = value[..^1];
                    break;
                case "extend":
                    value = [.. value, 0];
                    break;
                default:
                    value = (byte[])(await Db.StringGetAsync(PieceKey(options, key.Key, manifest.WriteId, 0)))!;
                    break;
            }

            await Db.StringSetAsync(piece, value);
            (TierReadStatus status, _) = await ReadAsync(tier, key);
            Assert.Equal(TierReadStatus.Corrupt, status);
            Assert.Equal(0, tier.GetStats().Hits);
        }
    }

    [Fact]
    public async Task ReadAsync_TamperedInlineBytes_CorruptNeverHit()
    {
        (RedisTier tier, RedisTierOptions options) = await TierAsync(RedisCompression.None);
        using (tier)
        {
            TierKey key = Key(RandomKey(), 4096);
            await WriteAsync(tier, key, Bytes(4096, 1));
            await Db.StringSetRangeAsync(ManifestKey(options, key.Key), ChunkManifest.HeaderSize + 100, "Z");
            Assert.Equal(TierReadStatus.Corrupt, (await ReadAsync(tier, key)).Status);
        }
    }
}
