namespace Connector.Storage.Redis;

/// <summary>
/// An approximate account of what this sidecar holds in Redis: bytes and chunks written within the last TTL, in
/// <see cref="Buckets"/> time buckets (so memory stays bounded however many chunks are written). A bucket leaves the
/// account once all of it is older than the TTL, when its keys have expired on the server.
/// </summary>
/// <remarks>
/// It overcounts what the server evicted early (maxmemory) or what other sidecars overwrote, and it starts empty
/// after a restart: it is a write budget, not an inventory. Thread-safe.
/// </remarks>
internal sealed class WriteBudget
{
    /// <summary>Time buckets over one TTL: 256 keeps the account within 0.4 % of the TTL of exact.</summary>
    public const int Buckets = 256;

    private readonly TimeProvider _time;
    private readonly long _start;
    private readonly double _bucketTicks;
    private readonly long[] _index = new long[Buckets];
    private readonly long[] _bytes = new long[Buckets];
    private readonly long[] _chunks = new long[Buckets];
    private readonly Lock _lock = new();

    public WriteBudget(TimeSpan ttl, TimeProvider time)
    {
        _time = time;
        _start = time.GetTimestamp();
        _bucketTicks = Math.Max(1, ttl.TotalSeconds * time.TimestampFrequency / Buckets);
        Array.Fill(_index, long.MinValue);
    }

    /// <summary>Adds a written chunk of <paramref name="bytes"/> stored bytes.</summary>
    public void Add(long bytes)
    {
        long now = Now();
        int slot = (int)(now % Buckets);
        lock (_lock)
        {
            if (_index[slot] != now)
            {
                _index[slot] = now;
                _bytes[slot] = 0;
                _chunks[slot] = 0;
            }

            _bytes[slot] += bytes;
            _chunks[slot]++;
        }
    }

    /// <summary>The bytes and chunks written within the last TTL.</summary>
    public (long Bytes, long Chunks) Read()
    {
        long now = Now();
        long bytes = 0;
        long chunks = 0;
        lock (_lock)
        {
            for (int i = 0; i < Buckets; i++)
            {
                // A bucket is live while any part of it is younger than one TTL (Buckets buckets).
                if (_index[i] > now - Buckets)
                {
                    bytes += _bytes[i];
                    chunks += _chunks[i];
                }
            }
        }

        return (bytes, chunks);
    }

    /// <summary>Forgets everything (after CLEAR).</summary>
    public void Reset()
    {
        lock (_lock)
        {
            Array.Fill(_index, long.MinValue);
            Array.Clear(_bytes);
            Array.Clear(_chunks);
        }
    }

    private long Now() => (long)((_time.GetTimestamp() - _start) / _bucketTicks);
}
