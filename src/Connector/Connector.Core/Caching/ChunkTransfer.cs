using System.Buffers;
using Connector.Core.Keys;
using Connector.Core.Memory;

namespace Connector.Core.Caching;

/// <summary>
/// The validated plan of one store or load: the keys of the named chunks and, per chunk, the copy
/// list between the engine's blocks and an L1 slab. Buffers are pooled: one rental per request,
/// none per chunk.
/// </summary>
internal ref struct ChunkTransfer
{
    private readonly EngineRegistration _registration;
    private readonly ReadOnlySpan<int> _blockIds;
    private readonly int _firstChunk;
    private readonly bool _allowSkippedBlocks;
    private ChunkKey[]? _keys;
    private CopyOp[]? _ops;

    private ChunkTransfer(EngineRegistration registration, ReadOnlySpan<int> blockIds, int firstChunk, bool allowSkippedBlocks, ChunkKey[] keys, CopyOp[] ops)
    {
        _registration = registration;
        _blockIds = blockIds;
        _firstChunk = firstChunk;
        _allowSkippedBlocks = allowSkippedBlocks;
        _keys = keys;
        _ops = ops;
    }

    /// <summary>Validates a request and computes its keys.</summary>
    /// <exception cref="CacheException">A count, the tokens, the keys or the block ids do not match.</exception>
    public static ChunkTransfer Begin(EngineRegistration registration, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, bool allowSkippedBlocks)
    {
        if (firstChunk < 0 || numChunks < 0 || numChunks > KvCacheService.MaxChunksPerRequest || firstChunk > 4 * KvCacheService.MaxChunksPerRequest)
        {
            throw new CacheException(CacheError.BadRequest, $"first_chunk {firstChunk} / num_chunks {numChunks} out of range (at most {KvCacheService.MaxChunksPerRequest} chunks per request).");
        }

        if (blockIds.Length != numChunks * registration.BlocksPerChunk)
        {
            throw new CacheException(CacheError.BadRequest, $"{blockIds.Length} block ids for {numChunks} chunks of {registration.BlocksPerChunk} blocks.");
        }

        int totalChunks = firstChunk + numChunks;
        ChunkKey[] keys;
        if (source.ByTokens)
        {
            if (source.Tokens.Length < totalChunks * registration.ChunkTokens)
            {
                throw new CacheException(CacheError.BadRequest, $"{source.Tokens.Length} tokens do not cover chunks up to {totalChunks} of {registration.ChunkTokens} tokens.");
            }

            keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(totalChunks, 1));
            ChunkHasher.ComputeKeys(registration.RootKey(cacheSalt), registration.ChunkTokens, source.Tokens[..(totalChunks * registration.ChunkTokens)], keys.AsSpan(0, totalChunks));
        }
        else
        {
            if (source.Keys.Length != numChunks * ChunkKey.Size)
            {
                throw new CacheException(CacheError.BadRequest, $"{source.Keys.Length} key bytes for {numChunks} chunks of {ChunkKey.Size}-byte keys.");
            }

            // Keys given by the caller: slot i of the array is chunk firstChunk+i; the parent of the first is unknown.
            keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(totalChunks, 1));
            keys.AsSpan(0, firstChunk).Clear();
            for (int i = 0; i < numChunks; i++)
            {
                keys[firstChunk + i] = ChunkKey.Read(source.Keys, i);
            }
        }

        CopyOp[] ops = ArrayPool<CopyOp>.Shared.Rent(registration.Geometry.MaxCopyOpsPerChunk);
        return new ChunkTransfer(registration, blockIds, firstChunk, allowSkippedBlocks, keys, ops);
    }

    /// <summary>The key of the i-th named chunk.</summary>
    public readonly ChunkKey Key(int i) => _keys![_firstChunk + i];

    /// <summary>The key of the chunk before the i-th named chunk, or <see cref="ChunkKey.None"/> for the first chunk of a sequence.</summary>
    public readonly ChunkKey Parent(int i) => _firstChunk + i == 0 ? ChunkKey.None : _keys![_firstChunk + i - 1];

    /// <summary>The copy list of the i-th named chunk against an L1 slab.</summary>
    /// <exception cref="EngineMemoryException">A block id is out of range.</exception>
    public readonly ReadOnlySpan<CopyOp> CopyOps(int i, nint slab)
    {
        int bpc = _registration.BlocksPerChunk;
        int count = _registration.Geometry.BuildCopyOps(_blockIds.Slice(i * bpc, bpc), slab, _ops, _allowSkippedBlocks);
        return _ops.AsSpan(0, count);
    }

    /// <summary>Returns the pooled buffers.</summary>
    public void Dispose()
    {
        if (_keys is not null)
        {
            ArrayPool<ChunkKey>.Shared.Return(_keys);
            _keys = null;
        }

        if (_ops is not null)
        {
            ArrayPool<CopyOp>.Shared.Return(_ops);
            _ops = null;
        }
    }
}
