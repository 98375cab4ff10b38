using Connector.Core.Caching;
using Connector.Cuda;
using Connector.Core.Memory;
using Connector.Core.Storage;
using Connector.Core.Storage.Tiers;
using Connector.Server;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace Connector.Sidecar;

/// <summary>The kvsidecar daemon: a .NET Generic Host serving the cache over a Unix socket.</summary>
internal static class Program
{
    /// <summary>Short command-line flags and the settings they set.</summary>
    private static readonly Dictionary<string, string> SwitchMappings = new()
    {
        ["--socket"] = "Sidecar:SocketPath",
        ["--socket-mode"] = "Sidecar:SocketMode",
        ["--capacity-bytes"] = "Sidecar:CapacityBytes",
        ["--extent-bytes"] = "Sidecar:ExtentBytes",
        ["--lease-ttl"] = "Sidecar:LeaseTtl",
        ["--max-frame-bytes"] = "Sidecar:MaxFrameBytes",
        ["--config"] = "ConfigFile",
    };

    public static async Task<int> Main(string[] args)
    {
        if (args.Any(a => a is "--help" or "-h" or "-?"))
        {
            await Console.Out.WriteAsync(Usage);
            return 0;
        }

        if (args.Any(a => a is "--version" or "-V"))
        {
            await Console.Out.WriteLineAsync($"kvsidecar {Version}");
            return 0;
        }

        try
        {
            using IHost host = Build(args);
            await host.RunAsync();
            return 0;
        }
        catch (OptionsValidationException ex)
        {
            await Console.Error.WriteLineAsync("kvsidecar: invalid configuration:\n  " + string.Join("\n  ", ex.Failures));
            return 2;
        }
        catch (ArgumentException ex)
        {
            // A storage tier's settings (Sidecar:Disk, Sidecar:Redis), validated when the tier is built.
            await Console.Error.WriteLineAsync($"kvsidecar: invalid configuration:\n  {ex.Message}");
            return 2;
        }
        catch (Exception ex) when (ex is InvalidOperationException or IOException or UnauthorizedAccessException or System.Net.Sockets.SocketException or FormatException)
        {
            await Console.Error.WriteLineAsync($"kvsidecar: cannot start: {ex.Message}");
            return 1;
        }
    }

    private static string Version =>
        typeof(Program).Assembly.GetCustomAttributes(typeof(System.Reflection.AssemblyInformationalVersionAttribute), false)
            .OfType<System.Reflection.AssemblyInformationalVersionAttribute>().FirstOrDefault()?.InformationalVersion ?? "0";

    private const string Usage = """
        kvsidecar: a KV-cache sidecar for LLM inference engines (vLLM).

        Usage: kvsidecar [options]

          --socket PATH            Unix socket path (default $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/kvsidecar or /run/kvsidecar, /sidecar.sock)
          --socket-mode MODE       socket file mode, octal (default 0660; never world-writable)
          --capacity-bytes N       bytes of host memory for cached KV (default 4 GiB)
          --extent-bytes N         bytes of one native allocation carved into slabs (default 256 MiB)
          --lease-ttl HH:MM:SS     how long a lookup's lease protects its chunks (default 00:01:00)
          --max-frame-bytes N      largest request frame (default 64 MiB, at most 1 GiB)
          --config FILE            a JSON settings file ({"Sidecar": {...}})
          --Sidecar:NAME=VALUE     any setting, e.g. --Sidecar:HelloTimeout=00:00:05, --Sidecar:MaxSaltBytes=256
          --Sidecar:Disk:Path=DIR  a local disk tier below memory (Sidecar:Disk:*, docs/storage-disk.md)
          --Sidecar:Redis:Configuration=HOST:PORT[,HOST:PORT]
                                   a Redis/Valkey (cluster) tier shared across machines (Sidecar:Redis:*, docs/storage-redis.md)
          --Sidecar:Gpu=auto|off|required
                                   the GPU data plane (docs/gpu.md)
          --help, --version        print this text or the version, and exit

        Every setting can also come from KVSIDECAR_Sidecar__NAME environment variables. See README.md and docs/security.md.

        """;

    /// <summary>Builds the host: config file, KVSIDECAR_ environment variables and flags, validated options, the cache and the socket server.</summary>
    internal static IHost Build(string[] args)
    {
        HostApplicationBuilder builder = Host.CreateEmptyApplicationBuilder(new HostApplicationBuilderSettings { Args = args });
        builder.Configuration.AddCommandLine(args, SwitchMappings);
        string? configFile = builder.Configuration["ConfigFile"] ?? Environment.GetEnvironmentVariable("KVSIDECAR_CONFIG");
        builder.Configuration.Sources.Clear();
        builder.Configuration.AddJsonFile(Path.Combine(AppContext.BaseDirectory, "appsettings.json"), optional: true);
        if (!string.IsNullOrEmpty(configFile))
        {
            builder.Configuration.AddJsonFile(Path.GetFullPath(configFile), optional: false);
        }

        builder.Configuration.AddEnvironmentVariables("KVSIDECAR_");
        builder.Configuration.AddCommandLine(args, SwitchMappings);

        builder.Logging.AddConfiguration(builder.Configuration.GetSection("Logging"));
        builder.Logging.AddSimpleConsole(o =>
        {
            o.SingleLine = true;
            o.TimestampFormat = "HH:mm:ss.fff ";
        });
        builder.Services.AddSystemd();
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(30));

        builder.Services.AddOptions<SidecarOptions>()
            .Bind(builder.Configuration.GetSection(SidecarOptions.Section))
            .ValidateDataAnnotations()
            .ValidateOnStart();
        builder.Services.AddSingleton<IValidateOptions<SidecarOptions>, SidecarOptionsValidator>();
        builder.Services.AddSingleton(TimeProvider.System);
        builder.Services.AddSingleton<ServerCounters>();
        builder.Services.AddSingleton(sp => new GpuDataPlaneHolder(CreateDataPlane(
            sp.GetRequiredService<IOptions<SidecarOptions>>().Value,
            sp.GetRequiredService<ILoggerFactory>().CreateLogger("Connector.Sidecar.Gpu"))));
        builder.Services.AddSingleton(sp => StorageTiers.Create(
            builder.Configuration, sp.GetRequiredService<IOptions<SidecarOptions>>().Value, sp.GetRequiredService<ILoggerFactory>()));
        builder.Services.AddSingleton(sp =>
        {
            SidecarOptions o = sp.GetRequiredService<IOptions<SidecarOptions>>().Value;
            TierChain chain = sp.GetRequiredService<TierChain>();
            var tierOptions = new HostTierOptions
            {
                CapacityBytes = o.CapacityBytes,
                ExtentBytes = o.ExtentBytes,
                LeaseTtl = o.LeaseTtl,
                Pinner = sp.GetRequiredService<GpuDataPlaneHolder>().Plane?.Pinner,
                EvictionSink = chain.Slots.Count > 0 ? chain : null,
            };
            return new HostMemoryTier(tierOptions, sp.GetRequiredService<TimeProvider>());
        });
        builder.Services.AddSingleton<IEngineMemoryProvider, HostProcessMemoryProvider>();
        builder.Services.AddSingleton(sp => sp.GetRequiredService<GpuDataPlaneHolder>().Plane?.Provider ?? NoGpu.Instance);
        builder.Services.AddSingleton(sp => new CopyThreads(sp.GetRequiredService<IOptions<SidecarOptions>>().Value.CopyThreads, "kvsidecar-copy"));
        builder.Services.AddSingleton(sp => new KvCacheService(
            sp.GetRequiredService<HostMemoryTier>(),
            sp.GetServices<IEngineMemoryProvider>().Where(p => p != NoGpu.Instance),
            sp.GetRequiredService<IOptions<SidecarOptions>>().Value.ToCacheLimits(),
            sp.GetRequiredService<CopyThreads>(),
            sp.GetRequiredService<TierChain>(),
            StorageTiers.Tiering(sp.GetRequiredService<IOptions<SidecarOptions>>().Value)));
        builder.Services.AddHostedService<UnixSocketServer>();
        return builder.Build();
    }

    /// <summary>Probes CUDA as Sidecar:Gpu says: auto uses it where it is, off never loads it, required fails without it.</summary>
    private static CudaDataPlane? CreateDataPlane(SidecarOptions options, ILogger logger)
    {
        if (options.Gpu == "off")
        {
            SidecarLog.GpuDataPlane(logger, "off (Sidecar:Gpu=off); host memory only");
            return null;
        }

        var planeOptions = new CudaDataPlaneOptions { DriverLibrary = options.CudaDriverLibrary, BatchCopies = options.CudaBatchCopies, PinHostMemory = options.PinHostMemory };
        CudaDataPlane? plane = CudaDataPlane.TryCreate(planeOptions, detail => SidecarLog.GpuWarning(logger, detail), out string description);
        if (plane is null && options.Gpu == "required")
        {
            throw new InvalidOperationException($"Sidecar:Gpu=required, but {description}");
        }

        SidecarLog.GpuDataPlane(logger, plane is null ? $"{description}; host memory only" : description);
        return plane;
    }

    /// <summary>Owns the GPU data plane (or its absence) for the host's lifetime.</summary>
    private sealed class GpuDataPlaneHolder(CudaDataPlane? plane) : IDisposable
    {
        public CudaDataPlane? Plane { get; } = plane;

        public void Dispose() => Plane?.Dispose();
    }

    /// <summary>Stands for "no CUDA provider" in the container, which cannot hold null services.</summary>
    private sealed class NoGpu : IEngineMemoryProvider
    {
        public static readonly NoGpu Instance = new();

        public EngineMemoryKind Kind => EngineMemoryKind.CudaIpc;

        public IEngineMemory Open(IReadOnlyList<EngineMemoryRef> regions, Core.Platform.ProcessIdentity? owner = null, EngineSignals? signals = null) =>
            throw new EngineMemoryException(EngineMemoryError.Unsupported, "this sidecar has no GPU data plane");
    }
}
