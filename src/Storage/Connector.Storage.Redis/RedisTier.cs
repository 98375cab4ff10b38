using System.Collections.Concurrent;
using System.Net;
using System.Threading.Channels;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging;
using StackExchange.Redis;

namespace Connector.Storage.Redis;

/// <summary>
/// L3: whole chunks in a Redis or Valkey server or cluster shared by many sidecars (docs/storage-redis.md). A chunk
/// is written as bounded pieces under a fresh write id, then a small manifest that names them (the commit point), so
/// a reader never sees a partial chunk; every key has the TTL; bytes travel LZ4-compressed and are verified against
/// an XxHash128 of the whole chunk on every read. A Redis that is down or slow is a miss, never a stall.
/// </summary>
/// <remarks>
/// One <see cref="ConnectionMultiplexer"/> (cluster-aware, reconnecting in the background) carries every command;
/// the pieces of one chunk share a cluster hash tag, so they pipeline to one node. Thread-safe.
/// </remarks>
public sealed partial class RedisTier : IChunkTier
{
    private readonly ILogger _logger;
    private readonly TimeProvider _time;
    private readonly ChunkKeys _keys;
    private readonly CircuitBreaker _breaker;
    private readonly WriteBudget _budget;
    private readonly BufferPool _buffers;
    private readonly LogGate _failureGate;
    private readonly LogGate _corruptGate;
    private readonly LogGate _dropGate;
    private readonly LogGate _connectionGate;
    private readonly Channel<WriteItem> _queue;
    private readonly ConcurrentDictionary<ChunkKey, byte> _queued = new();
    private readonly CancellationTokenSource _stopping = new();
    private readonly Task[] _writers;

    private readonly TimeSpan _ttl;
    private readonly TimeSpan _pieceTtl;
    private readonly TimeSpan _operationTimeout;
    private readonly TimeSpan _breakerOpenDuration;
    private readonly int _breakerThreshold;
    private readonly long _capacityBytes;
    private readonly long _writeQueueBytes;
    private readonly int _pieceBytes;
    private readonly long _pipelineBytes;
    private readonly RedisCompression _compression;
    private readonly ulong _writeIdBase;

    private volatile ConnectionMultiplexer? _mux;
    private volatile IDatabase? _db;
    private long _writeIdCounter;
    private long _queuedBytes;
    private int _queueDepth;
    private long _clearEpoch;
    private int _disposed;

    private long _hits;
    private long _misses;
    private long _bytesRead;
    private long _bytesWritten;
    private long _wireBytesRead;
    private long _wireBytesWritten;
    private long _writes;
    private long _drops;
    private long _notAdmitted;
    private long _evictions;
    private long _corrupt;
    private long _errors;
    private long _shortCircuits;
    private long _refused;
    private long _deduplicated;

    /// <summary>Creates the tier and starts connecting in the background; never blocks or throws when Redis is down.</summary>
    /// <param name="options">The settings, validated here (and read once: later changes have no effect).</param>
    /// <param name="logger">Where the tier logs (rate-limited for per-operation failures).</param>
    /// <param name="time">The clock for timeouts, the circuit breaker and the TTL account (default: the system clock).</param>
    /// <exception cref="ArgumentException">A setting is invalid.</exception>
    public RedisTier(RedisTierOptions options, ILogger logger, TimeProvider? time = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(logger);
        options.Validate();
        _logger = logger;
        _time = time ?? TimeProvider.System;
        _keys = new ChunkKeys(options.KeyPrefix);
        _ttl = options.Ttl;
        _operationTimeout = options.OperationTimeout;

        // Pieces outlive their manifest by the longest a write may take plus a margin, so a reader that found a
        // manifest just before it expired still finds its pieces.
        _pieceTtl = options.Ttl + options.OperationTimeout + TimeSpan.FromSeconds(30);
        _breakerOpenDuration = options.BreakerOpenDuration;
        _breakerThreshold = options.BreakerFailureThreshold;
        _capacityBytes = options.CapacityBytes;
        _writeQueueBytes = options.WriteQueueBytes;
        _pieceBytes = options.PieceBytes;
        _pipelineBytes = options.PipelineBytes;
        _compression = options.Compression;
        _writeIdBase = (ulong)Random.Shared.NextInt64();
        _breaker = new CircuitBreaker(options.BreakerFailureThreshold, options.BreakerOpenDuration, _time);
        _budget = new WriteBudget(options.Ttl, _time);

        // The queue's chunks plus the writers' encode buffers: a burst fills it once, then nothing chunk-sized is allocated.
        _buffers = new BufferPool(2 * options.WriteQueueBytes);
        _failureGate = new LogGate(options.LogInterval, _time);
        _corruptGate = new LogGate(options.LogInterval, _time);
        _dropGate = new LogGate(options.LogInterval, _time);
        _connectionGate = new LogGate(options.LogInterval, _time);
        _queue = Channel.CreateUnbounded<WriteItem>(new UnboundedChannelOptions { SingleWriter = false, SingleReader = false });

        ConfigurationOptions config = ConfigurationOptions.Parse(options.Configuration);
        config.AbortOnConnectFail = false;
        config.BacklogPolicy = BacklogPolicy.FailFast;
        config.ConnectTimeout = Milliseconds(options.ConnectTimeout);
        config.ConnectRetry = 1;
        config.AsyncTimeout = Milliseconds(options.OperationTimeout * 2);
        config.SyncTimeout = Milliseconds(options.OperationTimeout * 2);
        config.KeepAlive = 5;
        config.ReconnectRetryPolicy = new ExponentialRetry(100, 2000);
        config.ClientName ??= "kvsidecar";

        if (_logger.IsEnabled(LogLevel.Information))
        {
            string endpoints = string.Join(",", config.EndPoints.Select(e => e.ToString()));
            RedisTierLog.Starting(_logger, endpoints, options.KeyPrefix, options.Ttl, options.PieceBytes, options.Compression, options.CapacityBytes);
        }

        _ = Task.Run(() => ConnectAsync(config));
        _writers = new Task[options.WriteConcurrency];
        for (int i = 0; i < _writers.Length; i++)
        {
            _writers[i] = Task.Run(WriteLoopAsync);
        }
    }

    /// <inheritdoc/>
    public string Name => "redis";

    /// <inheritdoc/>
    public bool HasLocalIndex => false;

    /// <summary>The circuit breaker's state (for health checks and tests).</summary>
    internal BreakerState BreakerState => _breaker.State;

    /// <summary>How many times the circuit opened.</summary>
    internal long BreakerOpenings => _breaker.Opened;

    /// <summary>Reads and probes answered without asking Redis (circuit open or not yet connected).</summary>
    internal long ShortCircuits => Interlocked.Read(ref _shortCircuits);

    /// <summary>Offers and queued writes refused because the circuit was open or Redis not yet connected.</summary>
    internal long Refused => Interlocked.Read(ref _refused);

    /// <summary>Writes skipped because the chunk was already in Redis (written by this or another sidecar).</summary>
    internal long Deduplicated => Interlocked.Read(ref _deduplicated);

    /// <summary>Bytes read from Redis as stored (compressed), headers included.</summary>
    internal long WireBytesRead => Interlocked.Read(ref _wireBytesRead);

    /// <summary>Bytes written to Redis as stored (compressed), headers included.</summary>
    internal long WireBytesWritten => Interlocked.Read(ref _wireBytesWritten);

    /// <summary>Whether the multiplexer exists and has a connection.</summary>
    internal bool IsConnected => _mux?.IsConnected == true;

    /// <inheritdoc/>
    public int CountPresentPrefix(ReadOnlySpan<TierKey> keys) => 0;

    /// <inheritdoc/>
    public TierStats GetStats()
    {
        (long used, long chunks) = _budget.Read();
        return new TierStats(
            Name,
            _capacityBytes,
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
            Volatile.Read(ref _queueDepth));
    }

    /// <inheritdoc/>
    /// <remarks>
    /// Scans every primary for keys under the prefix (SCAN, never KEYS or FLUSHDB: the server may hold other data)
    /// and deletes them; returns how many chunk manifests were deleted. Chunks still queued are dropped; a write in
    /// flight may land after it. Clears the prefix for every sidecar that shares it.
    /// </remarks>
    public async ValueTask<long> ClearAsync(CancellationToken cancellation)
    {
        Interlocked.Increment(ref _clearEpoch);
        _budget.Reset();
        ConnectionMultiplexer? mux = _mux;
        IDatabase? db = _db;
        if (mux is null || db is null)
        {
            return 0;
        }

        long manifests = 0;
        var batch = new List<RedisKey>(1024);
        foreach (EndPoint endPoint in mux.GetEndPoints())
        {
            IServer server = mux.GetServer(endPoint);
            if (!server.IsConnected || server.IsReplica)
            {
                continue;
            }

            try
            {
                await foreach (RedisKey key in server.KeysAsync(pattern: _keys.Pattern, pageSize: 1000).WithCancellation(cancellation))
                {
                    batch.Add(key);
                    if (batch.Count == 1024)
                    {
                        manifests += await DeleteBatchAsync(db, batch, cancellation);
                    }
                }

                manifests += await DeleteBatchAsync(db, batch, cancellation);
            }
            catch (Exception ex) when (!cancellation.IsCancellationRequested)
            {
                RedisTierLog.ClearFailed(_logger, ex, endPoint.ToString() ?? "?");
                batch.Clear();
            }
        }

        return manifests;
    }

    /// <summary>Waits until every queued write has been written or dropped (tests, benchmarks, shutdown).</summary>
    /// <returns>False when <paramref name="timeout"/> passed first.</returns>
    internal async Task<bool> FlushAsync(TimeSpan timeout)
    {
        long deadline = _time.GetTimestamp() + (long)(timeout.TotalSeconds * _time.TimestampFrequency);
        while (Volatile.Read(ref _queueDepth) > 0)
        {
            if (_time.GetTimestamp() > deadline)
            {
                return false;
            }

            await Task.Delay(1);
        }

        return true;
    }

    /// <summary>Stops the writers (queued chunks are dropped) and closes the connections.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        _queue.Writer.TryComplete();
        _stopping.Cancel();
        try
        {
            Task.WaitAll(_writers, _operationTimeout + TimeSpan.FromSeconds(1));
        }
        catch (AggregateException)
        {
            // The writers end by cancellation; nothing of theirs is to report here.
        }

        while (_queue.Reader.TryRead(out WriteItem item))
        {
            Release(item, returnBuffer: true);
        }

        ConnectionMultiplexer? mux = _mux;
        _mux = null;
        _db = null;
        if (mux is not null)
        {
            // Not Dispose alone: it lets pending commands complete, which waits on a frozen server.
            mux.Close(allowCommandsToComplete: false);
            mux.Dispose();
        }
    }

    private async Task ConnectAsync(ConfigurationOptions config)
    {
        for (int attempt = 0; Volatile.Read(ref _disposed) == 0; attempt++)
        {
            try
            {
                ConnectionMultiplexer mux = await ConnectionMultiplexer.ConnectAsync(config);
                mux.ConnectionFailed += OnConnectionFailed;
                mux.ConnectionRestored += OnConnectionRestored;
                _mux = mux;
                _db = mux.GetDatabase();
                if (Volatile.Read(ref _disposed) != 0)
                {
                    _mux = null;
                    _db = null;
                    mux.Dispose();
                    return;
                }

                if (!mux.IsConnected)
                {
                    RedisTierLog.NotConnected(_logger);
                }
                else if (_logger.IsEnabled(LogLevel.Information))
                {
                    string kind = ServerKind(mux);
                    int servers = mux.GetEndPoints().Length;
                    RedisTierLog.Connected(_logger, kind, servers);
                }

                return;
            }
            catch (Exception ex) when (ex is RedisException or System.Net.Sockets.SocketException or ArgumentException or InvalidOperationException)
            {
                // Only a configuration the client cannot use at all gets here (AbortOnConnectFail is off): retry slowly.
                if (attempt == 0)
                {
                    RedisTierLog.ConnectFailed(_logger, ex);
                }

                try
                {
                    await Task.Delay(TimeSpan.FromSeconds(Math.Min(30, 1 << Math.Min(attempt, 5))), _time, _stopping.Token);
                }
                catch (OperationCanceledException)
                {
                    return;
                }
            }
        }
    }

    private static string ServerKind(ConnectionMultiplexer mux)
    {
        foreach (EndPoint endPoint in mux.GetEndPoints())
        {
            IServer server = mux.GetServer(endPoint);
            if (server.IsConnected)
            {
                return server.ServerType.ToString();
            }
        }

        return "unknown";
    }

    private void OnConnectionFailed(object? sender, ConnectionFailedEventArgs e)
    {
        if (e.ConnectionType == ConnectionType.Subscription)
        {
            return;
        }

        if (_connectionGate.TryEnter(out long suppressed) && _logger.IsEnabled(LogLevel.Warning))
        {
            string endPoint = e.EndPoint?.ToString() ?? "?";
            string failure = e.FailureType.ToString();
            RedisTierLog.ConnectionLost(_logger, endPoint, failure, suppressed);
        }
    }

    private void OnConnectionRestored(object? sender, ConnectionFailedEventArgs e)
    {
        if (e.ConnectionType != ConnectionType.Subscription && _logger.IsEnabled(LogLevel.Information))
        {
            string endPoint = e.EndPoint?.ToString() ?? "?";
            RedisTierLog.ConnectionRestored(_logger, endPoint);
        }
    }

    private async Task<long> DeleteBatchAsync(IDatabase db, List<RedisKey> batch, CancellationToken cancellation)
    {
        if (batch.Count == 0)
        {
            return 0;
        }

        long manifests = 0;
        var deletes = new Task<bool>[batch.Count];
        for (int i = 0; i < batch.Count; i++)
        {
            deletes[i] = db.KeyDeleteAsync(batch[i]);
            if (_keys.IsManifest((byte[]?)batch[i]))
            {
                manifests++;
            }
        }

        batch.Clear();
        using var scope = new OperationScope(_operationTimeout * 4, _time, cancellation, _stopping.Token);
        await Task.WhenAll(deletes).WaitAsync(scope.Token);
        return manifests;
    }

    /// <summary>Records a failed operation: counts it, feeds the breaker, logs at most once per interval.</summary>
    private void Failed(string operation, Exception ex)
    {
        Interlocked.Increment(ref _errors);
        switch (_breaker.OnFailure())
        {
            case BreakerTransition.Opened:
                RedisTierLog.BreakerOpened(_logger, _breakerThreshold, _breakerOpenDuration);
                break;
            case BreakerTransition.Reopened:
                RedisTierLog.BreakerReopened(_logger, _breakerOpenDuration);
                break;
        }

        if (_failureGate.TryEnter(out long suppressed))
        {
            string reason = ex is OperationCanceledException ? $"no answer within {_operationTimeout.TotalMilliseconds:0} ms" : $"{ex.GetType().Name}: {ex.Message}";
            RedisTierLog.OperationFailed(_logger, operation, reason, suppressed);
        }
    }

    private void Succeeded()
    {
        if (_breaker.OnSuccess() == BreakerTransition.Closed)
        {
            RedisTierLog.BreakerClosed(_logger);
        }
    }

    private void CountCorrupt(IDatabase db, in ChunkKey key, RedisKey manifestKey, string reason)
    {
        Interlocked.Increment(ref _corrupt);

        // Dropped so it is not probed or read again; a value written over it meanwhile is lost at worst (a later miss).
        _ = db.KeyDeleteAsync(manifestKey, CommandFlags.FireAndForget);
        if (_corruptGate.TryEnter(out long suppressed))
        {
            RedisTierLog.CorruptValue(_logger, key.ToString(), reason, suppressed);
        }
    }

    /// <summary>How many pieces of one chunk are on the wire at once: <see cref="RedisTierOptions.PipelineBytes"/> worth, at least 2.</summary>
    private int PiecesInFlight(int pieceBytes) => (int)Math.Clamp(_pipelineBytes / pieceBytes, 2, int.MaxValue);

    private static int Milliseconds(TimeSpan t) => (int)Math.Clamp(t.TotalMilliseconds, 1, int.MaxValue);

    /// <summary>Observes a command the tier stopped waiting for (timeout or early exit), freeing a lease it may still return.</summary>
    private static void Abandon<T>(Task<T> task)
    {
        if (task.IsCompleted)
        {
            Dispose(task);
            return;
        }

        _ = task.ContinueWith(static t => Dispose(t), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

        static void Dispose(Task<T> t)
        {
            if (t.IsCompletedSuccessfully)
            {
                (t.Result as IDisposable)?.Dispose();
            }
            else
            {
                _ = t.Exception;
            }
        }
    }

    /// <summary>A deadline for one operation, cancelled also by the caller and by disposal.</summary>
    private sealed class OperationScope : IDisposable
    {
        private readonly CancellationTokenSource _source;
        private readonly CancellationTokenRegistration _caller;
        private readonly CancellationTokenRegistration _stopping;

        public OperationScope(TimeSpan timeout, TimeProvider time, CancellationToken caller, CancellationToken stopping)
        {
            _source = new CancellationTokenSource(timeout, time);
            _caller = caller.CanBeCanceled ? caller.UnsafeRegister(static s => ((CancellationTokenSource)s!).Cancel(), _source) : default;
            _stopping = stopping.UnsafeRegister(static s => ((CancellationTokenSource)s!).Cancel(), _source);
        }

        public CancellationToken Token => _source.Token;

        public void Dispose()
        {
            _caller.Dispose();
            _stopping.Dispose();
            _source.Dispose();
        }
    }
}
