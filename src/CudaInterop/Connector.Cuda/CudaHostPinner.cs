using System.Collections.Concurrent;
using Connector.Core.Storage;
using Connector.CudaInterop.Driver;

namespace Connector.Cuda;

/// <summary>
/// Page-locks L1 extents with <c>cuMemHostRegister</c> (PORTABLE: every device's context can DMA from them), once per
/// extent. A refusal (RLIMIT_MEMLOCK, out of memory) is counted and reported; the extent stays pageable and copies
/// from it still work, slower.
/// </summary>
public sealed class CudaHostPinner : IHostMemoryPinner
{
    private readonly CudaContext _context;
    private readonly Action<string>? _log;
    private readonly ConcurrentDictionary<nint, HostRegistration> _pinned = new();
    private long _pinnedBytes;
    private long _failures;

    internal CudaHostPinner(CudaContext context, Action<string>? log)
    {
        _context = context;
        _log = log;
    }

    /// <summary>Bytes page-locked now.</summary>
    public long PinnedBytes => Interlocked.Read(ref _pinnedBytes);

    /// <summary>Extents the driver refused to pin.</summary>
    public long Failures => Interlocked.Read(ref _failures);

    /// <inheritdoc/>
    public bool TryPin(nint address, long bytes)
    {
        try
        {
            HostRegistration registration = HostRegistration.Register(_context, address, bytes);
            _pinned[address] = registration;
            Interlocked.Add(ref _pinnedBytes, bytes);
            return true;
        }
        catch (CudaException ex)
        {
            long failures = Interlocked.Increment(ref _failures);
            if (failures <= 3)
            {
                _log?.Invoke($"cannot pin {bytes} bytes of L1 for DMA ({ex.Message}); this extent stays pageable and GPU copies from it are slower. Raise LimitMEMLOCK (the systemd unit sets infinity).");
            }

            return false;
        }
    }

    /// <inheritdoc/>
    public void Unpin(nint address)
    {
        if (_pinned.TryRemove(address, out HostRegistration? registration))
        {
            Interlocked.Add(ref _pinnedBytes, -registration.Bytes);
            registration.Dispose();
        }
    }
}
