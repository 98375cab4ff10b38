using System.ComponentModel.DataAnnotations;

namespace Connector.Sidecar;

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

    /// <summary>How long a lookup's lease protects its chunks from eviction. Defaults to 60 s.</summary>
    public TimeSpan LeaseTtl { get; set; } = TimeSpan.FromSeconds(60);

    /// <summary>Largest frame body accepted, in bytes. Defaults to 64 MiB (a 1M-token prompt is 4 MiB).</summary>
    [Range(1024, int.MaxValue)]
    public int MaxFrameBytes { get; set; } = 64 << 20;

    /// <summary>Most connections served at once; more are refused. Defaults to 1024.</summary>
    [Range(1, 65536)]
    public int MaxConnections { get; set; } = 1024;

    /// <summary>Most STORE/LOAD copies in flight per connection before the connection stops reading. Defaults to 64.</summary>
    [Range(1, 4096)]
    public int MaxInFlightPerConnection { get; set; } = 64;

    /// <summary>How long shutdown waits for in-flight copies. Defaults to 10 s.</summary>
    public TimeSpan ShutdownTimeout { get; set; } = TimeSpan.FromSeconds(10);

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
