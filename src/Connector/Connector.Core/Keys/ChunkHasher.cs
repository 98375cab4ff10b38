using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace Connector.Core.Keys;

/// <summary>
/// The chunk-key hash chain: k_i = SHA-256(k_{i-1} || u32le tokens of chunk i), k_{-1} = SHA-256(namespace encoding).
/// No seed, so every process and every implementation computes the same keys (docs/hashing.md).
/// </summary>
public static class ChunkHasher
{
    // One reusable SHA-256 context per thread: a one-shot HashData sets up and tears down a context per
    // chunk, which costs as much as hashing the chunk's 1 KiB.
    [ThreadStatic]
    private static IncrementalHash? t_sha256;

    [ThreadStatic]
    private static byte[]? t_input;

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

        IncrementalHash? sha = Sha256Native.IsAvailable ? null : (t_sha256 ??= IncrementalHash.CreateHash(HashAlgorithmName.SHA256));

        // The previous key and the chunk's tokens are hashed as one contiguous input: one append and
        // one finish per chunk (each is a call into OpenSSL, which costs as much as hashing 1 KiB).
        int inputBytes = ChunkKey.Size + chunkBytes;
        byte[] input = t_input is { } cached && cached.Length >= inputBytes ? cached : (t_input = new byte[Math.Max(inputBytes, 4096)]);
        Span<byte> buffer = input.AsSpan(0, inputBytes);
        Span<byte> digest = buffer[..ChunkKey.Size];
        root.CopyTo(digest);
        for (int i = 0; i < count; i++)
        {
            tokensU32Le.Slice(i * chunkBytes, chunkBytes).CopyTo(buffer[ChunkKey.Size..]);
            if (sha is null)
            {
                Sha256Native.Hash(buffer, digest);
            }
            else
            {
                sha.AppendData(buffer);
                sha.GetHashAndReset(digest);
            }
            keys[i] = new ChunkKey(digest);
        }

        return count;
    }
}
