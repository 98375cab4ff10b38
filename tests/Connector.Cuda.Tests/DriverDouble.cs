using Xunit;
using System.Diagnostics;
using System.Runtime.InteropServices;
using Connector.CudaInterop.Driver;
using Connector.Testing;

[assembly: CollectionBehavior(DisableTestParallelization = true)]

namespace Connector.Cuda.Tests;

/// <summary>
/// The CUDA driver double (tests/cuda_double), built once and loaded in place of libcuda.so.1 for this test
/// process, with its control functions (error injection, counters, pin limit).
/// </summary>
internal static unsafe class DriverDouble
{
    private static readonly Lazy<string?> Built = new(Build);
    private static nint _handle;

    /// <summary>The library's path, or null when it cannot be built here (no C compiler): the tests skip.</summary>
    public static string? Path => Built.Value;

    /// <summary>Why the double is missing.</summary>
    public static string MissingReason { get; private set; } = string.Empty;

    /// <summary>Loads the double as this process's CUDA driver and resets its controls.</summary>
    public static string Use()
    {
        Assert.SkipWhen(Path is null, $"the CUDA driver double cannot be built: {MissingReason}");
        CudaLibrary.Use(Path);
        if (_handle == 0)
        {
            _handle = NativeLibrary.Load(Path!);
        }

        Reset();
        return Path!;
    }

    public static void Inject(string symbol, CuResult result, int skip = 0, int count = -1)
    {
        fixed (byte* s = System.Text.Encoding.ASCII.GetBytes(symbol + "\0"))
        {
            Assert.Equal(0, ((delegate* unmanaged<byte*, int, int, int, int>)Export("fakecuda_inject"))(s, (int)result, skip, count));
        }
    }

    public static void Reset() => ((delegate* unmanaged<void>)Export("fakecuda_reset"))();

    public static long Counter(string name)
    {
        fixed (byte* s = System.Text.Encoding.ASCII.GetBytes(name + "\0"))
        {
            return ((delegate* unmanaged<byte*, long>)Export("fakecuda_counter"))(s);
        }
    }

    public static void SetPinLimit(long bytes) => ((delegate* unmanaged<long, void>)Export("fakecuda_set_pin_limit"))(bytes);

    public static void SetBatchAvailable(bool on) => ((delegate* unmanaged<int, void>)Export("fakecuda_set_batch_available"))(on ? 1 : 0);

    private static nint Export(string name) => NativeLibrary.GetExport(_handle, name);

    private static string? Build()
    {
        string script = System.IO.Path.Combine(ProcessPaths.RepoRoot, "tests", "cuda_double", "build.sh");
        var psi = new ProcessStartInfo("bash", [script]) { RedirectStandardOutput = true, RedirectStandardError = true };
        using Process p = Process.Start(psi)!;
        string stdout = p.StandardOutput.ReadToEnd();
        string stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        string path = stdout.Trim();
        if (p.ExitCode != 0 || !File.Exists(path))
        {
            MissingReason = $"build.sh exited {p.ExitCode}: {stderr.Trim()}";
            return null;
        }

        return path;
    }
}
