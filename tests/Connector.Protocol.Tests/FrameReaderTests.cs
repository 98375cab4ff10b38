using System.Buffers;
using System.Buffers.Binary;
using Connector.Protocol.Framing;
using Xunit;

namespace Connector.Protocol.Tests;

public sealed class FrameReaderTests
{
    public static TheoryData<string> FrameNames => new(SampleFrames.All().Select(f => f.Name));

    private static byte[] Frame(string name)
    {
        var f = SampleFrames.All().Single(x => x.Name == name);
        return SampleFrames.Encode(f.Opcode, f.Flags, f.RequestId, f.Message);
    }

    [Theory]
    [MemberData(nameof(FrameNames))]
    public void TryReadFrame_SplitAtEveryByteBoundary_ReturnsSameFrame(string name)
    {
        byte[] bytes = Frame(name);
        var whole = new ReadOnlySequence<byte>(bytes);
        Assert.Equal(FrameReadResult.Done, FrameReader.TryReadFrame(ref whole, 1 << 20, out FrameHeader expected, out ReadOnlySequence<byte> expectedBody));
        byte[] expectedBodyBytes = expectedBody.ToArray();

        for (int at = 0; at <= bytes.Length; at++)
        {
            ReadOnlySequence<byte> split = SegmentedSequence.SplitAt(bytes, at);
            Assert.Equal(FrameReadResult.Done, FrameReader.TryReadFrame(ref split, 1 << 20, out FrameHeader header, out ReadOnlySequence<byte> body));
            Assert.Equal(expected, header);
            Assert.Equal(expectedBodyBytes, body.ToArray());
            Assert.True(split.IsEmpty);
        }

        ReadOnlySequence<byte> bytewise = SegmentedSequence.OneBytePieces(bytes);
        Assert.Equal(FrameReadResult.Done, FrameReader.TryReadFrame(ref bytewise, 1 << 20, out FrameHeader h1, out ReadOnlySequence<byte> b1));
        Assert.Equal(expected, h1);
        Assert.Equal(expectedBodyBytes, b1.ToArray());
    }

    [Theory]
    [MemberData(nameof(FrameNames))]
    public void TryReadFrame_EveryTruncation_NeedsMoreData(string name)
    {
        byte[] bytes = Frame(name);
        for (int length = 0; length < bytes.Length; length++)
        {
            var partial = new ReadOnlySequence<byte>(bytes, 0, length);
            Assert.Equal(FrameReadResult.NeedMoreData, FrameReader.TryReadFrame(ref partial, 1 << 20, out _, out _));
            Assert.Equal(length, partial.Length);
        }
    }

    [Fact]
    public void TryReadFrame_FramesBackToBack_ReadsEachInOrder()
    {
        byte[][] frames = SampleFrames.All().Select(f => SampleFrames.Encode(f.Opcode, f.Flags, f.RequestId, f.Message)).ToArray();
        ReadOnlySequence<byte> buffer = SegmentedSequence.Of(frames.SelectMany(f => new[] { f[..3], f[3..] }).ToArray());
        var ids = new List<ulong>();
        while (FrameReader.TryReadFrame(ref buffer, 1 << 20, out FrameHeader h, out _) == FrameReadResult.Done)
        {
            ids.Add(h.RequestId);
        }

        Assert.Equal(SampleFrames.All().Select(f => f.RequestId), ids);
        Assert.True(buffer.IsEmpty);
    }

    [Theory]
    [InlineData(0, (byte)'X')]
    [InlineData(3, (byte)'D')]
    [InlineData(10, 1)]
    [InlineData(11, 1)]
    [InlineData(8, 4)]
    [InlineData(9, 0x80)]
    public void TryReadFrame_CorruptHeaderByte_BadFrame(int offset, byte value)
    {
        byte[] bytes = Frame("ping");
        bytes[offset] = value;
        var buffer = new ReadOnlySequence<byte>(bytes);
        Assert.Equal(FrameReadResult.BadFrame, FrameReader.TryReadFrame(ref buffer, 1 << 20, out _, out _));
    }

    [Fact]
    public void TryReadFrame_HugeLengthWithOnlyHeader_TooLargeAtOnce()
    {
        byte[] header = new byte[FrameHeader.Size];
        new FrameHeader(1, Opcode.Lookup, FrameFlags.None, 99, uint.MaxValue).Write(header);
        var buffer = new ReadOnlySequence<byte>(header);
        Assert.Equal(FrameReadResult.TooLarge, FrameReader.TryReadFrame(ref buffer, 64 << 20, out FrameHeader h, out _));
        Assert.Equal(99UL, h.RequestId);
    }

    [Fact]
    public void TryReadFrame_BodyExactlyAtLimit_Accepted()
    {
        byte[] frame = new byte[FrameHeader.Size + 100];
        new FrameHeader(1, Opcode.Ping, FrameFlags.None, 1, 100).Write(frame);
        var buffer = new ReadOnlySequence<byte>(frame);
        Assert.Equal(FrameReadResult.Done, FrameReader.TryReadFrame(ref buffer, 100, out _, out _));
        buffer = new ReadOnlySequence<byte>(frame);
        Assert.Equal(FrameReadResult.TooLarge, FrameReader.TryReadFrame(ref buffer, 99, out _, out _));
    }

    [Fact]
    public void TryReadFrame_OtherVersion_DoneWithVersionVisible()
    {
        byte[] bytes = Frame("ping");
        BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(4), 7);
        var buffer = new ReadOnlySequence<byte>(bytes);
        Assert.Equal(FrameReadResult.Done, FrameReader.TryReadFrame(ref buffer, 1 << 20, out FrameHeader h, out _));
        Assert.Equal(7, h.Version);
        Assert.True(buffer.IsEmpty);
    }

    [Fact]
    public void TryReadFrame_WholeFrameInOneSegment_AllocatesNothing()
    {
        byte[] bytes = Frame("lookup");
        var warm = new ReadOnlySequence<byte>(bytes);
        FrameReader.TryReadFrame(ref warm, 1 << 20, out _, out _);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 10_000; i++)
        {
            var buffer = new ReadOnlySequence<byte>(bytes);
            FrameReader.TryReadFrame(ref buffer, 1 << 20, out _, out _);
        }

        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }

    [Fact]
    public void Header_WriteThenRead_RoundTrips()
    {
        var header = new FrameHeader(1, Opcode.Store, FrameFlags.Reply | FrameFlags.Error, ulong.MaxValue - 3, 123456);
        byte[] bytes = new byte[FrameHeader.Size];
        header.Write(bytes);
        Assert.Equal("KVSC"u8.ToArray(), bytes[..4]);
        Assert.Equal(OperationStatus.Done, FrameHeader.TryRead(bytes, out FrameHeader read));
        Assert.Equal(header, read);
        Assert.Equal(OperationStatus.NeedMoreData, FrameHeader.TryRead(bytes.AsSpan(0, 23), out _));
    }
}
