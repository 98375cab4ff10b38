using System.ComponentModel.DataAnnotations;
using Connector.Core.Caching;

namespace Connector.Server;

/// <summary>Settings of the sidecar daemon, bound from the "Sidecar" section (config file, KVSIDECAR_ environment variables, flags).</summary>
public sealed class SidecarOptions
{
    /// <summary>The configuration section the options bind from.</summary>
    public const string Section = "Sidecar";

    /// <summary>Path of the Unix socket. Defaults to $XDG_RUNTIME_DIR/kvsidecar/sidecar.sock, or /run/kvsidecar/sidecar.sock.</summary>
    public string? SocketPath { get; set; }

    /// <summary>File mode of the socket, octal. Defaults to 0660 (owner and group; never world-writable).</summary>
    public string SocketMode { get; set; } = "0660";

    /// <summary>Bytes of host memory for cached KV (L1). Defaults to 4 GiB.</summary>
    [Range(1L << 20, long.MaxValue)]
    public long CapacityBytes { get; set; } = 4L << 30;

    /// <summary>Bytes of one native allocation carved into slabs. Defaults to 256 MiB.</summary>
    [Range(1L << 20, 1L << 40)]
    public long ExtentBytes { get; set; } = 256L << 20;

    /// <summary>
    /// The GPU data plane: "auto" (default) uses CUDA where a driver and a device are and serves host memory only
    /// elsewhere; "off" never loads the driver; "required" refuses to start without it.
    /// </summary>
    [RegularExpression("^(auto|off|required)$", ErrorMessage = "Sidecar:Gpu must be auto, off or required.")]
    public string Gpu { get; set; } = "auto";

    /// <summary>A CUDA driver library other than the system's libcuda.so.1 (tests use the driver double of tests/cuda_double). Null: the system's.</summary>
    public string? CudaDriverLibrary { get; set; }

    /// <summary>Whether GPU copies use cuMemcpyBatchAsync where the driver has it. Defaults to true; false copies one call per piece.</summary>
    public bool CudaBatchCopies { get; set; } = true;

    /// <summary>Whether L1 extents are page-locked for DMA where a GPU is present. Defaults to true.</summary>
    public bool PinHostMemory { get; set; } = true;

    /// <summary>When the disk tier (Sidecar:Disk, on when Sidecar:Disk:Path is set) receives chunks: "write-back" (default: at L1 eviction, sparing the SSD chunks that die in memory) or "write-through" (at every store).</summary>
    [RegularExpression("^(write-back|write-through)$", ErrorMessage = "Sidecar:DiskWritePolicy must be write-back or write-through.")]
    public string DiskWritePolicy { get; set; } = "write-back";

    /// <summary>When the Redis/Valkey tier (Sidecar:Redis, on when Sidecar:Redis:Configuration is set) receives chunks: "write-through" (default: other machines see a chunk as soon as it is stored) or "write-back".</summary>
    [RegularExpression("^(write-back|write-through)$", ErrorMessage = "Sidecar:RedisWritePolicy must be write-back or write-through.")]
    public string RedisWritePolicy { get; set; } = "write-through";

    /// <summary>How long a LOOKUP answers "pending" while chunks are promoted from lower tiers. Defaults to 500 ms (the shim gives up after its lookup_timeout_ms, 1 s).</summary>
    public TimeSpan PromotionTimeout { get; set; } = TimeSpan.FromMilliseconds(500);

    /// <summary>Most requests promoted from lower tiers at once. Defaults to 256.</summary>
    [Range(1, 65536)]
    public int MaxPromotions { get; set; } = 256;

    /// <summary>How long a lookup's lease protects its chunks from eviction. Defaults to 60 s.</summary>
    public TimeSpan LeaseTtl { get; set; } = TimeSpan.FromSeconds(60);

    /// <summary>Largest frame body accepted, in bytes. Defaults to 64 MiB (a 1M-token prompt is 4 MiB); at most 1 GiB.</summary>
    [Range(1024, MaxFrameBytesLimit)]
    public int MaxFrameBytes { get; set; } = 64 << 20;

    /// <summary>Most connections served at once; more are refused. Defaults to 1024.</summary>
    [Range(1, 65536)]
    public int MaxConnections { get; set; } = 1024;

    /// <summary>Most STORE/LOAD copies in flight per connection before the connection stops reading. Defaults to 64.</summary>
    [Range(1, 4096)]
    public int MaxInFlightPerConnection { get; set; } = 64;

    /// <summary>How long shutdown waits for in-flight copies. Defaults to 10 s.</summary>
    public TimeSpan ShutdownTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>How long a new connection has to complete HELLO before it is closed. Defaults to 5 s.</summary>
    public TimeSpan HelloTimeout { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>How long a reply may wait for the client to read before the client is dropped. Defaults to 10 s.</summary>
    public TimeSpan SendTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>Bytes of replies queued for one connection before it is dropped as not reading. Defaults to 4 MiB.</summary>
    [Range(64L << 10, 1L << 30)]
    public long MaxOutboundBytesPerConnection { get; set; } = 4L << 20;

    /// <summary>Bytes of chunks one connection may have in flight in STORE and LOAD copies before its reads pause. Defaults to 8 GiB.</summary>
    [Range(1L << 20, long.MaxValue)]
    public long MaxInFlightBytesPerConnection { get; set; } = 8L << 30;

    /// <summary>Dedicated threads that run STORE and LOAD copies for all connections. Defaults to 4.</summary>
    [Range(1, 256)]
    public int CopyThreads { get; set; } = 4;

    /// <summary>Longest a copy runs when the engine sent no deadline. Defaults to 30 s.</summary>
    public TimeSpan DefaultCopyTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>Most tokens in one LOOKUP, STORE or LOAD. Defaults to 1,048,576.</summary>
    [Range(1, 1 << 28)]
    public int MaxTokensPerRequest { get; set; } = 1 << 20;

    /// <summary>Most tokens per chunk a registration may declare. Defaults to 8192.</summary>
    [Range(1, 1 << 20)]
    public int MaxChunkTokens { get; set; } = 8192;

    /// <summary>Most engine blocks per chunk. Defaults to 1024.</summary>
    [Range(1, 1 << 16)]
    public int MaxBlocksPerChunk { get; set; } = 1024;

    /// <summary>Smallest chunk in bytes. Defaults to 4 KiB.</summary>
    [Range(1, long.MaxValue)]
    public long MinChunkBytes { get; set; } = 4096;

    /// <summary>Largest chunk in bytes; a chunk must also fit in a quarter of CapacityBytes. Defaults to 256 MiB.</summary>
    [Range(1, long.MaxValue)]
    public long MaxChunkBytes { get; set; } = 256L << 20;

    /// <summary>Longest cache_salt in UTF-8 bytes. Defaults to 256.</summary>
    [Range(0, 1 << 16)]
    public int MaxSaltBytes { get; set; } = 256;

    /// <summary>Longest instance, request or model id in UTF-8 bytes. Defaults to 256.</summary>
    [Range(1, 1 << 16)]
    public int MaxIdBytes { get; set; } = 256;

    /// <summary>Salt root keys remembered per registration (more salts are served, their roots recomputed). Defaults to 64.</summary>
    [Range(0, 1 << 20)]
    public int MaxCachedSaltsPerRegistration { get; set; } = 64;

    /// <summary>Most leases one connection holds at once. Defaults to 16384.</summary>
    [Range(1, 1 << 24)]
    public int MaxLeasesPerConnection { get; set; } = 16384;

    /// <summary>The upper bound of <see cref="MaxFrameBytes"/>: 1 GiB keeps every buffer size far from 32-bit overflow.</summary>
    public const int MaxFrameBytesLimit = 1 << 30;

    /// <summary>The bounds the cache core enforces, from these settings.</summary>
    public CacheLimits ToCacheLimits() => new()
    {
        MaxTokensPerRequest = MaxTokensPerRequest,
        MaxChunkTokens = MaxChunkTokens,
        MaxBlocksPerChunk = MaxBlocksPerChunk,
        MinChunkBytes = MinChunkBytes,
        MaxChunkBytes = MaxChunkBytes,
        MaxSaltBytes = MaxSaltBytes,
        MaxIdBytes = MaxIdBytes,
        MaxCachedSaltsPerRegistration = MaxCachedSaltsPerRegistration,
        MaxLeasesPerConnection = MaxLeasesPerConnection,
    };

    /// <summary>Resolves the socket path default.</summary>
    public string ResolveSocketPath()
    {
        if (!string.IsNullOrWhiteSpace(SocketPath))
        {
            return SocketPath;
        }

        // systemd's RuntimeDirectory= sets RUNTIME_DIRECTORY; a user session has XDG_RUNTIME_DIR.
        string? runtime = Environment.GetEnvironmentVariable("RUNTIME_DIRECTORY");
        if (string.IsNullOrEmpty(runtime) && Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR") is { Length: > 0 } xdg)
        {
            runtime = Path.Combine(xdg, "kvsidecar");
        }

        return Path.Combine(string.IsNullOrEmpty(runtime) ? "/run/kvsidecar" : runtime, "sidecar.sock");
    }
}
