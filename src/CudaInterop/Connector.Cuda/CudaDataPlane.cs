using System.Collections.Concurrent;
using Connector.Core.Memory;
using Connector.CudaInterop.Driver;

namespace Connector.Cuda;

/// <summary>Settings of the CUDA data plane.</summary>
public sealed class CudaDataPlaneOptions
{
    /// <summary>A driver library other than the system's libcuda.so.1 (the test double); null for the system's.</summary>
    public string? DriverLibrary { get; set; }

    /// <summary>Whether to use <c>cuMemcpyBatchAsync</c> where the driver has it (default true).</summary>
    public bool BatchCopies { get; set; } = true;

    /// <summary>Whether to page-lock L1 extents for DMA (default true).</summary>
    public bool PinHostMemory { get; set; } = true;
}

/// <summary>
/// The GPU side of the sidecar, present only where a CUDA driver and a device are: devices by UUID with their
/// streams, the shared IPC mapping cache, the L1 pinner and the engine-memory provider for CUDA IPC memory.
/// </summary>
public sealed class CudaDataPlane : IDisposable
{
    private readonly ConcurrentDictionary<string, Lazy<CudaDevice>> _devices = new();
    private readonly CudaAvailability _availability;
    private readonly BatchCopy _copier;
    private CudaContext? _pinContext;

    private CudaDataPlane(CudaAvailability availability, CudaDataPlaneOptions options, Action<string>? log)
    {
        _availability = availability;
        _copier = BatchCopy.Resolve(options.BatchCopies);
        Provider = new CudaEngineMemoryProvider(this);
        if (options.PinHostMemory)
        {
            _pinContext = CudaContext.RetainPrimary(availability.Devices[0]);
            Pinner = new CudaHostPinner(_pinContext, log);
        }
    }

    /// <summary>What the probe found.</summary>
    public CudaAvailability Availability => _availability;

    /// <summary>"13.0", "12.8" or "none": which batched copy is in use.</summary>
    public string BatchMode => _copier.Mode;

    /// <summary>Opens engines' CUDA IPC memory.</summary>
    public IEngineMemoryProvider Provider { get; }

    /// <summary>Pins L1 extents; null when pinning is off.</summary>
    public CudaHostPinner? Pinner { get; }

    /// <summary>IPC handles opened with the driver so far.</summary>
    public long IpcOpens => Mappings.Opens;

    /// <summary>Engine allocations mapped now.</summary>
    public int OpenMappings => Mappings.OpenMappings;

    internal IpcMappingCache Mappings { get; } = new();

    /// <summary>Probes the driver and, where it has a device, creates the data plane.</summary>
    /// <param name="options">The settings.</param>
    /// <param name="log">Where warnings go.</param>
    /// <param name="reason">Why there is no data plane (no driver, no device).</param>
    public static CudaDataPlane? TryCreate(CudaDataPlaneOptions options, Action<string>? log, out string reason)
    {
        ArgumentNullException.ThrowIfNull(options);
        CudaAvailability availability = CudaProbe.Probe(options.DriverLibrary);
        reason = availability.ToString();
        if (!availability.Available)
        {
            return null;
        }

        try
        {
            var plane = new CudaDataPlane(availability, options, log);
            reason = $"{availability}; batched copies: {plane.BatchMode}";
            return plane;
        }
        catch (CudaException ex)
        {
            reason = $"no CUDA: {ex.Message}";
            return null;
        }
    }

    /// <summary>Stops the streams and releases the contexts. Registrations must be closed first.</summary>
    public void Dispose()
    {
        foreach (Lazy<CudaDevice> device in _devices.Values)
        {
            if (device.IsValueCreated)
            {
                device.Value.Dispose();
            }
        }

        _devices.Clear();
        _pinContext?.Dispose();
        _pinContext = null;
    }

    /// <summary>The device with this UUID, its context and streams created on first use.</summary>
    /// <exception cref="EngineMemoryException">The sidecar cannot see that device.</exception>
    internal CudaDevice Device(string uuid)
    {
        CudaDeviceInfo info = _availability.Devices.FirstOrDefault(d => d.Uuid == uuid)
            ?? throw new EngineMemoryException(EngineMemoryError.Unsupported,
                $"GPU {uuid} is not visible to the sidecar (it sees {string.Join(", ", _availability.Devices.Select(d => d.Uuid))}); run the sidecar with every GPU of the machine visible (do not set CUDA_VISIBLE_DEVICES for it)");
        try
        {
            return _devices.GetOrAdd(uuid, _ => new Lazy<CudaDevice>(() => new CudaDevice(info, _copier))).Value;
        }
        catch (CudaException ex)
        {
            _devices.TryRemove(uuid, out _);
            throw new EngineMemoryException(EngineMemoryError.Fault, $"GPU {uuid} cannot be used: {ex.Message}");
        }
    }
}
