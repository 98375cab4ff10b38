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
    private readonly int _base;
    private readonly ChunkKey _baseParent;
    private readonly bool _allowSkippedBlocks;
    private readonly ChunkKey _root;
    private ChunkKey[]? _keys;
    private int[]? _blockIds;

    private ChunkTransfer(EngineRegistration registration, int firstChunk, int numChunks, bool allowSkippedBlocks, ChunkKey[] keys, int[] blockIds, in ChunkKey root, int baseChunk, in ChunkKey baseParent)
    {
        _registration = registration;
        _firstChunk = firstChunk;
        NumChunks = numChunks;
        _allowSkippedBlocks = allowSkippedBlocks;
        _keys = keys;
        _blockIds = blockIds;
        _root = root;
        _base = baseChunk;
        _baseParent = baseParent;
    }

    /// <summary>Chunks named by the request.</summary>
    public int NumChunks { get; }

    /// <summary>A tag of the salted namespace the keys were derived in (recorded with every stored chunk).</summary>
    public ulong NamespaceTag => _root.Tag;

    /// <summary>Validates a request and computes its keys.</summary>
    /// <param name="registration">The caller's registration.</param>
    /// <param name="cacheSalt">The tenant salt.</param>
    /// <param name="source">The tokens: from the request's first token, or with <paramref name="chain"/> from the chunk after the one it names.</param>
    /// <param name="firstChunk">The first chunk named.</param>
    /// <param name="numChunks">The chunks named.</param>
    /// <param name="blockIds">The engine block ids, chunk by chunk.</param>
    /// <param name="allowSkippedBlocks">Whether -1 means "leave this block alone".</param>
    /// <param name="chain">A <see cref="ChainToken"/> from an earlier STORE of the request, or empty.</param>
    /// <exception cref="CacheException">A count, the tokens, the chain token or the block ids do not match.</exception>
    public static ChunkTransfer Begin(EngineRegistration registration, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, bool allowSkippedBlocks, ReadOnlySpan<byte> chain = default)
    {
        if (firstChunk < 0 || numChunks < 0 || numChunks > KvCacheService.MaxChunksPerRequest)
        {
            throw new CacheException(CacheError.BadRequest, $"first_chunk {firstChunk} / num_chunks {numChunks} out of range (at most {KvCacheService.MaxChunksPerRequest} chunks per request).");
        }

        if ((long)blockIds.Length != (long)numChunks * registration.BlocksPerChunk)
        {
            throw new CacheException(CacheError.BadRequest, $"{blockIds.Length} block ids for {numChunks} chunks of {registration.BlocksPerChunk} blocks.");
        }

        ChunkKey root = registration.RootKey(cacheSalt);
        int baseChunk = 0;
        ChunkKey baseParent = root;
        if (!chain.IsEmpty)
        {
            // The chain state must be one this sidecar sealed for this very namespace and salt.
            if (!ChainToken.TryOpen(root, chain, out int chainChunk, out ChunkKey chainKey) || chainChunk >= firstChunk)
            {
                throw new CacheException(CacheError.BadRequest, "the chain state does not belong to this namespace, salt and sidecar run, or names a chunk at or after first_chunk; send the tokens from the first chunk.");
            }

            baseChunk = chainChunk + 1;
            baseParent = chainKey;
        }

        // All in 64-bit: first_chunk and num_chunks come from the wire.
        long keyCount = (long)firstChunk + numChunks - baseChunk;
        long tokensNeeded = keyCount * registration.ChunkTokens;
        if (source.Tokens.Length < tokensNeeded)
        {
            throw new CacheException(CacheError.BadRequest, $"{source.Tokens.Length} tokens do not cover chunks {baseChunk} to {firstChunk + (long)numChunks - 1} of {registration.ChunkTokens} tokens.");
        }

        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent((int)Math.Max(keyCount, 1));
        ChunkHasher.ComputeKeys(baseParent, registration.ChunkTokens, source.Tokens[..(int)tokensNeeded], keys.AsSpan(0, (int)keyCount));
        int[] ids = ArrayPool<int>.Shared.Rent(Math.Max(blockIds.Length, 1));
        blockIds.CopyTo(ids);
        return new ChunkTransfer(registration, firstChunk, numChunks, allowSkippedBlocks, keys, ids, root, baseChunk, baseParent);
    }

    /// <summary>The key of the i-th named chunk.</summary>
    public ChunkKey Key(int i) => _keys![_firstChunk - _base + i];

    /// <summary>The key of the chunk before the i-th named chunk, or <see cref="ChunkKey.None"/> for the request's first chunk.</summary>
    public ChunkKey Parent(int i)
    {
        int k = _firstChunk - _base + i;
        return k > 0 ? _keys![k - 1] : _base == 0 ? ChunkKey.None : _baseParent;
    }

    /// <summary>The sealed chain state of the last named chunk (null when no chunk is named): the next STORE may resume from it.</summary>
    public byte[]? SealLast() => NumChunks == 0 ? null : ChainToken.Seal(_root, _firstChunk + NumChunks - 1, Key(NumChunks - 1));

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
