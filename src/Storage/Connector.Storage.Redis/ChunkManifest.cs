using System.Buffers.Binary;
using System.IO.Hashing;
using Connector.Core.Keys;

namespace Connector.Storage.Redis;

/// <summary>
/// The small value under a chunk's key that makes the chunk visible: it names the write id of its pieces, their
/// count and size, the codec, the namespace tag, the key itself and a checksum of the whole uncompressed chunk.
/// A chunk that fits one piece carries its bytes inline after the header (one key, one SET).
/// </summary>
/// <remarks>
/// Layout, little-endian, <see cref="HeaderSize"/> bytes:
/// magic "KVSR" (4) | version (1) | codec (1) | flags (1) | reserved 0 (1) | namespace tag (8) | chunk key (32) |
/// length (8) | stored bytes (8) | piece count (4) | piece bytes (4) | write id (8) | XxHash128 of the chunk (16) |
/// XxHash3 of the 96 bytes before it (8). Then, when <see cref="ManifestFlags.Inline"/> is set, the stored bytes.
/// </remarks>
internal readonly record struct ChunkManifest(
    RedisCompression Codec,
    ManifestFlags Flags,
    ulong NamespaceTag,
    ChunkKey Key,
    long Length,
    long StoredBytes,
    int PieceCount,
    int PieceBytes,
    ulong WriteId,
    UInt128 Checksum)
{
    /// <summary>Bytes of the header.</summary>
    public const int HeaderSize = 104;

    private const uint Magic = 0x5253564B; // "KVSR" little-endian
    private const byte Version = 1;
    private const int HashedBytes = 96;

    /// <summary>Whether the chunk's bytes follow the header in the same value.</summary>
    public bool IsInline => (Flags & ManifestFlags.Inline) != 0;

    /// <summary>The uncompressed bytes of piece <paramref name="index"/>.</summary>
    public int RawPieceLength(int index) => (int)Math.Min(PieceBytes, Length - ((long)index * PieceBytes));

    /// <summary>Writes the header into the first <see cref="HeaderSize"/> bytes of <paramref name="destination"/>.</summary>
    public void Write(Span<byte> destination)
    {
        Span<byte> d = destination[..HeaderSize];
        BinaryPrimitives.WriteUInt32LittleEndian(d, Magic);
        d[4] = Version;
        d[5] = (byte)Codec;
        d[6] = (byte)Flags;
        d[7] = 0;
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], NamespaceTag);
        Key.CopyTo(d[16..]);
        BinaryPrimitives.WriteInt64LittleEndian(d[48..], Length);
        BinaryPrimitives.WriteInt64LittleEndian(d[56..], StoredBytes);
        BinaryPrimitives.WriteInt32LittleEndian(d[64..], PieceCount);
        BinaryPrimitives.WriteInt32LittleEndian(d[68..], PieceBytes);
        BinaryPrimitives.WriteUInt64LittleEndian(d[72..], WriteId);
        BinaryPrimitives.WriteUInt128LittleEndian(d[80..], Checksum);
        BinaryPrimitives.WriteUInt64LittleEndian(d[HashedBytes..], XxHash3.HashToUInt64(d[..HashedBytes]));
    }

    /// <summary>Parses and checks a manifest read for a chunk; nothing here throws for bad input.</summary>
    /// <param name="value">The manifest value (at least the header; an inline chunk's bytes may follow).</param>
    /// <param name="expectedKey">The key the value was read under.</param>
    /// <param name="expectedTag">The namespace tag the reader expects.</param>
    /// <param name="expectedLength">The chunk length the reader expects.</param>
    /// <param name="headerOnly">Whether <paramref name="value"/> is only the header (a probe's GETRANGE), so inline bytes are not checked.</param>
    /// <param name="manifest">The parsed manifest when the result is <see cref="ManifestCheck.Valid"/>.</param>
    public static ManifestCheck TryParse(ReadOnlySpan<byte> value, in ChunkKey expectedKey, ulong expectedTag, long expectedLength, bool headerOnly, out ChunkManifest manifest)
    {
        manifest = default;
        if (value.Length < HeaderSize
            || BinaryPrimitives.ReadUInt32LittleEndian(value) != Magic
            || BinaryPrimitives.ReadUInt64LittleEndian(value[HashedBytes..]) != XxHash3.HashToUInt64(value[..HashedBytes]))
        {
            return ManifestCheck.Garbage;
        }

        if (value[4] != Version || value[7] != 0)
        {
            return ManifestCheck.Garbage;
        }

        var codec = (RedisCompression)value[5];
        var flags = (ManifestFlags)value[6];
        var m = new ChunkManifest(
            codec,
            flags,
            BinaryPrimitives.ReadUInt64LittleEndian(value[8..]),
            new ChunkKey(value.Slice(16, ChunkKey.Size)),
            BinaryPrimitives.ReadInt64LittleEndian(value[48..]),
            BinaryPrimitives.ReadInt64LittleEndian(value[56..]),
            BinaryPrimitives.ReadInt32LittleEndian(value[64..]),
            BinaryPrimitives.ReadInt32LittleEndian(value[68..]),
            BinaryPrimitives.ReadUInt64LittleEndian(value[72..]),
            BinaryPrimitives.ReadUInt128LittleEndian(value[80..]));

        if (m.Key != expectedKey)
        {
            return ManifestCheck.WrongKey;
        }

        if (m.NamespaceTag != expectedTag)
        {
            return ManifestCheck.WrongNamespace;
        }

        if (m.Length != expectedLength)
        {
            return ManifestCheck.WrongLength;
        }

        if (!Enum.IsDefined(codec)
            || (flags & ~ManifestFlags.Inline) != 0
            || m.Length <= 0
            || m.PieceBytes is <= 0 or > RedisTierOptions.MaxPieceBytes
            || m.PieceCount != (int)Math.Min(int.MaxValue, (m.Length + m.PieceBytes - 1) / m.PieceBytes)
            || m.StoredBytes < 0
            || m.StoredBytes > m.Length
            || (m.IsInline && (m.PieceCount != 1 || (!headerOnly && value.Length - HeaderSize != m.StoredBytes)))
            || (!m.IsInline && value.Length != HeaderSize))
        {
            return ManifestCheck.Garbage;
        }

        manifest = m;
        return ManifestCheck.Valid;
    }
}

/// <summary>Flags of a <see cref="ChunkManifest"/>.</summary>
[Flags]
internal enum ManifestFlags : byte
{
    /// <summary>No flags.</summary>
    None = 0,

    /// <summary>The chunk's one piece follows the header.</summary>
    Inline = 1,
}

/// <summary>What <see cref="ChunkManifest.TryParse"/> found.</summary>
internal enum ManifestCheck
{
    /// <summary>A manifest for the expected chunk.</summary>
    Valid,

    /// <summary>Not a manifest of ours (bad magic, version, header checksum or inconsistent fields).</summary>
    Garbage,

    /// <summary>A manifest naming another key.</summary>
    WrongKey,

    /// <summary>A manifest of another namespace.</summary>
    WrongNamespace,

    /// <summary>A manifest of a chunk of another length.</summary>
    WrongLength,
}
