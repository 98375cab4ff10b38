using Connector.CudaInterop.Driver;

namespace Connector.Cuda;

/// <summary>
/// The process's opened IPC memory handles, one mapping per exporter allocation, shared and reference counted:
/// the driver returns the same pointer for a second open and one close unmaps it for everybody (cuda.md A.3,
/// pitfall 3). Keyed by exporter (pid and start time, since a handle can repeat after an exporter restarts),
/// device and handle bytes.
/// </summary>
internal sealed class IpcMappingCache
{
    private readonly Lock _gate = new();
    private readonly Dictionary<Key, Entry> _entries = [];
    private long _opens;

    /// <summary>Handles opened with the driver so far (a registration that reuses a mapping opens nothing).</summary>
    public long Opens => Interlocked.Read(ref _opens);

    /// <summary>Mappings open now.</summary>
    public int OpenMappings
    {
        get
        {
            lock (_gate)
            {
                return _entries.Count;
            }
        }
    }

    /// <summary>Opens (or shares) the mapping of an exporter's allocation.</summary>
    /// <exception cref="CudaException">The driver refused the handle.</exception>
    public IpcMapping Acquire(CudaContext context, int exporterPid, long exporterStart, byte[] handle)
    {
        var key = new Key(context.Device.Uuid, exporterPid, exporterStart, Convert.ToBase64String(handle));
        lock (_gate)
        {
            if (_entries.TryGetValue(key, out Entry? entry))
            {
                entry.Refs++;
                return entry.Mapping;
            }

            // Opened under the lock: two registrations of one allocation must not both open it.
            IpcMapping mapping = IpcMapping.Open(context, IpcHandle.FromBytes(handle));
            Interlocked.Increment(ref _opens);
            _entries[key] = new Entry(mapping);
            return mapping;
        }
    }

    /// <summary>Drops one use of a mapping; the last closes it.</summary>
    public void Release(IpcMapping mapping)
    {
        lock (_gate)
        {
            foreach ((Key key, Entry entry) in _entries)
            {
                if (ReferenceEquals(entry.Mapping, mapping))
                {
                    if (--entry.Refs == 0)
                    {
                        _entries.Remove(key);
                        mapping.Dispose();
                    }

                    return;
                }
            }
        }
    }

    private readonly record struct Key(string Device, int Pid, long Start, string Handle);

    private sealed class Entry(IpcMapping mapping)
    {
        public IpcMapping Mapping { get; } = mapping;

        public int Refs { get; set; } = 1;
    }
}
