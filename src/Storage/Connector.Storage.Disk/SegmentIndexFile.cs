using System.Buffers.Binary;
using System.IO.Hashing;
using Connector.Core.Keys;

namespace Connector.Storage.Disk;

/// <summary>One record as a segment's index file lists it.</summary>
internal readonly record struct IndexRecord(ChunkKey Key, ChunkKey Parent, ulong NamespaceTag, long Offset, long Length, ulong Checksum, ulong Sequence);

/// <summary>
/// The index file written when a segment is sealed (docs/storage-disk.md, "Index file"): the segment's live records, so a
/// restart reads a few bytes per chunk instead of every header. Written to a temporary file, synced, then renamed, so it is
/// whole or absent. It is a hint: every read still verifies the record itself, so an index that disagrees never wins.
/// </summary>
internal static class SegmentIndexFile
{
    /// <summary>"KVDX" read as a little-endian uint.</summary>
    public const uint Magic = 0x5844564B;

    public const ushort Version = 1;

    public const int HeaderSize = 64;

    public const int EntrySize = 104;

    private const int TrailerSize = 8;

    /// <summary>Bytes of an index file listing <paramref name="count"/> records.</summary>
    public static long FileSize(int count) => HeaderSize + ((long)count * EntrySize) + TrailerSize;

    /// <summary>Serializes the index of segment <paramref name="segmentId"/>, whose records end at <paramref name="dataLength"/>.</summary>
    public static byte[] Encode(long segmentId, long dataLength, IReadOnlyList<IndexRecord> records)
    {
        byte[] file = new byte[FileSize(records.Count)];
        Span<byte> s = file;
        BinaryPrimitives.WriteUInt32LittleEndian(s, Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(s[4..], Version);
        BinaryPrimitives.WriteUInt16LittleEndian(s[6..], EntrySize);
        BinaryPrimitives.WriteInt64LittleEndian(s[8..], segmentId);
        BinaryPrimitives.WriteInt32LittleEndian(s[16..], records.Count);
        BinaryPrimitives.WriteInt64LittleEndian(s[24..], dataLength);
        for (int i = 0; i < records.Count; i++)
        {
            Span<byte> e = s.Slice(HeaderSize + (i * EntrySize), EntrySize);
            IndexRecord r = records[i];
            r.Key.CopyTo(e);
            r.Parent.CopyTo(e[32..]);
            BinaryPrimitives.WriteUInt64LittleEndian(e[64..], r.NamespaceTag);
            BinaryPrimitives.WriteInt64LittleEndian(e[72..], r.Offset);
            BinaryPrimitives.WriteInt64LittleEndian(e[80..], r.Length);
            BinaryPrimitives.WriteUInt64LittleEndian(e[88..], r.Checksum);
            BinaryPrimitives.WriteUInt64LittleEndian(e[96..], r.Sequence);
        }

        int body = file.Length - TrailerSize;
        BinaryPrimitives.WriteUInt64LittleEndian(s[body..], XxHash3.HashToUInt64(s[..body]));
        return file;
    }

    /// <summary>Writes the file atomically: a temporary file, fsync, rename, fsync of the directory.</summary>
    public static void Write(string path, long segmentId, long dataLength, IReadOnlyList<IndexRecord> records)
    {
        byte[] bytes = Encode(segmentId, dataLength, records);
        string temporary = path + ".tmp";
        using (var stream = new FileStream(temporary, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 1 << 16))
        {
            stream.Write(bytes);
            stream.Flush(flushToDisk: true);
        }

        File.Move(temporary, path, overwrite: true);
        Posix.SyncDirectory(Path.GetDirectoryName(path)!);
    }

    /// <summary>Parses an index file; false with a reason when it is not a whole, matching index of <paramref name="segmentId"/>.</summary>
    public static bool TryDecode(ReadOnlySpan<byte> file, long segmentId, out long dataLength, out IndexRecord[] records, out string reason)
    {
        dataLength = 0;
        records = [];
        if (file.Length < HeaderSize + TrailerSize)
        {
            reason = "is shorter than its header";
            return false;
        }

        if (BinaryPrimitives.ReadUInt32LittleEndian(file) != Magic || BinaryPrimitives.ReadUInt16LittleEndian(file[4..]) != Version
            || BinaryPrimitives.ReadUInt16LittleEndian(file[6..]) != EntrySize)
        {
            reason = "has an unknown magic or version";
            return false;
        }

        int count = BinaryPrimitives.ReadInt32LittleEndian(file[16..]);
        if (count < 0 || FileSize(count) != file.Length)
        {
            reason = "has a length that does not match its record count";
            return false;
        }

        int body = file.Length - TrailerSize;
        if (BinaryPrimitives.ReadUInt64LittleEndian(file[body..]) != XxHash3.HashToUInt64(file[..body]))
        {
            reason = "fails its checksum";
            return false;
        }

        if (BinaryPrimitives.ReadInt64LittleEndian(file[8..]) != segmentId)
        {
            reason = "belongs to another segment";
            return false;
        }

        dataLength = BinaryPrimitives.ReadInt64LittleEndian(file[24..]);
        records = new IndexRecord[count];
        for (int i = 0; i < count; i++)
        {
            ReadOnlySpan<byte> e = file.Slice(HeaderSize + (i * EntrySize), EntrySize);
            records[i] = new IndexRecord(
                new ChunkKey(e[..32]),
                new ChunkKey(e.Slice(32, 32)),
                BinaryPrimitives.ReadUInt64LittleEndian(e[64..]),
                BinaryPrimitives.ReadInt64LittleEndian(e[72..]),
                BinaryPrimitives.ReadInt64LittleEndian(e[80..]),
                BinaryPrimitives.ReadUInt64LittleEndian(e[88..]),
                BinaryPrimitives.ReadUInt64LittleEndian(e[96..]));
        }

        reason = "";
        return true;
    }
}
