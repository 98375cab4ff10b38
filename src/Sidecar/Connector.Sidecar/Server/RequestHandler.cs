using System.Buffers;
using System.Reflection;
using Connector.Core.Caching;
using Connector.Core.Memory;
using Connector.Protocol;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Microsoft.Extensions.Logging;

namespace Connector.Sidecar.Server;

/// <summary>A decoded STORE or LOAD waiting for a thread to copy it.</summary>
internal sealed record CopyJob(Opcode Opcode, EngineRegistration Registration, string RequestId, string? CacheSalt, byte[]? Tokens, byte[]? Keys, int FirstChunk, int NumChunks, byte[] BlockIds, uint DeadlineMs = 0)
{
    /// <summary>When the request arrived (Stopwatch ticks): the engine's deadline counts from about then.</summary>
    public long ArrivedAt { get; } = System.Diagnostics.Stopwatch.GetTimestamp();
}

/// <summary>Turns one connection's decoded requests into calls on the cache and builds the replies.</summary>
/// <remarks>Holds the connection's HELLO state and registration. Not thread-safe except <see cref="RunCopy"/>.</remarks>
internal sealed class RequestHandler(long sessionId, KvCacheService cache, ServerCounters counters, SidecarOptions options, ILogger logger)
{
    private static readonly string ServerVersion = typeof(RequestHandler).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "0";
    private static readonly string[] ServerCapabilities = ["host-memory"];
    private EngineRegistration? _registration;

    public bool IsReady { get; private set; }

    public string InstanceId { get; private set; } = string.Empty;

    public string Role { get; private set; } = "unknown";

    public int Rank { get; private set; }

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
            Opcode.Clear => new ClearReply { RemovedChunks = cache.Clear() },
            Opcode.Stats => Stats(),
            Opcode.Store or Opcode.Load => throw new ProtocolException(ErrorCode.NotReady, $"{opcode} before HELLO; send HELLO first."),
            _ => throw new ProtocolException(ErrorCode.UnknownOpcode, $"opcode {(ushort)opcode} is not known to this sidecar (protocol version {FrameHeader.CurrentVersion})."),
        };
    }

    /// <summary>Decodes a STORE or LOAD and checks it can run.</summary>
    public CopyJob PrepareCopy(Opcode opcode, in ReadOnlySequence<byte> body)
    {
        EngineRegistration registration = _registration ?? throw new CacheException(CacheError.NotRegistered, $"{opcode} before REGISTER; register the KV memory first.");
        if (opcode == Opcode.Store)
        {
            StoreRequest s = ProtocolSerializer.Deserialize<StoreRequest>(body);
            return new CopyJob(opcode, registration, s.RequestId ?? string.Empty, s.CacheSalt, s.Tokens, s.Keys, s.FirstChunk, s.NumChunks, s.BlockIds ?? [], s.DeadlineMs);
        }

        LoadRequest l = ProtocolSerializer.Deserialize<LoadRequest>(body);
        return new CopyJob(opcode, registration, l.RequestId ?? string.Empty, l.CacheSalt, l.Tokens, l.Keys, l.FirstChunk, l.NumChunks, l.BlockIds ?? []);
    }

    /// <summary>Runs a copy; safe to call from any thread.</summary>
    public object RunCopy(CopyJob job)
    {
        if ((job.Tokens is null) == (job.Keys is null))
        {
            throw new ProtocolException(ErrorCode.BadRequest, "exactly one of tokens and keys must be given.");
        }

        ChunkSource source = job.Tokens is not null ? ChunkSource.FromTokens(WireArrays.AsTokens(job.Tokens)) : ChunkSource.FromKeys(job.Keys);
        ReadOnlySpan<int> blocks = WireArrays.AsBlockIds(job.BlockIds);
        if (job.Opcode == Opcode.Store)
        {
            StoreResult r = cache.Store(job.Registration, job.CacheSalt, source, job.FirstChunk, job.NumChunks, blocks, CommitDeadline(job));
            return new StoreReply { Stored = r.Stored, AlreadyPresent = r.AlreadyPresent, Failed = r.Failed };
        }

        int loaded = cache.Load(job.Registration, job.RequestId, job.CacheSalt, source, job.FirstChunk, job.NumChunks, blocks);
        return new LoadReply { LoadedChunks = loaded };
    }

    /// <summary>
    /// The last moment (Stopwatch ticks) a store may still commit: the engine's deadline minus a margin of a
    /// tenth (at least 50 ms) for the time the request spent in transit before it arrived.
    /// </summary>
    private static long CommitDeadline(CopyJob job)
    {
        if (job.DeadlineMs == 0)
        {
            return long.MaxValue;
        }

        double ms = Math.Max(0, job.DeadlineMs - Math.Max(50.0, job.DeadlineMs / 10.0));
        return job.ArrivedAt + (long)(ms * System.Diagnostics.Stopwatch.Frequency / 1000);
    }

    private HelloReply Hello(HelloRequest hello)
    {
        if (hello.ProtocolVersion != FrameHeader.CurrentVersion)
        {
            throw new ProtocolException(ErrorCode.UnsupportedVersion, $"protocol version {hello.ProtocolVersion} is not supported; this sidecar speaks version {FrameHeader.CurrentVersion}.");
        }

        InstanceId = hello.InstanceId ?? string.Empty;
        Role = hello.Role ?? "client";
        Rank = hello.Rank;
        IsReady = true;
        return new HelloReply
        {
            ProtocolVersion = FrameHeader.CurrentVersion,
            ServerVersion = ServerVersion,
            Capabilities = ServerCapabilities,
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
        foreach (LayerDescriptor layer in layers)
        {
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
        EngineRegistration registration = cache.Register(sessionId, InstanceId, nsSpec, specs);
        if (_registration is not null)
        {
            cache.Unregister(_registration);
        }

        _registration = registration;
        SidecarLog.Registered(logger, sessionId, InstanceId, ns.TpRank, layers.Length, nsSpec.ModelId, registration.Geometry.ChunkBytes, registration.Geometry.Fingerprint);
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
            ? cache.Release(request.LeaseId)
            : cache.Release(InstanceId, request.RequestId ?? throw new ProtocolException(ErrorCode.BadRequest, "RELEASE needs a lease id or a request id."));
        return new ReleaseReply { ReleasedChunks = released };
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
        };
    }
}
