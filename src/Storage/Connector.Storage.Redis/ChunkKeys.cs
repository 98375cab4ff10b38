using System.Text;
using Connector.Core.Keys;
using StackExchange.Redis;

namespace Connector.Storage.Redis;

/// <summary>
/// Builds the Redis keys of a chunk. The manifest is <c>{prefix}{{hex key}}</c>; piece <c>i</c> of write <c>w</c> is
/// <c>{prefix}{{hex key}}:{w as 16 hex}:{i}</c>. The braces are a cluster hash tag: every key of one chunk hashes to
/// the same slot, so its pieces and manifest live on one node and pipeline on one connection.
/// </summary>
internal sealed class ChunkKeys
{
    private const int HexKeyLength = ChunkKey.Size * 2;
    private readonly byte[] _prefix;

    public ChunkKeys(string prefix)
    {
        _prefix = Encoding.ASCII.GetBytes(prefix);
        Pattern = prefix + "*";
    }

    /// <summary>The SCAN pattern of every key of this tier.</summary>
    public string Pattern { get; }

    /// <summary>Bytes of a manifest key.</summary>
    public int ManifestKeyLength => _prefix.Length + HexKeyLength + 2;

    /// <summary>The manifest key of <paramref name="key"/>.</summary>
    public RedisKey Manifest(in ChunkKey key)
    {
        var bytes = new byte[ManifestKeyLength];
        WriteManifest(key, bytes);
        return bytes;
    }

    /// <summary>The key of piece <paramref name="index"/> of write <paramref name="writeId"/> of <paramref name="key"/>.</summary>
    public RedisKey Piece(in ChunkKey key, ulong writeId, int index)
    {
        Span<byte> digits = stackalloc byte[10];
        index.TryFormat(digits, out int n, provider: System.Globalization.CultureInfo.InvariantCulture);
        var bytes = new byte[ManifestKeyLength + 1 + 16 + 1 + n];
        int at = WriteManifest(key, bytes);
        bytes[at++] = (byte)':';
        for (int shift = 60; shift >= 0; shift -= 4)
        {
            bytes[at++] = Hex((int)(writeId >> shift) & 0xF);
        }

        bytes[at++] = (byte)':';
        digits[..n].CopyTo(bytes.AsSpan(at));
        return bytes;
    }

    /// <summary>Whether a key of this tier is a manifest (not a piece).</summary>
    public bool IsManifest(ReadOnlySpan<byte> redisKey) => redisKey.Length == ManifestKeyLength && redisKey[^1] == (byte)'}';

    private int WriteManifest(in ChunkKey key, Span<byte> destination)
    {
        _prefix.CopyTo(destination);
        int at = _prefix.Length;
        destination[at++] = (byte)'{';
        Span<byte> raw = stackalloc byte[ChunkKey.Size];
        key.CopyTo(raw);
        foreach (byte b in raw)
        {
            destination[at++] = Hex(b >> 4);
            destination[at++] = Hex(b & 0xF);
        }

        destination[at++] = (byte)'}';
        return at;
    }

    private static byte Hex(int nibble) => (byte)(nibble < 10 ? '0' + nibble : 'a' + nibble - 10);
}
