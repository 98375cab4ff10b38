using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Connector.Storage.Disk;

/// <summary>The writer thread: appends queued records to the open segment, seals full segments, and makes room under the budget.</summary>
public sealed partial class DiskTier
{
    /// <summary>Records gathered into one vectored write: enough to amortize the syscall for small chunks, few enough to keep one write short.</summary>
    private const int MaxBatchRecords = 64;

    /// <summary>8 MiB: past this a larger write buys no device throughput, and the writer should look at its queue again.</summary>
    private const long MaxBatchBytes = 8L << 20;

    private Segment? _open;
    private long _nextSegmentId = 1;
    private ulong _nextSequence = 1;

    private void StartWriter()
    {
        _writer = new Thread(WriterLoop) { IsBackground = true, Name = "kvsidecar disk tier writer" };
        _writer.Start();
    }

    private void WriterLoop()
    {
        var batch = new List<PendingWrite>(MaxBatchRecords);
        while (true)
        {
            _queueSignal.Wait();
            if (!_queue.TryDequeue(out WorkItem? item))
            {
                continue;
            }

            if (item is ControlItem control)
            {
                if (RunControl(control))
                {
                    return;
                }

                continue;
            }

            var first = (PendingWrite)item;
            batch.Add(first);
            long bytes = first.RecordBytes;
            while (batch.Count < MaxBatchRecords && _queue.TryPeek(out WorkItem? next) && next is PendingWrite more
                && bytes + more.RecordBytes <= MaxBatchBytes && _queueSignal.Wait(0))
            {
                _queue.TryDequeue(out _);
                batch.Add(more);
                bytes += more.RecordBytes;
            }

            _writerGate.Wait();
            try
            {
                WriteBatch(batch);
            }
            catch (Exception ex)
            {
                // Nothing may stop the writer: a bug here would otherwise fill the queue for good.
                FailWrites(_open, ex.Message, Posix.EIo);
                foreach (PendingWrite write in batch)
                {
                    Finish(write);
                }
            }

            batch.Clear();
        }
    }

    /// <summary>Runs a control item; true when the writer should exit.</summary>
    private bool RunControl(ControlItem control)
    {
        try
        {
            switch (control.Kind)
            {
                case ControlKind.Flush:
                    control.Done.TrySetResult(0);
                    return false;
                case ControlKind.Clear:
                    control.Done.TrySetResult(ClearAll());
                    return false;
                default:
                    if (_open is not null)
                    {
                        CloseOpenSegment();
                    }

                    control.Done.TrySetResult(0);
                    return true;
            }
        }
        catch (Exception ex)
        {
            control.Done.TrySetResult(0);
            Interlocked.Increment(ref _errors);
            if (_writeLog.TryEnter(out long suppressed))
            {
                DiskTierLog.WriteFailed(_logger, _open?.Id ?? 0, ex.Message, 0, _options.ErrorBackoff, suppressed);
            }

            return control.Kind == ControlKind.Stop;
        }
    }

    private void WriteBatch(List<PendingWrite> batch)
    {
        int i = 0;
        while (i < batch.Count)
        {
            PendingWrite head = batch[i];
            if (head.Cancelled)
            {
                Finish(head);
                i++;
                continue;
            }

            // What this group may take: the following uncancelled records, at most one segment.
            long want = 0;
            for (int j = i; j < batch.Count && !batch[j].Cancelled && want + batch[j].RecordBytes <= _options.SegmentBytes; j++)
            {
                want += batch[j].RecordBytes;
            }

            if (!EnsureSpace(want) && !EnsureSpace(want = head.RecordBytes))
            {
                Interlocked.Increment(ref _drops);
                if (_writeLog.TryEnter(out long suppressed))
                {
                    DiskTierLog.NoRoom(_logger, head.RecordBytes, BudgetBytes, suppressed);
                }

                Finish(head);
                i++;
                continue;
            }

            Segment? segment = OpenSegmentFor(head.RecordBytes);
            if (segment is null)
            {
                for (; i < batch.Count; i++)
                {
                    Finish(batch[i]);
                }

                return;
            }

            int count = 0;
            long groupBytes = 0;
            while (i + count < batch.Count && !batch[i + count].Cancelled
                && groupBytes + batch[i + count].RecordBytes <= want
                && segment.Length + groupBytes + batch[i + count].RecordBytes <= _options.SegmentBytes)
            {
                groupBytes += batch[i + count].RecordBytes;
                count++;
            }

            List<PendingWrite> group = batch.GetRange(i, count);
            var headers = new RecordHeader[count];
            for (int j = 0; j < count; j++)
            {
                PendingWrite write = group[j];
                headers[j] = new RecordHeader(write.Key.Key, write.Key.Parent, write.Key.NamespaceTag, write.Key.Length, write.Checksum, _nextSequence++);
                RecordFormat.WriteHeader(write.Buffer!.Span, headers[j]);
            }

            int written = AppendRecords(ref segment, group, out int errno);
            long offset = segment.Length;
            lock (_lock)
            {
                for (int j = 0; j < written; j++)
                {
                    PendingWrite write = group[j];
                    var entry = new IndexEntry
                    {
                        Key = write.Key.Key,
                        Parent = write.Key.Parent,
                        NamespaceTag = write.Key.NamespaceTag,
                        Length = write.Key.Length,
                        Checksum = headers[j].PayloadChecksum,
                        Sequence = headers[j].Sequence,
                        Segment = segment,
                        Offset = offset,
                    };
                    offset += write.RecordBytes;
                    segment.Length = offset;
                    _footprint += write.RecordBytes;
                    if (!write.Cancelled)
                    {
                        // (A write cancelled by a CLEAR during the write is dead weight in the segment, not a chunk.)
                        _index.Add(entry);
                        segment.Appended!.Add(entry);
                    }
                }
            }

            for (int j = 0; j < written; j++)
            {
                Interlocked.Increment(ref _writes);
                Interlocked.Add(ref _bytesWritten, group[j].Key.Length);
                Finish(group[j]);
            }

            if (written < count)
            {
                // The rest of the group is still pending: FailWrites counts it among the dropped.
                FailWrites(segment, Posix.Describe(errno), errno);
                for (int j = written; j < count; j++)
                {
                    Finish(group[j]);
                }
            }

            i += count;
        }
    }

    /// <summary>
    /// Writes <paramref name="records"/> back to back at the end of <paramref name="segment"/> with vectored writes; returns how
    /// many were written whole, and the errno that stopped the rest. A segment whose first write O_DIRECT refuses is reopened
    /// buffered (and replaces <paramref name="segment"/>).
    /// </summary>
    private unsafe int AppendRecords(ref Segment segment, IReadOnlyList<PendingWrite> records, out int errno)
    {
        errno = 0;
        int done = 0;
        long progress = 0; // bytes of records[done] already written
        long offset = segment.Length;
        var iov = stackalloc Posix.IoVec[Math.Min(records.Count, Posix.MaxIoVecs)];
        while (done < records.Count)
        {
            int count = 0;
            for (int j = done; j < records.Count && count < Posix.MaxIoVecs; j++, count++)
            {
                long skip = j == done ? progress : 0;
                iov[count].Base = records[j].Buffer!.Pointer + skip;
                iov[count].Length = (nuint)(records[j].RecordBytes - skip);
            }

            nint n = Posix.PWriteV(segment.Handle, iov, count, offset + progress);
            if (n < 0)
            {
                errno = Marshal.GetLastPInvokeError();
                if (errno == Posix.EIntr)
                {
                    continue;
                }

                if (errno == Posix.EInval && segment.DirectIo && segment.Length == 0 && done == 0 && progress == 0
                    && ReopenBuffered(ref segment))
                {
                    offset = 0;
                    continue;
                }

                return done;
            }

            if (n == 0)
            {
                errno = Posix.EIo;
                return done;
            }

            long left = n + progress;
            progress = 0;
            while (done < records.Count && left >= records[done].RecordBytes)
            {
                left -= records[done].RecordBytes;
                offset += records[done].RecordBytes;
                done++;
            }

            progress = left;
        }

        return done;
    }

    /// <summary>Replaces a new, empty O_DIRECT segment whose first write was refused with a buffered one; from now on the tier writes buffered.</summary>
    private bool ReopenBuffered(ref Segment segment)
    {
        SafeFileHandle? handle = Posix.TryOpen(segment.DataPath, Posix.ORdWr | Posix.OCreat | Posix.OTrunc, out _);
        if (handle is null)
        {
            return false;
        }

        if (_directIo)
        {
            _directIo = false;
            DiskTierLog.DirectIoRefused(_logger, _path, "EINVAL on the first aligned write");
        }

        var replacement = new Segment(segment.Id, _path, handle, directIo: false) { Appended = [] };
        lock (_lock)
        {
            int at = _segments.IndexOf(segment);
            _segments[at] = replacement;
            segment.Retired = true;
        }

        segment.Release();
        _open = replacement;
        segment = replacement;
        return true;
    }

    /// <summary>Counts and logs a failed write, drops everything queued (it would fail too) and pauses offers for the back-off.</summary>
    private void FailWrites(Segment? segment, string error, int errno)
    {
        Interlocked.Increment(ref _errors);
        if (segment is not null)
        {
            // Cut what a partial write left after the last whole record; best effort, the next append overwrites it anyway.
            _ = Posix.FTruncate(segment.Handle, segment.Length);
        }

        int dropped;
        long used;
        lock (_lock)
        {
            dropped = CancelPendingLocked();
            used = _footprint;
        }

        Interlocked.Add(ref _drops, dropped);
        Interlocked.Exchange(ref _pausedUntil, _time.GetTimestamp() + (long)(_options.ErrorBackoff.TotalSeconds * _time.TimestampFrequency));
        if (_writeLog.TryEnter(out long suppressed))
        {
            if (Posix.IsNoSpace(errno))
            {
                DiskTierLog.DiskFull(_logger, _path, error, used, dropped, _options.ErrorBackoff, suppressed);
            }
            else
            {
                DiskTierLog.WriteFailed(_logger, segment?.Id ?? 0, error, dropped, _options.ErrorBackoff, suppressed);
            }
        }
    }

    /// <summary>Ends a queued write: it leaves the queue's byte count and the pending map, and its buffer goes back once readers are done.</summary>
    private void Finish(PendingWrite write)
    {
        lock (_lock)
        {
            if (write.Finished)
            {
                return;
            }

            write.Finished = true;
            RemovePendingLocked(write);

            _queuedBytes -= write.RecordBytes;
            _queuedCount--;
        }

        write.Release(_pool);
    }

    /// <summary>The open segment if a record of <paramref name="recordBytes"/> fits in it, else a new one (sealing the old); null when no file can be created.</summary>
    private Segment? OpenSegmentFor(long recordBytes)
    {
        if (_open is not null && _open.Length + recordBytes <= _options.SegmentBytes)
        {
            return _open;
        }

        if (_open is not null)
        {
            Seal(_open);
            _open = null;
        }

        long id = _nextSegmentId++;
        string path = System.IO.Path.Combine(_path, Segment.DataFileName(id));
        bool direct = _directIo;
        SafeFileHandle? handle = Posix.TryOpen(path, Posix.ORdWr | Posix.OCreat | Posix.OTrunc | (direct ? Posix.ODirect : 0), out int errno);
        if (handle is null && direct && errno == Posix.EInval)
        {
            _directIo = direct = false;
            DiskTierLog.DirectIoRefused(_logger, _path, Posix.Describe(errno));
            handle = Posix.TryOpen(path, Posix.ORdWr | Posix.OCreat | Posix.OTrunc, out errno);
        }

        if (handle is null)
        {
            FailWrites(null, $"cannot create {path}: {Posix.Describe(errno)}", errno);
            return null;
        }

        var segment = new Segment(id, _path, handle, direct) { Appended = [] };
        lock (_lock)
        {
            _segments.Add(segment);
        }

        _open = segment;
        return segment;
    }

    /// <summary>Seals a segment: data synced, then its index file (the chunks it still holds) written atomically.</summary>
    private void Seal(Segment segment)
    {
        string? error = Posix.FDataSync(segment.Handle) == 0 ? null : Posix.Describe(Marshal.GetLastPInvokeError());
        var records = new List<IndexRecord>();
        lock (_lock)
        {
            foreach (IndexEntry entry in segment.Appended ?? [])
            {
                if (!entry.Removed && ReferenceEquals(entry.Segment, segment))
                {
                    records.Add(new IndexRecord(entry.Key, entry.Parent, entry.NamespaceTag, entry.Offset, entry.Length, entry.Checksum, entry.Sequence));
                }
            }

            segment.Sealed = true;
            segment.Appended = null;
        }

        if (error is null)
        {
            try
            {
                SegmentIndexFile.Write(segment.IndexPath, segment.Id, segment.Length, records);
                lock (_lock)
                {
                    segment.IndexFileBytes = SegmentIndexFile.FileSize(records.Count);
                    _footprint += segment.IndexFileBytes;
                }

                return;
            }
            catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
            {
                error = ex.Message;
                TryDelete(segment.IndexPath + ".tmp");
            }
        }

        if (_sealLog.TryEnter(out long suppressed))
        {
            DiskTierLog.SealFailed(_logger, segment.Id, error, suppressed);
        }
    }

    /// <summary>At shutdown: seals the open segment, or deletes it when nothing was written to it.</summary>
    private void CloseOpenSegment()
    {
        Segment open = _open!;
        _open = null;
        if (open.Length == 0)
        {
            RetireSegment(open);
        }
        else
        {
            Seal(open);
        }
    }

    /// <summary>
    /// Makes room for <paramref name="need"/> more bytes: deletes segments nothing lives in, evicts least recently used leaf
    /// chunks while the live data is over its target, and compacts the segment with the most dead space. False when even an
    /// empty tier could not take <paramref name="need"/>.
    /// </summary>
    /// <remarks>
    /// New records keep the footprint under budget less one segment: that segment is the room compaction copies live records
    /// into before it deletes their old segment. Live data is kept under that less max(one segment, 10 %), so some segment
    /// always has dead space worth compacting; one is compacted only when at least a quarter of it is dead, which bounds the
    /// bytes copied per byte given back by three.
    /// </remarks>
    private bool EnsureSpace(long need)
    {
        for (int guard = 0; guard < 1_000_000; guard++)
        {
            Segment? retire = null;
            Segment? compact = null;
            lock (_lock)
            {
                long soft = _budget - _options.SegmentBytes;
                if (_footprint + need <= soft)
                {
                    return true;
                }

                long liveTarget = soft - Math.Max(_options.SegmentBytes, soft / 10);
                Segment? mostDead = null;
                foreach (Segment segment in _segments)
                {
                    if (!segment.Sealed || ReferenceEquals(segment, _open))
                    {
                        continue;
                    }

                    if (segment.LiveBytes == 0)
                    {
                        retire = segment;
                        break;
                    }

                    if (mostDead is null || segment.DeadBytes > mostDead.DeadBytes)
                    {
                        mostDead = segment;
                    }
                }

                if (retire is null)
                {
                    if (_index.LiveBytes + need <= liveTarget && mostDead is not null && mostDead.DeadBytes * 4 >= mostDead.Length)
                    {
                        compact = mostDead;
                    }
                    else if (_index.TryPeekVictim(out IndexEntry victim))
                    {
                        _index.Remove(victim);
                        Interlocked.Increment(ref _evictions);
                        continue;
                    }
                    else if (mostDead is not null && mostDead.DeadBytes > 0)
                    {
                        compact = mostDead;
                    }
                    else
                    {
                        return false; // nothing stored, and still no room: the record is larger than the budget allows
                    }
                }
            }

            if (retire is not null)
            {
                RetireSegment(retire);
            }
            else if (!Compact(compact!))
            {
                return false;
            }
        }

        return false;
    }

    /// <summary>Copies a segment's live records (each verified) to the open segment, then deletes it; false when a write failed.</summary>
    private bool Compact(Segment victim)
    {
        List<IndexEntry> live;
        lock (_lock)
        {
            live = [.. _index.Entries.Where(e => ReferenceEquals(e.Segment, victim))];
        }

        live.Sort(static (a, b) => a.Offset.CompareTo(b.Offset));
        long moved = 0;
        long movedBytes = 0;
        long freed = victim.Length + victim.IndexFileBytes;
        foreach (IndexEntry entry in live)
        {
            int recordBytes = (int)entry.RecordBytes;
            AlignedBuffer buffer = _pool.Rent(recordBytes);
            try
            {
                long from = entry.Offset;
                if (!ReadWholeRecord(victim, from, buffer, recordBytes, out RecordHeader header)
                    || header.Key != entry.Key || header.Length != entry.Length || header.NamespaceTag != entry.NamespaceTag
                    || RecordFormat.Checksum(buffer.Span.Slice(RecordFormat.PayloadOffset(entry.Length), (int)entry.Length)) != header.PayloadChecksum)
                {
                    _ = DropCorrupt(entry, victim, from, "found damaged while compacting its segment");
                    continue;
                }

                Segment? target = OpenSegmentFor(recordBytes);
                if (target is null)
                {
                    return false;
                }

                ulong sequence = _nextSequence++;
                RecordFormat.WriteHeader(buffer.Span, header with { Sequence = sequence });
                if (!AppendOne(target, buffer, recordBytes, out int errno))
                {
                    FailWrites(target, Posix.Describe(errno), errno);
                    return false;
                }

                lock (_lock)
                {
                    long to = target.Length;
                    target.Length += recordBytes;
                    _footprint += recordBytes;
                    if (!entry.Removed && ReferenceEquals(entry.Segment, victim) && entry.Offset == from)
                    {
                        victim.LiveBytes -= recordBytes;
                        target.LiveBytes += recordBytes;
                        entry.Segment = target;
                        entry.Offset = to;
                        entry.Sequence = sequence;
                        target.Appended!.Add(entry);
                        moved++;
                        movedBytes += recordBytes;
                    }
                }
            }
            finally
            {
                _pool.Return(buffer);
            }
        }

        RetireSegment(victim);
        DiskTierLog.Compacted(_logger, victim.Id, moved, movedBytes, freed - movedBytes);
        return true;
    }

    private static unsafe bool AppendOne(Segment segment, AlignedBuffer buffer, int recordBytes, out int errno)
    {
        long written = 0;
        while (written < recordBytes)
        {
            var iov = new Posix.IoVec { Base = buffer.Pointer + written, Length = (nuint)(recordBytes - written) };
            nint n = Posix.PWriteV(segment.Handle, &iov, 1, segment.Length + written);
            if (n < 0)
            {
                errno = Marshal.GetLastPInvokeError();
                if (errno == Posix.EIntr)
                {
                    continue;
                }

                return false;
            }

            if (n == 0)
            {
                errno = Posix.EIo;
                return false;
            }

            written += n;
        }

        errno = 0;
        return true;
    }

    /// <summary>Reads a whole record at <paramref name="offset"/> and parses its header (synchronously: writer thread and recovery).</summary>
    private static unsafe bool ReadWholeRecord(Segment segment, long offset, AlignedBuffer buffer, int recordBytes, out RecordHeader header)
    {
        header = default;
        long read = 0;
        while (read < recordBytes)
        {
            nint n = Posix.PRead(segment.Handle, buffer.Pointer + read, (nuint)(recordBytes - read), offset + read);
            if (n < 0 && Marshal.GetLastPInvokeError() == Posix.EIntr)
            {
                continue;
            }

            if (n <= 0)
            {
                return false;
            }

            read += n;
            if (n % RecordFormat.Alignment != 0 && read < recordBytes)
            {
                return false;
            }
        }

        return RecordFormat.TryReadHeader(buffer.Span, out header);
    }

    /// <summary>Takes a segment out of the tier: its remaining chunks leave the index, its files are deleted, its descriptor closes after the last read.</summary>
    private void RetireSegment(Segment segment)
    {
        lock (_lock)
        {
            if (segment.Retired)
            {
                return;
            }

            segment.Retired = true;
            _segments.Remove(segment);
            _footprint -= segment.Length + segment.IndexFileBytes;
            if (segment.LiveBytes > 0)
            {
                foreach (IndexEntry entry in _index.Entries.Where(e => ReferenceEquals(e.Segment, segment)).ToList())
                {
                    _index.Remove(entry);
                    Interlocked.Increment(ref _evictions);
                }
            }
        }

        // The data file goes first: an index file without its segment is ignored (and removed) at the next start.
        TryDelete(segment.DataPath);
        TryDelete(segment.IndexPath);
        segment.Release();
    }

    private long ClearAll()
    {
        List<Segment> segments;
        long chunks;
        lock (_lock)
        {
            CancelPendingLocked();
            chunks = _index.Count;
            _index.Clear();
            segments = [.. _segments];
        }

        _open = null;
        foreach (Segment segment in segments)
        {
            lock (_lock)
            {
                segment.LiveBytes = 0;
            }

            RetireSegment(segment);
        }

        return chunks;
    }

    private void TryDelete(string file)
    {
        try
        {
            File.Delete(file);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            if (_deleteLog.TryEnter(out long suppressed))
            {
                DiskTierLog.DeleteFailed(_logger, file, ex.Message, suppressed);
            }
        }
    }
}
