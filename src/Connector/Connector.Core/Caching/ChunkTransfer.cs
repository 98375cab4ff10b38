using System.Buffers;
using Connector.Core.Keys;
using Connector.Core.Memory;

namespace Connector.Core.Caching;

/// <summary>
/// The validated plan of one store or load: the keys of the named chunks (derived here from the caller's
/// namespace, salt and tokens) and their engine block ids. Buffers are pooled: one rental per request, none
/// per chunk. <see cref="BuildOps"/> is thread-safe, so chunks can be copied by several threads.
/// </summary>
internal sealed class ChunkTransfer : IDisposable
{
    private readonly EngineRegistration _registration;
    private readonly int _firstChunk;
    private readonly bool _allowSkippedBlocks;
    private ChunkKey[]? _keys;
    private int[]? _blockIds;

    private ChunkTransfer(EngineRegistration registration, int firstChunk, int numChunks, bool allowSkippedBlocks, ChunkKey[] keys, int[] blockIds, ulong namespaceTag)
    {
        _registration = registration;
        _firstChunk = firstChunk;
        NumChunks = numChunks;
        _allowSkippedBlocks = allowSkippedBlocks;
        _keys = keys;
        _blockIds = blockIds;
        NamespaceTag = namespaceTag;
    }

    /// <summary>Chunks named by the request.</summary>
    public int NumChunks { get; }

    /// <summary>A tag of the salted namespace the keys were derived in (recorded with every stored chunk).</summary>
    public ulong NamespaceTag { get; }

    /// <summary>Validates a request and computes its keys.</summary>
    /// <exception cref="CacheException">A count, the tokens or the block ids do not match, or a limit is exceeded.</exception>
    public static ChunkTransfer Begin(EngineRegistration registration, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, bool allowSkippedBlocks)
    {
        if (firstChunk < 0 || numChunks < 0 || numChunks > KvCacheService.MaxChunksPerRequest)
        {
            throw new CacheException(CacheError.BadRequest, $"first_chunk {firstChunk} / num_chunks {numChunks} out of range (at most {KvCacheService.MaxChunksPerRequest} chunks per request).");
        }

        // All in 64-bit: first_chunk and num_chunks come from the wire.
        long totalChunks = (long)firstChunk + numChunks;
        long tokensNeeded = totalChunks * registration.ChunkTokens;
        if ((long)blockIds.Length != (long)numChunks * registration.BlocksPerChunk)
        {
            throw new CacheException(CacheError.BadRequest, $"{blockIds.Length} block ids for {numChunks} chunks of {registration.BlocksPerChunk} blocks.");
        }

        if (source.Tokens.Length < tokensNeeded)
        {
            throw new CacheException(CacheError.BadRequest, $"{source.Tokens.Length} tokens do not cover chunks up to {totalChunks} of {registration.ChunkTokens} tokens.");
        }

        ChunkKey root = registration.RootKey(cacheSalt);
        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent((int)Math.Max(totalChunks, 1));
        ChunkHasher.ComputeKeys(root, registration.ChunkTokens, source.Tokens[..(int)tokensNeeded], keys.AsSpan(0, (int)totalChunks));
        int[] ids = ArrayPool<int>.Shared.Rent(Math.Max(blockIds.Length, 1));
        blockIds.CopyTo(ids);
        return new ChunkTransfer(registration, firstChunk, numChunks, allowSkippedBlocks, keys, ids, root.Tag);
    }

    /// <summary>The key of the i-th named chunk.</summary>
    public ChunkKey Key(int i) => _keys![_firstChunk + i];

    /// <summary>The key of the chunk before the i-th named chunk, or <see cref="ChunkKey.None"/> for the first chunk.</summary>
    public ChunkKey Parent(int i) => _firstChunk + i == 0 ? ChunkKey.None : _keys![_firstChunk + i - 1];

    /// <summary>Writes the copy list of the i-th named chunk against an L1 slab.</summary>
    /// <exception cref="EngineMemoryException">A block id is out of range.</exception>
    public int BuildOps(int i, nint slab, Span<CopyOp> ops)
    {
        int bpc = _registration.BlocksPerChunk;
        return _registration.Geometry.BuildCopyOps(_blockIds.AsSpan(i * bpc, bpc), slab, ops, _allowSkippedBlocks);
    }

    /// <summary>Checks every block id before any slab is reserved, so a bad request changes nothing.</summary>
    public void ValidateBlockIds()
    {
        int limit = _registration.Geometry.NumBlocks;
        foreach (int id in _blockIds.AsSpan(0, NumChunks * _registration.BlocksPerChunk))
        {
            if ((uint)id >= (uint)limit && !(_allowSkippedBlocks && id == -1))
            {
                throw new CacheException(CacheError.OutOfRange, $"block id {id} is outside [0, {limit})");
            }
        }
    }

    /// <summary>Returns the pooled buffers.</summary>
    public void Dispose()
    {
        if (_keys is not null)
        {
            ArrayPool<ChunkKey>.Shared.Return(_keys);
            _keys = null;
        }

        if (_blockIds is not null)
        {
            ArrayPool<int>.Shared.Return(_blockIds);
            _blockIds = null;
        }
    }
}
