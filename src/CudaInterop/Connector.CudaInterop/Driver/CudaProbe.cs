namespace Connector.CudaInterop.Driver;

/// <summary>What the probe found: a usable driver and its devices, or why there is none.</summary>
/// <param name="Available">Whether CUDA can be used.</param>
/// <param name="Reason">Why not (null when available).</param>
/// <param name="DriverVersion">The driver's CUDA version (0 when unavailable).</param>
/// <param name="Devices">The visible devices.</param>
public sealed record CudaAvailability(bool Available, string? Reason, int DriverVersion, IReadOnlyList<CudaDeviceInfo> Devices)
{
    /// <summary>"CUDA 13.0, 1 device(s): ..." or "no CUDA: reason".</summary>
    public override string ToString() => Available
        ? $"CUDA {DriverVersion / 1000}.{DriverVersion % 1000 / 10}, {Devices.Count} device(s): {string.Join(", ", Devices.Select(d => $"{d.Name} {d.Uuid}"))}"
        : $"no CUDA: {Reason}";
}

/// <summary>Finds out, without throwing, whether this machine has a CUDA driver and devices kvsidecar can use.</summary>
public static class CudaProbe
{
    /// <summary>Loads the driver, initialises it and lists its devices.</summary>
    /// <param name="libraryPath">A driver library other than the system's <c>libcuda.so.1</c> (the test double), or null.</param>
    public static CudaAvailability Probe(string? libraryPath = null)
    {
        try
        {
            CudaLibrary.Use(libraryPath);
            if (!CudaLibrary.TryLoad(out string? reason))
            {
                return Unavailable(reason!);
            }

            CudaDriver.Initialize();
            int version = CudaDriver.DriverVersion();
            IReadOnlyList<CudaDeviceInfo> devices = CudaDriver.Devices();
            return devices.Count == 0 ? Unavailable("the driver sees no device") : new CudaAvailability(true, null, version, devices);
        }
        catch (CudaException ex)
        {
            return Unavailable(ex.Message);
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException or BadImageFormatException or InvalidOperationException)
        {
            return Unavailable(ex.Message);
        }
    }

    private static CudaAvailability Unavailable(string reason) => new(false, reason, 0, []);
}
