namespace Connector.Core.Caching;

/// <summary>
/// Bounds on everything a client can make the cache hold or do. Each is a setting of the sidecar
/// (Sidecar:&lt;Name&gt;), refused with <see cref="CacheError.LimitExceeded"/> and counted.
/// </summary>
public sealed record CacheLimits
{
    /// <summary>Most tokens in one LOOKUP, STORE or LOAD. Defaults to 1,048,576 (a 1M-token prompt).</summary>
    public int MaxTokensPerRequest { get; init; } = 1 << 20;

    /// <summary>Most tokens per chunk a registration may declare. Defaults to 8192.</summary>
    public int MaxChunkTokens { get; init; } = 8192;

    /// <summary>Most engine blocks per chunk. Defaults to 1024.</summary>
    public int MaxBlocksPerChunk { get; init; } = 1024;

    /// <summary>Smallest chunk in bytes: below it, per-chunk metadata outweighs the data. Defaults to 4 KiB.</summary>
    public long MinChunkBytes { get; init; } = 4096;

    /// <summary>Largest chunk in bytes (a chunk must also fit in a quarter of the capacity). Defaults to 256 MiB.</summary>
    public long MaxChunkBytes { get; init; } = 256L << 20;

    /// <summary>Longest cache salt in UTF-8 bytes. Defaults to 256.</summary>
    public int MaxSaltBytes { get; init; } = 256;

    /// <summary>Longest instance, request or model id in UTF-8 bytes. Defaults to 256.</summary>
    public int MaxIdBytes { get; init; } = 256;

    /// <summary>Salt root keys remembered per registration; more salts are served by recomputing the root. Defaults to 64.</summary>
    public int MaxCachedSaltsPerRegistration { get; init; } = 64;

    /// <summary>Most leases one connection holds at once. Defaults to 16384.</summary>
    public int MaxLeasesPerConnection { get; init; } = 16384;
}
