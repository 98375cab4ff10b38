using System.Text;
using Microsoft.Extensions.Options;

namespace Connector.Server;

/// <summary>Checks the settings that attributes cannot express, with messages that say what to change.</summary>
internal sealed class SidecarOptionsValidator : IValidateOptions<SidecarOptions>
{
    /// <summary>Longest socket path Linux accepts (sun_path is 108 bytes with the terminating NUL).</summary>
    private const int MaxSocketPathBytes = 107;

    public ValidateOptionsResult Validate(string? name, SidecarOptions options)
    {
        var failures = new List<string>();
        string path = options.ResolveSocketPath();
        if (Encoding.UTF8.GetByteCount(path) > MaxSocketPathBytes)
        {
            failures.Add($"Sidecar:SocketPath '{path}' is longer than {MaxSocketPathBytes} bytes; choose a shorter path.");
        }

        if (!TryParseMode(options.SocketMode, out int mode))
        {
            failures.Add($"Sidecar:SocketMode '{options.SocketMode}' is not an octal file mode such as 0660.");
        }
        else if ((mode & 0b010) != 0)
        {
            failures.Add($"Sidecar:SocketMode {options.SocketMode} makes the socket world-writable; use 0660 or 0600.");
        }

        if (options.ExtentBytes > options.CapacityBytes)
        {
            failures.Add($"Sidecar:ExtentBytes ({options.ExtentBytes}) is larger than Sidecar:CapacityBytes ({options.CapacityBytes}); lower it or raise the capacity.");
        }

        if (options.PromotionTimeout <= TimeSpan.Zero || options.PromotionTimeout > TimeSpan.FromMinutes(1))
        {
            failures.Add("Sidecar:PromotionTimeout must be positive and at most a minute (vLLM waits that long for a pending lookup), e.g. 00:00:01.");
        }

        if (options.LeaseTtl <= TimeSpan.Zero)
        {
            failures.Add("Sidecar:LeaseTtl must be positive, e.g. 00:01:00.");
        }

        if (options.ShutdownTimeout < TimeSpan.Zero)
        {
            failures.Add("Sidecar:ShutdownTimeout must not be negative.");
        }

        foreach (var (setting, value) in new[] { ("HelloTimeout", options.HelloTimeout), ("SendTimeout", options.SendTimeout), ("DefaultCopyTimeout", options.DefaultCopyTimeout) })
        {
            if (value <= TimeSpan.Zero || value > TimeSpan.FromHours(1))
            {
                failures.Add($"Sidecar:{setting} must be between 0 and 1 hour, e.g. 00:00:05 (got {value}).");
            }
        }

        if (options.MinChunkBytes > options.MaxChunkBytes)
        {
            failures.Add($"Sidecar:MinChunkBytes ({options.MinChunkBytes}) is above Sidecar:MaxChunkBytes ({options.MaxChunkBytes}).");
        }

        return failures.Count == 0 ? ValidateOptionsResult.Success : ValidateOptionsResult.Fail(failures);
    }

    /// <summary>Parses an octal mode string such as "0660".</summary>
    internal static bool TryParseMode(string? text, out int mode)
    {
        mode = 0;
        if (string.IsNullOrEmpty(text) || text.Length > 5)
        {
            return false;
        }

        foreach (char c in text)
        {
            if (c is < '0' or > '7')
            {
                return false;
            }

            mode = (mode * 8) + (c - '0');
        }

        return mode <= 0x1FF;
    }
}
