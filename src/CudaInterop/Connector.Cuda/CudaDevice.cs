using Connector.CudaInterop.Driver;

namespace Connector.Cuda;

/// <summary>
/// One GPU as the sidecar uses it: its primary context, a stream for stores and a separate one for loads (a load
/// is never stuck behind stores), and a stream for device-to-device copies between engines.
/// </summary>
internal sealed class CudaDevice : IDisposable
{
    public CudaDevice(CudaDeviceInfo info, BatchCopy copier)
    {
        Context = CudaContext.RetainPrimary(info);
        try
        {
            Stores = new CopyQueue(Context, $"kvsidecar-cuda{info.Device}-store");
            Loads = new CopyQueue(Context, $"kvsidecar-cuda{info.Device}-load");
            Transfers = new CopyQueue(Context, $"kvsidecar-cuda{info.Device}-d2d");
        }
        catch
        {
            Stores?.Dispose();
            Loads?.Dispose();
            Context.Dispose();
            throw;
        }

        Copier = copier;
    }

    public CudaContext Context { get; }

    public CudaDeviceInfo Info => Context.Device;

    /// <summary>Engine to L1.</summary>
    public CopyQueue Stores { get; }

    /// <summary>L1 to engine.</summary>
    public CopyQueue Loads { get; }

    /// <summary>Engine to engine (prefill/decode hand-off on one machine).</summary>
    public CopyQueue Transfers { get; }

    public BatchCopy Copier { get; }

    public void Dispose()
    {
        Transfers.Dispose();
        Loads.Dispose();
        Stores.Dispose();
        Context.Dispose();
    }
}
