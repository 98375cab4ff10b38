using System.Text;
using Connector.Core.Keys;
using Connector.Storage.Redis.Tests.Infrastructure;
using Microsoft.Extensions.Time.Testing;
using Xunit;

namespace Connector.Storage.Redis.Tests;

/// <summary>The manifest format, the piece codec, keys, options, the breaker and the budget, without a server.</summary>
public sealed class RedisTierUnitTests
{
    private static readonly ChunkKey SomeKey = TestSupport.RandomKey();

    private static ChunkManifest Manifest(ManifestFlags flags = ManifestFlags.None, long length = 3 << 20) =>
        new(RedisCompression.Lz4, flags, 77, SomeKey, length, length - 1000, (int)((length + (1 << 20) - 1) >> 20), 1 << 20, 0xABCDEF, new UInt128(1, 2));

    [Fact]
    public void TryParse_WrittenManifest_RoundTrips()
    {
        var buffer = new byte[ChunkManifest.HeaderSize];
        ChunkManifest written = Manifest();
        written.Write(buffer);
        Assert.Equal(ManifestCheck.Valid, ChunkManifest.TryParse(buffer, SomeKey, 77, 3 << 20, headerOnly: false, out ChunkManifest read));
        Assert.Equal(written, read);
        Assert.Equal(1 << 20, read.RawPieceLength(2));
    }

    [Fact]
    public void TryParse_AnyByteOfTheHeaderFlipped_NotValid()
    {
        var buffer = new byte[ChunkManifest.HeaderSize];
        Manifest().Write(buffer);
        for (int i = 0; i < buffer.Length; i++)
        {
            for (int bit = 0; bit < 8; bit++)
            {
                buffer[i] ^= (byte)(1 << bit);
                Assert.NotEqual(ManifestCheck.Valid, ChunkManifest.TryParse(buffer, SomeKey, 77, 3 << 20, headerOnly: false, out _));
                buffer[i] ^= (byte)(1 << bit);
            }
        }
    }

    [Fact]
    public void TryParse_OtherKeyNamespaceOrLength_SaysWhich()
    {
        var buffer = new byte[ChunkManifest.HeaderSize];
        Manifest().Write(buffer);
        Assert.Equal(ManifestCheck.WrongKey, ChunkManifest.TryParse(buffer, TestSupport.RandomKey(), 77, 3 << 20, false, out _));
        Assert.Equal(ManifestCheck.WrongNamespace, ChunkManifest.TryParse(buffer, SomeKey, 78, 3 << 20, false, out _));
        Assert.Equal(ManifestCheck.WrongLength, ChunkManifest.TryParse(buffer, SomeKey, 77, (3 << 20) + 1, false, out _));
        Assert.Equal(ManifestCheck.Garbage, ChunkManifest.TryParse(buffer.AsSpan(0, 50), SomeKey, 77, 3 << 20, false, out _));
        Assert.Equal(ManifestCheck.Garbage, ChunkManifest.TryParse([.. buffer, 1], SomeKey, 77, 3 << 20, false, out _));
    }

    [Fact]
    public void TryParse_InlineWithWrongPayloadLength_Garbage()
    {
        ChunkManifest m = new(RedisCompression.None, ManifestFlags.Inline, 77, SomeKey, 4096, 4096, 1, 1 << 20, 1, 0);
        var buffer = new byte[ChunkManifest.HeaderSize + 4096];
        m.Write(buffer);
        Assert.Equal(ManifestCheck.Valid, ChunkManifest.TryParse(buffer, SomeKey, 77, 4096, false, out _));
        Assert.Equal(ManifestCheck.Garbage, ChunkManifest.TryParse(buffer.AsSpan(0, buffer.Length - 1), SomeKey, 77, 4096, false, out _));
        Assert.Equal(ManifestCheck.Valid, ChunkManifest.TryParse(buffer.AsSpan(0, ChunkManifest.HeaderSize), SomeKey, 77, 4096, headerOnly: true, out _));
    }

    [Theory]
    [InlineData(64, true)]
    [InlineData(4096, true)]
    [InlineData(1 << 20, true)]
    [InlineData(4096, false)]
    [InlineData(1 << 20, false)]
    public void TryDecode_EncodedPiece_RoundTrips(int length, bool compressible)
    {
        byte[] raw = TestSupport.Bytes(length, 5, compressible);
        var encoded = new byte[length];
        int n = PieceCodec.TryEncode(RedisCompression.Lz4, raw, encoded);
        Assert.Equal(compressible, n > 0);
        ReadOnlySpan<byte> stored = n > 0 ? encoded.AsSpan(0, n) : raw;
        var back = new byte[length];
        Assert.True(PieceCodec.TryDecode(RedisCompression.Lz4, stored, back));
        Assert.Equal(raw, back);
        Assert.False(PieceCodec.TryDecode(RedisCompression.Lz4, stored, new byte[length + 1]));
        Assert.False(PieceCodec.TryDecode(RedisCompression.None, stored[..^1], new byte[length]));
    }

    [Fact]
    public void ChunkKeys_PieceAndManifest_ShareTheHashTag()
    {
        var keys = new ChunkKeys("kvsc:");
        string manifest = keys.Manifest(SomeKey)!;
        string piece = keys.Piece(SomeKey, 0x1234, 7)!;
        Assert.Equal("kvsc:{" + SomeKey + "}", manifest);
        Assert.Equal(manifest + ":0000000000001234:7", piece);
        Assert.True(keys.IsManifest(Encoding.ASCII.GetBytes(manifest)));
        Assert.False(keys.IsManifest(Encoding.ASCII.GetBytes(piece)));
    }

    public static TheoryData<string, Action<RedisTierOptions>> BadOptions => new()
    {
        { "Configuration is required", o => o.Configuration = " " },
        { "KeyPrefix", o => o.KeyPrefix = "a{b" },
        { "KeyPrefix", o => o.KeyPrefix = "a*" },
        { "KeyPrefix", o => o.KeyPrefix = "" },
        { "Ttl", o => o.Ttl = TimeSpan.Zero },
        { "CapacityBytes", o => o.CapacityBytes = 0 },
        { "PieceBytes", o => o.PieceBytes = 100 },
        { "PieceBytes", o => o.PieceBytes = 128 << 20 },
        { "PipelineBytes", o => o.PipelineBytes = 0 },
        { "Compression", o => o.Compression = (RedisCompression)9 },
        { "OperationTimeout", o => o.OperationTimeout = TimeSpan.Zero },
        { "WriteQueueBytes", o => o.WriteQueueBytes = -1 },
        { "WriteConcurrency", o => o.WriteConcurrency = 0 },
        { "BreakerFailureThreshold", o => o.BreakerFailureThreshold = 0 },
        { "BreakerOpenDuration", o => o.BreakerOpenDuration = TimeSpan.Zero },
    };

    [Theory]
    [MemberData(nameof(BadOptions))]
    public void Validate_BadSetting_MessageNamesIt(string expected, Action<RedisTierOptions> spoil)
    {
        var options = new RedisTierOptions { Configuration = "127.0.0.1:6379" };
        options.Validate();
        spoil(options);
        ArgumentException ex = Assert.Throws<ArgumentException>(options.Validate);
        Assert.Contains(expected, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void CircuitBreaker_ThresholdFailures_OpensThenOneTrialAfterTheDelay()
    {
        var time = new FakeTimeProvider();
        var breaker = new CircuitBreaker(3, TimeSpan.FromSeconds(5), time);
        Assert.Equal(BreakerTransition.None, breaker.OnFailure());
        Assert.Equal(BreakerTransition.None, breaker.OnFailure());
        Assert.Equal(BreakerTransition.None, breaker.OnSuccess());
        Assert.Equal(BreakerTransition.None, breaker.OnFailure());
        Assert.Equal(BreakerTransition.None, breaker.OnFailure());
        Assert.Equal(BreakerTransition.Opened, breaker.OnFailure());
        Assert.True(breaker.IsRefusing);
        Assert.False(breaker.TryAcquire());

        time.Advance(TimeSpan.FromSeconds(5));
        Assert.False(breaker.IsRefusing);
        Assert.True(breaker.TryAcquire());
        Assert.Equal(BreakerState.HalfOpen, breaker.State);
        Assert.False(breaker.TryAcquire());
        Assert.Equal(BreakerTransition.Reopened, breaker.OnFailure());

        time.Advance(TimeSpan.FromSeconds(5));
        Assert.True(breaker.TryAcquire());

        // A trial whose caller never reports is replaced after another open period.
        time.Advance(TimeSpan.FromSeconds(5));
        Assert.True(breaker.TryAcquire());
        Assert.Equal(BreakerTransition.Closed, breaker.OnSuccess());
        Assert.Equal(BreakerState.Closed, breaker.State);
        Assert.True(breaker.TryAcquire());
        Assert.Equal(2, breaker.Opened);
    }

    [Fact]
    public void WriteBudget_BytesOlderThanTtl_LeaveTheAccount()
    {
        var time = new FakeTimeProvider();
        var budget = new WriteBudget(TimeSpan.FromMinutes(10), time);
        budget.Add(1000);
        time.Advance(TimeSpan.FromMinutes(5));
        budget.Add(500);
        Assert.Equal((1500L, 2L), budget.Read());
        time.Advance(TimeSpan.FromMinutes(5.1));
        Assert.Equal((500L, 1L), budget.Read());
        time.Advance(TimeSpan.FromMinutes(5));
        Assert.Equal((0L, 0L), budget.Read());
        budget.Add(7);
        budget.Reset();
        Assert.Equal((0L, 0L), budget.Read());
    }

    [Fact]
    public void LogGate_ManyLinesInOneInterval_LetsOneThroughAndCountsTheRest()
    {
        var time = new FakeTimeProvider();
        var gate = new LogGate(TimeSpan.FromSeconds(10), time);
        Assert.True(gate.TryEnter(out long suppressed));
        Assert.Equal(0, suppressed);
        for (int i = 0; i < 5; i++)
        {
            Assert.False(gate.TryEnter(out _));
        }

        time.Advance(TimeSpan.FromSeconds(10));
        Assert.True(gate.TryEnter(out suppressed));
        Assert.Equal(5, suppressed);
    }
}
