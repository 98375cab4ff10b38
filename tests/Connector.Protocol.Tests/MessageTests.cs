using System.Buffers;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using MessagePack;
using Xunit;

namespace Connector.Protocol.Tests;

public sealed class MessageTests
{
    public static TheoryData<string> MessageNames => new(SampleFrames.All().Where(f => f.Message is not null).Select(f => f.Name));

    [Theory]
    [MemberData(nameof(MessageNames))]
    public void Serialize_ThenDeserialize_SameFields(string name)
    {
        object message = SampleFrames.All().Single(f => f.Name == name).Message!;
        var buffer = new ArrayBufferWriter<byte>();
        ProtocolSerializer.Serialize(buffer, message);
        object back = MessagePackSerializer.Deserialize(message.GetType(), buffer.WrittenMemory, ProtocolSerializer.Options)!;
        var again = new ArrayBufferWriter<byte>();
        ProtocolSerializer.Serialize(again, back);
        Assert.Equal(buffer.WrittenSpan.ToArray(), again.WrittenSpan.ToArray());
    }

    [Fact]
    public void Deserialize_MissingTrailingFields_Defaults()
    {
        // A LookupRequest from an older client that knows only request_id and cache_salt.
        byte[] body = MessagePackSerializer.Serialize(new object?[] { "r1", null });
        LookupRequest r = ProtocolSerializer.Deserialize<LookupRequest>(new ReadOnlySequence<byte>(body));
        Assert.Equal("r1", r.RequestId);
        Assert.Null(r.Tokens);
        Assert.False(r.Lease);
    }

    [Fact]
    public void Deserialize_ExtraTrailingFields_Ignored()
    {
        byte[] body = MessagePackSerializer.Serialize(new object?[] { 7, "future field", new[] { 1, 2 } });
        LoadReply r = ProtocolSerializer.Deserialize<LoadReply>(new ReadOnlySequence<byte>(body));
        Assert.Equal(7, r.LoadedChunks);
    }

    [Theory]
    [InlineData(new byte[] { 0xc1 })]
    [InlineData(new byte[] { 0x93, 0x01 })]
    [InlineData(new byte[] { 0x94, 0xa3, 0x61, 0x62 })]
    [InlineData(new byte[] { 0x91, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff })]
    [InlineData(new byte[] { 0xc0 })]
    [InlineData(new byte[] { 0x92, 0xa1, 0x78, 0x81, 0x01, 0x02 })]
    public void Deserialize_Garbage_ProtocolExceptionBadRequest(byte[] body)
    {
        var ex = Assert.Throws<ProtocolException>(() => ProtocolSerializer.Deserialize<LookupReply>(new ReadOnlySequence<byte>(body)));
        Assert.Equal(ErrorCode.BadRequest, ex.Code);
    }

    [Fact]
    public void Deserialize_DeeplyNestedBody_RejectedNotStackOverflow()
    {
        byte[] body = Enumerable.Repeat((byte)0x91, 100_000).Append((byte)0x01).ToArray();
        var ex = Assert.Throws<ProtocolException>(() => ProtocolSerializer.Deserialize<RegisterRequest>(new ReadOnlySequence<byte>(body)));
        Assert.Equal(ErrorCode.BadRequest, ex.Code);
    }

    [Fact]
    public void WireArrays_RoundTripAndRejectRaggedLength()
    {
        uint[] tokens = [0, 1, 128000, uint.MaxValue];
        Assert.Equal(tokens, WireArrays.AsTokens(WireArrays.FromTokens(tokens)).ToArray());
        int[] blocks = [-1, 0, 7, int.MaxValue];
        Assert.Equal(blocks, WireArrays.AsBlockIds(WireArrays.FromBlockIds(blocks)).ToArray());
        Assert.Equal(ErrorCode.BadRequest, Assert.Throws<ProtocolException>(() => WireArrays.AsTokens([1, 2, 3])).Code);
        Assert.True(WireArrays.AsTokens(null).IsEmpty);
    }
}
