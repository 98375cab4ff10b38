using System.Runtime.InteropServices;

namespace Connector.Core.Storage;

/// <summary>
/// Fixed-size slabs carved from large aligned native extents, one slab class per chunk size, under a
/// byte budget. Not thread-safe: <see cref="HostMemoryTier"/> calls it under its lock.
/// </summary>
internal sealed unsafe partial class SlabArena : IDisposable
{
    /// <summary>Extents are aligned to 2 MiB so the kernel can back them with huge pages.</summary>
    private const nuint ExtentAlignment = 2 << 20;

    private const int MadvHugepage = 14;

    private readonly long _capacity;
    private readonly long _extentBytes;
    private readonly IHostMemoryPinner? _pinner;
    private readonly Dictionary<long, SlabClass> _classes = [];
    private long _allocated;

    public SlabArena(long capacityBytes, long extentBytes, IHostMemoryPinner? pinner = null)
    {
        _capacity = capacityBytes;
        _extentBytes = extentBytes;
        _pinner = pinner;
    }

    public long AllocatedBytes => _allocated;

    /// <summary>Bytes of the owner's metadata charged against the same budget as the extents.</summary>
    public long MetadataBytes { get; set; }

    /// <summary>Takes a free slab of <paramref name="slabBytes"/>, allocating an extent if the budget allows.</summary>
    public bool TryTake(long slabBytes, out Extent? extent, out int slot)
    {
        SlabClass c = ClassOf(slabBytes);
        foreach (Extent e in c.Extents)
        {
            if (e.FreeCount > 0)
            {
                extent = e;
                slot = e.Take();
                return true;
            }
        }

        long bytes = c.ExtentBytes;
        if (_allocated + MetadataBytes + bytes > _capacity)
        {
            extent = null;
            slot = -1;
            return false;
        }

        nint address = Allocate(bytes);
        _pinner?.TryPin(address, bytes);
        var fresh = new Extent(c, address, bytes, (int)(bytes / slabBytes));
        c.Extents.Add(fresh);
        _allocated += bytes;
        extent = fresh;
        slot = fresh.Take();
        return true;
    }

    /// <summary>Allocates (and pins) an extent for <paramref name="slabBytes"/> slabs if that size has none yet and the budget allows.</summary>
    public bool Prewarm(long slabBytes)
    {
        SlabClass c = ClassOf(slabBytes);
        if (c.Extents.Count > 0 || !ExtentFits(slabBytes))
        {
            return false;
        }

        nint address = Allocate(c.ExtentBytes);
        _pinner?.TryPin(address, c.ExtentBytes);
        c.Extents.Add(new Extent(c, address, c.ExtentBytes, (int)(c.ExtentBytes / slabBytes)));
        _allocated += c.ExtentBytes;
        return true;
    }

    /// <summary>Whether a new extent for this slab size fits the budget now.</summary>
    public bool ExtentFits(long slabBytes) => _allocated + MetadataBytes + ClassOf(slabBytes).ExtentBytes <= _capacity;

    /// <summary>Frees every completely empty extent of classes other than <paramref name="keepSlabBytes"/>, returning its bytes to the budget.</summary>
    public bool ReleaseEmptyExtents(long keepSlabBytes)
    {
        bool released = false;
        foreach (SlabClass c in _classes.Values)
        {
            if (c.SlabBytes == keepSlabBytes)
            {
                continue;
            }

            for (int i = c.Extents.Count - 1; i >= 0; i--)
            {
                Extent e = c.Extents[i];
                if (e.FreeCount == e.SlabCount)
                {
                    c.Extents.RemoveAt(i);
                    Free(e);
                    _allocated -= e.Bytes;
                    released = true;
                }
            }
        }

        return released;
    }

    public void Dispose()
    {
        foreach (SlabClass c in _classes.Values)
        {
            foreach (Extent e in c.Extents)
            {
                Free(e);
            }

            c.Extents.Clear();
        }

        _allocated = 0;
    }

    private SlabClass ClassOf(long slabBytes)
    {
        if (!_classes.TryGetValue(slabBytes, out SlabClass? c))
        {
            long extentBytes = slabBytes >= _extentBytes
                ? (slabBytes + 4095) & ~4095L
                : _extentBytes / slabBytes * slabBytes;
            c = new SlabClass(slabBytes, extentBytes);
            _classes[slabBytes] = c;
        }

        return c;
    }

    private void Free(Extent e)
    {
        _pinner?.Unpin(e.Base);
        NativeMemory.AlignedFree((void*)e.Base);
    }

    private static nint Allocate(long bytes)
    {
        void* p = NativeMemory.AlignedAlloc((nuint)bytes, ExtentAlignment);
        if (OperatingSystem.IsLinux())
        {
            // Best effort: huge pages cut page faults and TLB misses on multi-megabyte chunk copies.
            _ = madvise(p, (nuint)bytes, MadvHugepage);
        }

        return (nint)p;
    }

    [LibraryImport("libc", EntryPoint = "madvise")]
    private static partial int madvise(void* addr, nuint length, int advice);

    internal sealed class SlabClass(long slabBytes, long extentBytes)
    {
        public long SlabBytes { get; } = slabBytes;

        public long ExtentBytes { get; } = extentBytes;

        public List<Extent> Extents { get; } = [];
    }

    /// <summary>One native allocation holding <see cref="SlabCount"/> slabs.</summary>
    internal sealed class Extent
    {
        private readonly int[] _free;

        public Extent(SlabClass owner, nint baseAddress, long bytes, int slabCount)
        {
            Owner = owner;
            Base = baseAddress;
            Bytes = bytes;
            SlabCount = slabCount;
            _free = new int[slabCount];
            for (int i = 0; i < slabCount; i++)
            {
                _free[i] = slabCount - 1 - i;
            }

            FreeCount = slabCount;
        }

        public SlabClass Owner { get; }

        public nint Base { get; }

        public long Bytes { get; }

        public int SlabCount { get; }

        public int FreeCount { get; private set; }

        public nint Address(int slot) => Base + (nint)(slot * Owner.SlabBytes);

        public int Take() => _free[--FreeCount];

        public void Return(int slot) => _free[FreeCount++] = slot;
    }
}
