using System.Diagnostics;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Connector.Storage.Disk;

/// <summary>Opening the directory: the lock, the O_DIRECT probe, and the recovery of the index from index files and segment scans.</summary>
public sealed partial class DiskTier
{
    /// <summary>1 MiB: the read size of a recovery scan, so small records are scanned at sequential speed.</summary>
    private const int ScanWindowBytes = 1 << 20;

    private const string LockFileName = "LOCK";
    private const string ProbeFileName = ".probe";

    private void Open()
    {
        long started = Stopwatch.GetTimestamp();
        string? failure;
        try
        {
            Directory.CreateDirectory(_path);
            failure = TakeLock() ?? ProbeWrites();
            if (failure is null)
            {
                Recover();
                LowerBudgetToFreeSpace();
            }
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or NotSupportedException)
        {
            failure = ex.Message;
        }

        if (failure is not null)
        {
            UnavailableReason = failure;
            Interlocked.Increment(ref _errors);
            DiskTierLog.Unavailable(_logger, _path, failure);
            lock (_lock)
            {
                RetireAllSegmentsLocked();
                _footprint = 0;
            }

            _lockFile?.Dispose();
            _lockFile = null;
            return;
        }

        RecoveryTime = Stopwatch.GetElapsedTime(started);
        _available = true;
        StartWriter();
        DiskTierLog.Opened(_logger, _path, _index.Count, _footprint, _segments.Count, RecoveryTime.TotalMilliseconds, _directIo, _budget);
    }

    /// <summary>Takes an exclusive flock on the directory's lock file: two tiers appending to one directory would corrupt each other's segments.</summary>
    private string? TakeLock()
    {
        string path = System.IO.Path.Combine(_path, LockFileName);
        _lockFile = Posix.TryOpen(path, Posix.ORdWr | Posix.OCreat, out int errno);
        if (_lockFile is null)
        {
            return $"cannot create the lock file {path}: {Posix.Describe(errno)}";
        }

        if (Posix.FLock(_lockFile, Posix.LockExclusive | Posix.LockNonBlocking) != 0)
        {
            errno = Marshal.GetLastPInvokeError();
            return errno == Posix.EAgain
                ? $"another process (another sidecar?) holds the lock on {path}"
                : $"cannot lock {path}: {Posix.Describe(errno)}";
        }

        return null;
    }

    /// <summary>
    /// Writes one aligned block to a probe file: it finds whether the filesystem takes O_DIRECT (EINVAL at open or at the first
    /// write means no, and the tier goes buffered) and whether the directory takes writes at all.
    /// </summary>
    private unsafe string? ProbeWrites()
    {
        string path = System.IO.Path.Combine(_path, ProbeFileName);
        bool direct = _options.UseDirectIo;
        using var block = new AlignedBuffer(RecordFormat.Alignment);
        block.Span.Clear();
        try
        {
            while (true)
            {
                int errno;
                SafeFileHandle? handle;
                if (direct && _options.SimulateDirectIoRefusal)
                {
                    handle = null;
                    errno = Posix.EInval;
                }
                else
                {
                    handle = Posix.TryOpen(path, Posix.ORdWr | Posix.OCreat | Posix.OTrunc | (direct ? Posix.ODirect : 0), out errno);
                }

                if (handle is null)
                {
                    if (direct && errno == Posix.EInval)
                    {
                        DiskTierLog.DirectIoRefused(_logger, _path, "EINVAL at open");
                        direct = false;
                        continue;
                    }

                    return $"cannot create files in it: {Posix.Describe(errno)}";
                }

                using (handle)
                {
                    var iov = new Posix.IoVec { Base = block.Pointer, Length = RecordFormat.Alignment };
                    nint n;
                    do
                    {
                        n = Posix.PWriteV(handle, &iov, 1, 0);
                        errno = n < 0 ? Marshal.GetLastPInvokeError() : 0;
                    }
                    while (n < 0 && errno == Posix.EIntr);

                    if (n < 0 && direct && errno == Posix.EInval)
                    {
                        DiskTierLog.DirectIoRefused(_logger, _path, "EINVAL at the first aligned write");
                        direct = false;
                        continue;
                    }

                    _directIo = direct;
                    if (n < 0 && Posix.IsNoSpace(errno))
                    {
                        // Full already: serve what is stored, try writes again after the back-off.
                        FailWrites(null, Posix.Describe(errno), errno);
                        return null;
                    }

                    return n == RecordFormat.Alignment ? null : $"cannot write files in it: {(n < 0 ? Posix.Describe(errno) : "short write")}";
                }
            }
        }
        finally
        {
            TryDelete(path);
        }
    }

    /// <summary>Rebuilds the index: every segment from its index file when that is whole and agrees, else by scanning its records.</summary>
    private void Recover()
    {
        var dataIds = new List<long>();
        var indexIds = new HashSet<long>();
        foreach (string file in Directory.EnumerateFiles(_path))
        {
            string name = System.IO.Path.GetFileName(file);
            if (Segment.TryParseId(name, ".dat", out long id))
            {
                dataIds.Add(id);
            }
            else if (Segment.TryParseId(name, ".idx", out id))
            {
                indexIds.Add(id);
            }
            else if (name.EndsWith(".tmp", StringComparison.Ordinal))
            {
                TryDelete(file); // an index file whose rename never happened
            }
        }

        dataIds.Sort();
        foreach (long id in indexIds)
        {
            if (dataIds.BinarySearch(id) < 0)
            {
                TryDelete(System.IO.Path.Combine(_path, Segment.IndexFileName(id))); // its segment was deleted first
            }
        }

        ulong maxSequence = 0;
        foreach (long id in dataIds)
        {
            RecoverSegment(id, indexIds.Contains(id), ref maxSequence);
        }

        _nextSegmentId = (dataIds.Count > 0 ? dataIds[^1] : 0) + 1;
        _nextSequence = maxSequence + 1;
        _index.AdvanceClock((long)maxSequence);
        RecoveredChunks = _index.Count;
        _footprint = _segments.Sum(s => s.Length + s.IndexFileBytes);
    }

    private void RecoverSegment(long id, bool hasIndexFile, ref ulong maxSequence)
    {
        string dataPath = System.IO.Path.Combine(_path, Segment.DataFileName(id));
        bool direct = _directIo;
        SafeFileHandle? handle = Posix.TryOpen(dataPath, Posix.ORdOnly | (direct ? Posix.ODirect : 0), out int errno);
        if (handle is null && direct && errno == Posix.EInval)
        {
            direct = false;
            handle = Posix.TryOpen(dataPath, Posix.ORdOnly, out errno);
        }

        if (handle is null)
        {
            DiskTierLog.SegmentUnreadable(_logger, dataPath, Posix.Describe(errno));
            return;
        }

        long fileLength = RandomAccess.GetLength(handle);
        var segment = new Segment(id, _path, handle, direct) { Sealed = true };
        IndexRecord[]? records = null;
        long dataLength = 0;
        if (hasIndexFile)
        {
            byte[] file;
            string reason;
            try
            {
                file = File.ReadAllBytes(segment.IndexPath);
            }
            catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
            {
                file = [];
            }

            if (!SegmentIndexFile.TryDecode(file, id, out dataLength, out records, out reason))
            {
                records = null;
            }
            else if (dataLength > fileLength || dataLength % RecordFormat.Alignment != 0)
            {
                reason = $"lists records up to byte {dataLength} of a {fileLength}-byte segment (the segment was cut short)";
                records = null;
            }
            else
            {
                segment.IndexFileBytes = file.Length;
            }

            if (records is null)
            {
                RebuiltIndexFiles++;
                DiskTierLog.IndexRebuilt(_logger, id, reason);
            }
        }

        if (records is null)
        {
            // The unsealed tail after a crash (normal), or a segment whose index file could not be trusted.
            records = Scan(segment, fileLength, out dataLength, out long skipped, out long skippedBytes);
            if (skipped > 0)
            {
                SkippedRecords += skipped;
                DiskTierLog.RecordsSkipped(_logger, id, skipped, skippedBytes);
            }

            if (records.Length > 0)
            {
                WriteRecoveredIndex(segment, dataLength, records);
            }
        }

        if (records.Length == 0)
        {
            // Nothing usable: give the space back now.
            handle.Dispose();
            TryDelete(segment.DataPath);
            TryDelete(segment.IndexPath);
            return;
        }

        segment.Length = RecordFormat.AlignUp(fileLength); // dead space past the last record counts until compaction removes it
        _segments.Add(segment);
        foreach (IndexRecord record in records)
        {
            if (record.Offset < 0 || record.Offset % RecordFormat.Alignment != 0 || record.Length < 0 || record.Length > DiskTierOptions.MaxSegmentBytes
                || record.Offset + RecordFormat.RecordSize(record.Length) > dataLength)
            {
                SkippedRecords++;
                continue;
            }

            if (_index.TryGet(record.Key, out IndexEntry existing) && existing.Sequence >= record.Sequence)
            {
                continue; // an older copy (a crash between a compaction's copy and the deletion of the old segment)
            }

            var entry = new IndexEntry
            {
                Key = record.Key,
                Parent = record.Parent,
                NamespaceTag = record.NamespaceTag,
                Length = record.Length,
                Checksum = record.Checksum,
                Sequence = record.Sequence,
                Segment = segment,
                Offset = record.Offset,
            };
            _index.Add(entry, stamp: (long)record.Sequence);
            maxSequence = Math.Max(maxSequence, record.Sequence);
        }
    }

    /// <summary>
    /// Walks a segment header to header. A header that fails its checksum starts a damaged run, skipped block by block until a
    /// valid header follows; a record cut off by the end of the file ends the scan. Payloads are not read here: every read
    /// verifies them.
    /// </summary>
    private static unsafe IndexRecord[] Scan(Segment segment, long fileLength, out long dataLength, out long skipped, out long skippedBytes)
    {
        var records = new List<IndexRecord>();
        using var window = new AlignedBuffer(ScanWindowBytes);
        long windowStart = 0;
        long windowLength = 0;
        long offset = 0;
        bool damagedRun = false;
        long lastRecordBytes = 0;
        dataLength = 0;
        skipped = 0;
        skippedBytes = 0;
        while (offset + RecordFormat.HeaderSize <= fileLength)
        {
            if (offset < windowStart || offset + RecordFormat.HeaderSize > windowStart + windowLength)
            {
                // Small records: read a window of many headers at once. Records larger than a window: read just the next header's block.
                int want = lastRecordBytes >= ScanWindowBytes ? RecordFormat.Alignment : ScanWindowBytes;
                windowStart = offset;
                windowLength = ReadWindow(segment, window, offset, (int)Math.Min(want, RecordFormat.AlignUp(fileLength - offset)));
                if (windowLength < RecordFormat.HeaderSize)
                {
                    break;
                }
            }

            ReadOnlySpan<byte> at = window.Span.Slice((int)(offset - windowStart), (int)(windowLength - (offset - windowStart)));
            if (RecordFormat.TryReadHeader(at, out RecordHeader header) && header.Length <= DiskTierOptions.MaxSegmentBytes)
            {
                long recordBytes = RecordFormat.RecordSize(header.Length);
                if (offset + recordBytes > fileLength)
                {
                    skipped++;
                    skippedBytes += fileLength - offset;
                    break;
                }

                records.Add(new IndexRecord(header.Key, header.Parent, header.NamespaceTag, offset, header.Length, header.PayloadChecksum, header.Sequence));
                lastRecordBytes = recordBytes;
                offset += recordBytes;
                dataLength = offset;
                damagedRun = false;
                continue;
            }

            if (!damagedRun)
            {
                skipped++;
                damagedRun = true;
            }

            skippedBytes += Math.Min(RecordFormat.Alignment, fileLength - offset);
            offset += RecordFormat.Alignment;
        }

        return [.. records];
    }

    private static unsafe long ReadWindow(Segment segment, AlignedBuffer window, long offset, int length)
    {
        long read = 0;
        while (read < length)
        {
            nint n = Posix.PRead(segment.Handle, window.Pointer + read, (nuint)(length - read), offset + read);
            if (n < 0 && Marshal.GetLastPInvokeError() == Posix.EIntr)
            {
                continue;
            }

            if (n <= 0)
            {
                break;
            }

            read += n;
            if (n % RecordFormat.Alignment != 0)
            {
                break; // end of file
            }
        }

        return read;
    }

    /// <summary>Writes the index file of a scanned segment, so the next start reads it instead of scanning again (best effort).</summary>
    private void WriteRecoveredIndex(Segment segment, long dataLength, IndexRecord[] records)
    {
        try
        {
            SegmentIndexFile.Write(segment.IndexPath, segment.Id, dataLength, records);
            segment.IndexFileBytes = SegmentIndexFile.FileSize(records.Length);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            TryDelete(segment.IndexPath + ".tmp");
            if (_sealLog.TryEnter(out long suppressed))
            {
                DiskTierLog.SealFailed(_logger, segment.Id, ex.Message, suppressed);
            }
        }
    }

    /// <summary>Lowers the budget to what the filesystem can hold (our files plus its free space, less one segment), so a
    /// CapacityBytes above the free space evicts instead of failing writes with ENOSPC.</summary>
    private void LowerBudgetToFreeSpace()
    {
        if (!Posix.TryGetAvailableBytes(_path, out long free))
        {
            return;
        }

        long possible = _footprint + free - _options.SegmentBytes;
        if (possible < _budget)
        {
            DiskTierLog.CapacityLowered(_logger, _options.CapacityBytes, _path, free, _footprint, Math.Max(possible, 0));
            _budget = Math.Max(possible, 0);
        }
    }
}
