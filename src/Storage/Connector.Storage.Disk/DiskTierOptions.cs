namespace Connector.Storage.Disk;

/// <summary>Settings of the local-disk tier (docs/storage-disk.md).</summary>
public sealed class DiskTierOptions
{
    /// <summary>Smallest segment: small segments are for tests; production wants hundreds of MiB.</summary>
    public const long MinSegmentBytes = 64 * 1024;

    /// <summary>Largest segment (offsets and buffer lengths of one record stay within an int).</summary>
    public const long MaxSegmentBytes = 1L << 30;

    /// <summary>Most sightings <see cref="AdmitAfterSightings"/> may ask for (the admission sketch counts to 15).</summary>
    public const int MaxAdmitAfterSightings = 15;

    /// <summary>The directory holding the segment files; created if missing. One tier per directory (a lock file enforces it).</summary>
    public string Path { get; set; } = "";

    /// <summary>
    /// Bytes of disk the tier may use: segment and index files together. Defaults to 64 GiB. At least four segments; one
    /// segment's worth is kept free as room for compaction. Lowered at start to what the filesystem has free.
    /// </summary>
    public long CapacityBytes { get; set; } = 64L << 30;

    /// <summary>Bytes of one segment file. Defaults to 256 MiB. A multiple of 4096 between 64 KiB and 1 GiB; a chunk larger than a segment is not stored.</summary>
    public long SegmentBytes { get; set; } = 256L << 20;

    /// <summary>
    /// Bytes of chunks waiting to be written (copied out of L1 at <c>Offer</c>). Defaults to 256 MiB. When full, offers are
    /// dropped (and counted) instead of waiting.
    /// </summary>
    public long WriteQueueBytes { get; set; } = 256L << 20;

    /// <summary>
    /// At which sighting a chunk is written. Defaults to 2: a chunk offered once is not written, one offered again (stored
    /// again, or evicted from L1 after a write-through offer) is. 1 writes every chunk at once. At most 15.
    /// </summary>
    public int AdmitAfterSightings { get; set; } = 2;

    /// <summary>Whether to bypass the page cache with O_DIRECT. Defaults to true; where the filesystem refuses it, the tier falls back to buffered I/O and says so.</summary>
    public bool UseDirectIo { get; set; } = true;

    /// <summary>How long writes pause after the disk was found full or failing, before the tier tries again. Defaults to 5 s.</summary>
    public TimeSpan ErrorBackoff { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>Test seam: act as if the filesystem refused O_DIRECT (EINVAL), as tmpfs before Linux 6.6 does.</summary>
    internal bool SimulateDirectIoRefusal { get; set; }

    /// <summary>Checks the settings.</summary>
    /// <exception cref="ArgumentException">A setting is invalid; the message names it, its value and the rule.</exception>
    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Path))
        {
            throw new ArgumentException("DiskTierOptions.Path must name a directory for the disk tier's segment files");
        }

        if (SegmentBytes < MinSegmentBytes || SegmentBytes > MaxSegmentBytes || SegmentBytes % RecordFormat.Alignment != 0)
        {
            throw new ArgumentException(
                $"DiskTierOptions.SegmentBytes must be a multiple of {RecordFormat.Alignment} between {MinSegmentBytes} and {MaxSegmentBytes} (got {SegmentBytes})");
        }

        if (CapacityBytes < 4 * SegmentBytes)
        {
            throw new ArgumentException(
                $"DiskTierOptions.CapacityBytes must be at least four segments, {4 * SegmentBytes} bytes with SegmentBytes {SegmentBytes} (got {CapacityBytes})");
        }

        if (WriteQueueBytes < RecordFormat.Alignment)
        {
            throw new ArgumentException($"DiskTierOptions.WriteQueueBytes must be at least {RecordFormat.Alignment} (got {WriteQueueBytes})");
        }

        if (AdmitAfterSightings < 1 || AdmitAfterSightings > MaxAdmitAfterSightings)
        {
            throw new ArgumentException($"DiskTierOptions.AdmitAfterSightings must be between 1 and {MaxAdmitAfterSightings} (got {AdmitAfterSightings})");
        }

        if (ErrorBackoff <= TimeSpan.Zero)
        {
            throw new ArgumentException($"DiskTierOptions.ErrorBackoff must be positive (got {ErrorBackoff})");
        }
    }
}
