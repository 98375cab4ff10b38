using System.Buffers;
using Connector.Core.Keys;
using Connector.Core.Memory;
using Connector.Core.Storage;

namespace Connector.Core.Caching;

/// <summary>
/// The caching core: registrations of engine memory, lookups with leases, and stores and loads that
/// move chunk bytes between engine memory and the host tier.
/// </summary>
/// <remarks>Thread-safe. Stores and loads run on the caller's thread and block it for the copy.</remarks>
public sealed class KvCacheService : IDisposable
{
    /// <summary>Upper bound on chunks one request may name: 4096 chunks of 256 tokens is a 1M-token prompt.</summary>
    public const int MaxChunksPerRequest = 4096;

    private readonly HostMemoryTier _tier;
    private readonly Dictionary<EngineMemoryKind, IEngineMemoryProvider> _providers;
    private readonly RegistrationTable _registrations = new();
    private readonly LeaseBook _leases;
    private long _nextRegistrationId;
    private long _storedChunks;
    private long _loadedChunks;
    private long _storedBytes;
    private long _loadedBytes;
    private long _copyErrors;
    private long _lateStores;

    /// <summary>Creates the service over a host tier and the engine memory providers this build has.</summary>
    public KvCacheService(HostMemoryTier tier, IEnumerable<IEngineMemoryProvider> providers)
    {
        ArgumentNullException.ThrowIfNull(tier);
        ArgumentNullException.ThrowIfNull(providers);
        _tier = tier;
        _providers = providers.ToDictionary(p => p.Kind);
        _leases = new LeaseBook(tier);
    }

    /// <summary>Validates and opens a worker's KV memory and returns its registration.</summary>
    /// <exception cref="CacheException">The namespace, a layout or the memory is refused.</exception>
    public EngineRegistration Register(long sessionId, string instanceId, NamespaceSpec ns, IReadOnlyList<LayerSpec> layers)
    {
        ArgumentNullException.ThrowIfNull(ns);
        ArgumentNullException.ThrowIfNull(layers);
        if (string.IsNullOrEmpty(instanceId))
        {
            throw new CacheException(CacheError.BadRequest, "REGISTER needs the instance id sent in HELLO.");
        }

        if (layers.Count == 0)
        {
            throw new CacheException(CacheError.BadRequest, "REGISTER names no layers.");
        }

        if (ns.BlockTokens <= 0 || ns.ChunkTokens <= 0 || ns.ChunkTokens % ns.BlockTokens != 0)
        {
            throw new CacheException(CacheError.BadRequest, $"chunk_tokens ({ns.ChunkTokens}) must be a positive multiple of block_tokens ({ns.BlockTokens}).");
        }

        ChunkGeometry geometry;
        try
        {
            var geometryLayers = new List<(string Name, KvLayout Layout, long RegionLength)>(layers.Count);
            foreach (LayerSpec layer in layers)
            {
                if (layer.Layout.BlockTokens != ns.BlockTokens)
                {
                    throw new LayoutException(layer.Name, $"layout block_tokens {layer.Layout.BlockTokens} differs from the namespace's {ns.BlockTokens}");
                }

                geometryLayers.Add((layer.Name, layer.Layout, checked((long)layer.Memory.Length)));
            }

            geometry = ChunkGeometry.Create(geometryLayers, ns.ChunkTokens / ns.BlockTokens);
        }
        catch (LayoutException ex)
        {
            throw new CacheException(CacheError.BadLayout, ex.Message, ex);
        }
        catch (OverflowException ex)
        {
            throw new CacheException(CacheError.BadLayout, "a region length does not fit in 63 bits", ex);
        }

        KvNamespace baseNs;
        try
        {
            baseNs = new KvNamespace(ns.ModelId, ns.KvDtype, geometry.Fingerprint, ns.BlockTokens, ns.ChunkTokens, ns.TpSize, ns.TpRank, ns.KvGroup, ns.FormatVersion, string.Empty);
            baseNs.Validate();
        }
        catch (ArgumentException ex)
        {
            throw new CacheException(CacheError.BadRequest, ex.Message, ex);
        }

        EngineMemoryKind kind = layers[0].Memory.Kind;
        if (layers.Any(l => l.Memory.Kind != kind))
        {
            throw new CacheException(CacheError.BadRequest, "all layers of one registration must use the same memory kind.");
        }

        if (!_providers.TryGetValue(kind, out IEngineMemoryProvider? provider))
        {
            throw new CacheException(CacheError.Unsupported, $"memory kind {kind} is not supported by this sidecar (no data plane for it).");
        }

        IEngineMemory memory;
        try
        {
            memory = provider.Open(layers.Select(l => l.Memory).ToList());
        }
        catch (EngineMemoryException ex)
        {
            throw Translate(ex);
        }

        var registration = new EngineRegistration(Interlocked.Increment(ref _nextRegistrationId), sessionId, instanceId, baseNs, geometry, memory);
        _registrations.Add(registration);
        return registration;
    }

    /// <summary>Ends a registration; in-flight copies finish first.</summary>
    public void Unregister(EngineRegistration registration)
    {
        ArgumentNullException.ThrowIfNull(registration);
        if (_registrations.Remove(registration))
        {
            registration.Close();
        }
    }

    /// <summary>Counts the leading chunks of <paramref name="tokens"/> present for every rank of the instance, and leases them.</summary>
    /// <param name="sessionId">The caller's connection; its leases end when it closes.</param>
    /// <param name="instanceId">The engine instance whose registered ranks are consulted.</param>
    /// <param name="requestId">The engine's request id; the lease is filed under it.</param>
    /// <param name="cacheSalt">The tenant salt; null or empty for none.</param>
    /// <param name="tokens">The request's token ids from its first token.</param>
    /// <param name="lease">Whether to lease the hit chunks until they are loaded.</param>
    public LookupResult Lookup(long sessionId, string instanceId, string requestId, string? cacheSalt, ReadOnlySpan<uint> tokens, bool lease)
    {
        EngineRegistration[] ranks = _registrations.RanksOf(instanceId);
        if (ranks.Length == 0)
        {
            return new LookupResult(0, 0, 0, LookupOutcome.NotRegistered);
        }

        int chunkTokens = ranks[0].ChunkTokens;
        int wanted = Math.Min(tokens.Length / chunkTokens, MaxChunksPerRequest);
        if (wanted == 0)
        {
            return new LookupResult(0, 0, 0, LookupOutcome.Ready);
        }

        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent(wanted * ranks.Length);
        try
        {
            int hit = wanted;
            for (int r = 0; r < ranks.Length && hit > 0; r++)
            {
                Span<ChunkKey> rankKeys = keys.AsSpan(r * wanted, hit);
                ChunkHasher.ComputeKeys(ranks[r].RootKey(cacheSalt), chunkTokens, tokens[..(hit * chunkTokens)], rankKeys);
                hit = _tier.CountPresentPrefix(rankKeys);
            }

            bool leased = false;
            ulong leaseId = 0;
            if (lease)
            {
                leaseId = _leases.Replace(instanceId, requestId);
                for (int r = 0; r < ranks.Length && hit > 0; r++)
                {
                    leased |= _leases.Add(sessionId, instanceId, requestId, ranks[r].BaseNamespace, keys.AsSpan(r * wanted, hit));
                }
            }

            return new LookupResult(hit, hit * chunkTokens, leased ? leaseId : 0, LookupOutcome.Ready);
        }
        finally
        {
            ArrayPool<ChunkKey>.Shared.Return(keys);
        }
    }

    /// <summary>Copies chunks out of the engine's blocks into the host tier; chunks already present are skipped.</summary>
    /// <param name="registration">The calling worker's registration.</param>
    /// <param name="cacheSalt">The tenant salt.</param>
    /// <param name="source">Token ids or keys naming the chunks.</param>
    /// <param name="firstChunk">Index of the first chunk to store.</param>
    /// <param name="numChunks">How many chunks to store.</param>
    /// <param name="blockIds">numChunks times blocks-per-chunk engine block ids, chunk by chunk.</param>
    /// <param name="commitBefore">Stopwatch timestamp after which the copies are discarded instead of committed
    /// (the engine has stopped waiting and may be overwriting the blocks); <see cref="long.MaxValue"/> for none.</param>
    public StoreResult Store(EngineRegistration registration, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, long commitBefore = long.MaxValue)
    {
        ArgumentNullException.ThrowIfNull(registration);
        Acquire(registration);
        try
        {
            return StoreCore(registration, cacheSalt, source, firstChunk, numChunks, blockIds, commitBefore);
        }
        finally
        {
            registration.ReleaseRef();
        }
    }

    private StoreResult StoreCore(EngineRegistration registration, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, long commitBefore)
    {
        using var transfer = ChunkTransfer.Begin(registration, cacheSalt, source, firstChunk, numChunks, blockIds, allowSkippedBlocks: false);
        transfer.ValidateBlockIds();
        long chunkBytes = registration.Geometry.ChunkBytes;
        int[] indices = ArrayPool<int>.Shared.Rent(Math.Max(numChunks, 1));
        nint[] addresses = ArrayPool<nint>.Shared.Rent(Math.Max(numChunks, 1));
        SlabRef[] slabs = ArrayPool<SlabRef>.Shared.Rent(Math.Max(numChunks, 1));
        int reserved = 0, present = 0, failed = 0;
        bool committed = false;
        try
        {
            // Reserve in prefix order; later chunks are useless without an earlier one (the prefix invariant).
            for (int i = 0; i < numChunks; i++)
            {
                StoreBegin begin = _tier.TryBeginStore(transfer.Key(i), transfer.Parent(i), chunkBytes, out SlabRef slab);
                if (begin is StoreBegin.AlreadyPresent or StoreBegin.InProgress)
                {
                    present++;
                    continue;
                }

                if (begin == StoreBegin.NoSpace)
                {
                    failed = numChunks - i;
                    break;
                }

                indices[reserved] = i;
                addresses[reserved] = slab.Address;
                slabs[reserved++] = slab;
            }

            ParallelCopier.Run(transfer, indices, addresses, reserved, registration.Memory, toEngine: false, chunkBytes, registration.Geometry.MaxCopyOpsPerChunk);
            if (System.Diagnostics.Stopwatch.GetTimestamp() > commitBefore)
            {
                // Too late: the engine may have reused the blocks while we copied. The finally aborts the slabs.
                Interlocked.Increment(ref _lateStores);
                return new StoreResult(0, present, failed + reserved);
            }

            for (int k = 0; k < reserved; k++)
            {
                _tier.CommitStore(slabs[k]);
            }

            committed = true;
            Interlocked.Add(ref _storedChunks, reserved);
            Interlocked.Add(ref _storedBytes, reserved * chunkBytes);
            return new StoreResult(reserved, present, failed);
        }
        catch (EngineMemoryException ex)
        {
            Interlocked.Increment(ref _copyErrors);
            throw Translate(ex);
        }
        finally
        {
            if (!committed)
            {
                // Nothing half-copied ever becomes visible.
                for (int k = 0; k < reserved; k++)
                {
                    _tier.AbortStore(slabs[k]);
                }
            }

            ArrayPool<int>.Shared.Return(indices);
            ArrayPool<nint>.Shared.Return(addresses);
            ArrayPool<SlabRef>.Shared.Return(slabs);
        }
    }

    /// <summary>Copies chunks from the host tier into the engine's blocks, stopping at the first chunk not present.</summary>
    /// <param name="registration">The calling worker's registration.</param>
    /// <param name="requestId">The engine's request id: this rank's share of its lease is released afterwards.</param>
    /// <param name="cacheSalt">The tenant salt.</param>
    /// <param name="source">Token ids or keys naming the chunks.</param>
    /// <param name="firstChunk">Index of the first chunk to load.</param>
    /// <param name="numChunks">How many chunks to load.</param>
    /// <param name="blockIds">numChunks times blocks-per-chunk engine block ids; -1 skips a block.</param>
    /// <returns>The number of leading chunks loaded completely.</returns>
    public int Load(EngineRegistration registration, string requestId, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds)
    {
        ArgumentNullException.ThrowIfNull(registration);
        Acquire(registration);
        int pinned = 0;
        int[]? indices = null;
        nint[]? addresses = null;
        SlabRef[]? slabs = null;
        try
        {
            using var transfer = ChunkTransfer.Begin(registration, cacheSalt, source, firstChunk, numChunks, blockIds, allowSkippedBlocks: true);
            transfer.ValidateBlockIds();
            indices = ArrayPool<int>.Shared.Rent(Math.Max(numChunks, 1));
            addresses = ArrayPool<nint>.Shared.Rent(Math.Max(numChunks, 1));
            slabs = ArrayPool<SlabRef>.Shared.Rent(Math.Max(numChunks, 1));
            for (; pinned < numChunks && _tier.TryPinForRead(transfer.Key(pinned), out SlabRef slab); pinned++)
            {
                indices[pinned] = pinned;
                addresses[pinned] = slab.Address;
                slabs[pinned] = slab;
            }

            ParallelCopier.Run(transfer, indices, addresses, pinned, registration.Memory, toEngine: true, registration.Geometry.ChunkBytes, registration.Geometry.MaxCopyOpsPerChunk);
            Interlocked.Add(ref _loadedChunks, pinned);
            Interlocked.Add(ref _loadedBytes, pinned * registration.Geometry.ChunkBytes);
            return pinned;
        }
        catch (EngineMemoryException ex)
        {
            Interlocked.Increment(ref _copyErrors);
            throw Translate(ex);
        }
        finally
        {
            for (int k = 0; k < pinned; k++)
            {
                _tier.Unpin(slabs![k]);
            }

            if (indices is not null)
            {
                ArrayPool<int>.Shared.Return(indices);
                ArrayPool<nint>.Shared.Return(addresses!);
                ArrayPool<SlabRef>.Shared.Return(slabs!);
            }

            registration.ReleaseRef();
            _leases.ReleaseRank(registration.InstanceId, requestId, registration.BaseNamespace);
        }
    }

    /// <summary>Releases every lease of a request of an instance.</summary>
    /// <returns>The number of chunks released.</returns>
    public int Release(string instanceId, string requestId) => _leases.ReleaseRequest(instanceId, requestId);

    /// <summary>Releases the lease a lookup returned.</summary>
    /// <returns>The number of chunks released.</returns>
    /// <exception cref="CacheException">The lease does not exist (released, loaded or expired).</exception>
    public int Release(ulong leaseId)
    {
        int released = _leases.ReleaseById(leaseId);
        return released >= 0 ? released : throw new CacheException(CacheError.UnknownLease, $"lease {leaseId} does not exist (already released, loaded or expired).");
    }

    /// <summary>Releases every lease and registration of a closed connection.</summary>
    public void OnSessionClosed(long sessionId)
    {
        _leases.ReleaseSession(sessionId);
        foreach (EngineRegistration registration in _registrations.OfSession(sessionId))
        {
            Unregister(registration);
        }
    }

    /// <summary>Ends leases past their TTL.</summary>
    public int ExpireLeases()
    {
        int expired = _tier.ExpireLeases();
        _leases.Prune();
        return expired;
    }

    /// <summary>Removes every chunk that is not leased or being copied.</summary>
    public int Clear() => _tier.Clear();

    /// <summary>Reads the counters.</summary>
    public CacheStats GetStats()
    {
        HostTierStats tier = _tier.GetStats();
        return new CacheStats(
            tier.CapacityBytes, tier.UsedBytes, tier.Chunks, tier.Hits, tier.Misses, tier.Evictions,
            Interlocked.Read(ref _storedChunks), Interlocked.Read(ref _loadedChunks),
            Interlocked.Read(ref _storedBytes), Interlocked.Read(ref _loadedBytes),
            tier.ActiveLeases, Interlocked.Read(ref _copyErrors), _registrations.Count, Interlocked.Read(ref _lateStores));
    }

    /// <inheritdoc/>
    public void Dispose() => _tier.Dispose();

    private static void Acquire(EngineRegistration registration)
    {
        if (!registration.TryAcquire())
        {
            throw new CacheException(CacheError.NotRegistered, "the registration was closed; register the KV memory again.");
        }
    }

    private static CacheException Translate(EngineMemoryException ex) => ex.Code switch
    {
        EngineMemoryError.OutOfRange => new CacheException(CacheError.OutOfRange, ex.Message, ex),
        EngineMemoryError.AccessDenied => new CacheException(CacheError.MemoryAccessDenied, ex.Message, ex),
        EngineMemoryError.Unsupported => new CacheException(CacheError.Unsupported, ex.Message, ex),
        EngineMemoryError.BadLayout => new CacheException(CacheError.BadLayout, ex.Message, ex),
        _ => new CacheException(CacheError.MemoryFault, ex.Message, ex),
    };
}
