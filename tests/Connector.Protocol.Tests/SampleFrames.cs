using System.Buffers;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;

namespace Connector.Protocol.Tests;

/// <summary>
/// The C# side of tests/golden/frames.json: the same frames, in the same order, with every field set by
/// property name. GoldenFrameTests checks that these encode to exactly the golden bytes (built from the
/// spec by tests/golden/make_frames.py) and that the golden bytes decode to them.
/// </summary>
internal static class SampleFrames
{
    public static IEnumerable<(string Name, Opcode Opcode, FrameFlags Flags, ulong RequestId, object? Message)> All()
    {
        yield return ("hello", Opcode.Hello, FrameFlags.None, 1, new HelloRequest { ProtocolVersion = 1, EngineKind = "vllm", EngineVersion = "0.29.0", InstanceId = "engine-7f3a", Role = "worker", Rank = 1, Capabilities = ["host-memory"], Pid = 4242 });
        yield return ("hello_reply", Opcode.Hello, FrameFlags.Reply, 1, new HelloReply { ProtocolVersion = 1, ServerVersion = "1.0.0", Capabilities = ["host-memory"], MaxFrameBytes = 64 << 20, SessionId = 9, ServerPid = 77 });
        yield return ("ping", Opcode.Ping, FrameFlags.None, 2, new PingMessage { Nonce = 0xDEADBEEF });
        yield return ("ping_empty", Opcode.Ping, FrameFlags.None, 3, null);
        yield return ("register", Opcode.Register, FrameFlags.None, 4, new RegisterRequest
        {
            Namespace = new NamespaceDescriptor { ModelId = "meta-llama/Meta-Llama-3-8B", KvDtype = "bfloat16", BlockTokens = 16, ChunkTokens = 256, TpSize = 2, TpRank = 1, KvGroup = 0, FormatVersion = 1 },
            Layers =
            [
                new LayerDescriptor
                {
                    Name = "model.layers.0.self_attn.attn",
                    Memory = new MemoryRefDescriptor { Kind = 1, Pid = 4242, Address = 0x7f0000001000, Length = 1 << 30 },
                    Layout = new LayoutDescriptor { ElementSize = 2, NumBlocks = 2048, BlockTokens = 16, NumHeads = 8, RowBytes = 256, StrideBlock = 65536, StrideToken = 2048, StrideHead = 256, KOffset = 0, VOffset = 32768 },
                },
            ],
        });
        yield return ("register_cuda", Opcode.Register, FrameFlags.None, 15, new RegisterRequest
        {
            Namespace = new NamespaceDescriptor { ModelId = "m", KvDtype = "bfloat16", BlockTokens = 16, ChunkTokens = 256, TpSize = 1, TpRank = 0, KvGroup = 0, FormatVersion = 1 },
            Layers =
            [
                new LayerDescriptor
                {
                    Name = "l0",
                    Memory = new MemoryRefDescriptor { Kind = 2, Pid = 0, Address = 0, Length = 1UL << 33, IpcHandle = Enumerable.Range(0, 64).Select(i => (byte)i).ToArray(), DeviceUuid = "GPU-facecda0-0000-0000-0000-000000000000", Offset = 1 << 21 },
                    Layout = new LayoutDescriptor { ElementSize = 2, NumBlocks = 4096, BlockTokens = 16, NumHeads = 8, RowBytes = 256, StrideBlock = 65536, StrideToken = 2048, StrideHead = 256, KOffset = 0, VOffset = 1L << 32 },
                },
            ],
            StoreEvent = Enumerable.Range(64, 64).Select(i => (byte)i).ToArray(),
        });
        yield return ("register_reply", Opcode.Register, FrameFlags.Reply, 4, new RegisterReply { RegistrationId = 3, LayoutFingerprint = "0123456789abcdef0123456789abcdef", ChunkBytes = 33554432, BlocksPerChunk = 16 });
        yield return ("lookup", Opcode.Lookup, FrameFlags.None, 5, new LookupRequest { RequestId = "cmpl-1", CacheSalt = "tenant-a", Tokens = WireArrays.FromTokens([1, 2, 3, 128000, uint.MaxValue]), Lease = true });
        yield return ("lookup_reply", Opcode.Lookup, FrameFlags.Reply, 5, new LookupReply { HitTokens = 512, HitChunks = 2, LeaseId = 17, State = LookupState.Ready });
        yield return ("store", Opcode.Store, FrameFlags.None, 6, new StoreRequest { RequestId = "cmpl-1", CacheSalt = null, Tokens = WireArrays.FromTokens([5, 6, 7, 8]), Keys = null, FirstChunk = 1, NumChunks = 1, BlockIds = WireArrays.FromBlockIds([10, 11, 12, 13]), DeadlineMs = 10000, DeadlineNs = 0 });
        yield return ("store_deadline_ns", Opcode.Store, FrameFlags.None, 12, new StoreRequest { RequestId = "cmpl-2", CacheSalt = "t\u00e9nant-\u4e2d", Tokens = WireArrays.FromTokens([100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111]), Keys = null, FirstChunk = 1, NumChunks = 2, BlockIds = WireArrays.FromBlockIds([20, 21, 22, 23, 24, 25, 26, 27]), DeadlineMs = 250, DeadlineNs = 987_654_321_012_345 });
        yield return ("store_chain", Opcode.Store, FrameFlags.None, 14, new StoreRequest { RequestId = "cmpl-3", CacheSalt = null, Tokens = WireArrays.FromTokens([200, 201, 202, 203]), Keys = null, FirstChunk = 3, NumChunks = 1, BlockIds = WireArrays.FromBlockIds([30, 31, 32, 33]), DeadlineMs = 0, DeadlineNs = 5_000_000_000, Chain = Enumerable.Range(0, 68).Select(i => (byte)i).ToArray() });
        yield return ("store_reply", Opcode.Store, FrameFlags.Reply, 6, new StoreReply { Stored = 1, AlreadyPresent = 0, Failed = 0 });
        yield return ("store_reply_chain", Opcode.Store, FrameFlags.Reply, 14, new StoreReply { Stored = 1, AlreadyPresent = 0, Failed = 0, Chain = Enumerable.Range(68, 68).Select(i => (byte)i).ToArray() });
        yield return ("load", Opcode.Load, FrameFlags.None, 7, new LoadRequest { RequestId = "cmpl-1", CacheSalt = "tenant-a", Tokens = null, Keys = new byte[32], FirstChunk = 0, NumChunks = 1, BlockIds = WireArrays.FromBlockIds([-1, -1, 4, 5]), LeaseId = 17, DeadlineNs = 0 });
        yield return ("load_deadline_ns", Opcode.Load, FrameFlags.None, 13, new LoadRequest { RequestId = "cmpl-2", CacheSalt = null, Tokens = WireArrays.FromTokens([7, 0, 65535, 65536, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 42]), Keys = null, FirstChunk = 0, NumChunks = 2, BlockIds = WireArrays.FromBlockIds([-1, 3, int.MinValue, int.MaxValue]), LeaseId = 0, DeadlineNs = 1UL << 32 });
        yield return ("load_reply", Opcode.Load, FrameFlags.Reply, 7, new LoadReply { LoadedChunks = 1 });
        yield return ("release", Opcode.Release, FrameFlags.None, 8, new ReleaseRequest { LeaseId = 0, RequestId = "cmpl-1" });
        yield return ("release_reply", Opcode.Release, FrameFlags.Reply, 8, new ReleaseReply { ReleasedChunks = 2 });
        yield return ("clear", Opcode.Clear, FrameFlags.None, 9, null);
        yield return ("clear_reply", Opcode.Clear, FrameFlags.Reply, 9, new ClearReply { RemovedChunks = 3 });
        yield return ("stats", Opcode.Stats, FrameFlags.None, 10, null);
        yield return ("stats_reply", Opcode.Stats, FrameFlags.Reply, 10, new StatsReply { CapacityBytes = 1UL << 32, UsedBytes = 1 << 25, Chunks = 1, Hits = 2, Misses = 3, Evictions = 4, StoredChunks = 5, LoadedChunks = 6, StoredBytes = 7, LoadedBytes = 8, ActiveLeases = 9, ProtocolErrors = 10, CopyErrors = 11, Connections = 12, Registrations = 13, LateStores = 14, LateLoads = 0, PermissionDenied = 0, LimitsExceeded = 0, DroppedConnections = 0 });
        yield return ("stats_reply_all_fields", Opcode.Stats, FrameFlags.Reply, 14, new StatsReply { CapacityBytes = 1UL << 40, UsedBytes = uint.MaxValue, Chunks = 1 << 16, Hits = ushort.MaxValue, Misses = 256, Evictions = 255, StoredChunks = 128, LoadedChunks = 127, StoredBytes = 1UL << 32, LoadedBytes = ulong.MaxValue, ActiveLeases = 10, ProtocolErrors = 11, CopyErrors = 12, Connections = 13, Registrations = 14, LateStores = 15, LateLoads = 16, PermissionDenied = 17, LimitsExceeded = 18, DroppedConnections = 19, GpuHandleOpens = 20, GpuMappings = 21, PinnedBytes = 1UL << 33, PinFailures = 23, Tiers = [new TierStatsMessage { Name = "disk", Policy = "write-back", CapacityBytes = 1UL << 40, UsedBytes = 1UL << 33, Chunks = 300, Hits = 1, Misses = 2, BytesRead = 3, BytesWritten = 4, Writes = 5, Drops = 6, NotAdmitted = 7, Evictions = 8, Corrupt = 9, Errors = 10, QueueDepth = 11, WriteThroughOffers = 12, Demotions = 13, Promotions = 14, PromotionFailures = ulong.MaxValue }] });
        yield return ("error", Opcode.Load, FrameFlags.Reply | FrameFlags.Error, 11, new ErrorBody { Code = (int)ErrorCode.OutOfRange, Message = "block id 4096 is outside [0, 2048)" });
        yield return ("error_permission_denied", Opcode.Register, FrameFlags.Reply | FrameFlags.Error, 0, new ErrorBody { Code = (int)ErrorCode.PermissionDenied, Message = "pid 4243 is not the caller" });
        yield return ("error_limit_exceeded", Opcode.Lookup, FrameFlags.Reply | FrameFlags.Error, 0xFEDCBA9876543210, new ErrorBody { Code = (int)ErrorCode.LimitExceeded, Message = "200000 tokens is above Limits:MaxTokens (131072)" });
    }

    public static byte[] Encode(Opcode opcode, FrameFlags flags, ulong requestId, object? message)
    {
        var buffer = new ArrayBufferWriter<byte>();
        new FrameWriter().Write(buffer, opcode, flags, requestId, message);
        return buffer.WrittenSpan.ToArray();
    }
}
