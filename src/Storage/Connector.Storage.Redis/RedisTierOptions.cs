namespace Connector.Storage.Redis;

/// <summary>Settings of the Redis (or Valkey) tier: one server or a cluster shared by many sidecars (docs/storage-redis.md).</summary>
public sealed class RedisTierOptions
{
    /// <summary>The largest piece a chunk is split into: 64 MiB, far below Redis's 512 MB proto-max-bulk-len.</summary>
    public const int MaxPieceBytes = 64 << 20;

    /// <summary>
    /// The StackExchange.Redis configuration string: "127.0.0.1:6379", or several cluster endpoints
    /// ("10.0.0.1:7000,10.0.0.2:7000,password=…"); the cluster topology is discovered from any of them. Required.
    /// </summary>
    public string Configuration { get; set; } = "";

    /// <summary>
    /// Prefix of every key the tier writes. Defaults to "kvsc:". Sidecars that share the prefix share the chunks;
    /// CLEAR removes every key under it. Printable ASCII without spaces, braces or glob characters (* ? [ ] \).
    /// </summary>
    public string KeyPrefix { get; set; } = "kvsc:";

    /// <summary>How long a chunk lives in Redis after it is written; every key gets it. Defaults to 1 day.</summary>
    public TimeSpan Ttl { get; set; } = TimeSpan.FromDays(1);

    /// <summary>
    /// This sidecar's write budget in bytes: the bytes it wrote (as stored, after compression) that have not yet
    /// reached their TTL. Above it, <c>Offer</c> answers NotAdmitted. The server's own <c>maxmemory</c> and eviction
    /// policy still bound the shared pool. Defaults to 16 GiB.
    /// </summary>
    public long CapacityBytes { get; set; } = 16L << 30;

    /// <summary>
    /// Bytes of a chunk per Redis value: larger chunks are split into pieces of this many (uncompressed) bytes,
    /// pipelined, all in one cluster slot. Defaults to 1 MiB (measured: docs/storage-redis.md).
    /// </summary>
    public int PieceBytes { get; set; } = 1 << 20;

    /// <summary>
    /// Bytes of one chunk's pieces on the wire at once (at least two pieces). Enough keeps the connection busy while
    /// pieces are encoded or decoded (4 MiB per 0.5 ms of round trip is 8 GB/s per chunk); a whole 32 MiB chunk asked
    /// for at once sits in the server's reply buffers and costs it twice the CPU per byte. Defaults to 4 MiB
    /// (measured: docs/storage-redis.md).
    /// </summary>
    public long PipelineBytes { get; set; } = 4L << 20;

    /// <summary>The wire codec: <see cref="RedisCompression.Lz4"/> (default, lossless) or <see cref="RedisCompression.None"/>.</summary>
    public RedisCompression Compression { get; set; } = RedisCompression.Lz4;

    /// <summary>
    /// The longest one step of a read, probe or write may take (one round trip of pipelined commands) before it
    /// counts as a failure and the chunk is a miss. Defaults to 1 s.
    /// </summary>
    public TimeSpan OperationTimeout { get; set; } = TimeSpan.FromSeconds(1);

    /// <summary>How long one attempt to connect may take (the tier reconnects in the background). Defaults to 5 s.</summary>
    public TimeSpan ConnectTimeout { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>Bytes of offered chunks waiting to be written; an offer that does not fit is dropped and counted. Defaults to 256 MiB.</summary>
    public long WriteQueueBytes { get; set; } = 256L << 20;

    /// <summary>Chunks written at the same time by the background writers. Defaults to 4.</summary>
    public int WriteConcurrency { get; set; } = 4;

    /// <summary>Consecutive failed operations that open the circuit (reads and probes then miss at once, offers are refused). Defaults to 5.</summary>
    public int BreakerFailureThreshold { get; set; } = 5;

    /// <summary>How long the circuit stays open before one trial operation is let through (half-open). Defaults to 5 s.</summary>
    public TimeSpan BreakerOpenDuration { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>The shortest interval between two log lines of the same kind (failures, corrupt values, drops). Defaults to 10 s.</summary>
    public TimeSpan LogInterval { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>Checks the settings.</summary>
    /// <exception cref="ArgumentException">A setting is invalid; the message says which and why.</exception>
    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Configuration))
        {
            throw new ArgumentException("Redis Configuration is required (e.g. \"127.0.0.1:6379\", or several cluster endpoints separated by commas)");
        }

        try
        {
            _ = StackExchange.Redis.ConfigurationOptions.Parse(Configuration);
        }
        catch (Exception ex) when (ex is ArgumentException or FormatException or NotSupportedException)
        {
            throw new ArgumentException($"Redis Configuration \"{Configuration}\" cannot be parsed: {ex.Message}", ex);
        }

        if (string.IsNullOrEmpty(KeyPrefix) || KeyPrefix.Length > 64)
        {
            throw new ArgumentException($"Redis KeyPrefix must be 1 to 64 characters (got \"{KeyPrefix}\")");
        }

        foreach (char c in KeyPrefix)
        {
            if (c is <= ' ' or > '~' or '{' or '}' or '*' or '?' or '[' or ']' or '\\')
            {
                throw new ArgumentException($"Redis KeyPrefix \"{KeyPrefix}\" has '{c}': use printable ASCII without spaces, braces (they would change the cluster hash tag) or glob characters (CLEAR scans by pattern)");
            }
        }

        if (Ttl < TimeSpan.FromSeconds(1))
        {
            throw new ArgumentException($"Redis Ttl must be at least 1 s (got {Ttl}); every key is written with it");
        }

        if (CapacityBytes <= 0)
        {
            throw new ArgumentException($"Redis CapacityBytes must be positive (got {CapacityBytes})");
        }

        if (PieceBytes is < 4096 or > MaxPieceBytes)
        {
            throw new ArgumentException($"Redis PieceBytes must be between 4096 and {MaxPieceBytes} (got {PieceBytes})");
        }

        if (PipelineBytes is <= 0 or > 1L << 30)
        {
            throw new ArgumentException($"Redis PipelineBytes must be between 1 and 1 GiB (got {PipelineBytes})");
        }

        if (!Enum.IsDefined(Compression))
        {
            throw new ArgumentException($"Redis Compression must be Lz4 or None (got {Compression})");
        }

        if (OperationTimeout <= TimeSpan.Zero || OperationTimeout > TimeSpan.FromMinutes(5))
        {
            throw new ArgumentException($"Redis OperationTimeout must be positive and at most 5 min (got {OperationTimeout})");
        }

        if (ConnectTimeout <= TimeSpan.Zero || ConnectTimeout > TimeSpan.FromMinutes(5))
        {
            throw new ArgumentException($"Redis ConnectTimeout must be positive and at most 5 min (got {ConnectTimeout})");
        }

        if (WriteQueueBytes <= 0)
        {
            throw new ArgumentException($"Redis WriteQueueBytes must be positive (got {WriteQueueBytes})");
        }

        if (WriteConcurrency is < 1 or > 64)
        {
            throw new ArgumentException($"Redis WriteConcurrency must be between 1 and 64 (got {WriteConcurrency})");
        }

        if (BreakerFailureThreshold < 1)
        {
            throw new ArgumentException($"Redis BreakerFailureThreshold must be at least 1 (got {BreakerFailureThreshold})");
        }

        if (BreakerOpenDuration <= TimeSpan.Zero)
        {
            throw new ArgumentException($"Redis BreakerOpenDuration must be positive (got {BreakerOpenDuration})");
        }

        if (LogInterval < TimeSpan.Zero)
        {
            throw new ArgumentException($"Redis LogInterval must not be negative (got {LogInterval})");
        }
    }
}

/// <summary>How chunk bytes travel to Redis.</summary>
public enum RedisCompression
{
    /// <summary>Raw bytes.</summary>
    None = 0,

    /// <summary>Lossless LZ4 per piece (a piece that does not shrink by at least 1/32 is stored raw).</summary>
    Lz4 = 1,
}
