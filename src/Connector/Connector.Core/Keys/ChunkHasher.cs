using System.Buffers;
using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace Connector.Core.Keys;

/// <summary>
/// The chunk-key hash chain: k_i = SHA-256(k_{i-1} || u32le tokens of chunk i), k_{-1} = SHA-256(namespace encoding).
/// No seed, so every process and every implementation computes the same keys (docs/hashing.md).
/// </summary>
public static class ChunkHasher
{
    /// <summary>Chunks up to this many bytes of input hash from a stack buffer: 2048 tokens.</summary>
    private const int MaxStackallocBytes = ChunkKey.Size + (2048 * sizeof(uint));

    static ChunkHasher()
    {
        if (!BitConverter.IsLittleEndian)
        {
            throw new PlatformNotSupportedException("chunk keys hash u32le token bytes read in place; big-endian hosts are not supported.");
        }
    }

    /// <summary>The root key k_{-1} of a namespace.</summary>
    public static ChunkKey Root(KvNamespace ns)
    {
        ArgumentNullException.ThrowIfNull(ns);
        Span<byte> digest = stackalloc byte[ChunkKey.Size];
        SHA256.HashData(ns.Encode(), digest);
        return new ChunkKey(digest);
    }

    /// <summary>Computes the keys of the full chunks of <paramref name="tokens"/>.</summary>
    /// <param name="root">The namespace's root key.</param>
    /// <param name="chunkTokens">Tokens per chunk.</param>
    /// <param name="tokens">Token ids from the sequence's first token; a trailing partial chunk gets no key.</param>
    /// <param name="keys">Receives min(tokens / chunkTokens, keys.Length) keys.</param>
    /// <returns>The number of keys written.</returns>
    public static int ComputeKeys(in ChunkKey root, int chunkTokens, ReadOnlySpan<uint> tokens, Span<ChunkKey> keys) =>
        ComputeKeys(root, chunkTokens, MemoryMarshal.AsBytes(tokens), keys);

    /// <summary>Computes the keys of the full chunks of u32le token bytes.</summary>
    /// <inheritdoc cref="ComputeKeys(in ChunkKey, int, ReadOnlySpan{uint}, Span{ChunkKey})"/>
    public static int ComputeKeys(in ChunkKey root, int chunkTokens, ReadOnlySpan<byte> tokensU32Le, Span<ChunkKey> keys)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(chunkTokens);
        int chunkBytes = chunkTokens * sizeof(uint);
        int count = Math.Min(tokensU32Le.Length / chunkBytes, keys.Length);
        if (count == 0)
        {
            return 0;
        }

        int inputBytes = ChunkKey.Size + chunkBytes;
        byte[]? rented = null;
        Span<byte> input = inputBytes <= MaxStackallocBytes
            ? stackalloc byte[MaxStackallocBytes]
            : (rented = ArrayPool<byte>.Shared.Rent(inputBytes));
        input = input[..inputBytes];
        Span<byte> digest = stackalloc byte[ChunkKey.Size];
        try
        {
            root.CopyTo(input);
            for (int i = 0; i < count; i++)
            {
                tokensU32Le.Slice(i * chunkBytes, chunkBytes).CopyTo(input[ChunkKey.Size..]);
                SHA256.HashData(input, digest);
                keys[i] = new ChunkKey(digest);
                digest.CopyTo(input);
            }
        }
        finally
        {
            if (rented is not null)
            {
                ArrayPool<byte>.Shared.Return(rented);
            }
        }

        return count;
    }
}
