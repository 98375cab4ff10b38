using Connector.Core.Memory;

namespace Connector.Core.Caching;

/// <summary>The namespace fields an engine worker declares when it registers (the layout fingerprint and salt are added by the sidecar).</summary>
public sealed record NamespaceSpec(
    string ModelId,
    string KvDtype,
    int BlockTokens,
    int ChunkTokens,
    int TpSize,
    int TpRank,
    int KvGroup,
    int FormatVersion);

/// <summary>One registered region of engine KV memory (a layer or a shared buffer) and how blocks are laid out in it.</summary>
public sealed record LayerSpec(string Name, EngineMemoryRef Memory, KvLayout Layout);

/// <summary>What a lookup found.</summary>
/// <param name="HitChunks">Leading chunks present for every rank of the instance.</param>
/// <param name="HitTokens">HitChunks times the chunk size in tokens.</param>
/// <param name="LeaseId">The id of the request's lease, or 0 when nothing was leased.</param>
/// <param name="State">Whether the answer is final.</param>
public readonly record struct LookupResult(int HitChunks, int HitTokens, ulong LeaseId, LookupOutcome State);

/// <summary>Whether a lookup answer is final.</summary>
public enum LookupOutcome
{
    /// <summary>The answer is final.</summary>
    Ready = 0,

    /// <summary>Lower tiers are being consulted; ask again.</summary>
    Pending = 1,

    /// <summary>No worker of the instance has registered memory, so nothing can be served.</summary>
    NotRegistered = 2,
}

/// <summary>What a store did.</summary>
/// <param name="Stored">Chunks copied into the cache.</param>
/// <param name="AlreadyPresent">Chunks that were cached already.</param>
/// <param name="Failed">Chunks not stored (no room, or the copy ended after the deadline).</param>
/// <param name="Chain">The sealed chain state of the last chunk named (<see cref="Keys.ChainToken"/>), or null.</param>
public readonly record struct StoreResult(int Stored, int AlreadyPresent, int Failed, byte[]? Chain = null)
{
    /// <summary>Compares the counts only (the chain token is sealed with a random per-process secret).</summary>
    public bool Equals(StoreResult other) => Stored == other.Stored && AlreadyPresent == other.AlreadyPresent && Failed == other.Failed;

    /// <inheritdoc/>
    public override int GetHashCode() => HashCode.Combine(Stored, AlreadyPresent, Failed);
}

/// <summary>Where the chunk keys of a store or load come from: always the request's tokens, hashed by the sidecar.</summary>
/// <remarks>
/// Keys are never taken from a client: a key is derived from the caller's namespace, its cache salt and the
/// tokens, so no client can name a chunk outside its own namespace (docs/security.md).
/// </remarks>
public readonly ref struct ChunkSource
{
    private ChunkSource(ReadOnlySpan<uint> tokens) => Tokens = tokens;

    /// <summary>Token ids of the request from its first token.</summary>
    public ReadOnlySpan<uint> Tokens { get; }

    /// <summary>Creates a source from the request's token ids (the sidecar hashes them).</summary>
    public static ChunkSource FromTokens(ReadOnlySpan<uint> tokens) => new(tokens);
}

/// <summary>Why a cache operation was refused.</summary>
public enum CacheError
{
    /// <summary>A field of the request is invalid.</summary>
    BadRequest,

    /// <summary>A block id or extent lies outside the registered memory.</summary>
    OutOfRange,

    /// <summary>A layout descriptor is inconsistent or overflows its region.</summary>
    BadLayout,

    /// <summary>The kernel refused access to the engine's memory.</summary>
    MemoryAccessDenied,

    /// <summary>The engine's memory could not be read or written.</summary>
    MemoryFault,

    /// <summary>The request needs a registration first.</summary>
    NotRegistered,

    /// <summary>The memory kind is not supported by this build.</summary>
    Unsupported,

    /// <summary>The lease does not exist (or belongs to another instance).</summary>
    UnknownLease,

    /// <summary>The caller may not do this: memory of another process, an instance of another user, an administrative request.</summary>
    PermissionDenied,

    /// <summary>A configured bound of <see cref="CacheLimits"/> was hit.</summary>
    LimitExceeded,
}

/// <summary>A refused cache operation, with a code the protocol layer maps to an error reply.</summary>
public sealed class CacheException : Exception
{
    /// <summary>Creates the exception.</summary>
    public CacheException(CacheError code, string message)
        : base(message) => Code = code;

    /// <summary>Creates the exception with an inner cause.</summary>
    public CacheException(CacheError code, string message, Exception inner)
        : base(message, inner) => Code = code;

    /// <summary>The machine-readable reason.</summary>
    public CacheError Code { get; }
}

/// <summary>Counters of the cache service, for STATS and metrics.</summary>
public readonly record struct CacheStats(
    long CapacityBytes,
    long UsedBytes,
    long Chunks,
    long Hits,
    long Misses,
    long Evictions,
    long StoredChunks,
    long LoadedChunks,
    long StoredBytes,
    long LoadedBytes,
    long ActiveLeases,
    long CopyErrors,
    long Registrations,
    long LateStores,
    long LateLoads,
    DataPlaneCounters DataPlane = default);

/// <summary>Counters of a GPU data plane (zero without one).</summary>
/// <param name="HandleOpens">IPC handles opened so far.</param>
/// <param name="Mappings">Engine allocations mapped now.</param>
/// <param name="PinnedBytes">Host memory page-locked now.</param>
/// <param name="PinFailures">Pin refusals so far.</param>
public readonly record struct DataPlaneCounters(long HandleOpens, long Mappings, long PinnedBytes, long PinFailures);

/// <summary>An engine-memory provider with counters of its own for STATS.</summary>
public interface IDataPlaneCounters
{
    /// <summary>Reads the counters.</summary>
    DataPlaneCounters Read();
}
