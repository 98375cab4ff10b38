using System.Buffers;
using Connector.Core.Keys;

namespace Connector.Core.Storage.Tiers;

/// <summary>
/// A storage tier below L1 (local disk, a Redis/Valkey pool): whole chunks by key, hot to cold, in the manner of
/// Tsavorite's tiered devices. L1 is the commit point: a chunk is durable for the engine once L1 holds it, and the
/// tiers below receive it asynchronously (write-through at store, or write-behind at L1 eviction). The cache service
/// asks each tier which leading chunks of a prompt it holds and promotes them into L1 before they are loaded; it
/// never knows which tier is which.
/// </summary>
/// <remarks>
/// Rules every tier keeps:
/// <list type="bullet">
/// <item>Nothing here throws for a failure of the backing store (full disk, unwritable directory, Redis down or slow,
/// a corrupt or foreign value): the chunk is a miss, a counter moves and the tier logs a clear line (rate limited).
/// Only programming errors (null arguments, a destination of the wrong size) throw.</item>
/// <item>A chunk is served only if its bytes are exactly what was offered: a checksum, the key, the namespace tag and
/// the length are verified on every read; a partial write is never visible (two-phase write or a manifest).</item>
/// <item>Nothing blocks an engine: <see cref="Offer"/> copies and returns at once (a full queue drops the write and
/// counts it); reads and probes have the caller's cancellation and their own timeouts.</item>
/// <item>Thread-safe.</item>
/// </list>
/// </remarks>
public interface IChunkTier : IDisposable
{
    /// <summary>Short name for logs, settings and STATS: "disk", "redis".</summary>
    string Name { get; }

    /// <summary>
    /// Whether <see cref="CountPresentPrefix"/> answers from memory (a local index) in microseconds, so LOOKUP may
    /// consult it inline. False for remote tiers: their presence is learnt through <see cref="ProbePrefixAsync"/>.
    /// </summary>
    bool HasLocalIndex { get; }

    /// <summary>How many leading <paramref name="keys"/> the tier holds, from its local index; 0 for tiers without one.</summary>
    int CountPresentPrefix(ReadOnlySpan<TierKey> keys);

    /// <summary>How many leading <paramref name="keys"/> the backing store holds (a network round trip for remote tiers).</summary>
    /// <returns>The count; 0 when the store cannot be reached (never throws for that).</returns>
    ValueTask<int> ProbePrefixAsync(ReadOnlyMemory<TierKey> keys, CancellationToken cancellation);

    /// <summary>Reads a chunk into <paramref name="destination"/> (an L1 slab of exactly <see cref="TierKey.Length"/> bytes).</summary>
    /// <returns><see cref="TierReadStatus.Hit"/> only when every byte was verified; the destination is undefined otherwise.</returns>
    ValueTask<TierReadStatus> ReadAsync(TierKey key, Memory<byte> destination, CancellationToken cancellation);

    /// <summary>Offers a chunk for writing: the tier decides (admission), copies the bytes it keeps, and returns at once.</summary>
    TierWriteStatus Offer(in TierKey key, ReadOnlySpan<byte> data);

    /// <summary>Removes every chunk (CLEAR); returns how many.</summary>
    ValueTask<long> ClearAsync(CancellationToken cancellation);

    /// <summary>Reads the counters.</summary>
    TierStats GetStats();
}

/// <summary>A chunk as the tiers know it.</summary>
/// <param name="Key">The chunk's key (docs/hashing.md); it already depends on the namespace, salt and every earlier token.</param>
/// <param name="Parent">The key of the chunk before it (<see cref="ChunkKey.None"/> for a prompt's first chunk): eviction
/// removes suffixes before prefixes.</param>
/// <param name="NamespaceTag">A tag of the salted namespace, stored with the chunk and checked on every read.</param>
/// <param name="Length">The chunk's bytes (a registration's chunk geometry).</param>
public readonly record struct TierKey(ChunkKey Key, ChunkKey Parent, ulong NamespaceTag, long Length);

/// <summary>The outcome of <see cref="IChunkTier.ReadAsync"/>.</summary>
public enum TierReadStatus
{
    /// <summary>The bytes were read and verified.</summary>
    Hit,

    /// <summary>The tier does not hold the chunk.</summary>
    Miss,

    /// <summary>The tier held something under the key that failed verification (checksum, length, key or namespace); it is dropped and counted.</summary>
    Corrupt,

    /// <summary>The backing store failed or timed out (counted and logged).</summary>
    Error,

    /// <summary>The caller cancelled.</summary>
    Cancelled,
}

/// <summary>The outcome of <see cref="IChunkTier.Offer"/>.</summary>
public enum TierWriteStatus
{
    /// <summary>Queued; it will be written.</summary>
    Accepted,

    /// <summary>The tier holds the chunk already.</summary>
    AlreadyPresent,

    /// <summary>Not admitted (e.g. first sight of a chunk under frequency admission).</summary>
    NotAdmitted,

    /// <summary>The write queue is full: dropped and counted (back-pressure never reaches the engine).</summary>
    QueueFull,

    /// <summary>The tier is unusable now (disk full, unwritable directory, circuit open).</summary>
    Unavailable,
}

/// <summary>Counters of one tier, for STATS and metrics.</summary>
public readonly record struct TierStats(
    string Name,
    long CapacityBytes,
    long UsedBytes,
    long Chunks,
    long Hits,
    long Misses,
    long BytesRead,
    long BytesWritten,
    long Writes,
    long Drops,
    long NotAdmitted,
    long Evictions,
    long Corrupt,
    long Errors,
    int QueueDepth);

/// <summary>A <see cref="Memory{T}"/> over native memory (an L1 slab), so tiers can read into it with async I/O.</summary>
public sealed unsafe class NativeMemoryManager : MemoryManager<byte>
{
    private readonly byte* _pointer;
    private readonly int _length;

    /// <summary>Wraps <paramref name="length"/> bytes at <paramref name="address"/>; the caller keeps them alive.</summary>
    public NativeMemoryManager(nint address, int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        _pointer = (byte*)address;
        _length = length;
    }

    /// <inheritdoc/>
    public override Span<byte> GetSpan() => new(_pointer, _length);

    /// <inheritdoc/>
    public override MemoryHandle Pin(int elementIndex = 0) => new(_pointer + elementIndex);

    /// <inheritdoc/>
    public override void Unpin()
    {
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
    }
}
