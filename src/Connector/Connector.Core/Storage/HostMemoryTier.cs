using System.Buffers;
using System.Runtime.CompilerServices;
using Connector.Core.Keys;

namespace Connector.Core.Storage;

/// <summary>
/// The L1 tier: chunks in fixed-size slabs of large native extents, a byte budget, LRU eviction that
/// takes a chunk's suffixes before its prefix, and leases that keep looked-up chunks until they are loaded.
/// </summary>
/// <remarks>
/// Thread-safe. Metadata changes take one lock; copies into and out of slabs happen outside it, with
/// the chunk reserved (being written) or pinned (being read). No managed allocation per chunk once the
/// tables have grown to the working set.
/// </remarks>
public sealed partial class HostMemoryTier : IDisposable
{
    private const int None = -1;

    private readonly Lock _lock = new();
    private readonly HostTierOptions _options;
    private readonly TimeProvider _time;
    private readonly SlabArena _arena;
    private readonly Dictionary<ChunkKey, int> _index = [];
    private readonly Stack<int> _freeEntries = new(16);
    private readonly Dictionary<ulong, Lease> _leases = [];
    private Entry[] _entries = new Entry[16];
    private int _entryCount;
    private int _lruHead = None;
    private int _lruTail = None;
    private long _usedBytes;
    private long _chunks;
    private long _hits;
    private long _misses;
    private long _evictions;
    private long _leasedChunks;
    private ulong _nextLease;
    private bool _disposed;

    /// <summary>Creates an empty tier; memory is allocated as chunks arrive.</summary>
    public HostMemoryTier(HostTierOptions options, TimeProvider time)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(time);
        options.Validate();
        _options = options;
        _time = time;
        _arena = new SlabArena(options.CapacityBytes, options.ExtentBytes, options.Pinner);
    }

    /// <summary>Bytes of managed metadata the tier holds now (entries, index, free list); counted in the byte budget.</summary>
    public long MetadataBytesEstimate
    {
        get
        {
            lock (_lock)
            {
                return MetadataBytesLocked();
            }
        }
    }

    /// <summary>The largest chunk a registration may declare: a quarter of the capacity, so one chunk never empties the cache.</summary>
    public long MaxChunkBytes => _options.CapacityBytes / 4;

    /// <summary>Reserves a slab for a new chunk, evicting if needed.</summary>
    /// <param name="key">The chunk's key.</param>
    /// <param name="parent">The previous chunk's key in its prefix chain, or <see cref="ChunkKey.None"/>.</param>
    /// <param name="bytes">The chunk's size in bytes.</param>
    /// <param name="slab">The reserved slab when the result is <see cref="StoreBegin.Reserved"/>.</param>
    public StoreBegin TryBeginStore(in ChunkKey key, in ChunkKey parent, long bytes, out SlabRef slab) => TryBeginStore(key, parent, bytes, 0, out slab);

    /// <summary>Reserves a slab for a new chunk of a namespace, evicting if needed.</summary>
    /// <param name="key">The chunk's key.</param>
    /// <param name="parent">The previous chunk's key in its prefix chain, or <see cref="ChunkKey.None"/>.</param>
    /// <param name="bytes">The chunk's size in bytes.</param>
    /// <param name="namespaceTag">A tag of the chunk's namespace; a read names it too (<see cref="TryPinForRead(in ChunkKey, long, ulong, out SlabRef)"/>).</param>
    /// <param name="slab">The reserved slab when the result is <see cref="StoreBegin.Reserved"/>.</param>
    public StoreBegin TryBeginStore(in ChunkKey key, in ChunkKey parent, long bytes, ulong namespaceTag, out SlabRef slab)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytes);
        slab = default;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_index.TryGetValue(key, out int existing))
            {
                if (_entries[existing].State == EntryState.Committed)
                {
                    Touch(existing);
                    return StoreBegin.AlreadyPresent;
                }

                return StoreBegin.InProgress;
            }

            if (bytes > _options.CapacityBytes || !TryTakeSlab(bytes, out SlabArena.Extent? extent, out int slot))
            {
                return StoreBegin.NoSpace;
            }

            int e = NewEntry();
            ref Entry entry = ref _entries[e];
            entry.Key = key;
            entry.Parent = parent;
            entry.Extent = extent;
            entry.Slot = slot;
            entry.Address = extent!.Address(slot);
            entry.Length = bytes;
            entry.NamespaceTag = namespaceTag;
            entry.State = EntryState.Reserved;
            _index[key] = e;
            _arena.MetadataBytes = MetadataBytesLocked();
            _usedBytes += bytes;
            slab = new SlabRef(entry.Address, bytes, e, entry.Generation);
            return StoreBegin.Reserved;
        }
    }

    /// <summary>
    /// Prepares the first extent for chunks of <paramref name="bytes"/> (allocated, and pinned where a GPU is present),
    /// so the first stores after a registration do not pay for it. Nothing happens if that size has an extent already
    /// or the budget has no room.
    /// </summary>
    /// <returns>Whether an extent was allocated.</returns>
    public bool Prewarm(long bytes)
    {
        lock (_lock)
        {
            return !_disposed && bytes > 0 && bytes <= _options.CapacityBytes && _arena.Prewarm(bytes);
        }
    }

    /// <summary>Makes a reserved chunk visible to lookups and loads.</summary>
    public void CommitStore(in SlabRef slab)
    {
        lock (_lock)
        {
            ref Entry entry = ref Checked(slab, EntryState.Reserved);
            entry.State = EntryState.Committed;
            entry.ParentIndex = None;
            if (!entry.Parent.IsNone && _index.TryGetValue(entry.Parent, out int p) && _entries[p].State == EntryState.Committed)
            {
                _entries[p].Children++;
                entry.ParentIndex = p;
                entry.ParentGeneration = _entries[p].Generation;
            }

            LinkHead(slab.Entry);
            _chunks++;
        }
    }

    /// <summary>Frees a reserved chunk whose copy failed; it was never visible.</summary>
    public void AbortStore(in SlabRef slab)
    {
        lock (_lock)
        {
            Checked(slab, EntryState.Reserved);
            FreeEntry(slab.Entry);
        }
    }

    /// <summary>Counts the leading keys that are stored; touches them for LRU and counts hits and misses.</summary>
    public int CountPresentPrefix(ReadOnlySpan<ChunkKey> keys)
    {
        lock (_lock)
        {
            int n = 0;
            while (n < keys.Length && _index.TryGetValue(keys[n], out int e) && _entries[e].State == EntryState.Committed)
            {
                n++;
            }

            // Touch from the last to the first so a prefix is always more recent than its suffixes.
            for (int i = n - 1; i >= 0; i--)
            {
                Touch(_index[keys[i]]);
            }

            _hits += n;
            if (n < keys.Length)
            {
                _misses++;
            }

            return n;
        }
    }

    /// <summary>Pins a stored chunk so it is neither evicted nor freed while it is copied out.</summary>
    public bool TryPinForRead(in ChunkKey key, out SlabRef slab) => TryPinForRead(key, -1, 0, out slab);

    /// <summary>Pins a stored chunk of exactly <paramref name="expectedLength"/> bytes (-1: any) stored under <paramref name="namespaceTag"/>.</summary>
    /// <remarks>A chunk of another length or namespace is treated as absent: a copy never runs past a slab or across namespaces.</remarks>
    public bool TryPinForRead(in ChunkKey key, long expectedLength, ulong namespaceTag, out SlabRef slab)
    {
        lock (_lock)
        {
            if (_index.TryGetValue(key, out int e) && _entries[e].State == EntryState.Committed
                && (expectedLength < 0 || (_entries[e].Length == expectedLength && _entries[e].NamespaceTag == namespaceTag)))
            {
                ref Entry entry = ref _entries[e];
                entry.Pins++;
                Touch(e);
                slab = new SlabRef(entry.Address, entry.Length, e, entry.Generation);
                return true;
            }

            slab = default;
            return false;
        }
    }

    /// <summary>Ends a pin.</summary>
    public void Unpin(in SlabRef slab)
    {
        lock (_lock)
        {
            Checked(slab, EntryState.Committed).Pins--;
        }
    }

    /// <summary>Removes every chunk that is not leased, pinned or being written.</summary>
    /// <returns>The number of chunks removed.</returns>
    public int Clear()
    {
        lock (_lock)
        {
            int removed = 0;
            for (int e = _lruHead; e != None;)
            {
                int next = _entries[e].Next;
                if (_entries[e].Pins == 0 && _entries[e].Leases == 0)
                {
                    Remove(e);
                    removed++;
                }

                e = next;
            }

            return removed;
        }
    }

    /// <summary>Reads the counters.</summary>
    public HostTierStats GetStats()
    {
        lock (_lock)
        {
            return new HostTierStats(_options.CapacityBytes, _arena.AllocatedBytes, _usedBytes, _chunks, _hits, _misses, _evictions, _leases.Count, _leasedChunks);
        }
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            foreach (Lease lease in _leases.Values)
            {
                ArrayPool<int>.Shared.Return(lease.Entries);
            }

            _leases.Clear();

            // A copy still running into or out of a slab (a shutdown that gave up waiting for it) must
            // never touch freed memory: then the extents are left to the process's exit.
            for (int e = 0; e < _entryCount; e++)
            {
                if (_entries[e].Pins > 0 || _entries[e].State == EntryState.Reserved)
                {
                    return;
                }
            }

            _arena.Dispose();
        }
    }

    private bool TryTakeSlab(long bytes, out SlabArena.Extent? extent, out int slot)
    {
        bool checkedRoom = false;
        while (true)
        {
            if (_arena.TryTake(bytes, out extent, out slot))
            {
                return true;
            }

            // Room for a new extent may be held by empty extents of another chunk size.
            if (_arena.ReleaseEmptyExtents(bytes) && _arena.ExtentFits(bytes))
            {
                continue;
            }

            ExpireLeasesLocked();
            if (!checkedRoom && !EvictionCanMakeRoom(bytes))
            {
                return false;
            }

            checkedRoom = true;
            int victim = FindVictim(bytes, sameSizeOnly: true);
            if (victim == None)
            {
                victim = FindVictim(bytes, sameSizeOnly: false);
            }

            if (victim == None)
            {
                return false;
            }

            Demote(victim);
            Remove(victim);
            _evictions++;
        }
    }

    /// <summary>
    /// Whether evicting every chunk that is not leased, pinned or being written would free at least
    /// <paramref name="bytes"/>: if not, nothing is evicted for a store that would fail anyway.
    /// </summary>
    private bool EvictionCanMakeRoom(long bytes)
    {
        long reclaimable = 0;
        for (int e = _lruTail; e != None && reclaimable < bytes; e = _entries[e].Prev)
        {
            if (_entries[e].Pins == 0 && _entries[e].Leases == 0)
            {
                reclaimable += _entries[e].Length;
            }
        }

        return reclaimable >= bytes;
    }

    private long MetadataBytesLocked() =>
        // Entry structs, the free-entry stack, and per index slot a key + value + hash + next (about 48 bytes) and a bucket.
        ((long)_entries.Length * (Unsafe.SizeOf<Entry>() + sizeof(int))) + (_index.EnsureCapacity(0) * (long)(Unsafe.SizeOf<ChunkKey>() + 16 + 4));

    /// <summary>The least recently used chunk that may go: not leased, pinned, or the prefix of a stored chunk.</summary>
    private int FindVictim(long bytes, bool sameSizeOnly)
    {
        for (int e = _lruTail; e != None; e = _entries[e].Prev)
        {
            ref Entry entry = ref _entries[e];
            if (entry.Pins == 0 && entry.Leases == 0 && entry.Children == 0 && (!sameSizeOnly || entry.Length == bytes))
            {
                return e;
            }
        }

        return None;
    }

    /// <summary>Hands an evicted chunk to the lower tiers; a failing sink never stops the eviction.</summary>
    private unsafe void Demote(int e)
    {
        if (_options.EvictionSink is not { } sink)
        {
            return;
        }

        ref Entry entry = ref _entries[e];
        try
        {
            sink.OnEvict(entry.Key, entry.Parent, entry.NamespaceTag, new ReadOnlySpan<byte>((void*)entry.Address, checked((int)entry.Length)));
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            // The sink counts its own failures (TierChain counts a tier's as that tier's errors); the eviction goes on.
        }
    }

    private void Remove(int e)
    {
        ref Entry entry = ref _entries[e];
        if (entry.ParentIndex != None && _entries[entry.ParentIndex].Generation == entry.ParentGeneration)
        {
            _entries[entry.ParentIndex].Children--;
        }

        Unlink(e);
        _chunks--;
        FreeEntry(e);
    }

    private void FreeEntry(int e)
    {
        ref Entry entry = ref _entries[e];
        _index.Remove(entry.Key);
        entry.Extent!.Return(entry.Slot);
        _usedBytes -= entry.Length;
        int generation = entry.Generation + 1;
        entry = default;
        entry.Generation = generation;
        entry.Prev = entry.Next = entry.ParentIndex = None;
        _freeEntries.Push(e);
    }

    private int NewEntry()
    {
        if (_freeEntries.TryPop(out int e))
        {
            return e;
        }

        if (_entryCount == _entries.Length)
        {
            Array.Resize(ref _entries, _entries.Length * 2);
            _arena.MetadataBytes = MetadataBytesLocked();
        }

        e = _entryCount++;
        _entries[e].Prev = _entries[e].Next = _entries[e].ParentIndex = None;
        return e;
    }

    private ref Entry Checked(in SlabRef slab, EntryState state)
    {
        if ((uint)slab.Entry >= (uint)_entryCount || _entries[slab.Entry].Generation != slab.Generation || _entries[slab.Entry].State != state)
        {
            throw new InvalidOperationException($"stale slab reference (entry {slab.Entry}, generation {slab.Generation})");
        }

        return ref _entries[slab.Entry];
    }

    private void Touch(int e)
    {
        if (_lruHead == e)
        {
            return;
        }

        Unlink(e);
        LinkHead(e);
    }

    private void LinkHead(int e)
    {
        _entries[e].Prev = None;
        _entries[e].Next = _lruHead;
        if (_lruHead != None)
        {
            _entries[_lruHead].Prev = e;
        }

        _lruHead = e;
        if (_lruTail == None)
        {
            _lruTail = e;
        }
    }

    private void Unlink(int e)
    {
        ref Entry entry = ref _entries[e];
        if (entry.Prev != None)
        {
            _entries[entry.Prev].Next = entry.Next;
        }
        else if (_lruHead == e)
        {
            _lruHead = entry.Next;
        }

        if (entry.Next != None)
        {
            _entries[entry.Next].Prev = entry.Prev;
        }
        else if (_lruTail == e)
        {
            _lruTail = entry.Prev;
        }

        entry.Prev = entry.Next = None;
    }

    private enum EntryState : byte
    {
        Free,
        Reserved,
        Committed,
    }

    private struct Entry
    {
        public ChunkKey Key;
        public ChunkKey Parent;
        public SlabArena.Extent? Extent;
        public nint Address;
        public long Length;
        public ulong NamespaceTag;
        public int Slot;
        public int Generation;
        public int Prev;
        public int Next;
        public int ParentIndex;
        public int ParentGeneration;
        public int Children;
        public int Pins;
        public int Leases;
        public EntryState State;
    }
}
