using System.Buffers.Binary;
using Connector.Client;
using Connector.Protocol;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Connector.Testing;
using Xunit;

namespace Connector.Sidecar.Tests;

/// <summary>Malformed and hostile input over the real socket: an error reply or a closed connection, never a dead sidecar or lost data.</summary>
public sealed class BadInputEndToEndTests : IDisposable
{
    private readonly SidecarProcess _sidecar = SidecarProcess.Start();
    private readonly TestEngineProcess _engine = TestPool.StartEngine();

    public void Dispose()
    {
        _engine.Dispose();
        _sidecar.Dispose();
    }

    [Fact]
    public void Load_BlockIdOutOfRange_ErrorReplyAndConnectionStillServes()
    {
        using var w = RegisteredWorker();
        uint[] tokens = TestPool.Tokens(TestPool.ChunkTokens, 1);
        w.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 1, [0, 1, 2, 3]));

        var ex = Assert.Throws<SidecarErrorException>(() => w.Call<LoadReply>(Opcode.Load, TestPool.Load(tokens, 0, 1, [0, 1, 2, TestPool.Blocks])));
        Assert.Equal(ErrorCode.OutOfRange, ex.Code);
        var ex2 = Assert.Throws<SidecarErrorException>(() => w.Call<StoreReply>(Opcode.Store, TestPool.Store(TestPool.Tokens(TestPool.ChunkTokens, 2), 0, 1, [0, 1, -5, 3])));
        Assert.Equal(ErrorCode.OutOfRange, ex2.Code);
        Assert.Equal(1, w.Call<LoadReply>(Opcode.Load, TestPool.Load(tokens, 0, 1, [4, 5, 6, 7])).LoadedChunks);
        Assert.True(w.Call<StatsReply>(Opcode.Stats, null).ProtocolErrors >= 2);
    }

    [Fact]
    public void Register_LayoutOverflowingRegion_BadLayout()
    {
        using var w = _engine.Connect(_sidecar.SocketPath, "e", "worker");
        var tooMany = Assert.Throws<SidecarErrorException>(() => w.Call<RegisterReply>(Opcode.Register, TestPool.Register(_engine, layout: TestPool.Layout(numBlocks: TestPool.Blocks + 1))));
        Assert.Equal(ErrorCode.BadLayout, tooMany.Code);
        var hugeStride = Assert.Throws<SidecarErrorException>(() => w.Call<RegisterReply>(Opcode.Register, TestPool.Register(_engine, layout: TestPool.Layout(strideBlock: long.MaxValue / 2))));
        Assert.Equal(ErrorCode.BadLayout, hugeStride.Code);
        Assert.Equal(TestPool.BlocksPerChunk, w.Call<RegisterReply>(Opcode.Register, TestPool.Register(_engine)).BlocksPerChunk);
    }

    [Fact]
    public async Task UnknownOpcode_ErrorReplyAndConnectionStillServes()
    {
        using var c = SidecarClient.Connect(_sidecar.SocketPath, "e");
        Task<SidecarClient.Reply> reply = c.Expect(77);
        c.SendRaw(Header(opcode: 999, requestId: 77, bodyLength: 0));
        SidecarClient.Reply r = await reply.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(ErrorCode.UnknownOpcode, r.Error!.Value.Code);
        c.Call<PingMessage>(Opcode.Ping, null);
    }

    [Fact]
    public async Task UnknownVersion_ErrorReplyBodySkippedConnectionStillServes()
    {
        using var c = SidecarClient.Connect(_sidecar.SocketPath, "e");
        Task<SidecarClient.Reply> reply = c.Expect(78);
        byte[] frame = [.. Header(opcode: (ushort)Opcode.Ping, requestId: 78, bodyLength: 3, version: 9), 1, 2, 3];
        c.SendRaw(frame);
        SidecarClient.Reply r = await reply.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(ErrorCode.UnsupportedVersion, r.Error!.Value.Code);
        c.Call<PingMessage>(Opcode.Ping, null);
    }

    [Fact]
    public async Task GarbageBody_BadRequestAndConnectionStillServes()
    {
        using var c = SidecarClient.Connect(_sidecar.SocketPath, "e");
        Task<SidecarClient.Reply> reply = c.Expect(79);
        c.SendRaw([.. Header(opcode: (ushort)Opcode.Lookup, requestId: 79, bodyLength: 4), 0xc1, 0xff, 0x00, 0x13]);
        SidecarClient.Reply r = await reply.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(ErrorCode.BadRequest, r.Error!.Value.Code);
        c.Call<PingMessage>(Opcode.Ping, null);
    }

    [Fact]
    public async Task WrongMagic_ConnectionClosedOthersUnaffected()
    {
        using var healthy = RegisteredWorker();
        uint[] tokens = TestPool.Tokens(TestPool.ChunkTokens, 3);
        healthy.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 1, [0, 1, 2, 3]));

        using var bad = SidecarClient.Connect(_sidecar.SocketPath, "x");
        Task<SidecarClient.Reply> closed = bad.Expect(0);
        byte[] frame = Header(opcode: (ushort)Opcode.Ping, requestId: 5, bodyLength: 0);
        frame[0] = (byte)'X';
        bad.SendRaw(frame);
        SidecarClient.Reply r = await closed.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(ErrorCode.BadFrame, r.Error!.Value.Code);
        // The sidecar closed the stream: the next call fails on the read side (IOException) or, when the close
        // is already seen at send time, with a broken pipe (SocketException).
        Exception? afterClose = await Record.ExceptionAsync(() => bad.CallAsync<PingMessage>(Opcode.Ping, null).WaitAsync(TimeSpan.FromSeconds(10)));
        Assert.True(afterClose is IOException or System.Net.Sockets.SocketException, $"expected the connection to be closed, got {afterClose?.GetType().Name ?? "a reply"}");

        Assert.Equal(1, healthy.Call<LoadReply>(Opcode.Load, TestPool.Load(tokens, 0, 1, [8, 9, 10, 11])).LoadedChunks);
    }

    [Fact]
    public async Task HugeLength_FrameTooLargeWithoutBuffering()
    {
        using var c = SidecarClient.Connect(_sidecar.SocketPath, "e");
        Task<SidecarClient.Reply> reply = c.Expect(80);
        c.SendRaw(Header(opcode: (ushort)Opcode.Lookup, requestId: 80, bodyLength: uint.MaxValue));
        SidecarClient.Reply r = await reply.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(ErrorCode.FrameTooLarge, r.Error!.Value.Code);
        using var other = SidecarClient.Connect(_sidecar.SocketPath, "e");
        other.Call<PingMessage>(Opcode.Ping, null);
    }

    [Fact]
    public void RequestBeforeHello_NotReady()
    {
        using var raw = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
        raw.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(_sidecar.SocketPath));
        raw.Send(Header(opcode: (ushort)Opcode.Stats, requestId: 1, bodyLength: 0));
        byte[] header = new byte[FrameHeader.Size];
        int n = 0;
        while (n < header.Length)
        {
            int got = raw.Receive(header.AsSpan(n));
            Assert.NotEqual(0, got);
            n += got;
        }

        Assert.Equal(System.Buffers.OperationStatus.Done, FrameHeader.TryRead(header, out FrameHeader h));
        Assert.True((h.Flags & FrameFlags.Error) != 0);
        byte[] body = new byte[h.BodyLength];
        for (int read = 0; read < body.Length;)
        {
            read += raw.Receive(body.AsSpan(read));
        }

        ErrorBody e = ProtocolSerializer.Deserialize<ErrorBody>(new System.Buffers.ReadOnlySequence<byte>(body));
        Assert.Equal((int)ErrorCode.NotReady, e.Code);
    }

    [Fact]
    public void EngineKilledMidStore_SidecarKeepsServingAndStoredDataIntact()
    {
        using var w = RegisteredWorker();
        _engine.Command("fill 5");
        uint[] keep = TestPool.Tokens(TestPool.ChunkTokens, 10);
        w.Call<StoreReply>(Opcode.Store, TestPool.Store(keep, 0, 1, [0, 1, 2, 3]));
        string before = _engine.Hash(1, 0, 4L * TestPool.BlockBytes);

        using var victim = TestPool.StartEngine();
        using var vw = victim.Connect(_sidecar.SocketPath, "victim", "worker");
        vw.Call<RegisterReply>(Opcode.Register, TestPool.Register(victim));
        victim.Kill();
        var ex = Assert.Throws<SidecarErrorException>(() => vw.Call<StoreReply>(Opcode.Store, TestPool.Store(TestPool.Tokens(TestPool.ChunkTokens, 11), 0, 1, [0, 1, 2, 3])));
        Assert.Equal(ErrorCode.MemoryFault, ex.Code);

        _engine.Command("zero");
        Assert.Equal(1, w.Call<LoadReply>(Opcode.Load, TestPool.Load(keep, 0, 1, [0, 1, 2, 3])).LoadedChunks);
        Assert.Equal(before, _engine.Hash(1, 0, 4L * TestPool.BlockBytes));
    }

    [Fact]
    public void ClientDisconnectsMidStore_SidecarKeepsServing()
    {
        _engine.Command("fill 6");
        for (int i = 0; i < 5; i++)
        {
            var c = RegisteredWorker();
            _ = c.CallAsync<StoreReply>(Opcode.Store, TestPool.Store(TestPool.Tokens(8 * TestPool.ChunkTokens, (uint)(20 + i)), 0, 8, Enumerable.Range(0, 32).ToArray()));
            c.Dispose();
        }

        using var w = RegisteredWorker();
        w.Call<PingMessage>(Opcode.Ping, null);
        uint[] tokens = TestPool.Tokens(TestPool.ChunkTokens, 30);
        Assert.Equal(1, w.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 1, [0, 1, 2, 3])).Stored);
        Assert.False(_sidecar.HasExited);
    }

    private SidecarClient RegisteredWorker()
    {
        var w = _engine.Connect(_sidecar.SocketPath, "e", "worker");
        w.Call<RegisterReply>(Opcode.Register, TestPool.Register(_engine));
        return w;
    }

    private static byte[] Header(ushort opcode, ulong requestId, uint bodyLength, ushort version = 1)
    {
        byte[] h = new byte[FrameHeader.Size];
        "KVSC"u8.CopyTo(h);
        BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(4), version);
        BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(6), opcode);
        BinaryPrimitives.WriteUInt64LittleEndian(h.AsSpan(12), requestId);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(20), bodyLength);
        return h;
    }
}
