using System.Buffers;
using Connector.Core.Caching;
using Connector.Core.Memory;
using Connector.Core.Platform;
using Connector.Core.Storage;
using Connector.Protocol;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Connector.Testing;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Time.Testing;

namespace Connector.Server.Tests;

/// <summary>
/// A cache, its claims and counters, and request handlers for simulated peers: the handler is driven with
/// real MessagePack bodies, without a socket. Memory registered is an <see cref="InProcessPool"/> of this process.
/// </summary>
internal sealed class HandlerFixture : IDisposable
{
    public const int ChunkTokens = 64;

    private long _nextSession;

    public HandlerFixture(SidecarOptions? options = null)
    {
        Options = options ?? new SidecarOptions { CapacityBytes = 16L << 20, ExtentBytes = 1L << 20 };
        Cache = new KvCacheService(
            new HostMemoryTier(new HostTierOptions { CapacityBytes = Options.CapacityBytes, ExtentBytes = Options.ExtentBytes }, Time),
            [new HostProcessMemoryProvider()],
            Options.ToCacheLimits());
    }

    public FakeTimeProvider Time { get; } = new();

    public SidecarOptions Options { get; }

    public KvCacheService Cache { get; }

    public InstanceClaims Claims { get; } = new();

    public ServerCounters Counters { get; } = new();

    public InProcessPool Pool { get; } = new(layers: 2, blocks: 32);

    /// <summary>This process as the peer: it owns <see cref="Pool"/>.</summary>
    public static ProcessIdentity Self() => ProcessIdentity.Current();

    /// <summary>Another process of another user (its pid and uid are not ours).</summary>
    public static ProcessIdentity Stranger(uint uid = 4242) => new(Environment.ProcessId + 1_000_000, uid, uid, null);

    public RequestHandler Handler(ProcessIdentity peer) => new(Interlocked.Increment(ref _nextSession), peer, Cache, Claims, Counters, Options, NullLogger.Instance);

    /// <summary>A handler that said HELLO for <paramref name="instance"/>.</summary>
    public RequestHandler Hello(ProcessIdentity peer, string instance, string role = "worker")
    {
        RequestHandler h = Handler(peer);
        h.Handle(Opcode.Hello, Body(new HelloRequest { ProtocolVersion = 1, EngineKind = "test", InstanceId = instance, Role = role, Pid = peer.Pid }));
        return h;
    }

    /// <summary>A worker of <paramref name="instance"/> that registered <see cref="Pool"/>.</summary>
    public RequestHandler Worker(string instance = "engine")
    {
        RequestHandler h = Hello(Self(), instance);
        h.Handle(Opcode.Register, Body(Register()));
        return h;
    }

    public RegisterRequest Register(int? pid = null, int chunkTokens = ChunkTokens, int blockTokens = InProcessPool.BlockTokens) => new()
    {
        Namespace = new NamespaceDescriptor { ModelId = "m", KvDtype = "bfloat16", BlockTokens = blockTokens, ChunkTokens = chunkTokens, TpSize = 1, TpRank = 0, FormatVersion = 1 },
        Layers = Pool.Layers(pid: pid).Select(l => new LayerDescriptor
        {
            Name = l.Name,
            Memory = new MemoryRefDescriptor { Kind = 1, Pid = l.Memory.Pid, Address = l.Memory.Address, Length = l.Memory.Length },
            Layout = new LayoutDescriptor
            {
                ElementSize = l.Layout.ElementSize, NumBlocks = l.Layout.NumBlocks, BlockTokens = blockTokens, NumHeads = l.Layout.NumHeads, RowBytes = l.Layout.RowBytes,
                StrideBlock = l.Layout.StrideBlock, StrideToken = l.Layout.StrideToken, StrideHead = l.Layout.StrideHead, KOffset = l.Layout.KOffset, VOffset = l.Layout.VOffset,
            },
        }).ToArray(),
    };

    public static uint[] Tokens(int count, uint seed) => TestPool.Tokens(count, seed);

    public static ReadOnlySequence<byte> Body<T>(T message)
    {
        var writer = new ArrayBufferWriter<byte>();
        ProtocolSerializer.Serialize(writer, message);
        return new ReadOnlySequence<byte>(writer.WrittenMemory);
    }

    public static StoreRequest Store(uint[] tokens, int chunks, int[] blocks, string? salt = null, ulong deadlineNs = 0) => new()
    {
        RequestId = "r", CacheSalt = salt, Tokens = WireArrays.FromTokens(tokens), FirstChunk = 0, NumChunks = chunks, BlockIds = WireArrays.FromBlockIds(blocks), DeadlineNs = deadlineNs,
    };

    public static LoadRequest Load(uint[] tokens, int chunks, int[] blocks, string? salt = null, ulong deadlineNs = 0) => new()
    {
        RequestId = "r", CacheSalt = salt, Tokens = WireArrays.FromTokens(tokens), FirstChunk = 0, NumChunks = chunks, BlockIds = WireArrays.FromBlockIds(blocks), DeadlineNs = deadlineNs,
    };

    /// <summary>Runs a STORE or LOAD the way the connection does: decode, then copy.</summary>
    public static object Copy<T>(RequestHandler h, Opcode opcode, T request) => h.RunCopy(h.PrepareCopy(opcode, Body(request), CancellationToken.None));

    public void Dispose()
    {
        Cache.Dispose();
        Pool.Dispose();
    }
}
