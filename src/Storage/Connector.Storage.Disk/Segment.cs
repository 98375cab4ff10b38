using System.Globalization;
using Microsoft.Win32.SafeHandles;

namespace Connector.Storage.Disk;

/// <summary>
/// One append-only segment file and its open descriptor. Readers take a reference for the length of a read, so a segment that
/// is deleted (evicted, compacted, cleared) keeps its descriptor until the last read ends; Linux keeps an unlinked file's
/// blocks while a descriptor is open.
/// </summary>
/// <remarks>Mutable fields are guarded by the tier's lock, except <see cref="Length"/>, which only the writer thread advances.</remarks>
internal sealed class Segment
{
    private int _references = 1;

    public Segment(long id, string directory, SafeFileHandle handle, bool directIo)
    {
        Id = id;
        DataPath = Path.Combine(directory, DataFileName(id));
        IndexPath = Path.Combine(directory, IndexFileName(id));
        Handle = handle;
        DirectIo = directIo;
    }

    public long Id { get; }

    public string DataPath { get; }

    public string IndexPath { get; }

    public SafeFileHandle Handle { get; }

    /// <summary>Whether the descriptor was opened with O_DIRECT (reads need aligned buffers, offsets and lengths).</summary>
    public bool DirectIo { get; }

    /// <summary>End of the last record written (the next append's offset).</summary>
    public long Length { get; set; }

    /// <summary>Bytes of the index file written when the segment was sealed (counted in the footprint).</summary>
    public long IndexFileBytes { get; set; }

    /// <summary>Record bytes of the chunks the index points into this segment.</summary>
    public long LiveBytes { get; set; }

    /// <summary>Whether no more records will be appended.</summary>
    public bool Sealed { get; set; }

    /// <summary>Whether the segment left the tier (its files are, or are about to be, deleted).</summary>
    public bool Retired { get; set; }

    /// <summary>Record bytes no chunk uses any more: what compaction would give back.</summary>
    public long DeadBytes => Length - LiveBytes;

    /// <summary>Records appended to the open segment, for the index file written when it is sealed.</summary>
    public List<IndexEntry>? Appended { get; set; }

    public static string DataFileName(long id) => string.Create(CultureInfo.InvariantCulture, $"seg-{id:D10}.dat");

    public static string IndexFileName(long id) => string.Create(CultureInfo.InvariantCulture, $"seg-{id:D10}.idx");

    /// <summary>Parses "seg-0000000042.dat" or ".idx".</summary>
    public static bool TryParseId(string fileName, string extension, out long id)
    {
        id = 0;
        return fileName.StartsWith("seg-", StringComparison.Ordinal)
            && fileName.EndsWith(extension, StringComparison.Ordinal)
            && long.TryParse(fileName.AsSpan(4, fileName.Length - 4 - extension.Length), NumberStyles.None, CultureInfo.InvariantCulture, out id);
    }

    /// <summary>Takes a reference for a read; false once the segment is retired. Call under the tier's lock.</summary>
    public bool TryAddReference()
    {
        if (Retired)
        {
            return false;
        }

        Interlocked.Increment(ref _references);
        return true;
    }

    /// <summary>Drops a reference; the last one closes the descriptor.</summary>
    public void Release()
    {
        if (Interlocked.Decrement(ref _references) == 0)
        {
            Handle.Dispose();
        }
    }
}
