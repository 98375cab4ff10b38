using System.Buffers.Binary;
using System.IO.Hashing;
using Connector.Core.Keys;

namespace Connector.Storage.Disk;

/// <summary>A record's header as stored (docs/storage-disk.md, "Record").</summary>
/// <param name="Key">The chunk's key.</param>
/// <param name="Parent">The key of the chunk before it, or <see cref="ChunkKey.None"/>.</param>
/// <param name="NamespaceTag">The namespace tag checked on every read.</param>
/// <param name="Length">Payload bytes.</param>
/// <param name="PayloadChecksum">XxHash3 (64-bit) of the payload.</param>
/// <param name="Sequence">The tier's write sequence number: of two records of one key, the higher wins at recovery.</param>
internal readonly record struct RecordHeader(ChunkKey Key, ChunkKey Parent, ulong NamespaceTag, long Length, ulong PayloadChecksum, ulong Sequence);

/// <summary>
/// The on-disk record: a 128-byte header, the payload, zeros up to the next 4096-byte boundary. Records start on 4096-byte
/// boundaries, so one aligned write carries a whole record and a recovery scan can step from header to header. A payload of
/// 64 KiB or more starts at the record's second block instead of right after the header, so an O_DIRECT read can put it
/// straight into an aligned destination (an L1 slab) with no copy; for block-multiple chunk sizes this costs no space.
/// </summary>
internal static class RecordFormat
{
    /// <summary>Records and their lengths are multiples of this: the largest logical block size O_DIRECT asks for.</summary>
    public const int Alignment = 4096;

    public const int HeaderSize = 128;

    /// <summary>"KVD1" read as a little-endian uint.</summary>
    public const uint Magic = 0x3144564B;

    public const ushort Version = 1;

    /// <summary>Payloads of at least this many bytes start on the record's second block (<see cref="PayloadOffset"/>).</summary>
    public const long OwnBlocksThreshold = 64 * 1024;

    /// <summary>Header flag: the payload starts at <see cref="Alignment"/>, not at <see cref="HeaderSize"/>.</summary>
    private const uint FlagPayloadInOwnBlocks = 1;

    /// <summary>One streaming hasher per thread, reset per chunk: no allocation per chunk.</summary>
    [ThreadStatic]
    private static XxHash3? t_hash;

    private const int MagicOffset = 0;
    private const int VersionOffset = 4;
    private const int HeaderSizeOffset = 6;
    private const int FlagsOffset = 8;
    private const int KeyOffset = 16;
    private const int ParentOffset = 48;
    private const int TagOffset = 80;
    private const int LengthOffset = 88;
    private const int PayloadChecksumOffset = 96;
    private const int SequenceOffset = 104;
    private const int HeaderChecksumOffset = 120;

    /// <summary>Where the payload starts in a record: right after the header, or on the second block for large payloads.</summary>
    public static int PayloadOffset(long payloadLength) => payloadLength >= OwnBlocksThreshold ? Alignment : HeaderSize;

    /// <summary>Bytes a record of <paramref name="payloadLength"/> payload bytes takes on disk.</summary>
    public static long RecordSize(long payloadLength) => AlignUp(PayloadOffset(payloadLength) + payloadLength);

    public static long AlignDown(long value) => value & ~(long)(Alignment - 1);

    public static long AlignUp(long value) => (value + Alignment - 1) & ~(long)(Alignment - 1);

    /// <summary>The payload checksum.</summary>
    public static ulong Checksum(ReadOnlySpan<byte> payload) => XxHash3.HashToUInt64(payload);

    /// <summary>
    /// Copies <paramref name="source"/> to <paramref name="destination"/> and returns its checksum, hashing each 64 KiB piece
    /// right after copying it, while it is still in the cache: the bytes come from memory once, not twice.
    /// </summary>
    public static ulong CopyAndChecksum(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        const int Piece = 64 * 1024;
        if (source.Length <= Piece)
        {
            source.CopyTo(destination);
            return XxHash3.HashToUInt64(destination[..source.Length]);
        }

        XxHash3 hash = t_hash ??= new XxHash3();
        hash.Reset();
        for (int at = 0; at < source.Length; at += Piece)
        {
            int n = Math.Min(Piece, source.Length - at);
            Span<byte> piece = destination.Slice(at, n);
            source.Slice(at, n).CopyTo(piece);
            hash.Append(piece);
        }

        return hash.GetCurrentHashAsUInt64();
    }

    /// <summary>The payload checksum of a payload read in two pieces (equal to <see cref="Checksum(ReadOnlySpan{byte})"/> of both together).</summary>
    public static ulong Checksum(ReadOnlySpan<byte> first, ReadOnlySpan<byte> second)
    {
        if (second.IsEmpty)
        {
            return XxHash3.HashToUInt64(first);
        }

        var hash = new XxHash3();
        hash.Append(first);
        hash.Append(second);
        return hash.GetCurrentHashAsUInt64();
    }

    /// <summary>Writes <paramref name="header"/> into the first <see cref="HeaderSize"/> bytes of <paramref name="destination"/>, sealed by its own checksum.</summary>
    public static void WriteHeader(Span<byte> destination, in RecordHeader header)
    {
        Span<byte> h = destination[..HeaderSize];
        h.Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(h[MagicOffset..], Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(h[VersionOffset..], Version);
        BinaryPrimitives.WriteUInt16LittleEndian(h[HeaderSizeOffset..], HeaderSize);
        BinaryPrimitives.WriteUInt32LittleEndian(h[FlagsOffset..], PayloadOffset(header.Length) == Alignment ? FlagPayloadInOwnBlocks : 0);
        header.Key.CopyTo(h[KeyOffset..]);
        header.Parent.CopyTo(h[ParentOffset..]);
        BinaryPrimitives.WriteUInt64LittleEndian(h[TagOffset..], header.NamespaceTag);
        BinaryPrimitives.WriteInt64LittleEndian(h[LengthOffset..], header.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(h[PayloadChecksumOffset..], header.PayloadChecksum);
        BinaryPrimitives.WriteUInt64LittleEndian(h[SequenceOffset..], header.Sequence);
        BinaryPrimitives.WriteUInt64LittleEndian(h[HeaderChecksumOffset..], XxHash3.HashToUInt64(h[..HeaderChecksumOffset]));
    }

    /// <summary>Reads a header; false when the bytes are not a header of this format (magic, version, size or checksum wrong).</summary>
    public static bool TryReadHeader(ReadOnlySpan<byte> source, out RecordHeader header)
    {
        header = default;
        if (source.Length < HeaderSize)
        {
            return false;
        }

        ReadOnlySpan<byte> h = source[..HeaderSize];
        if (BinaryPrimitives.ReadUInt32LittleEndian(h[MagicOffset..]) != Magic
            || BinaryPrimitives.ReadUInt16LittleEndian(h[VersionOffset..]) != Version
            || BinaryPrimitives.ReadUInt16LittleEndian(h[HeaderSizeOffset..]) != HeaderSize
            || BinaryPrimitives.ReadUInt64LittleEndian(h[HeaderChecksumOffset..]) != XxHash3.HashToUInt64(h[..HeaderChecksumOffset]))
        {
            return false;
        }

        long length = BinaryPrimitives.ReadInt64LittleEndian(h[LengthOffset..]);
        uint flags = BinaryPrimitives.ReadUInt32LittleEndian(h[FlagsOffset..]);
        if (length < 0 || flags != (PayloadOffset(length) == Alignment ? FlagPayloadInOwnBlocks : 0))
        {
            return false;
        }

        header = new RecordHeader(
            new ChunkKey(h.Slice(KeyOffset, ChunkKey.Size)),
            new ChunkKey(h.Slice(ParentOffset, ChunkKey.Size)),
            BinaryPrimitives.ReadUInt64LittleEndian(h[TagOffset..]),
            length,
            BinaryPrimitives.ReadUInt64LittleEndian(h[PayloadChecksumOffset..]),
            BinaryPrimitives.ReadUInt64LittleEndian(h[SequenceOffset..]));
        return true;
    }
}
