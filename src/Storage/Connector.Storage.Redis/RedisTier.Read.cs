using System.Buffers;
using System.IO.Hashing;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using StackExchange.Redis;

namespace Connector.Storage.Redis;

public sealed partial class RedisTier
{
    /// <summary>Manifest headers asked for at once by a probe: one pipelined round trip covers 64 chunks.</summary>
    private const int ProbeBatch = 64;

    /// <inheritdoc/>
    /// <remarks>
    /// Pipelines a GETRANGE of each manifest's header and counts the leading chunks whose header names the key, the
    /// namespace tag and the length asked for (a foreign or garbage value is not counted). One deadline covers the probe.
    /// </remarks>
    public async ValueTask<int> ProbePrefixAsync(ReadOnlyMemory<TierKey> keys, CancellationToken cancellation)
    {
        if (keys.IsEmpty || cancellation.IsCancellationRequested)
        {
            return 0;
        }

        IDatabase? db = _db;
        if (db is null || !_breaker.TryAcquire())
        {
            Interlocked.Increment(ref _shortCircuits);
            return 0;
        }

        using var scope = new OperationScope(_operationTimeout, _time, cancellation, _stopping.Token);
        Task<RedisValue>[] pending = ArrayPool<Task<RedisValue>>.Shared.Rent(Math.Min(ProbeBatch, keys.Length));
        int issued = 0;
        int awaited = 0;
        try
        {
            int present = 0;
            for (int start = 0; start < keys.Length; start += ProbeBatch)
            {
                int n = Math.Min(ProbeBatch, keys.Length - start);
                issued = n;
                awaited = 0;
                for (int i = 0; i < n; i++)
                {
                    pending[i] = db.StringGetRangeAsync(_keys.Manifest(keys.Span[start + i].Key), 0, ChunkManifest.HeaderSize - 1);
                }

                for (; awaited < n; awaited++)
                {
                    RedisValue header = await pending[awaited].WaitAsync(scope.Token);
                    TierKey key = keys.Span[start + awaited];
                    if (header.IsNullOrEmpty
                        || ChunkManifest.TryParse(((ReadOnlyMemory<byte>)header).Span, key.Key, key.NamespaceTag, key.Length, headerOnly: true, out _) != ManifestCheck.Valid)
                    {
                        awaited++;
                        AbandonRest(pending, awaited, n);
                        issued = 0;
                        Succeeded();
                        return present;
                    }

                    present++;
                }

                issued = 0;
            }

            Succeeded();
            return present;
        }
        catch (Exception ex) when (ex is RedisException or OperationCanceledException or ObjectDisposedException)
        {
            AbandonRest(pending, awaited, issued);
            if (!cancellation.IsCancellationRequested)
            {
                Failed("probe", ex);
            }

            return 0;
        }
        finally
        {
            Array.Clear(pending);
            ArrayPool<Task<RedisValue>>.Shared.Return(pending);
        }
    }

    /// <inheritdoc/>
    /// <remarks>
    /// Reads the manifest, then (unless the chunk is inline) pipelines a GET of every piece and decodes each into its
    /// place in <paramref name="destination"/> as it arrives; then checks the XxHash128 of the whole chunk. Nothing is
    /// written into <paramref name="destination"/> after this returns. A missing piece (expired or evicted by the
    /// server) is a miss and drops the manifest.
    /// </remarks>
    public async ValueTask<TierReadStatus> ReadAsync(TierKey key, Memory<byte> destination, CancellationToken cancellation)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(key.Length);
        if (destination.Length != key.Length)
        {
            throw new ArgumentException($"the destination is {destination.Length} bytes, the chunk {key.Length}", nameof(destination));
        }

        if (cancellation.IsCancellationRequested)
        {
            return TierReadStatus.Cancelled;
        }

        IDatabase? db = _db;
        if (db is null || !_breaker.TryAcquire())
        {
            Interlocked.Increment(ref _shortCircuits);
            Interlocked.Increment(ref _misses);
            return TierReadStatus.Miss;
        }

        RedisKey manifestKey = _keys.Manifest(key.Key);
        using var scope = new OperationScope(_operationTimeout, _time, cancellation, _stopping.Token);
        Lease<byte>? lease = null;
        try
        {
            lease = await db.StringGetLeaseAsync(manifestKey).WaitAsync(scope.Token);
            if (lease is null)
            {
                Succeeded();
                Interlocked.Increment(ref _misses);
                return TierReadStatus.Miss;
            }

            ManifestCheck check = ChunkManifest.TryParse(lease.Span, key.Key, key.NamespaceTag, key.Length, headerOnly: false, out ChunkManifest manifest);
            if (check != ManifestCheck.Valid)
            {
                Succeeded();
                CountCorrupt(db, key.Key, manifestKey, check.ToString());
                return TierReadStatus.Corrupt;
            }

            Interlocked.Add(ref _wireBytesRead, lease.Length);
            TierReadStatus status = manifest.IsInline
                ? DecodeInline(manifest, lease.Span[ChunkManifest.HeaderSize..], destination.Span)
                : await ReadPiecesAsync(db, key, manifest, destination, scope.Token);

            if (status == TierReadStatus.Hit && XxHash128.HashToUInt128(destination.Span) != manifest.Checksum)
            {
                status = TierReadStatus.Corrupt;
            }

            Succeeded();
            switch (status)
            {
                case TierReadStatus.Hit:
                    Interlocked.Increment(ref _hits);
                    Interlocked.Add(ref _bytesRead, key.Length);
                    break;
                case TierReadStatus.Corrupt:
                    CountCorrupt(db, key.Key, manifestKey, "checksum or piece size");
                    DeletePieces(db, key.Key, manifest);
                    break;
                default:
                    Interlocked.Increment(ref _misses);
                    break;
            }

            return status;
        }
        catch (Exception ex) when (ex is RedisServerException && ex.Message.StartsWith("WRONGTYPE", StringComparison.Ordinal))
        {
            Succeeded();
            CountCorrupt(db, key.Key, manifestKey, "not a string value");
            return TierReadStatus.Corrupt;
        }
        catch (Exception ex) when (ex is RedisException or OperationCanceledException or ObjectDisposedException)
        {
            if (cancellation.IsCancellationRequested)
            {
                return TierReadStatus.Cancelled;
            }

            Failed("read", ex);
            return TierReadStatus.Error;
        }
        finally
        {
            lease?.Dispose();
        }
    }

    private static TierReadStatus DecodeInline(in ChunkManifest manifest, ReadOnlySpan<byte> stored, Span<byte> destination) =>
        PieceCodec.TryDecode(manifest.Codec, stored, destination) ? TierReadStatus.Hit : TierReadStatus.Corrupt;

    private async ValueTask<TierReadStatus> ReadPiecesAsync(IDatabase db, TierKey key, ChunkManifest manifest, Memory<byte> destination, CancellationToken token)
    {
        int count = manifest.PieceCount;
        int window = PiecesInFlight(manifest.PieceBytes);
        Task<Lease<byte>?>[] pieces = ArrayPool<Task<Lease<byte>?>>.Shared.Rent(count);
        int issued = 0;
        int next = 0;
        long stored = 0;
        try
        {
            for (; issued < Math.Min(window, count); issued++)
            {
                pieces[issued] = db.StringGetLeaseAsync(_keys.Piece(key.Key, manifest.WriteId, issued));
            }

            for (; next < count; next++)
            {
                using Lease<byte>? piece = await pieces[next].WaitAsync(token);
                if (issued < count)
                {
                    pieces[issued] = db.StringGetLeaseAsync(_keys.Piece(key.Key, manifest.WriteId, issued));
                    issued++;
                }

                if (piece is null)
                {
                    // Expired or evicted by the server (a writer that died between its pieces and its manifest
                    // cannot leave this: the manifest goes last). The chunk is gone: drop the manifest too.
                    next++;
                    Interlocked.Increment(ref _evictions);
                    _ = db.KeyDeleteAsync(_keys.Manifest(key.Key), CommandFlags.FireAndForget);
                    return TierReadStatus.Miss;
                }

                stored += piece.Length;
                int offset = next * manifest.PieceBytes;
                if (!PieceCodec.TryDecode(manifest.Codec, piece.Span, destination.Span.Slice(offset, manifest.RawPieceLength(next))))
                {
                    next++;
                    return TierReadStatus.Corrupt;
                }
            }

            Interlocked.Add(ref _wireBytesRead, stored);
            return stored == manifest.StoredBytes ? TierReadStatus.Hit : TierReadStatus.Corrupt;
        }
        finally
        {
            AbandonRest(pieces, next, issued);
            Array.Clear(pieces, 0, count);
            ArrayPool<Task<Lease<byte>?>>.Shared.Return(pieces);
        }
    }

    private void DeletePieces(IDatabase db, in ChunkKey key, in ChunkManifest manifest)
    {
        if (manifest.IsInline)
        {
            return;
        }

        for (int i = 0; i < manifest.PieceCount; i++)
        {
            _ = db.KeyDeleteAsync(_keys.Piece(key, manifest.WriteId, i), CommandFlags.FireAndForget);
        }
    }

    private static void AbandonRest<T>(Task<T>[] tasks, int from, int to)
    {
        for (int i = from; i < to; i++)
        {
            if (tasks[i] is { } t)
            {
                Abandon(t);
            }
        }
    }
}
