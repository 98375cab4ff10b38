using Connector.Core.Memory;
using Connector.Core.Platform;
using Connector.CudaInterop.Driver;

namespace Connector.Cuda;

/// <summary>
/// Opens GPU engines' KV memory from their CUDA IPC handles: the device by UUID (never by ordinal: the engine
/// and the sidecar see different CUDA_VISIBLE_DEVICES), each allocation once (an open costs milliseconds, and the
/// mapping is shared with every registration of the same allocation), each layer at its offset, bounds checked
/// against the allocation the driver reports.
/// </summary>
public sealed class CudaEngineMemoryProvider : IEngineMemoryProvider, Core.Caching.IDataPlaneCounters
{
    private readonly CudaDataPlane _plane;

    internal CudaEngineMemoryProvider(CudaDataPlane plane) => _plane = plane;

    /// <inheritdoc/>
    public EngineMemoryKind Kind => EngineMemoryKind.CudaIpc;

    /// <inheritdoc/>
    public Core.Caching.DataPlaneCounters Read() =>
        new(_plane.IpcOpens, _plane.OpenMappings, _plane.Pinner?.PinnedBytes ?? 0, _plane.Pinner?.Failures ?? 0);

    /// <inheritdoc/>
    public IEngineMemory Open(IReadOnlyList<EngineMemoryRef> regions, ProcessIdentity? owner = null, EngineSignals? signals = null)
    {
        ArgumentNullException.ThrowIfNull(regions);
        if (regions.Count == 0)
        {
            throw new EngineMemoryException(EngineMemoryError.OutOfRange, "no regions to open");
        }

        string uuid = DeviceUuid.Normalize(regions[0].DeviceUuid)
            ?? throw new EngineMemoryException(EngineMemoryError.BadLayout, $"'{regions[0].DeviceUuid}' is not a GPU UUID (send torch.cuda.get_device_properties(i).uuid)");
        int exporter = owner?.Pid ?? regions[0].Pid;
        foreach (EngineMemoryRef r in regions)
        {
            Validate(r, uuid, owner);
        }

        CudaDevice device = _plane.Device(uuid);
        long exporterStart = ProcessStartTime(exporter);
        var mappings = new Dictionary<string, IpcMapping>();
        CudaEvent? storeEvent = null;
        try
        {
            var opened = new (ulong Address, long Length)[regions.Count];
            for (int i = 0; i < regions.Count; i++)
            {
                EngineMemoryRef r = regions[i];
                string key = Convert.ToBase64String(r.IpcHandle!);
                if (!mappings.TryGetValue(key, out IpcMapping? mapping))
                {
                    mapping = OpenMapping(device, exporter, exporterStart, r.IpcHandle!);
                    mappings[key] = mapping;
                }

                if (r.Offset > mapping.Size || r.Length > mapping.Size - r.Offset)
                {
                    throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"region {i}: {r.Length} bytes at offset {r.Offset} lie outside the exported allocation of {mapping.Size} bytes");
                }

                opened[i] = (mapping.Address + r.Offset, (long)r.Length);
            }

            if (signals?.StoreEvent is { } eventHandle)
            {
                storeEvent = OpenEvent(device, eventHandle);
            }

            var memory = new CudaEngineMemory(device, opened, [.. mappings.Values], _plane.Mappings, storeEvent, owner);
            mappings.Clear();
            storeEvent = null;
            return memory;
        }
        finally
        {
            // Roll back whatever a failed registration opened: an open mapping pins the engine's memory (pitfall 4).
            foreach (IpcMapping mapping in mappings.Values)
            {
                _plane.Mappings.Release(mapping);
            }

            storeEvent?.Dispose();
        }
    }

    private static void Validate(EngineMemoryRef r, string uuid, ProcessIdentity? owner)
    {
        if (r.Kind != EngineMemoryKind.CudaIpc)
        {
            throw new EngineMemoryException(EngineMemoryError.Unsupported, $"memory kind {r.Kind} is not CUDA IPC memory");
        }

        if (r.IpcHandle is not { Length: IpcHandle.Size })
        {
            throw new EngineMemoryException(EngineMemoryError.BadLayout, $"a CUDA region needs a {IpcHandle.Size}-byte IPC memory handle (got {r.IpcHandle?.Length ?? 0} bytes)");
        }

        if (DeviceUuid.Normalize(r.DeviceUuid) != uuid)
        {
            throw new EngineMemoryException(EngineMemoryError.BadLayout, $"all layers of one registration must be on one GPU ({uuid} and {r.DeviceUuid}); register each GPU's worker separately");
        }

        if (r.Length == 0 || r.Length > long.MaxValue || r.Offset > long.MaxValue)
        {
            throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"a CUDA region of {r.Length} bytes at offset {r.Offset} is not a valid range");
        }

        if (owner is not null && r.Pid != 0 && r.Pid != owner.Pid)
        {
            throw new EngineMemoryException(EngineMemoryError.NotOwner, $"the region names process {r.Pid}, not the registering process {owner.Pid}: a worker may register only memory it exported itself");
        }
    }

    private IpcMapping OpenMapping(CudaDevice device, int exporter, long exporterStart, byte[] handle)
    {
        try
        {
            return _plane.Mappings.Acquire(device.Context, exporter, exporterStart, handle);
        }
        catch (CudaException ex) when (ex.Result == CuResult.InvalidContext)
        {
            throw new EngineMemoryException(EngineMemoryError.NotOwner,
                $"the CUDA IPC handle cannot be opened ({ex.ErrorName}): it was exported by the sidecar's own process, or by a process in another pid namespace that has the sidecar's pid value; run the engine and the sidecar in one pid namespace (host pid, or a shared pod pid namespace)");
        }
        catch (CudaException ex)
        {
            throw new EngineMemoryException(EngineMemoryError.Fault,
                $"the CUDA IPC handle cannot be opened ({ex.Message}): the allocation was freed, the exporting process exited, or the handle comes from another machine or device; register again with a fresh handle");
        }
    }

    private static CudaEvent OpenEvent(CudaDevice device, byte[] handle)
    {
        try
        {
            return CudaEvent.OpenIpc(device.Context, IpcHandle.FromBytes(handle));
        }
        catch (CudaException ex)
        {
            throw new EngineMemoryException(EngineMemoryError.Unsupported,
                $"the store event's IPC handle cannot be opened ({ex.Message}); IPC events need the engine and the sidecar to share /dev/shm. Without it the engine must synchronise before STORE and send no store_event");
        }
    }

    /// <summary>The process's start time in clock ticks since boot (/proc/PID/stat field 22): a pid with another start time is another process.</summary>
    internal static long ProcessStartTime(int pid)
    {
        try
        {
            string stat = File.ReadAllText($"/proc/{pid}/stat");
            string[] fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            return long.Parse(fields[19], System.Globalization.CultureInfo.InvariantCulture);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or FormatException or IndexOutOfRangeException or ArgumentOutOfRangeException)
        {
            return 0;
        }
    }
}
