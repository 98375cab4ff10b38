using System.Buffers.Binary;
using System.Security.Cryptography;

namespace Connector.Core.Keys;

/// <summary>
/// A sealed hash-chain state: "chunk i of this namespace and salt has key k", authenticated with a secret of
/// this sidecar process (HMAC-SHA-256). A STORE reply hands it to the engine so the next STORE of the request
/// can send only the new chunks' tokens; the sidecar accepts it back only if the seal verifies under the
/// caller's own salted namespace root, so a client can never make the sidecar continue a chain it did not key.
/// </summary>
/// <remarks>
/// Layout (68 bytes): chunk index (u32le), key (32 bytes), HMAC-SHA-256 over root || index || key (32 bytes).
/// The secret lives only in memory: after a restart old tokens no longer verify and the engine resends the prefix.
/// </remarks>
public static class ChainToken
{
    /// <summary>Bytes of a sealed token.</summary>
    public const int Size = 4 + ChunkKey.Size + 32;

    private static readonly byte[] Secret = RandomNumberGenerator.GetBytes(32);

    /// <summary>Seals the key of chunk <paramref name="chunkIndex"/> under <paramref name="root"/>.</summary>
    public static byte[] Seal(in ChunkKey root, int chunkIndex, in ChunkKey key)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(chunkIndex);
        byte[] token = new byte[Size];
        BinaryPrimitives.WriteInt32LittleEndian(token, chunkIndex);
        key.CopyTo(token.AsSpan(4, ChunkKey.Size));
        Mac(root, token.AsSpan(0, 4 + ChunkKey.Size), token.AsSpan(4 + ChunkKey.Size));
        return token;
    }

    /// <summary>Opens a token sealed under <paramref name="root"/>.</summary>
    /// <returns>False when the token is malformed, sealed under another namespace or salt, or by another sidecar run.</returns>
    public static bool TryOpen(in ChunkKey root, ReadOnlySpan<byte> token, out int chunkIndex, out ChunkKey key)
    {
        chunkIndex = -1;
        key = ChunkKey.None;
        if (token.Length != Size)
        {
            return false;
        }

        Span<byte> expected = stackalloc byte[32];
        Mac(root, token[..(4 + ChunkKey.Size)], expected);
        if (!CryptographicOperations.FixedTimeEquals(expected, token[(4 + ChunkKey.Size)..]))
        {
            return false;
        }

        chunkIndex = BinaryPrimitives.ReadInt32LittleEndian(token);
        key = new ChunkKey(token.Slice(4, ChunkKey.Size));
        return chunkIndex >= 0;
    }

    private static void Mac(in ChunkKey root, ReadOnlySpan<byte> body, Span<byte> mac)
    {
        Span<byte> input = stackalloc byte[ChunkKey.Size + 4 + ChunkKey.Size];
        root.CopyTo(input);
        body.CopyTo(input[ChunkKey.Size..]);
        HMACSHA256.HashData(Secret, input, mac);
    }
}
