using Microsoft.Extensions.Logging;

namespace Connector.Storage.Disk;

/// <summary>The disk tier's log lines. Errors that can repeat per chunk go through a <see cref="LogLimiter"/>.</summary>
internal static partial class DiskTierLog
{
    [LoggerMessage(EventId = 1, EventName = "DiskTierOpened", Level = LogLevel.Information,
        Message = "Disk tier at {Path}: {Chunks} chunks ({UsedBytes} bytes in {Segments} segments) recovered in {ElapsedMs:0.0} ms; direct I/O {DirectIo}; budget {CapacityBytes} bytes")]
    public static partial void Opened(ILogger logger, string path, long chunks, long usedBytes, int segments, double elapsedMs, bool directIo, long capacityBytes);

    [LoggerMessage(EventId = 2, EventName = "DiskTierUnavailable", Level = LogLevel.Error,
        Message = "Disk tier disabled: cannot use {Path}: {Reason}. The sidecar runs without the disk tier until it is restarted with a usable directory")]
    public static partial void Unavailable(ILogger logger, string path, string reason);

    [LoggerMessage(EventId = 3, EventName = "DiskTierDirectIoRefused", Level = LogLevel.Warning,
        Message = "Disk tier: the filesystem at {Path} refuses O_DIRECT ({Error}); using buffered I/O (the page cache will hold copies of chunks)")]
    public static partial void DirectIoRefused(ILogger logger, string path, string error);

    [LoggerMessage(EventId = 4, EventName = "DiskTierRecordsSkipped", Level = LogLevel.Warning,
        Message = "Disk tier recovery: skipped {Records} unreadable or truncated records ({Bytes} bytes) in segment {Segment}")]
    public static partial void RecordsSkipped(ILogger logger, long segment, long records, long bytes);

    [LoggerMessage(EventId = 5, EventName = "DiskTierIndexRebuilt", Level = LogLevel.Warning,
        Message = "Disk tier recovery: the index file of segment {Segment} {Reason}; rebuilt from the segment's records")]
    public static partial void IndexRebuilt(ILogger logger, long segment, string reason);

    [LoggerMessage(EventId = 6, EventName = "DiskTierDiskFull", Level = LogLevel.Error,
        Message = "Disk tier: the filesystem at {Path} is full ({Error}) with {UsedBytes} bytes of ours on it; {Dropped} queued chunks dropped, writes paused for {Backoff}. Lower CapacityBytes or free space ({Suppressed} more since the last line)")]
    public static partial void DiskFull(ILogger logger, string path, string error, long usedBytes, long dropped, TimeSpan backoff, long suppressed);

    [LoggerMessage(EventId = 7, EventName = "DiskTierWriteFailed", Level = LogLevel.Error,
        Message = "Disk tier: writing segment {Segment} failed ({Error}); {Dropped} chunks dropped, writes paused for {Backoff} ({Suppressed} more since the last line)")]
    public static partial void WriteFailed(ILogger logger, long segment, string error, long dropped, TimeSpan backoff, long suppressed);

    [LoggerMessage(EventId = 8, EventName = "DiskTierReadFailed", Level = LogLevel.Warning,
        Message = "Disk tier: reading chunk {ChunkKey} from segment {Segment} failed ({Error}) ({Suppressed} more since the last line)")]
    public static partial void ReadFailed(ILogger logger, string chunkKey, long segment, string error, long suppressed);

    [LoggerMessage(EventId = 9, EventName = "DiskTierCorruptChunk", Level = LogLevel.Warning,
        Message = "Disk tier: chunk {ChunkKey} in segment {Segment} at offset {Offset} failed verification ({Reason}); dropped from the index ({Suppressed} more since the last line)")]
    public static partial void CorruptChunk(ILogger logger, string chunkKey, long segment, long offset, string reason, long suppressed);

    [LoggerMessage(EventId = 10, EventName = "DiskTierSealFailed", Level = LogLevel.Warning,
        Message = "Disk tier: could not write the index file of segment {Segment} ({Error}); the next start rebuilds it from the records ({Suppressed} more since the last line)")]
    public static partial void SealFailed(ILogger logger, long segment, string error, long suppressed);

    [LoggerMessage(EventId = 11, EventName = "DiskTierCapacityLowered", Level = LogLevel.Warning,
        Message = "Disk tier: CapacityBytes {CapacityBytes} is more than the filesystem at {Path} can hold ({FreeBytes} bytes free, {UsedBytes} ours); using {Budget} bytes")]
    public static partial void CapacityLowered(ILogger logger, long capacityBytes, string path, long freeBytes, long usedBytes, long budget);

    [LoggerMessage(EventId = 12, EventName = "DiskTierChunkTooLarge", Level = LogLevel.Warning,
        Message = "Disk tier: a chunk of {Length} bytes needs a {RecordBytes}-byte record, more than SegmentBytes {SegmentBytes} or WriteQueueBytes {QueueBytes}; such chunks are not stored ({Suppressed} more since the last line)")]
    public static partial void ChunkTooLarge(ILogger logger, long length, long recordBytes, long segmentBytes, long queueBytes, long suppressed);

    [LoggerMessage(EventId = 13, EventName = "DiskTierDeleteFailed", Level = LogLevel.Warning,
        Message = "Disk tier: could not delete {File} ({Error}) ({Suppressed} more since the last line)")]
    public static partial void DeleteFailed(ILogger logger, string file, string error, long suppressed);

    [LoggerMessage(EventId = 14, EventName = "DiskTierClosed", Level = LogLevel.Information,
        Message = "Disk tier at {Path} closed: {Chunks} chunks, {UsedBytes} bytes; {Writes} writes, {Hits} hits, {Corrupt} corrupt, {Errors} errors this run")]
    public static partial void Closed(ILogger logger, string path, long chunks, long usedBytes, long writes, long hits, long corrupt, long errors);

    [LoggerMessage(EventId = 16, EventName = "DiskTierSegmentUnreadable", Level = LogLevel.Warning,
        Message = "Disk tier recovery: cannot open segment file {File} ({Error}); its chunks are not served")]
    public static partial void SegmentUnreadable(ILogger logger, string file, string error);

    [LoggerMessage(EventId = 17, EventName = "DiskTierNoRoom", Level = LogLevel.Warning,
        Message = "Disk tier: no room for a {RecordBytes}-byte record within the budget of {Budget} bytes; chunk dropped ({Suppressed} more since the last line)")]
    public static partial void NoRoom(ILogger logger, long recordBytes, long budget, long suppressed);

    [LoggerMessage(EventId = 15, EventName = "DiskTierCompacted", Level = LogLevel.Debug,
        Message = "Disk tier: compacted segment {Segment}: {Moved} chunks ({MovedBytes} bytes) moved, {FreedBytes} bytes given back")]
    public static partial void Compacted(ILogger logger, long segment, long moved, long movedBytes, long freedBytes);
}

/// <summary>
/// Lets one line of a kind through per interval and counts the ones held back, which the next line reports: a failing disk
/// gives one line per interval, not one per chunk.
/// </summary>
/// <remarks>Thread-safe.</remarks>
internal sealed class LogLimiter(TimeProvider time, TimeSpan interval)
{
    private readonly Lock _lock = new();
    private long _nextTimestamp = long.MinValue;
    private long _suppressed;

    /// <summary>True when a line may be written now; <paramref name="suppressed"/> is how many were held back since the last one.</summary>
    public bool TryEnter(out long suppressed)
    {
        long now = time.GetTimestamp();
        lock (_lock)
        {
            if (_nextTimestamp != long.MinValue && now < _nextTimestamp)
            {
                _suppressed++;
                suppressed = 0;
                return false;
            }

            _nextTimestamp = now + (long)(interval.TotalSeconds * time.TimestampFrequency);
            suppressed = _suppressed;
            _suppressed = 0;
            return true;
        }
    }
}
