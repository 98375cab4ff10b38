using System.Buffers;
using System.Collections.Concurrent;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging;
using Microsoft.Win32.SafeHandles;

namespace Connector.Storage.Disk;

/// <summary>
/// The L2 tier: chunks on a local SSD in append-only segment files of 4096-aligned records (O_DIRECT where the filesystem allows
/// it), an in-memory index recovered at start from per-segment index files plus a scan of the unsealed tail, frequency
/// admission, a bounded write queue drained by one writer thread, and prefix-coherent eviction with compaction under a byte
/// budget. docs/storage-disk.md has the formats and the reasoning.
/// </summary>
/// <remarks>
/// Thread-safe. <see cref="Offer"/> copies the chunk into an aligned buffer and returns; reads go straight to the file (or the
/// queue buffer of a chunk not yet written) and never wait for the writer. Failures of the disk never throw: the tier counts,
/// logs (rate limited) and answers Miss/Unavailable. A directory that cannot be used leaves the tier unavailable, not the
/// sidecar down (<see cref="IsAvailable"/>).
/// </remarks>
public sealed partial class DiskTier : IChunkTier
{
    private static readonly TimeSpan LogInterval = TimeSpan.FromSeconds(10);

    private readonly DiskTierOptions _options;
    private readonly ILogger _logger;
    private readonly TimeProvider _time;
    private readonly string _path;
    private readonly Lock _lock = new();
    private readonly ChunkIndex _index = new();
    private readonly Dictionary<ChunkKey, PendingWrite> _pending = [];
    private readonly AdmissionSketch _sketch = new();
    private readonly AlignedBufferPool _pool;
    private readonly List<Segment> _segments = [];
    private readonly ConcurrentQueue<WorkItem> _queue = new();
    private readonly SemaphoreSlim _queueSignal = new(0);
    private readonly ManualResetEventSlim _writerGate = new(initialState: true);
    private readonly LogLimiter _writeLog;
    private readonly LogLimiter _readLog;
    private readonly LogLimiter _corruptLog;
    private readonly LogLimiter _sealLog;
    private readonly LogLimiter _tooLargeLog;
    private readonly LogLimiter _deleteLog;
    private Thread? _writer;
    private SafeFileHandle? _lockFile;
    private volatile bool _available;
    private volatile bool _directIo;
    private bool _disposed;
    private long _budget;
    private long _footprint;
    private long _queuedBytes;
    private int _queuedCount;
    private long _pausedUntil = long.MinValue;

    private long _hits;
    private long _misses;
    private long _bytesRead;
    private long _bytesWritten;
    private long _writes;
    private long _drops;
    private long _notAdmitted;
    private long _evictions;
    private long _corrupt;
    private long _errors;

    /// <summary>Opens (or creates) the tier in <see cref="DiskTierOptions.Path"/> and recovers the chunks stored there.</summary>
    /// <param name="options">The settings; checked with <see cref="DiskTierOptions.Validate"/>.</param>
    /// <param name="logger">Where the tier's lines go.</param>
    /// <param name="time">The clock for back-off and log rate limits (tests pass a fake); the system clock when null.</param>
    /// <exception cref="ArgumentException">The settings are invalid. A directory that cannot be used does not throw: the tier
    /// starts unavailable, logs why, and counts one error.</exception>
    public DiskTier(DiskTierOptions options, ILogger logger, TimeProvider? time = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(logger);
        options.Validate();
        _options = options;
        _logger = logger;
        _time = time ?? TimeProvider.System;
        _path = System.IO.Path.GetFullPath(options.Path);
        _budget = options.CapacityBytes;
        _pool = new AlignedBufferPool(options.WriteQueueBytes);
        _writeLog = new LogLimiter(_time, LogInterval);
        _readLog = new LogLimiter(_time, LogInterval);
        _corruptLog = new LogLimiter(_time, LogInterval);
        _sealLog = new LogLimiter(_time, LogInterval);
        _tooLargeLog = new LogLimiter(_time, LogInterval);
        _deleteLog = new LogLimiter(_time, LogInterval);
        Open();
    }

    /// <inheritdoc/>
    public string Name => "disk";

    /// <inheritdoc/>
    public bool HasLocalIndex => true;

    /// <summary>The directory of the segment files.</summary>
    public string Path => _path;

    /// <summary>Whether the tier could open its directory; when false it answers Miss and Unavailable to everything.</summary>
    public bool IsAvailable => _available;

    /// <summary>Why the tier is unavailable, or null.</summary>
    public string? UnavailableReason { get; private set; }

    /// <summary>Whether new segment files bypass the page cache (O_DIRECT); false when disabled or refused by the filesystem.</summary>
    public bool DirectIo => _directIo;

    /// <summary>The byte budget in use: <see cref="DiskTierOptions.CapacityBytes"/>, or less when the filesystem had less room at start.</summary>
    public long BudgetBytes => Interlocked.Read(ref _budget);

    /// <summary>How long opening took (listing, index files, scanning the unsealed tail).</summary>
    public TimeSpan RecoveryTime { get; private set; }

    /// <summary>Chunks found at start.</summary>
    public long RecoveredChunks { get; private set; }

    /// <summary>Records skipped at start: unreadable headers, records cut off by the end of their file, index entries past it.</summary>
    public long SkippedRecords { get; private set; }

    /// <summary>Segments whose index file was missing, damaged or disagreeing at start, and rebuilt by a scan of their records.</summary>
    public long RebuiltIndexFiles { get; private set; }

    /// <inheritdoc/>
    public int CountPresentPrefix(ReadOnlySpan<TierKey> keys)
    {
        if (!_available)
        {
            return 0;
        }

        lock (_lock)
        {
            int n = 0;
            while (n < keys.Length && _index.TryGet(keys[n].Key, out IndexEntry entry)
                && entry.NamespaceTag == keys[n].NamespaceTag && entry.Length == keys[n].Length)
            {
                n++;
            }

            return n;
        }
    }

    /// <inheritdoc/>
    public ValueTask<int> ProbePrefixAsync(ReadOnlyMemory<TierKey> keys, CancellationToken cancellation) =>
        ValueTask.FromResult(CountPresentPrefix(keys.Span));

    /// <inheritdoc/>
    public async ValueTask<TierReadStatus> ReadAsync(TierKey key, Memory<byte> destination, CancellationToken cancellation)
    {
        if (destination.Length != key.Length)
        {
            throw new ArgumentException($"the destination has {destination.Length} bytes, the chunk {key.Length}", nameof(destination));
        }

        if (cancellation.IsCancellationRequested)
        {
            return TierReadStatus.Cancelled;
        }

        if (!_available)
        {
            Interlocked.Increment(ref _misses);
            return TierReadStatus.Miss;
        }

        PendingWrite? queued = null;
        IndexEntry? entry = null;
        Segment? segment = null;
        long offset = 0;
        bool mismatch = false;
        lock (_lock)
        {
            if (_pending.TryGetValue(key.Key, out PendingWrite? pending) && pending.Ready && !pending.Cancelled
                && pending.Key.NamespaceTag == key.NamespaceTag && pending.Key.Length == key.Length)
            {
                pending.AddReference();
                queued = pending;
            }
            else if (_index.TryGet(key.Key, out IndexEntry found))
            {
                if (found.NamespaceTag != key.NamespaceTag || found.Length != key.Length)
                {
                    mismatch = true;
                    entry = found;
                }
                else if (found.Segment.TryAddReference())
                {
                    entry = found;
                    segment = found.Segment;
                    offset = found.Offset;
                }
            }
        }

        if (queued is not null)
        {
            // Not on disk yet: the queue's copy is the offered bytes themselves.
            try
            {
                queued.Buffer!.Span.Slice(RecordFormat.PayloadOffset(key.Length), (int)key.Length).CopyTo(destination.Span);
            }
            finally
            {
                queued.Release(_pool);
            }

            Interlocked.Increment(ref _hits);
            return TierReadStatus.Hit;
        }

        if (mismatch)
        {
            return DropCorrupt(entry!, entry!.Segment, entry.Offset, "the index holds it under another namespace tag or length");
        }

        if (segment is null)
        {
            Interlocked.Increment(ref _misses);
            return TierReadStatus.Miss;
        }

        try
        {
            return await ReadRecordAsync(key, entry!, segment, offset, destination, cancellation).ConfigureAwait(false);
        }
        finally
        {
            segment.Release();
        }
    }

    /// <inheritdoc/>
    public TierWriteStatus Offer(in TierKey key, ReadOnlySpan<byte> data)
    {
        if (data.Length != key.Length)
        {
            throw new ArgumentException($"the chunk has {data.Length} bytes, its key says {key.Length}", nameof(data));
        }

        if (!_available || IsPaused())
        {
            return TierWriteStatus.Unavailable;
        }

        long recordBytes = RecordFormat.RecordSize(key.Length);
        if (recordBytes > _options.SegmentBytes || recordBytes > _options.WriteQueueBytes)
        {
            Interlocked.Increment(ref _notAdmitted);
            if (_tooLargeLog.TryEnter(out long suppressed))
            {
                DiskTierLog.ChunkTooLarge(_logger, key.Length, recordBytes, _options.SegmentBytes, _options.WriteQueueBytes, suppressed);
            }

            return TierWriteStatus.NotAdmitted;
        }

        PendingWrite write;
        lock (_lock)
        {
            if (_disposed)
            {
                return TierWriteStatus.Unavailable;
            }

            if ((_index.TryGet(key.Key, out IndexEntry entry) && entry.NamespaceTag == key.NamespaceTag && entry.Length == key.Length)
                || _pending.ContainsKey(key.Key))
            {
                return TierWriteStatus.AlreadyPresent;
            }

            if (_options.AdmitAfterSightings > 1 && _sketch.Increment(key.Key) < _options.AdmitAfterSightings)
            {
                Interlocked.Increment(ref _notAdmitted);
                return TierWriteStatus.NotAdmitted;
            }

            if (_queuedBytes + recordBytes > _options.WriteQueueBytes)
            {
                Interlocked.Increment(ref _drops);
                return TierWriteStatus.QueueFull;
            }

            // Reserve the queue room and the key now; the copy happens outside the lock.
            _queuedBytes += recordBytes;
            _queuedCount++;
            write = new PendingWrite(key, (int)recordBytes);
            _pending.Add(key.Key, write);
        }

        AlignedBuffer buffer;
        try
        {
            buffer = _pool.Rent((int)recordBytes);
        }
        catch (OutOfMemoryException)
        {
            lock (_lock)
            {
                RemovePendingLocked(write);
                _queuedBytes -= recordBytes;
                _queuedCount--;
            }

            Interlocked.Increment(ref _drops);
            return TierWriteStatus.QueueFull;
        }

        Span<byte> record = buffer.Span;
        int payloadOffset = RecordFormat.PayloadOffset(data.Length);
        record[RecordFormat.HeaderSize..payloadOffset].Clear();
        // The checksum is taken here, while the bytes are hot from the copy, and not by the writer, whose turn would come
        // after they left the cache and while the device waits for it.
        ulong checksum = RecordFormat.CopyAndChecksum(data, record[payloadOffset..]);
        record[(payloadOffset + data.Length)..].Clear();
        lock (_lock)
        {
            // Enqueued under the lock, and never after the writer's stop item (Dispose enqueues it under the lock too).
            if (_disposed)
            {
                RemovePendingLocked(write);
                _pool.Return(buffer);
                return TierWriteStatus.Unavailable;
            }

            write.Buffer = buffer;
            write.Checksum = checksum;
            write.Ready = true;
            Enqueue(write);
        }

        return TierWriteStatus.Accepted;
    }

    /// <inheritdoc/>
    public async ValueTask<long> ClearAsync(CancellationToken cancellation)
    {
        if (!_available)
        {
            return 0;
        }

        var clear = new ControlItem(ControlKind.Clear);
        lock (_lock)
        {
            if (_disposed)
            {
                return 0;
            }

            CancelPendingLocked();
            Enqueue(clear);
        }

        return await clear.Done.Task.WaitAsync(cancellation).ConfigureAwait(false);
    }

    /// <inheritdoc/>
    public TierStats GetStats()
    {
        long chunks;
        long used;
        int queued;
        lock (_lock)
        {
            chunks = _index.Count;
            used = _footprint;
            queued = _queuedCount;
        }

        return new TierStats(
            Name,
            BudgetBytes,
            used,
            chunks,
            Interlocked.Read(ref _hits),
            Interlocked.Read(ref _misses),
            Interlocked.Read(ref _bytesRead),
            Interlocked.Read(ref _bytesWritten),
            Interlocked.Read(ref _writes),
            Interlocked.Read(ref _drops),
            Interlocked.Read(ref _notAdmitted),
            Interlocked.Read(ref _evictions),
            Interlocked.Read(ref _corrupt),
            Interlocked.Read(ref _errors),
            queued);
    }

    /// <summary>Record bytes of the stored chunks (the footprint less dead space and index files).</summary>
    public long LiveBytes
    {
        get
        {
            lock (_lock)
            {
                return _index.LiveBytes;
            }
        }
    }

    /// <summary>Segment files in use.</summary>
    public int SegmentCount
    {
        get
        {
            lock (_lock)
            {
                return _segments.Count;
            }
        }
    }

    /// <summary>Writes what is queued, seals the open segment (its index file makes the next start fast) and closes the files.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            if (_writer is not null)
            {
                Enqueue(new ControlItem(ControlKind.Stop));
            }
        }

        bool wasAvailable = _available;
        if (_writer is not null)
        {
            _writerGate.Set();
            _writer.Join();
        }

        _available = false;
        TierStats stats = GetStats();
        lock (_lock)
        {
            RetireAllSegmentsLocked();
        }

        _lockFile?.Dispose();
        _pool.Dispose();
        _queueSignal.Dispose();
        _writerGate.Dispose();
        if (wasAvailable)
        {
            DiskTierLog.Closed(_logger, _path, stats.Chunks, stats.UsedBytes, stats.Writes, stats.Hits, stats.Corrupt, stats.Errors);
        }
    }

    /// <summary>Completes when everything offered before the call has been written or dropped (tests, benchmarks, shutdown).</summary>
    internal Task FlushAsync()
    {
        if (!_available)
        {
            return Task.CompletedTask;
        }

        var flush = new ControlItem(ControlKind.Flush);
        lock (_lock)
        {
            if (_disposed)
            {
                return Task.CompletedTask;
            }

            Enqueue(flush);
        }

        return flush.Done.Task;
    }

    /// <summary>Test seam: the writer stops before its next write until <see cref="ResumeWriter"/>.</summary>
    internal void PauseWriter() => _writerGate.Reset();

    /// <summary>Test seam: lets a paused writer go on.</summary>
    internal void ResumeWriter() => _writerGate.Set();

    /// <summary>Where the index says a chunk is (tests damage records there).</summary>
    internal bool TryGetLocation(in ChunkKey key, out string segmentPath, out long offset, out long recordBytes)
    {
        lock (_lock)
        {
            if (_index.TryGet(key, out IndexEntry entry))
            {
                segmentPath = entry.Segment.DataPath;
                offset = entry.Offset;
                recordBytes = entry.RecordBytes;
                return true;
            }
        }

        segmentPath = "";
        offset = recordBytes = 0;
        return false;
    }

    private bool IsPaused() => _time.GetTimestamp() < Interlocked.Read(ref _pausedUntil);

    private void Enqueue(WorkItem item)
    {
        _queue.Enqueue(item);
        _queueSignal.Release();
    }

    /// <summary>
    /// Reads a record and verifies it. Buffered, and under O_DIRECT for a large payload and a block-aligned destination, the
    /// payload goes straight into <paramref name="destination"/> with one vectored read (only the header block and a partial
    /// last block pass through a small buffer); otherwise the whole record goes through an aligned bounce buffer.
    /// </summary>
    private async ValueTask<TierReadStatus> ReadRecordAsync(TierKey key, IndexEntry entry, Segment segment, long offset, Memory<byte> destination, CancellationToken cancellation)
    {
        int payloadLength = (int)key.Length;
        int payloadOffset = RecordFormat.PayloadOffset(key.Length);
        int recordBytes = (int)RecordFormat.RecordSize(key.Length);
        MemoryHandle pin = default;
        AlignedBuffer? buffer = null;
        try
        {
            string? problem;
            if (!segment.DirectIo || (payloadOffset == RecordFormat.Alignment && IsBlockAligned(pin = destination.Pin())))
            {
                int straight = segment.DirectIo ? (int)RecordFormat.AlignDown(payloadLength) : payloadLength;
                int tail = segment.DirectIo ? recordBytes - payloadOffset - straight : 0;
                buffer = _pool.Rent(2 * RecordFormat.Alignment);
                Memory<byte>[] pieces = tail > 0
                    ? [buffer.Memory[..payloadOffset], destination[..straight], buffer.Memory.Slice(payloadOffset, tail)]
                    : [buffer.Memory[..payloadOffset], destination[..straight]];
                long expected = payloadOffset + straight + tail;
                long read = await RandomAccess.ReadAsync(segment.Handle, pieces, offset, cancellation).ConfigureAwait(false);
                ReadOnlySpan<byte> rest = buffer.Span.Slice(payloadOffset, payloadLength - straight);
                problem = Verify(read < expected, buffer.Span, key, destination.Span[..straight], rest);
                if (problem is null)
                {
                    rest.CopyTo(destination.Span[straight..]);
                }
            }
            else
            {
                buffer = _pool.Rent(recordBytes);
                int read = 0;
                while (read < recordBytes)
                {
                    int n = await RandomAccess.ReadAsync(segment.Handle, buffer.Memory[read..recordBytes], offset + read, cancellation).ConfigureAwait(false);
                    read += n;
                    if (n == 0 || n % RecordFormat.Alignment != 0)
                    {
                        break; // the end of the file: O_DIRECT cannot go on from an unaligned offset, and there is nothing more anyway
                    }
                }

                ReadOnlySpan<byte> payload = buffer.Span.Slice(payloadOffset, payloadLength);
                problem = Verify(read < recordBytes, buffer.Span, key, payload, default);
                if (problem is null)
                {
                    payload.CopyTo(destination.Span);
                }
            }

            if (problem is not null)
            {
                return DropCorrupt(entry, segment, offset, problem);
            }

            lock (_lock)
            {
                _index.Touch(entry);
            }

            Interlocked.Increment(ref _hits);
            Interlocked.Add(ref _bytesRead, payloadLength);
            return TierReadStatus.Hit;
        }
        catch (OperationCanceledException) when (cancellation.IsCancellationRequested)
        {
            return TierReadStatus.Cancelled;
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            Interlocked.Increment(ref _errors);
            if (_readLog.TryEnter(out long suppressed))
            {
                DiskTierLog.ReadFailed(_logger, key.Key.ToString(), segment.Id, ex.Message, suppressed);
            }

            return TierReadStatus.Error;
        }
        finally
        {
            pin.Dispose();
            if (buffer is not null)
            {
                _pool.Return(buffer);
            }
        }
    }

    private static unsafe bool IsBlockAligned(MemoryHandle pin) => ((nint)pin.Pointer & (RecordFormat.Alignment - 1)) == 0;

    /// <summary>What is wrong with a record read for <paramref name="key"/> (its payload in two pieces), or null when it is exactly what was offered.</summary>
    private static string? Verify(bool cutOff, ReadOnlySpan<byte> record, in TierKey key, ReadOnlySpan<byte> payloadHead, ReadOnlySpan<byte> payloadTail) =>
        cutOff ? "the record is cut off by the end of its file"
        : !RecordFormat.TryReadHeader(record, out RecordHeader header) ? "the record header fails its checksum"
        : header.Key != key.Key ? "the index points at another chunk's record"
        : header.NamespaceTag != key.NamespaceTag || header.Length != key.Length ? "the record has another namespace tag or length"
        : RecordFormat.Checksum(payloadHead, payloadTail) != header.PayloadChecksum ? "the payload fails its checksum"
        : null;

    /// <summary>Drops a chunk that failed verification, if the index still points where it was read; counts and logs it.</summary>
    private TierReadStatus DropCorrupt(IndexEntry entry, Segment segment, long offset, string reason)
    {
        lock (_lock)
        {
            if (!entry.Removed && ReferenceEquals(entry.Segment, segment) && entry.Offset == offset)
            {
                _index.Remove(entry);
            }
        }

        Interlocked.Increment(ref _corrupt);
        if (_corruptLog.TryEnter(out long suppressed))
        {
            DiskTierLog.CorruptChunk(_logger, entry.Key.ToString(), segment.Id, offset, reason, suppressed);
        }

        return TierReadStatus.Corrupt;
    }

    /// <summary>Removes <paramref name="write"/> from the pending map if it is still the key's pending write.</summary>
    private void RemovePendingLocked(PendingWrite write)
    {
        if (_pending.TryGetValue(write.Key.Key, out PendingWrite? current) && ReferenceEquals(current, write))
        {
            _pending.Remove(write.Key.Key);
        }
    }

    /// <summary>Marks every queued write cancelled (the writer releases them); returns how many.</summary>
    private int CancelPendingLocked()
    {
        int n = _pending.Count;
        foreach (PendingWrite write in _pending.Values)
        {
            write.Cancelled = true;
        }

        _pending.Clear();
        return n;
    }

    private abstract class WorkItem;

    /// <summary>A chunk copied at <see cref="Offer"/>: its record buffer (header filled in by the writer), shared with readers by reference count.</summary>
    private sealed class PendingWrite(TierKey key, int recordBytes) : WorkItem
    {
        private int _references = 1;

        public TierKey Key { get; } = key;

        public int RecordBytes { get; } = recordBytes;

        /// <summary>The record: header room, then the payload, then zeros. Set once the copy is done (<see cref="Ready"/>).</summary>
        public AlignedBuffer? Buffer { get; set; }

        public bool Ready { get; set; }

        /// <summary>The payload checksum, taken at the copy.</summary>
        public ulong Checksum { get; set; }

        /// <summary>Dropped before it was written (CLEAR, disk full); guarded by the tier's lock.</summary>
        public bool Cancelled { get; set; }

        /// <summary>The writer is done with it (written or dropped); guarded by the tier's lock.</summary>
        public bool Finished { get; set; }

        public void AddReference() => Interlocked.Increment(ref _references);

        public void Release(AlignedBufferPool pool)
        {
            if (Interlocked.Decrement(ref _references) == 0 && Buffer is not null)
            {
                pool.Return(Buffer);
                Buffer = null;
            }
        }
    }

    private enum ControlKind
    {
        Flush,
        Clear,
        Stop,
    }

    private sealed class ControlItem(ControlKind kind) : WorkItem
    {
        public ControlKind Kind { get; } = kind;

        public TaskCompletionSource<long> Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    /// <summary>Forgets every segment and index entry (the files stay); the caller holds <c>_lock</c>.</summary>
    private void RetireAllSegmentsLocked()
    {
        foreach (Segment segment in _segments)
        {
            segment.Retired = true;
            segment.Release();
        }

        _segments.Clear();
        _index.Clear();
    }
}
