using Connector.Core.Caching;
using Connector.Core.Memory;
using Connector.Core.Storage;
using Connector.Sidecar.Server;
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
        catch (Exception ex) when (ex is InvalidOperationException or IOException or UnauthorizedAccessException or System.Net.Sockets.SocketException or FormatException)
        {
            await Console.Error.WriteLineAsync($"kvsidecar: cannot start: {ex.Message}");
            return 1;
        }
    }

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
        builder.Services.AddSingleton(sp =>
        {
            SidecarOptions o = sp.GetRequiredService<IOptions<SidecarOptions>>().Value;
            var tierOptions = new HostTierOptions { CapacityBytes = o.CapacityBytes, ExtentBytes = o.ExtentBytes, LeaseTtl = o.LeaseTtl };
            return new HostMemoryTier(tierOptions, sp.GetRequiredService<TimeProvider>());
        });
        builder.Services.AddSingleton<IEngineMemoryProvider, HostProcessMemoryProvider>();
        builder.Services.AddSingleton(sp => new KvCacheService(sp.GetRequiredService<HostMemoryTier>(), sp.GetServices<IEngineMemoryProvider>()));
        builder.Services.AddHostedService<UnixSocketServer>();
        return builder.Build();
    }
}
