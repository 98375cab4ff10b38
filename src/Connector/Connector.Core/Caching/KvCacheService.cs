using System.Buffers;
using System.Text;
using Connector.Core.Keys;
using Connector.Core.Memory;
using Connector.Core.Platform;
using Connector.Core.Storage;
using Connector.Core.Storage.Tiers;

namespace Connector.Core.Caching;

/// <summary>
/// The caching core: registrations of engine memory, lookups with leases, and stores and loads that
/// move chunk bytes between engine memory and the host tier.
/// </summary>
/// <remarks>
/// Thread-safe. Stores and loads run on the caller's thread (large ones helped by <see cref="CopyThreads"/>)
/// and stop at their <see cref="CopyDeadline"/>. Every size a client declares is checked against
/// <see cref="CacheLimits"/> in 64-bit arithmetic before anything is reserved or evicted.
/// </remarks>
public sealed partial class KvCacheService : IDisposable
{
    /// <summary>Upper bound on chunks one request may name: 4096 chunks of 256 tokens is a 1M-token prompt.</summary>
    public const int MaxChunksPerRequest = 4096;

    private readonly HostMemoryTier _tier;
    private readonly Dictionary<EngineMemoryKind, IEngineMemoryProvider> _providers;
    private readonly RegistrationTable _registrations = new();
    private readonly LeaseBook _leases;
    private readonly CacheLimits _limits;
    private readonly CopyThreads? _helpers;
    private long _nextRegistrationId;
    private long _lateLoads;
    private long _storedChunks;
    private long _loadedChunks;
    private long _storedBytes;
    private long _loadedBytes;
    private long _copyErrors;
    private long _lateStores;

    /// <summary>Creates the service over a host tier and the engine memory providers this build has.</summary>
    /// <param name="tier">The L1 tier.</param>
    /// <param name="providers">The engine memory providers.</param>
    /// <param name="limits">The bounds on client requests; the defaults when null.</param>
    /// <param name="helpers">Threads that help with large copies; none when null.</param>
    /// <param name="chain">The tiers below L1, or null for L1 only. The host tier's eviction sink should be the same chain.</param>
    /// <param name="tierOptions">Promotion settings; the defaults when null.</param>
    public KvCacheService(HostMemoryTier tier, IEnumerable<IEngineMemoryProvider> providers, CacheLimits? limits = null, CopyThreads? helpers = null, TierChain? chain = null, TieringOptions? tierOptions = null)
    {
        ArgumentNullException.ThrowIfNull(tier);
        ArgumentNullException.ThrowIfNull(providers);
        _tier = tier;
        _providers = providers.ToDictionary(p => p.Kind);
        _limits = limits ?? new CacheLimits();
        _helpers = helpers;
        _leases = new LeaseBook(tier, _limits.MaxLeasesPerConnection);
        _chain = chain is { Slots.Count: > 0 } ? chain : null;
        _tiering = tierOptions ?? new TieringOptions();
    }

    /// <summary>The kinds of engine memory this service can open.</summary>
    public IReadOnlyCollection<EngineMemoryKind> MemoryKinds => _providers.Keys;

    /// <summary>The bounds this service enforces.</summary>
    public CacheLimits Limits => _limits;

    /// <summary>Request leases held now (a request that leased on several ranks counts once).</summary>
    public int RequestLeases => _leases.Count;

    /// <summary>Validates and opens a worker's KV memory and returns its registration.</summary>
    /// <param name="sessionId">The registering connection.</param>
    /// <param name="instanceId">The engine instance the worker belongs to.</param>
    /// <param name="ns">The declared namespace fields.</param>
    /// <param name="layers">The memory regions and their layouts.</param>
    /// <param name="owner">The connecting process: host memory must be its own (a pid of 0 means it). Null only in tests and tools that register memory on behalf of a process.</param>
    /// <param name="signals">How a GPU engine orders its compute with the sidecar's copies; null for none.</param>
    /// <exception cref="CacheException">The namespace, a layout, a limit or the memory is refused.</exception>
    public EngineRegistration Register(long sessionId, string instanceId, NamespaceSpec ns, IReadOnlyList<LayerSpec> layers, ProcessIdentity? owner = null, EngineSignals? signals = null)
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

        CheckId("model id", ns.ModelId);
        CheckId("KV dtype", ns.KvDtype);
        if (ns.BlockTokens <= 0 || ns.ChunkTokens <= 0 || ns.ChunkTokens % ns.BlockTokens != 0)
        {
            throw new CacheException(CacheError.BadRequest, $"chunk_tokens ({ns.ChunkTokens}) must be a positive multiple of block_tokens ({ns.BlockTokens}).");
        }

        if (ns.ChunkTokens > _limits.MaxChunkTokens)
        {
            throw new CacheException(CacheError.LimitExceeded, $"chunk_tokens {ns.ChunkTokens} is above Sidecar:MaxChunkTokens ({_limits.MaxChunkTokens}).");
        }

        if (ns.ChunkTokens / ns.BlockTokens > _limits.MaxBlocksPerChunk)
        {
            throw new CacheException(CacheError.LimitExceeded, $"{ns.ChunkTokens / ns.BlockTokens} blocks per chunk is above Sidecar:MaxBlocksPerChunk ({_limits.MaxBlocksPerChunk}).");
        }

        layers = BindToOwner(layers, owner);

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

        long maxChunk = Math.Min(_limits.MaxChunkBytes, _tier.MaxChunkBytes);
        if (geometry.ChunkBytes > maxChunk || geometry.ChunkBytes < _limits.MinChunkBytes)
        {
            throw new CacheException(CacheError.LimitExceeded, $"a chunk of this layout is {geometry.ChunkBytes} bytes; the sidecar takes chunks of {_limits.MinChunkBytes} to {maxChunk} bytes (Sidecar:MinChunkBytes, Sidecar:MaxChunkBytes, a quarter of Sidecar:CapacityBytes). Change chunk_tokens.");
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
            memory = provider.Open(layers.Select(l => l.Memory).ToList(), owner, signals);
        }
        catch (EngineMemoryException ex)
        {
            throw Translate(ex);
        }

        var registration = new EngineRegistration(Interlocked.Increment(ref _nextRegistrationId), sessionId, instanceId, baseNs, geometry, memory, _limits.MaxCachedSaltsPerRegistration);
        _registrations.Add(registration);

        // Off the REGISTER path: allocating (and pinning, on a GPU machine) the first L1 extent for this chunk size
        // takes milliseconds that the first stores would otherwise pay.
        long chunkBytes = geometry.ChunkBytes;
        ThreadPool.UnsafeQueueUserWorkItem(_ => Prewarm(chunkBytes), null);
        return registration;
    }

    private void Prewarm(long chunkBytes)
    {
        try
        {
            _tier.Prewarm(chunkBytes);
        }
        catch (Exception ex) when (ex is OutOfMemoryException or ObjectDisposedException)
        {
            // Best effort: the first store allocates the extent instead.
        }
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
    /// <exception cref="CacheException">A limit is exceeded (tokens, salt, request id, leases of the connection).</exception>
    public LookupResult Lookup(long sessionId, string instanceId, string requestId, string? cacheSalt, ReadOnlySpan<uint> tokens, bool lease)
    {
        CheckRequest(requestId, cacheSalt, tokens.Length);
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
        int[] rankHits = ArrayPool<int>.Shared.Rent(ranks.Length);
        Promotion? promoted = null;
        try
        {
            // With lower tiers every rank's keys are needed (each rank may miss at another chunk); without, the
            // shortest hit so far bounds the work.
            bool tiers = _chain is not null && lease;
            int hit = wanted;
            for (int r = 0; r < ranks.Length && (tiers || hit > 0); r++)
            {
                int n = tiers ? wanted : hit;
                Span<ChunkKey> rankKeys = keys.AsSpan(r * wanted, n);
                ChunkHasher.ComputeKeys(ranks[r].RootKey(cacheSalt), chunkTokens, tokens[..(n * chunkTokens)], rankKeys);
                rankHits[r] = _tier.CountPresentPrefix(rankKeys);
                hit = Math.Min(hit, rankHits[r]);
            }

            if (tiers && WaitForPromotion(instanceId, requestId, cacheSalt, ranks, keys, wanted, rankHits, hit, out promoted))
            {
                // Lower tiers hold more of the prompt and it is on its way into L1: vLLM asks again next step.
                return new LookupResult(0, 0, 0, LookupOutcome.Pending);
            }

            ulong leaseId = 0;
            if (lease && hit > 0)
            {
                LeaseBook.RequestLease pending = _leases.Start(sessionId, instanceId, requestId);
                for (int r = 0; r < ranks.Length; r++)
                {
                    _leases.Add(pending, ranks[r].BaseNamespace, keys.AsSpan(r * wanted, hit));
                }

                leaseId = _leases.Publish(pending);
            }
            else if (lease)
            {
                // A new lookup of the request supersedes its earlier lease, hit or not.
                _leases.ReleaseRequest(instanceId, requestId);
            }

            return new LookupResult(hit, hit * chunkTokens, leaseId, LookupOutcome.Ready);
        }
        finally
        {
            // After the lease: promoted chunks stay pinned until the lease protects them.
            promoted?.Release();
            ArrayPool<ChunkKey>.Shared.Return(keys);
            ArrayPool<int>.Shared.Return(rankHits);
        }
    }

    /// <summary>Releases every lease of a request of an instance.</summary>
    /// <returns>The number of chunks released.</returns>
    public int Release(string instanceId, string requestId) => _leases.ReleaseRequest(instanceId, requestId);

    /// <summary>Releases a lease a lookup of <paramref name="instanceId"/> returned.</summary>
    /// <returns>The number of chunks released.</returns>
    /// <exception cref="CacheException">The instance holds no such lease (released, loaded, expired, or another instance's).</exception>
    public int Release(ulong leaseId, string instanceId)
    {
        int released = _leases.ReleaseById(leaseId, instanceId);
        return released >= 0 ? released : throw new CacheException(CacheError.UnknownLease, $"lease {leaseId} does not exist for this instance (already released, loaded or expired).");
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
        SweepPromotions();
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
            tier.ActiveLeases, Interlocked.Read(ref _copyErrors), _registrations.Count, Interlocked.Read(ref _lateStores), Interlocked.Read(ref _lateLoads),
            _providers.Values.OfType<IDataPlaneCounters>().Select(p => p.Read()).FirstOrDefault());
    }

    /// <inheritdoc/>
    public void Dispose() => _tier.Dispose();

    /// <summary>Checks the client-sized fields every LOOKUP, STORE and LOAD carries.</summary>
    private void CheckRequest(string requestId, string? cacheSalt, int tokens)
    {
        CheckId("request id", requestId);
        if (tokens > _limits.MaxTokensPerRequest)
        {
            throw new CacheException(CacheError.LimitExceeded, $"{tokens} tokens is above Sidecar:MaxTokensPerRequest ({_limits.MaxTokensPerRequest}).");
        }

        if (cacheSalt is not null && cacheSalt.Length > 0 && Encoding.UTF8.GetByteCount(cacheSalt) > _limits.MaxSaltBytes)
        {
            throw new CacheException(CacheError.LimitExceeded, $"a cache_salt of {Encoding.UTF8.GetByteCount(cacheSalt)} bytes is above Sidecar:MaxSaltBytes ({_limits.MaxSaltBytes}).");
        }
    }

    private void CheckId(string what, string? id)
    {
        if (id is not null && id.Length > _limits.MaxIdBytes / 3 && Encoding.UTF8.GetByteCount(id) > _limits.MaxIdBytes)
        {
            throw new CacheException(CacheError.LimitExceeded, $"a {what} of {Encoding.UTF8.GetByteCount(id)} bytes is above Sidecar:MaxIdBytes ({_limits.MaxIdBytes}).");
        }
    }

    /// <summary>Binds host-memory regions to the connecting process: each must name its pid (0 means it).</summary>
    private static IReadOnlyList<LayerSpec> BindToOwner(IReadOnlyList<LayerSpec> layers, ProcessIdentity? owner)
    {
        if (owner is null)
        {
            return layers;
        }

        var bound = new List<LayerSpec>(layers.Count);
        foreach (LayerSpec layer in layers)
        {
            if (layer.Memory.Kind == EngineMemoryKind.HostProcess && layer.Memory.Pid != owner.Pid)
            {
                if (layer.Memory.Pid != 0)
                {
                    throw new CacheException(CacheError.PermissionDenied, $"layer '{layer.Name}' names the memory of process {layer.Memory.Pid}, but the connecting process is {owner.Pid}: a worker may register only its own memory (send pid 0 or its own pid; in another pid namespace send 0).");
                }

                bound.Add(layer with { Memory = layer.Memory with { Pid = owner.Pid } });
            }
            else
            {
                bound.Add(layer);
            }
        }

        return bound;
    }

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
        EngineMemoryError.NotOwner => new CacheException(CacheError.PermissionDenied, ex.Message, ex),
        EngineMemoryError.Unsupported => new CacheException(CacheError.Unsupported, ex.Message, ex),
        EngineMemoryError.BadLayout => new CacheException(CacheError.BadLayout, ex.Message, ex),
        _ => new CacheException(CacheError.MemoryFault, ex.Message, ex),
    };
}
