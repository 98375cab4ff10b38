using MessagePack;

namespace Connector.Protocol.Messages;

/// <summary>The state of a lookup answer.</summary>
public enum LookupState
{
    /// <summary>The answer is final.</summary>
    Ready = 0,

    /// <summary>Lower tiers are being consulted; ask again.</summary>
    Pending = 1,

    /// <summary>No worker of the instance has registered: a miss.</summary>
    NotRegistered = 2,
}

/// <summary>LOOKUP: how many leading tokens of a prompt are cached.</summary>
[MessagePackObject]
public sealed class LookupRequest
{
    /// <summary>The engine's request id (the lease is filed under it).</summary>
    [Key(0)] public string? RequestId { get; set; }

    /// <summary>The tenant salt, or nil.</summary>
    [Key(1)] public string? CacheSalt { get; set; }

    /// <summary>Token ids, u32le.</summary>
    [Key(2)] public byte[]? Tokens { get; set; }

    /// <summary>Whether to lease the hit chunks.</summary>
    [Key(3)] public bool Lease { get; set; }
}

/// <summary>The reply to LOOKUP.</summary>
[MessagePackObject]
public sealed class LookupReply
{
    /// <summary>Leading tokens present (whole chunks).</summary>
    [Key(0)] public int HitTokens { get; set; }

    /// <summary>Leading chunks present for every rank.</summary>
    [Key(1)] public int HitChunks { get; set; }

    /// <summary>The lease id, 0 when nothing was leased.</summary>
    [Key(2)] public ulong LeaseId { get; set; }

    /// <summary>Whether the answer is final.</summary>
    [Key(3)] public LookupState State { get; set; }
}

/// <summary>STORE: copy chunks out of engine blocks into the cache.</summary>
[MessagePackObject]
public sealed class StoreRequest
{
    /// <summary>The engine's request id.</summary>
    [Key(0)] public string? RequestId { get; set; }

    /// <summary>The tenant salt, or nil.</summary>
    [Key(1)] public string? CacheSalt { get; set; }

    /// <summary>Token ids from the request's first token, u32le; nil when <see cref="Keys"/> is given.</summary>
    [Key(2)] public byte[]? Tokens { get; set; }

    /// <summary>32-byte keys of exactly the named chunks; nil when <see cref="Tokens"/> is given.</summary>
    [Key(3)] public byte[]? Keys { get; set; }

    /// <summary>Index of the first chunk named.</summary>
    [Key(4)] public int FirstChunk { get; set; }

    /// <summary>Chunks named.</summary>
    [Key(5)] public int NumChunks { get; set; }

    /// <summary>Engine block ids, i32le, chunk by chunk.</summary>
    [Key(6)] public byte[]? BlockIds { get; set; }

    /// <summary>How long the engine waits for the reply, in milliseconds (0: no limit). A copy that ends
    /// too close to it is not committed: the engine may already be overwriting those blocks.</summary>
    [Key(7)] public uint DeadlineMs { get; set; }

    /// <summary>The engine's deadline as an absolute CLOCK_MONOTONIC time in nanoseconds (0: none). Copies stop
    /// at it and nothing copied after it is committed. Takes precedence over <see cref="DeadlineMs"/>.</summary>
    [Key(8)] public ulong DeadlineNs { get; set; }

    /// <summary>An opaque chain state from an earlier STORE reply of the same request, or nil. With it,
    /// <see cref="Tokens"/> holds the tokens from the chunk after the one it names (not the whole prefix), so a
    /// long generation sends each token once. The sidecar accepts only states it sealed for the caller's
    /// namespace and salt.</summary>
    [Key(9)] public byte[]? Chain { get; set; }
}

/// <summary>The reply to STORE.</summary>
[MessagePackObject]
public sealed class StoreReply
{
    /// <summary>Chunks copied into the cache.</summary>
    [Key(0)] public int Stored { get; set; }

    /// <summary>Chunks skipped because they were already cached.</summary>
    [Key(1)] public int AlreadyPresent { get; set; }

    /// <summary>Chunks not stored for lack of space.</summary>
    [Key(2)] public int Failed { get; set; }

    /// <summary>The sealed chain state of the last chunk named, for the request's next STORE (opaque, 68 bytes).</summary>
    [Key(3)] public byte[]? Chain { get; set; }
}

/// <summary>LOAD: copy chunks from the cache into engine blocks.</summary>
[MessagePackObject]
public sealed class LoadRequest
{
    /// <summary>The engine's request id; this rank's share of its lease ends after the load.</summary>
    [Key(0)] public string? RequestId { get; set; }

    /// <summary>The tenant salt, or nil.</summary>
    [Key(1)] public string? CacheSalt { get; set; }

    /// <summary>Token ids from the request's first token, u32le; nil when <see cref="Keys"/> is given.</summary>
    [Key(2)] public byte[]? Tokens { get; set; }

    /// <summary>32-byte keys of exactly the named chunks; nil when <see cref="Tokens"/> is given.</summary>
    [Key(3)] public byte[]? Keys { get; set; }

    /// <summary>Index of the first chunk named.</summary>
    [Key(4)] public int FirstChunk { get; set; }

    /// <summary>Chunks named.</summary>
    [Key(5)] public int NumChunks { get; set; }

    /// <summary>Engine block ids, i32le, chunk by chunk; -1 skips a block.</summary>
    [Key(6)] public byte[]? BlockIds { get; set; }

    /// <summary>The lease from LOOKUP, or 0.</summary>
    [Key(7)] public ulong LeaseId { get; set; }

    /// <summary>The engine's deadline as an absolute CLOCK_MONOTONIC time in nanoseconds (0: none). No byte is
    /// written into engine memory after it: the engine reuses the blocks once it stops waiting.</summary>
    [Key(8)] public ulong DeadlineNs { get; set; }
}

/// <summary>The reply to LOAD.</summary>
[MessagePackObject]
public sealed class LoadReply
{
    /// <summary>Leading named chunks now in the engine's blocks.</summary>
    [Key(0)] public int LoadedChunks { get; set; }
}

/// <summary>RELEASE: end a lease.</summary>
[MessagePackObject]
public sealed class ReleaseRequest
{
    /// <summary>The lease id, or 0 to release every lease of <see cref="RequestId"/>.</summary>
    [Key(0)] public ulong LeaseId { get; set; }

    /// <summary>The request whose leases end when <see cref="LeaseId"/> is 0.</summary>
    [Key(1)] public string? RequestId { get; set; }
}

/// <summary>The reply to RELEASE.</summary>
[MessagePackObject]
public sealed class ReleaseReply
{
    /// <summary>Chunk leases ended.</summary>
    [Key(0)] public int ReleasedChunks { get; set; }
}

/// <summary>The reply to CLEAR.</summary>
[MessagePackObject]
public sealed class ClearReply
{
    /// <summary>Chunks removed.</summary>
    [Key(0)] public int RemovedChunks { get; set; }
}

/// <summary>The reply to STATS.</summary>
[MessagePackObject]
public sealed class StatsReply
{
    /// <summary>L1 capacity in bytes.</summary>
    [Key(0)] public ulong CapacityBytes { get; set; }

    /// <summary>Bytes in stored chunks.</summary>
    [Key(1)] public ulong UsedBytes { get; set; }

    /// <summary>Chunks stored.</summary>
    [Key(2)] public ulong Chunks { get; set; }

    /// <summary>Chunks found by lookups.</summary>
    [Key(3)] public ulong Hits { get; set; }

    /// <summary>Lookups stopped by a missing chunk.</summary>
    [Key(4)] public ulong Misses { get; set; }

    /// <summary>Chunks evicted.</summary>
    [Key(5)] public ulong Evictions { get; set; }

    /// <summary>Chunks stored since start.</summary>
    [Key(6)] public ulong StoredChunks { get; set; }

    /// <summary>Chunks loaded since start.</summary>
    [Key(7)] public ulong LoadedChunks { get; set; }

    /// <summary>Bytes stored since start.</summary>
    [Key(8)] public ulong StoredBytes { get; set; }

    /// <summary>Bytes loaded since start.</summary>
    [Key(9)] public ulong LoadedBytes { get; set; }

    /// <summary>Leases held now.</summary>
    [Key(10)] public ulong ActiveLeases { get; set; }

    /// <summary>Requests answered with an error, and streams closed as unparsable.</summary>
    [Key(11)] public ulong ProtocolErrors { get; set; }

    /// <summary>Copies that failed (engine memory gone or refused).</summary>
    [Key(12)] public ulong CopyErrors { get; set; }

    /// <summary>Connections open now.</summary>
    [Key(13)] public ulong Connections { get; set; }

    /// <summary>Registrations live now.</summary>
    [Key(14)] public ulong Registrations { get; set; }

    /// <summary>Stores whose copy ended after the engine's deadline and were discarded.</summary>
    [Key(15)] public ulong LateStores { get; set; }

    /// <summary>Loads stopped at their deadline (the chunks after it were not written).</summary>
    [Key(16)] public ulong LateLoads { get; set; }

    /// <summary>Requests refused with PermissionDenied.</summary>
    [Key(17)] public ulong PermissionDenied { get; set; }

    /// <summary>Requests refused with LimitExceeded.</summary>
    [Key(18)] public ulong LimitsExceeded { get; set; }

    /// <summary>Connections the sidecar closed: no HELLO in time, a reader that stopped reading, or a failed connection.</summary>
    [Key(19)] public ulong DroppedConnections { get; set; }

    /// <summary>CUDA IPC memory handles opened so far (one per engine allocation; never per copy).</summary>
    [Key(20)] public ulong GpuHandleOpens { get; set; }

    /// <summary>Engine GPU allocations mapped into the sidecar now.</summary>
    [Key(21)] public ulong GpuMappings { get; set; }

    /// <summary>Bytes of L1 page-locked for DMA now.</summary>
    [Key(22)] public ulong PinnedBytes { get; set; }

    /// <summary>L1 extents the driver refused to pin (they stay pageable).</summary>
    [Key(23)] public ulong PinFailures { get; set; }

    /// <summary>The tiers below L1, hot to cold (nil or empty: none).</summary>
    [Key(24)] public TierStatsMessage[]? Tiers { get; set; }
}

/// <summary>One tier's counters in STATS (docs/protocol.md).</summary>
[MessagePackObject]
public sealed class TierStatsMessage
{
    /// <summary>"disk", "redis".</summary>
    [Key(0)] public string? Name { get; set; }

    /// <summary>"write-through" or "write-back".</summary>
    [Key(1)] public string? Policy { get; set; }

    /// <summary>The tier's byte budget.</summary>
    [Key(2)] public ulong CapacityBytes { get; set; }

    /// <summary>Bytes it holds (as far as it knows).</summary>
    [Key(3)] public ulong UsedBytes { get; set; }

    /// <summary>Chunks it holds (as far as it knows).</summary>
    [Key(4)] public ulong Chunks { get; set; }

    /// <summary>Reads that returned verified bytes.</summary>
    [Key(5)] public ulong Hits { get; set; }

    /// <summary>Reads of chunks it did not hold.</summary>
    [Key(6)] public ulong Misses { get; set; }

    /// <summary>Bytes read.</summary>
    [Key(7)] public ulong BytesRead { get; set; }

    /// <summary>Bytes written.</summary>
    [Key(8)] public ulong BytesWritten { get; set; }

    /// <summary>Chunks written.</summary>
    [Key(9)] public ulong Writes { get; set; }

    /// <summary>Writes dropped (queue full, store unavailable).</summary>
    [Key(10)] public ulong Drops { get; set; }

    /// <summary>Chunks not admitted (frequency admission).</summary>
    [Key(11)] public ulong NotAdmitted { get; set; }

    /// <summary>Chunks the tier evicted under its budget.</summary>
    [Key(12)] public ulong Evictions { get; set; }

    /// <summary>Values that failed verification and were dropped.</summary>
    [Key(13)] public ulong Corrupt { get; set; }

    /// <summary>Failures of the backing store.</summary>
    [Key(14)] public ulong Errors { get; set; }

    /// <summary>Writes queued now.</summary>
    [Key(15)] public ulong QueueDepth { get; set; }

    /// <summary>Chunks accepted at store (write-through).</summary>
    [Key(16)] public ulong WriteThroughOffers { get; set; }

    /// <summary>Chunks accepted at L1 eviction (demotions).</summary>
    [Key(17)] public ulong Demotions { get; set; }

    /// <summary>Chunks promoted from the tier into L1.</summary>
    [Key(18)] public ulong Promotions { get; set; }

    /// <summary>Promotions that failed.</summary>
    [Key(19)] public ulong PromotionFailures { get; set; }
}
