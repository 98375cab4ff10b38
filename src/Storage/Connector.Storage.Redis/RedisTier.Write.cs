using System.Buffers;
using System.IO.Hashing;
using Connector.Core.Storage.Tiers;
using StackExchange.Redis;

namespace Connector.Storage.Redis;

public sealed partial class RedisTier
{
    /// <inheritdoc/>
    /// <remarks>
    /// Refuses (Unavailable) while the circuit is open or before the first connection; answers NotAdmitted when the
    /// write budget (<see cref="RedisTierOptions.CapacityBytes"/>) would be exceeded, AlreadyPresent when the chunk is
    /// queued already, QueueFull (dropped, counted) when the queue's bytes would pass
    /// <see cref="RedisTierOptions.WriteQueueBytes"/>. Otherwise copies the bytes into a pooled buffer and returns.
    /// </remarks>
    public TierWriteStatus Offer(in TierKey key, ReadOnlySpan<byte> data)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(key.Length);
        if (data.Length != key.Length)
        {
            throw new ArgumentException($"the data is {data.Length} bytes, the chunk {key.Length}", nameof(data));
        }

        if (Volatile.Read(ref _disposed) != 0 || _db is null || _breaker.IsRefusing)
        {
            Interlocked.Increment(ref _refused);
            return TierWriteStatus.Unavailable;
        }

        if (_budget.Read().Bytes + Volatile.Read(ref _queuedBytes) + data.Length > _capacityBytes)
        {
            Interlocked.Increment(ref _notAdmitted);
            return TierWriteStatus.NotAdmitted;
        }

        if (!_queued.TryAdd(key.Key, 0))
        {
            return TierWriteStatus.AlreadyPresent;
        }

        long queued = Interlocked.Add(ref _queuedBytes, data.Length);
        if (queued > _writeQueueBytes)
        {
            Interlocked.Add(ref _queuedBytes, -data.Length);
            _queued.TryRemove(key.Key, out _);
            Interlocked.Increment(ref _drops);
            if (_dropGate.TryEnter(out long suppressed))
            {
                RedisTierLog.WriteDropped(_logger, queued - data.Length, _writeQueueBytes, suppressed);
            }

            return TierWriteStatus.QueueFull;
        }

        // A chunk of one piece is sent as header + bytes in one value: leave room for the header in front.
        int offset = data.Length <= _pieceBytes ? ChunkManifest.HeaderSize : 0;
        byte[] buffer = _buffers.Rent(offset + data.Length);
        data.CopyTo(buffer.AsSpan(offset));
        Interlocked.Increment(ref _queueDepth);
        var item = new WriteItem(key, buffer, offset, Volatile.Read(ref _clearEpoch));
        if (!_queue.Writer.TryWrite(item))
        {
            Release(item, returnBuffer: true);
            Interlocked.Increment(ref _refused);
            return TierWriteStatus.Unavailable;
        }

        return TierWriteStatus.Accepted;
    }

    private async Task WriteLoopAsync()
    {
        try
        {
            while (await _queue.Reader.WaitToReadAsync(_stopping.Token))
            {
                while (_queue.Reader.TryRead(out WriteItem item))
                {
                    bool returnBuffer = true;
                    try
                    {
                        if (item.Epoch == Volatile.Read(ref _clearEpoch))
                        {
                            returnBuffer = await WriteAsync(item);
                        }
                    }
                    finally
                    {
                        Release(item, returnBuffer);
                    }
                }
            }
        }
        catch (OperationCanceledException)
        {
            // Disposal.
        }
    }

    /// <summary>Writes one chunk; returns whether its buffers may go back to the pool (no command still holds them).</summary>
    private async Task<bool> WriteAsync(WriteItem item)
    {
        IDatabase? db = _db;
        if (db is null || !_breaker.TryAcquire())
        {
            Interlocked.Increment(ref _refused);
            return true;
        }

        int length = (int)item.Key.Length;
        ReadOnlyMemory<byte> data = item.Buffer.AsMemory(item.Offset, length);
        UInt128 checksum = XxHash128.HashToUInt128(data.Span);
        ulong writeId = _writeIdBase + (ulong)Interlocked.Increment(ref _writeIdCounter);
        RedisKey manifestKey = _keys.Manifest(item.Key.Key);
        using var scope = new OperationScope(_operationTimeout, _time, CancellationToken.None, _stopping.Token);
        return length <= _pieceBytes
            ? await WriteInlineAsync(db, item, manifestKey, writeId, checksum, scope.Token)
            : await WritePiecesAsync(db, item, manifestKey, writeId, checksum, scope.Token);
    }

    private async Task<bool> WriteInlineAsync(IDatabase db, WriteItem item, RedisKey manifestKey, ulong writeId, UInt128 checksum, CancellationToken token)
    {
        int length = (int)item.Key.Length;
        byte[] value = item.Buffer;
        int stored = length;
        byte[]? encoded = null;
        if (_compression == RedisCompression.Lz4)
        {
            encoded = _buffers.Rent(ChunkManifest.HeaderSize + PieceCodec.EncodeLimit(length));
            int n = PieceCodec.TryEncode(_compression, item.Buffer.AsSpan(item.Offset, length), encoded.AsSpan(ChunkManifest.HeaderSize));
            if (n > 0)
            {
                value = encoded;
                stored = n;
            }
        }

        new ChunkManifest(_compression, ManifestFlags.Inline, item.Key.NamespaceTag, item.Key.Key, length, stored, 1, _pieceBytes, writeId, checksum).Write(value);
        Task<bool> set = db.StringSetAsync(manifestKey, value.AsMemory(0, ChunkManifest.HeaderSize + stored), _ttl, When.NotExists);
        bool safe = true;
        try
        {
            bool written = await set.WaitAsync(token);
            Succeeded();
            Committed(written, length, ChunkManifest.HeaderSize + stored);
        }
        catch (Exception ex) when (ex is RedisException or OperationCanceledException or ObjectDisposedException)
        {
            safe = set.IsCompleted;
            Abandon(set);
            Failed("write", ex);
        }
        finally
        {
            if (encoded is not null && safe)
            {
                _buffers.Return(encoded);
            }
        }

        return safe;
    }

    private async Task<bool> WritePiecesAsync(IDatabase db, WriteItem item, RedisKey manifestKey, ulong writeId, UInt128 checksum, CancellationToken token)
    {
        int length = (int)item.Key.Length;
        int count = (int)(((long)length + _pieceBytes - 1) / _pieceBytes);
        Task<bool>[] sets = ArrayPool<Task<bool>>.Shared.Rent(count + 1);
        byte[]? encoded = null;
        int issued = 0;
        int piecesIssued = 0;
        bool safe = true;
        try
        {
            // Another sidecar may have written this chunk: one round trip spares sending all of its bytes again.
            sets[0] = db.KeyExistsAsync(manifestKey);
            issued = 1;
            bool exists = await sets[0].WaitAsync(token);
            issued = 0;
            if (exists)
            {
                Succeeded();
                Interlocked.Increment(ref _deduplicated);
                return true;
            }

            // Each piece is sent as soon as it is encoded, so encoding overlaps the transfer of the pieces before it;
            // at most a window of them is unacknowledged at once.
            int window = PiecesInFlight(_pieceBytes);
            encoded = _compression == RedisCompression.Lz4 ? _buffers.Rent(length) : null;
            int encodedAt = 0;
            long stored = 0;
            for (int i = 0; i < count; i++)
            {
                if (i >= window)
                {
                    await sets[i - window].WaitAsync(token);
                }

                int rawLength = Math.Min(_pieceBytes, length - (i * _pieceBytes));
                ReadOnlyMemory<byte> piece = item.Buffer.AsMemory(item.Offset + (i * _pieceBytes), rawLength);
                if (encoded is not null)
                {
                    int n = PieceCodec.TryEncode(_compression, piece.Span, encoded.AsSpan(encodedAt));
                    if (n > 0)
                    {
                        piece = encoded.AsMemory(encodedAt, n);
                        encodedAt += n;
                    }
                }

                stored += piece.Length;
                sets[i] = db.StringSetAsync(_keys.Piece(item.Key.Key, writeId, i), piece, _pieceTtl, When.Always);
                issued = i + 1;
                piecesIssued = i + 1;
            }

            for (int i = Math.Max(0, count - window); i < count; i++)
            {
                await sets[i].WaitAsync(token);
            }

            // The commit point: only now does the chunk become visible.
            byte[] header = new byte[ChunkManifest.HeaderSize];
            new ChunkManifest(_compression, ManifestFlags.None, item.Key.NamespaceTag, item.Key.Key, length, stored, count, _pieceBytes, writeId, checksum).Write(header);
            sets[count] = db.StringSetAsync(manifestKey, header, _ttl, When.NotExists);
            issued = count + 1;
            bool written = await sets[count].WaitAsync(token);
            Succeeded();
            if (!written)
            {
                // Lost the race to another writer of the same chunk: its pieces are the ones named; ours are orphans.
                DeletePieces(db, item.Key.Key, new ChunkManifest(_compression, ManifestFlags.None, 0, item.Key.Key, length, stored, count, _pieceBytes, writeId, checksum));
            }

            Committed(written, length, ChunkManifest.HeaderSize + stored);
            return true;
        }
        catch (Exception ex) when (ex is RedisException or OperationCanceledException or ObjectDisposedException)
        {
            for (int i = 0; i < issued; i++)
            {
                safe &= sets[i].IsCompleted;
                Abandon(sets[i]);
            }

            if (piecesIssued > 0 && issued <= count)
            {
                // No manifest names them: best effort to free them now rather than at their TTL.
                for (int i = 0; i < piecesIssued; i++)
                {
                    _ = db.KeyDeleteAsync(_keys.Piece(item.Key.Key, writeId, i), CommandFlags.FireAndForget);
                }
            }

            Failed("write", ex);
            return safe;
        }
        finally
        {
            if (encoded is not null && safe)
            {
                _buffers.Return(encoded);
            }

            Array.Clear(sets, 0, count + 1);
            ArrayPool<Task<bool>>.Shared.Return(sets);
        }
    }

    private void Committed(bool written, long length, long stored)
    {
        if (!written)
        {
            Interlocked.Increment(ref _deduplicated);
            return;
        }

        Interlocked.Increment(ref _writes);
        Interlocked.Add(ref _bytesWritten, length);
        Interlocked.Add(ref _wireBytesWritten, stored);
        _budget.Add(stored + _keys.ManifestKeyLength);
    }

    private void Release(WriteItem item, bool returnBuffer)
    {
        Interlocked.Add(ref _queuedBytes, -item.Key.Length);
        _queued.TryRemove(item.Key.Key, out _);
        Interlocked.Decrement(ref _queueDepth);
        if (returnBuffer)
        {
            _buffers.Return(item.Buffer);
        }
    }

    /// <summary>A chunk waiting to be written: its bytes at <see cref="Offset"/> of a pooled <see cref="Buffer"/>.</summary>
    private readonly record struct WriteItem(TierKey Key, byte[] Buffer, int Offset, long Epoch);
}
