namespace Connector.CudaInterop.Driver;

/// <summary>
/// A device's primary context, retained for the life of this object. The current context is per thread, so
/// every call site makes it current first (<see cref="MakeCurrent"/>; cheap when it already is).
/// </summary>
public sealed unsafe class CudaContext : IDisposable
{
    [ThreadStatic]
    private static nint _current;

    private int _released;

    private CudaContext(CudaDeviceInfo device, nint handle)
    {
        Device = device;
        Handle = handle;
    }

    /// <summary>The device.</summary>
    public CudaDeviceInfo Device { get; }

    /// <summary>The CUcontext.</summary>
    public nint Handle { get; }

    /// <summary>Retains the primary context of a device (never a context of our own: cuda.md A.2).</summary>
    public static CudaContext RetainPrimary(CudaDeviceInfo device)
    {
        ArgumentNullException.ThrowIfNull(device);
        nint ctx;
        CudaDriver.Check(CudaNative.cuDevicePrimaryCtxRetain(&ctx, device.Device), "cuDevicePrimaryCtxRetain");
        return new CudaContext(device, ctx);
    }

    /// <summary>Makes this context current on the calling thread.</summary>
    public void MakeCurrent()
    {
        if (_current != Handle)
        {
            CudaDriver.Check(CudaNative.cuCtxSetCurrent(Handle), "cuCtxSetCurrent");
            _current = Handle;
        }
    }

    /// <summary>Releases the primary context.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _released, 1) == 0)
        {
            if (_current == Handle)
            {
                _ = CudaNative.cuCtxSetCurrent(0);
                _current = 0;
            }

            _ = CudaNative.cuDevicePrimaryCtxRelease(Device.Device);
        }
    }
}
