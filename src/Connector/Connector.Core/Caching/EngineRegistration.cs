using Connector.Core.Keys;
using Connector.Core.Memory;

namespace Connector.Core.Caching;

/// <summary>One worker's registered KV memory: its namespace, chunk geometry and opened engine memory.</summary>
/// <remarks>
/// Copies hold a reference (<see cref="TryAcquire"/>/<see cref="ReleaseRef"/>) so that the engine
/// memory is closed only after the last in-flight copy finished, even if the connection is gone.
/// </remarks>
public sealed class EngineRegistration
{
    private readonly IEngineMemory _memory;
    private readonly int _maxCachedRoots;
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, ChunkKey> _roots = new();
    private int _refs = 1;
    private int _closed;

    internal EngineRegistration(long id, long sessionId, string instanceId, KvNamespace baseNamespace, ChunkGeometry geometry, IEngineMemory memory, int maxCachedRoots)
    {
        Id = id;
        SessionId = sessionId;
        _maxCachedRoots = maxCachedRoots;
        InstanceId = instanceId;
        BaseNamespace = baseNamespace;
        Geometry = geometry;
        _memory = memory;
        BlocksPerChunk = baseNamespace.ChunkTokens / baseNamespace.BlockTokens;
    }

    /// <summary>The registration id announced to the worker.</summary>
    public long Id { get; }

    /// <summary>The connection that registered.</summary>
    public long SessionId { get; }

    /// <summary>The engine instance the worker belongs to.</summary>
    public string InstanceId { get; }

    /// <summary>The namespace without a cache salt.</summary>
    public KvNamespace BaseNamespace { get; }

    /// <summary>Where each layer's blocks live and how a chunk is laid out in L1.</summary>
    public ChunkGeometry Geometry { get; }

    /// <summary>Engine blocks per chunk.</summary>
    public int BlocksPerChunk { get; }

    /// <summary>Tokens per chunk.</summary>
    public int ChunkTokens => BaseNamespace.ChunkTokens;

    internal IEngineMemory Memory => _memory;

    /// <summary>Salts whose root keys are remembered now.</summary>
    public int CachedRoots => _roots.Count;

    /// <summary>The root key of this registration's namespace under a cache salt.</summary>
    /// <param name="cacheSalt">The tenant salt; null or empty for none.</param>
    public ChunkKey RootKey(string? cacheSalt)
    {
        string salt = cacheSalt ?? string.Empty;
        if (_roots.TryGetValue(salt, out ChunkKey root))
        {
            return root;
        }

        root = ChunkHasher.Root(BaseNamespace.WithSalt(salt));
        // Bounded: a client sending a new salt per request must not grow the sidecar's memory.
        if (_roots.Count < _maxCachedRoots)
        {
            _roots.TryAdd(salt, root);
        }

        return root;
    }

    internal bool TryAcquire()
    {
        while (true)
        {
            int refs = Volatile.Read(ref _refs);
            if (refs <= 0)
            {
                return false;
            }

            if (Interlocked.CompareExchange(ref _refs, refs + 1, refs) == refs)
            {
                return true;
            }
        }
    }

    internal void ReleaseRef()
    {
        if (Interlocked.Decrement(ref _refs) == 0)
        {
            _memory.Dispose();
        }
    }

    /// <summary>Closes the registration: no new copies start, and the memory is released after the last in-flight copy.</summary>
    internal void Close()
    {
        if (Interlocked.Exchange(ref _closed, 1) == 0)
        {
            ReleaseRef();
        }
    }
}
