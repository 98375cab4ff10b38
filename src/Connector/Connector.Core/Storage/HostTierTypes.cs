namespace Connector.Core.Storage;

/// <summary>Settings of the L1 host-memory tier.</summary>
public sealed class HostTierOptions
{
    /// <summary>Bytes of host memory the tier may allocate. Defaults to 4 GiB.</summary>
    public long CapacityBytes { get; set; } = 4L << 30;

    /// <summary>Bytes of one native allocation carved into slabs. Defaults to 256 MiB; a larger slab gets an extent of its own.</summary>
    public long ExtentBytes { get; set; } = 256L << 20;

    /// <summary>How long a lease protects its chunks. Defaults to 60 s.</summary>
    public TimeSpan LeaseTtl { get; set; } = TimeSpan.FromSeconds(60);

    /// <summary>Page-locks each extent for DMA where a GPU is present (null: extents stay pageable).</summary>
    public IHostMemoryPinner? Pinner { get; set; }

    /// <summary>Receives evicted chunks (demotion to lower tiers); null: eviction drops them.</summary>
    public Tiers.IEvictionSink? EvictionSink { get; set; }

    /// <summary>Checks the settings.</summary>
    /// <exception cref="ArgumentException">A setting is invalid; the message says which.</exception>
    public void Validate()
    {
        if (CapacityBytes <= 0)
        {
            throw new ArgumentException($"CapacityBytes must be positive (got {CapacityBytes})");
        }

        if (ExtentBytes < 4096)
        {
            throw new ArgumentException($"ExtentBytes must be at least 4096 (got {ExtentBytes})");
        }

        if (LeaseTtl <= TimeSpan.Zero)
        {
            throw new ArgumentException($"LeaseTtl must be positive (got {LeaseTtl})");
        }
    }
}

/// <summary>What <see cref="HostMemoryTier.TryBeginStore(in Keys.ChunkKey, in Keys.ChunkKey, long, ulong, out SlabRef)"/> did.</summary>
public enum StoreBegin
{
    /// <summary>A slab is reserved for the chunk: copy into it, then commit or abort.</summary>
    Reserved,

    /// <summary>The chunk is already stored.</summary>
    AlreadyPresent,

    /// <summary>Another writer is storing the chunk right now.</summary>
    InProgress,

    /// <summary>No room could be made (everything is leased, pinned or being written).</summary>
    NoSpace,
}

/// <summary>A chunk's slab: <see cref="Length"/> bytes of native memory at <see cref="Address"/>.</summary>
/// <param name="Address">Start of the chunk's bytes.</param>
/// <param name="Length">Bytes of the chunk.</param>
/// <param name="Entry">The tier's entry index.</param>
/// <param name="Generation">The entry's generation, so a stale reference is recognized.</param>
public readonly record struct SlabRef(nint Address, long Length, int Entry, int Generation);

/// <summary>A lease on chunks.</summary>
/// <param name="Value">The lease's id; 0 is no lease.</param>
public readonly record struct LeaseId(ulong Value)
{
    /// <summary>No lease.</summary>
    public static readonly LeaseId None;
}

/// <summary>Counters and gauges of the tier.</summary>
public readonly record struct HostTierStats(
    long CapacityBytes,
    long AllocatedBytes,
    long UsedBytes,
    long Chunks,
    long Hits,
    long Misses,
    long Evictions,
    long ActiveLeases,
    long LeasedChunks);

/// <summary>
/// Page-locks host memory for a GPU's copy engines (cuMemHostRegister). The host tier pins each extent once,
/// when it allocates it, and unpins it before freeing it.
/// </summary>
public interface IHostMemoryPinner
{
    /// <summary>Pins a range.</summary>
    /// <param name="address">The start (2 MiB aligned).</param>
    /// <param name="bytes">Its length.</param>
    /// <returns>False when the driver refused (the range stays pageable and copies from it run slower); the pinner logs and counts why.</returns>
    bool TryPin(nint address, long bytes);

    /// <summary>Unpins a range <see cref="TryPin"/> pinned; ignores one it did not.</summary>
    void Unpin(nint address);
}
