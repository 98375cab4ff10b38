using System.Buffers;
using Connector.Core.Memory;
using Connector.Core.Platform;
using Connector.CudaInterop.Driver;

namespace Connector.Cuda;

/// <summary>
/// A GPU engine's KV memory mapped into the sidecar. Copies are gathered into as few driver calls as possible
/// (adjacent pieces merged, one batched copy per submission where the driver has it), queued on the device's store
/// or load stream, and completed by the stream's event. A store first makes its stream wait for the engine's store
/// event, so the copy reads the KV only after the forward pass that wrote it.
/// </summary>
internal sealed class CudaEngineMemory : IEngineMemory
{
    private readonly CudaDevice _device;
    private readonly (ulong Address, long Length)[] _regions;
    private readonly IpcMapping[] _mappings;
    private readonly IpcMappingCache _cache;
    private readonly CudaEvent? _storeEvent;
    private readonly ProcessIdentity? _owner;
    private int _disposed;

    public CudaEngineMemory(CudaDevice device, (ulong Address, long Length)[] regions, IpcMapping[] mappings, IpcMappingCache cache, CudaEvent? storeEvent, ProcessIdentity? owner)
    {
        _device = device;
        _regions = regions;
        _mappings = mappings;
        _cache = cache;
        _storeEvent = storeEvent;
        _owner = owner;
    }

    public int RegionCount => _regions.Length;

    public bool CopiesOnSubmit => false;

    /// <summary>The GPU.</summary>
    public string DeviceUuid => _device.Info.Uuid;

    /// <summary>The device address of a region (tests and the device-to-device path).</summary>
    public ulong RegionAddress(int region) => _regions[region].Address;

    public long RegionLength(int region) => _regions[region].Length;

    public unsafe void Submit(CopyDirection direction, ReadOnlySpan<CopyOp> ops)
    {
        EnsureUsable();
        if (ops.IsEmpty)
        {
            return;
        }

        ulong[] dst = ArrayPool<ulong>.Shared.Rent(ops.Length);
        ulong[] src = ArrayPool<ulong>.Shared.Rent(ops.Length);
        nuint[] sizes = ArrayPool<nuint>.Shared.Rent(ops.Length);
        try
        {
            bool toHost = direction == CopyDirection.EngineToHost;
            int n = 0;
            foreach (ref readonly CopyOp op in ops)
            {
                if ((uint)op.Region >= (uint)_regions.Length || op.RegionOffset < 0 || op.Length <= 0 || op.Length > _regions[op.Region].Length - op.RegionOffset)
                {
                    throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"copy of {op.Length} bytes at offset {op.RegionOffset} of region {op.Region} is outside the registered memory");
                }

                ulong device = _regions[op.Region].Address + (ulong)op.RegionOffset;
                ulong host = (ulong)op.Host;
                (ulong to, ulong from) = toHost ? (host, device) : (device, host);
                if (n > 0 && dst[n - 1] + sizes[n - 1] == to && src[n - 1] + sizes[n - 1] == from)
                {
                    sizes[n - 1] += (nuint)op.Length;
                }
                else
                {
                    dst[n] = to;
                    src[n] = from;
                    sizes[n++] = (nuint)op.Length;
                }
            }

            CopyQueue queue = toHost ? _device.Stores : _device.Loads;
            fixed (ulong* d = dst, s = src)
            fixed (nuint* z = sizes)
            {
                lock (queue.EnqueueLock)
                {
                    if (toHost && _storeEvent is not null)
                    {
                        queue.Stream.Wait(_storeEvent.Value);
                    }

                    _device.Copier.Enqueue(queue.Stream, toHost ? CopyKind.DeviceToHost : CopyKind.HostToDevice, d, s, z, n);
                }
            }
        }
        catch (CudaException ex)
        {
            throw Translate(ex);
        }
        finally
        {
            ArrayPool<ulong>.Shared.Return(dst);
            ArrayPool<ulong>.Shared.Return(src);
            ArrayPool<nuint>.Shared.Return(sizes);
        }
    }

    public ValueTask Completion(CopyDirection direction)
    {
        // No liveness check here: copies already submitted must be waited for before their slabs are let go.
        CopyQueue queue = direction == CopyDirection.EngineToHost ? _device.Stores : _device.Loads;
        Task done;
        try
        {
            done = queue.Completion();
        }
        catch (CudaException ex)
        {
            throw Translate(ex);
        }

        return done.IsCompletedSuccessfully ? ValueTask.CompletedTask : Await(done);
    }

    /// <summary>
    /// Copies between this engine's memory and another engine's on the same GPU (the prefill/decode hand-off on
    /// one machine): device to device on the device's transfer stream, without touching host memory.
    /// </summary>
    /// <param name="target">The receiving engine's memory.</param>
    /// <param name="pieces">(source region, source offset, target region, target offset, bytes) per piece.</param>
    /// <exception cref="EngineMemoryException">A piece is out of range, or the engines are on different GPUs.</exception>
    public unsafe ValueTask CopyTo(CudaEngineMemory target, ReadOnlySpan<(int SourceRegion, long SourceOffset, int TargetRegion, long TargetOffset, long Length)> pieces)
    {
        ArgumentNullException.ThrowIfNull(target);
        EnsureUsable();
        target.EnsureUsable();
        if (target._device != _device)
        {
            throw new EngineMemoryException(EngineMemoryError.Unsupported, $"device-to-device copies between GPUs ({DeviceUuid} to {target.DeviceUuid}) are not supported yet; the hand-off goes through host memory");
        }

        ulong[] dst = new ulong[pieces.Length];
        ulong[] src = new ulong[pieces.Length];
        nuint[] sizes = new nuint[pieces.Length];
        for (int i = 0; i < pieces.Length; i++)
        {
            var p = pieces[i];
            src[i] = Checked(this, p.SourceRegion, p.SourceOffset, p.Length);
            dst[i] = Checked(target, p.TargetRegion, p.TargetOffset, p.Length);
            sizes[i] = (nuint)p.Length;
        }

        try
        {
            CopyQueue queue = _device.Transfers;
            fixed (ulong* d = dst, s = src)
            fixed (nuint* z = sizes)
            {
                lock (queue.EnqueueLock)
                {
                    _device.Copier.Enqueue(queue.Stream, CopyKind.DeviceToDevice, d, s, z, pieces.Length);
                }
            }

            return Await(queue.Completion());
        }
        catch (CudaException ex)
        {
            throw Translate(ex);
        }
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        _storeEvent?.Dispose();
        foreach (IpcMapping mapping in _mappings)
        {
            _cache.Release(mapping);
        }
    }

    private static ulong Checked(CudaEngineMemory memory, int region, long offset, long length)
    {
        if ((uint)region >= (uint)memory._regions.Length || offset < 0 || length <= 0 || length > memory._regions[region].Length - offset)
        {
            throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"copy of {length} bytes at offset {offset} of region {region} is outside the registered memory");
        }

        return memory._regions[region].Address + (ulong)offset;
    }

    private static async ValueTask Await(Task done)
    {
        try
        {
            await done.ConfigureAwait(false);
        }
        catch (CudaException ex)
        {
            throw Translate(ex);
        }
    }

    private void EnsureUsable()
    {
        if (Volatile.Read(ref _disposed) != 0)
        {
            throw new EngineMemoryException(EngineMemoryError.Fault, "the engine's GPU memory was unregistered");
        }

        if (_owner is not null && !_owner.IsAlive())
        {
            throw new EngineMemoryException(EngineMemoryError.Fault, $"process {_owner.Pid}, which registered this GPU memory, has exited");
        }
    }

    private static EngineMemoryException Translate(CudaException ex) => new(
        EngineMemoryError.Fault,
        ex.IsSticky
            ? $"the GPU context is broken ({ex.Message}); the sidecar cannot copy on this device until it restarts"
            : $"a GPU copy failed: {ex.Message}");
}
