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
public readonly record struct StoreResult(int Stored, int AlreadyPresent, int Failed);

/// <summary>Where the chunk keys of a store or load come from.</summary>
/// <remarks>Exactly one of <see cref="Tokens"/> and <see cref="Keys"/> is non-empty.</remarks>
public readonly ref struct ChunkSource
{
    /// <summary>Creates a source from the request's token ids (the sidecar hashes them).</summary>
    public static ChunkSource FromTokens(ReadOnlySpan<uint> tokens) => new(tokens, default, true);

    /// <summary>Creates a source from packed 32-byte chunk keys computed by the caller.</summary>
    public static ChunkSource FromKeys(ReadOnlySpan<byte> keys) => new(default, keys, false);

    private ChunkSource(ReadOnlySpan<uint> tokens, ReadOnlySpan<byte> keys, bool byTokens)
    {
        Tokens = tokens;
        Keys = keys;
        ByTokens = byTokens;
    }

    /// <summary>Token ids of the request from its first token.</summary>
    public ReadOnlySpan<uint> Tokens { get; }

    /// <summary>Packed keys of exactly the chunks named by the request.</summary>
    public ReadOnlySpan<byte> Keys { get; }

    /// <summary>Whether the keys are computed from <see cref="Tokens"/>.</summary>
    public bool ByTokens { get; }
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

    /// <summary>The lease does not exist.</summary>
    UnknownLease,
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
    long LateStores);
