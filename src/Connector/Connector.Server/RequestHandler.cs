using System.Buffers;
using System.Reflection;
using System.Text;
using Connector.Core.Caching;
using Connector.Core.Memory;
using Connector.Core.Platform;
using Connector.Protocol;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Microsoft.Extensions.Logging;

namespace Connector.Server;

/// <summary>A decoded STORE or LOAD waiting for a copy thread.</summary>
/// <param name="Opcode">STORE or LOAD.</param>
/// <param name="Registration">The connection's registration.</param>
/// <param name="RequestId">The engine's request id.</param>
/// <param name="CacheSalt">The tenant salt.</param>
/// <param name="Tokens">The request's tokens, u32le.</param>
/// <param name="FirstChunk">The first chunk named.</param>
/// <param name="NumChunks">The chunks named.</param>
/// <param name="BlockIds">The engine block ids, i32le.</param>
/// <param name="Deadline">When the copy must stop (the engine's deadline, capped by Sidecar:DefaultCopyTimeout).</param>
/// <param name="Chain">A STORE's sealed chain state to resume the key chain from, or null.</param>
internal sealed record CopyJob(Opcode Opcode, EngineRegistration Registration, string RequestId, string? CacheSalt, byte[] Tokens, int FirstChunk, int NumChunks, byte[] BlockIds, CopyDeadline Deadline, byte[]? Chain = null)
{
    /// <summary>Bytes the copy moves at most (chunks times chunk bytes), for the connection's in-flight budget.</summary>
    public long Bytes => Math.Max(0, NumChunks) * Registration.Geometry.ChunkBytes;
}

/// <summary>Turns one connection's decoded requests into calls on the cache and builds the replies.</summary>
/// <remarks>
/// Holds the connection's HELLO state, its peer's identity (from the kernel, never from the client) and its
/// registration. Not thread-safe except <see cref="RunCopy"/>. Dispose leaves the instance claim.
/// </remarks>
internal sealed class RequestHandler(long sessionId, ProcessIdentity peer, KvCacheService cache, InstanceClaims claims, ServerCounters counters, SidecarOptions options, ILogger logger) : IDisposable
{
    private static readonly string ServerVersion = typeof(RequestHandler).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "0";
    private EngineRegistration? _registration;

    public bool IsReady { get; private set; }

    public string InstanceId { get; private set; } = string.Empty;

    public string Role { get; private set; } = "unknown";

    public int Rank { get; private set; }

    /// <summary>The connecting process, as the kernel reported it.</summary>
    public ProcessIdentity Peer => peer;

    /// <summary>The connection's registration, if any.</summary>
    public EngineRegistration? Registration => _registration;

    public static bool IsCopy(Opcode opcode) => opcode is Opcode.Store or Opcode.Load;

    /// <summary>Maps an exception to the error reply it deserves; false for bugs.</summary>
    public static bool TryMapError(Exception ex, out ErrorCode code, out string message)
    {
        message = ex.Message;
        switch (ex)
        {
            case ProtocolException p:
                code = p.Code;
                return true;
            case CacheException c:
                code = c.Code switch
                {
                    CacheError.BadRequest => ErrorCode.BadRequest,
                    CacheError.OutOfRange => ErrorCode.OutOfRange,
                    CacheError.BadLayout => ErrorCode.BadLayout,
                    CacheError.MemoryAccessDenied => ErrorCode.MemoryAccessDenied,
                    CacheError.MemoryFault => ErrorCode.MemoryFault,
                    CacheError.NotRegistered => ErrorCode.NotReady,
                    CacheError.Unsupported => ErrorCode.Unsupported,
                    CacheError.UnknownLease => ErrorCode.UnknownLease,
                    CacheError.PermissionDenied => ErrorCode.PermissionDenied,
                    CacheError.LimitExceeded => ErrorCode.LimitExceeded,
                    _ => ErrorCode.Internal,
                };
                return true;
            default:
                code = ErrorCode.Internal;
                return false;
        }
    }

    /// <summary>Handles every request except the copies.</summary>
    /// <returns>The reply message.</returns>
    public object Handle(Opcode opcode, in ReadOnlySequence<byte> body)
    {
        if (opcode is not (Opcode.Hello or Opcode.Ping) && !IsReady && Enum.IsDefined(opcode))
        {
            throw new ProtocolException(ErrorCode.NotReady, $"{opcode} before HELLO; send HELLO first.");
        }

        return opcode switch
        {
            Opcode.Hello => Hello(ProtocolSerializer.Deserialize<HelloRequest>(body)),
            Opcode.Ping => body.IsEmpty ? new PingMessage() : ProtocolSerializer.Deserialize<PingMessage>(body),
            Opcode.Register => Register(ProtocolSerializer.Deserialize<RegisterRequest>(body)),
            Opcode.Lookup => Lookup(ProtocolSerializer.Deserialize<LookupRequest>(body)),
            Opcode.Release => Release(ProtocolSerializer.Deserialize<ReleaseRequest>(body)),
            Opcode.Clear => Clear(),
            Opcode.Stats => Stats(),
            Opcode.Store or Opcode.Load => throw new ProtocolException(ErrorCode.NotReady, $"{opcode} before HELLO; send HELLO first."),
            _ => throw new ProtocolException(ErrorCode.UnknownOpcode, $"opcode {(ushort)opcode} is not known to this sidecar (protocol version {FrameHeader.CurrentVersion})."),
        };
    }

    /// <summary>Decodes a STORE or LOAD and checks it can run.</summary>
    /// <param name="opcode">STORE or LOAD.</param>
    /// <param name="body">The frame body.</param>
    /// <param name="cancellation">Cancelled when the connection closes: the copy stops.</param>
    public CopyJob PrepareCopy(Opcode opcode, in ReadOnlySequence<byte> body, CancellationToken cancellation)
    {
        long arrived = MonotonicClock.NowNs;
        EngineRegistration registration = _registration ?? throw new CacheException(CacheError.NotRegistered, $"{opcode} before REGISTER; register the KV memory first.");
        byte[]? tokens, keys, blockIds;
        string? requestId, salt;
        int first, count;
        long deadline;
        byte[]? chain = null;
        if (opcode == Opcode.Store)
        {
            StoreRequest s = ProtocolSerializer.Deserialize<StoreRequest>(body);
            (requestId, salt, tokens, keys, first, count, blockIds, chain) = (s.RequestId, s.CacheSalt, s.Tokens, s.Keys, s.FirstChunk, s.NumChunks, s.BlockIds, s.Chain);
            deadline = s.DeadlineNs != 0 ? (long)Math.Min(s.DeadlineNs, long.MaxValue) : LegacyStoreDeadline(arrived, s.DeadlineMs);
        }
        else
        {
            LoadRequest l = ProtocolSerializer.Deserialize<LoadRequest>(body);
            (requestId, salt, tokens, keys, first, count, blockIds) = (l.RequestId, l.CacheSalt, l.Tokens, l.Keys, l.FirstChunk, l.NumChunks, l.BlockIds);
            deadline = l.DeadlineNs != 0 ? (long)Math.Min(l.DeadlineNs, long.MaxValue) : long.MaxValue;
        }

        if (keys is not null)
        {
            throw new ProtocolException(ErrorCode.BadRequest, "chunk keys are derived by the sidecar from the namespace, cache_salt and tokens; send tokens and leave keys nil.");
        }

        if (tokens is null)
        {
            throw new ProtocolException(ErrorCode.BadRequest, $"{opcode} needs the request's tokens.");
        }

        // Every copy ends: the engine's deadline, but never later than the configured bound from now.
        long cap = arrived + (long)options.DefaultCopyTimeout.TotalNanoseconds;
        return new CopyJob(opcode, registration, requestId ?? string.Empty, salt, tokens, first, count, blockIds ?? [], new CopyDeadline(Math.Min(deadline, cap), cancellation), chain);
    }

    /// <summary>Runs a copy; safe to call from any thread. Host copies are done when it returns; GPU copies complete later.</summary>
    public ValueTask<object> RunCopyAsync(CopyJob job)
    {
        ChunkSource source = ChunkSource.FromTokens(WireArrays.AsTokens(job.Tokens));
        ReadOnlySpan<int> blocks = WireArrays.AsBlockIds(job.BlockIds);
        if (job.Opcode == Opcode.Store)
        {
            ValueTask<StoreResult> store = cache.StoreAsync(job.Registration, job.RequestId, job.CacheSalt, source, job.FirstChunk, job.NumChunks, blocks, job.Deadline, job.Chain);
            return store.IsCompletedSuccessfully ? new ValueTask<object>(ToReply(store.Result)) : AwaitStoreAsync(store);
        }

        ValueTask<int> load = cache.LoadAsync(job.Registration, job.RequestId, job.CacheSalt, source, job.FirstChunk, job.NumChunks, blocks, job.Deadline);
        return load.IsCompletedSuccessfully ? new ValueTask<object>(new LoadReply { LoadedChunks = load.Result }) : AwaitLoadAsync(load);
    }

    /// <summary>Runs a copy and waits for it (tests and tools).</summary>
    public object RunCopy(CopyJob job)
    {
        ValueTask<object> pending = RunCopyAsync(job);
        return pending.IsCompleted ? pending.Result : pending.AsTask().GetAwaiter().GetResult();
    }

    private static StoreReply ToReply(StoreResult r) => new() { Stored = r.Stored, AlreadyPresent = r.AlreadyPresent, Failed = r.Failed, Chain = r.Chain };

    private static async ValueTask<object> AwaitStoreAsync(ValueTask<StoreResult> store) => ToReply(await store.ConfigureAwait(false));

    private static async ValueTask<object> AwaitLoadAsync(ValueTask<int> load) => new LoadReply { LoadedChunks = await load.ConfigureAwait(false) };

    /// <summary>Leaves the instance claim (the cache ends the registration and leases when the session closes).</summary>
    public void Dispose()
    {
        if (IsReady && InstanceId.Length > 0)
        {
            claims.Leave(InstanceId);
        }
    }

    /// <summary>
    /// The deadline of a STORE from a client that sends only the relative <c>deadline_ms</c>: the time it waits
    /// minus a margin of a tenth (at least 50 ms) for the time the request spent in transit before it arrived.
    /// </summary>
    private static long LegacyStoreDeadline(long arrivedNs, uint deadlineMs)
    {
        if (deadlineMs == 0)
        {
            return long.MaxValue;
        }

        double ms = Math.Max(0, deadlineMs - Math.Max(50.0, deadlineMs / 10.0));
        return arrivedNs + (long)(ms * 1_000_000);
    }

    private HelloReply Hello(HelloRequest hello)
    {
        if (hello.ProtocolVersion != FrameHeader.CurrentVersion)
        {
            throw new ProtocolException(ErrorCode.UnsupportedVersion, $"protocol version {hello.ProtocolVersion} is not supported; this sidecar speaks version {FrameHeader.CurrentVersion}.");
        }

        if (IsReady)
        {
            throw new ProtocolException(ErrorCode.BadRequest, "HELLO was already done on this connection; open a new connection to speak for another instance.");
        }

        string instance = hello.InstanceId ?? string.Empty;
        int maxId = cache.Limits.MaxIdBytes;
        if (Encoding.UTF8.GetByteCount(instance) > maxId || Encoding.UTF8.GetByteCount(hello.Role ?? string.Empty) > maxId)
        {
            throw new ProtocolException(ErrorCode.LimitExceeded, $"an instance id or role longer than Sidecar:MaxIdBytes ({maxId}) bytes.");
        }

        if (instance.Length > 0 && !claims.TryJoin(instance, peer.Uid, out uint owner))
        {
            throw new ProtocolException(ErrorCode.PermissionDenied, $"instance '{instance}' belongs to uid {owner} while it is connected; uid {peer.Uid} cannot speak for it. Use another engine_id.");
        }

        InstanceId = instance;
        Role = hello.Role ?? "client";
        Rank = hello.Rank;
        IsReady = true;
        return new HelloReply
        {
            ProtocolVersion = FrameHeader.CurrentVersion,
            ServerVersion = ServerVersion,
            Capabilities = [.. cache.MemoryKinds.Order().Select(k => k == EngineMemoryKind.CudaIpc ? "cuda-ipc" : "host-memory")],
            MaxFrameBytes = options.MaxFrameBytes,
            SessionId = (ulong)sessionId,
            ServerPid = Environment.ProcessId,
        };
    }

    private RegisterReply Register(RegisterRequest request)
    {
        NamespaceDescriptor ns = request.Namespace ?? throw new ProtocolException(ErrorCode.BadRequest, "REGISTER without a namespace.");
        LayerDescriptor[] layers = request.Layers ?? throw new ProtocolException(ErrorCode.BadRequest, "REGISTER without layers.");
        var specs = new List<LayerSpec>(layers.Length);
        foreach (LayerDescriptor? layer in layers)
        {
            if (layer is null)
            {
                throw new ProtocolException(ErrorCode.BadRequest, $"REGISTER layer {specs.Count} is nil.");
            }

            MemoryRefDescriptor m = layer.Memory ?? throw new ProtocolException(ErrorCode.BadRequest, $"layer '{layer.Name}' has no memory reference.");
            LayoutDescriptor l = layer.Layout ?? throw new ProtocolException(ErrorCode.BadRequest, $"layer '{layer.Name}' has no layout.");
            if (!Enum.IsDefined((EngineMemoryKind)m.Kind))
            {
                throw new ProtocolException(ErrorCode.BadRequest, $"layer '{layer.Name}': unknown memory kind {m.Kind}.");
            }

            specs.Add(new LayerSpec(
                layer.Name ?? string.Empty,
                new EngineMemoryRef((EngineMemoryKind)m.Kind, m.Pid, m.Address, m.Length, m.IpcHandle, m.DeviceUuid, m.Offset),
                new KvLayout(l.ElementSize, l.NumBlocks, l.BlockTokens, l.NumHeads, l.RowBytes, l.StrideBlock, l.StrideToken, l.StrideHead, l.KOffset, l.VOffset)));
        }

        var nsSpec = new NamespaceSpec(ns.ModelId ?? string.Empty, ns.KvDtype ?? string.Empty, ns.BlockTokens, ns.ChunkTokens, ns.TpSize, ns.TpRank, ns.KvGroup, ns.FormatVersion);
        if (request.StoreEvent is not null && request.StoreEvent.Length != 64)
        {
            throw new ProtocolException(ErrorCode.BadRequest, $"store_event must be a 64-byte CUDA IPC event handle, not {request.StoreEvent.Length} bytes.");
        }

        EngineSignals? signals = request.StoreEvent is null ? null : new EngineSignals(request.StoreEvent);
        EngineRegistration registration = cache.Register(sessionId, InstanceId, nsSpec, specs, peer, signals);
        if (_registration is not null)
        {
            cache.Unregister(_registration);
        }

        _registration = registration;
        SidecarLog.Registered(logger, sessionId, InstanceId, ns.TpRank, layers.Length, nsSpec.ModelId, registration.Geometry.ChunkBytes, registration.Geometry.Fingerprint, peer.Pid, peer.Uid);
        return new RegisterReply
        {
            RegistrationId = (ulong)registration.Id,
            LayoutFingerprint = registration.Geometry.Fingerprint,
            ChunkBytes = (ulong)registration.Geometry.ChunkBytes,
            BlocksPerChunk = registration.BlocksPerChunk,
        };
    }

    private LookupReply Lookup(LookupRequest request)
    {
        LookupResult r = cache.Lookup(sessionId, InstanceId, request.RequestId ?? string.Empty, request.CacheSalt, WireArrays.AsTokens(request.Tokens), request.Lease);
        return new LookupReply { HitTokens = r.HitTokens, HitChunks = r.HitChunks, LeaseId = r.LeaseId, State = (LookupState)(int)r.State };
    }

    private ReleaseReply Release(ReleaseRequest request)
    {
        int released = request.LeaseId != 0
            ? cache.Release(request.LeaseId, InstanceId)
            : cache.Release(InstanceId, request.RequestId ?? throw new ProtocolException(ErrorCode.BadRequest, "RELEASE needs a lease id or a request id."));
        return new ReleaseReply { ReleasedChunks = released };
    }

    private ClearReply Clear()
    {
        if (!peer.IsAdministrator)
        {
            throw new ProtocolException(ErrorCode.PermissionDenied, $"CLEAR removes every tenant's cache: only root or the sidecar's own user may send it (this is uid {peer.Uid}).");
        }

        return new ClearReply { RemovedChunks = cache.Clear() };
    }

    private StatsReply Stats()
    {
        CacheStats s = cache.GetStats();
        return new StatsReply
        {
            CapacityBytes = (ulong)s.CapacityBytes,
            UsedBytes = (ulong)s.UsedBytes,
            Chunks = (ulong)s.Chunks,
            Hits = (ulong)s.Hits,
            Misses = (ulong)s.Misses,
            Evictions = (ulong)s.Evictions,
            StoredChunks = (ulong)s.StoredChunks,
            LoadedChunks = (ulong)s.LoadedChunks,
            StoredBytes = (ulong)s.StoredBytes,
            LoadedBytes = (ulong)s.LoadedBytes,
            ActiveLeases = (ulong)s.ActiveLeases,
            ProtocolErrors = (ulong)counters.ProtocolErrors,
            CopyErrors = (ulong)s.CopyErrors,
            Connections = (ulong)counters.Connections,
            Registrations = (ulong)s.Registrations,
            LateStores = (ulong)s.LateStores,
            LateLoads = (ulong)s.LateLoads,
            PermissionDenied = (ulong)counters.PermissionDenied,
            LimitsExceeded = (ulong)counters.LimitsExceeded,
            DroppedConnections = (ulong)counters.DroppedConnections,
            GpuHandleOpens = (ulong)s.DataPlane.HandleOpens,
            GpuMappings = (ulong)s.DataPlane.Mappings,
            PinnedBytes = (ulong)s.DataPlane.PinnedBytes,
            PinFailures = (ulong)s.DataPlane.PinFailures,
            Tiers = cache.Tiers?.GetStats().Select(ToMessage).ToArray(),
        };
    }

    private static TierStatsMessage ToMessage(Core.Storage.Tiers.TierChainStats t) => new()
    {
        Name = t.Tier.Name,
        Policy = t.Policy == Core.Storage.Tiers.TierWritePolicy.WriteThrough ? "write-through" : "write-back",
        CapacityBytes = (ulong)Math.Max(0, t.Tier.CapacityBytes),
        UsedBytes = (ulong)Math.Max(0, t.Tier.UsedBytes),
        Chunks = (ulong)Math.Max(0, t.Tier.Chunks),
        Hits = (ulong)t.Tier.Hits,
        Misses = (ulong)t.Tier.Misses,
        BytesRead = (ulong)t.Tier.BytesRead,
        BytesWritten = (ulong)t.Tier.BytesWritten,
        Writes = (ulong)t.Tier.Writes,
        Drops = (ulong)t.Tier.Drops,
        NotAdmitted = (ulong)t.Tier.NotAdmitted,
        Evictions = (ulong)t.Tier.Evictions,
        Corrupt = (ulong)t.Tier.Corrupt,
        Errors = (ulong)t.Tier.Errors,
        QueueDepth = (ulong)Math.Max(0, t.Tier.QueueDepth),
        WriteThroughOffers = (ulong)t.WriteThroughOffers,
        Demotions = (ulong)t.Demotions,
        Promotions = (ulong)t.Promotions,
        PromotionFailures = (ulong)t.PromotionFailures,
    };
}
