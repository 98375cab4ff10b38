using Connector.Core.Keys;

namespace Connector.Storage.Disk;

/// <summary>Where a chunk lives on disk, and what it must verify as.</summary>
internal sealed class IndexEntry
{
    public required ChunkKey Key { get; init; }

    public required ChunkKey Parent { get; init; }

    public required ulong NamespaceTag { get; init; }

    public required long Length { get; init; }

    public required ulong Checksum { get; init; }

    public required Segment Segment { get; set; }

    public required long Offset { get; set; }

    public required ulong Sequence { get; set; }

    /// <summary>Last use on the index's clock (LRU).</summary>
    public long Stamp { get; set; }

    /// <summary>Whether the entry left the index (evicted, dropped, cleared).</summary>
    public bool Removed { get; set; }

    public long RecordBytes => RecordFormat.RecordSize(Length);
}

/// <summary>
/// The in-memory index: key to entry, the number of stored children of each key, and a least-recently-used order over the
/// leaves (chunks no stored chunk continues), so eviction takes a prompt's last chunk before its first and never leaves a
/// stored suffix without its prefix.
/// </summary>
/// <remarks>
/// Not thread-safe: the tier calls it under its lock. The leaf order is a min-heap on last use with lazy deletion: an entry is
/// pushed again when touched or when it becomes a leaf, and stale heap items are skipped when popped.
/// </remarks>
internal sealed class ChunkIndex
{
    private readonly Dictionary<ChunkKey, IndexEntry> _entries = [];
    private readonly Dictionary<ChunkKey, int> _children = [];
    private readonly PriorityQueue<IndexEntry, long> _leaves = new();
    private long _clock;

    public int Count => _entries.Count;

    /// <summary>Record bytes of every entry.</summary>
    public long LiveBytes { get; private set; }

    public IEnumerable<IndexEntry> Entries => _entries.Values;

    /// <summary>Moves the clock forward to at least <paramref name="stamp"/> (recovery stamps entries by write order).</summary>
    public void AdvanceClock(long stamp) => _clock = Math.Max(_clock, stamp);

    public bool TryGet(in ChunkKey key, out IndexEntry entry) => _entries.TryGetValue(key, out entry!);

    /// <summary>Adds <paramref name="entry"/>, replacing (and returning) an entry of the same key.</summary>
    public IndexEntry? Add(IndexEntry entry, long? stamp = null)
    {
        IndexEntry? replaced = null;
        if (_entries.TryGetValue(entry.Key, out IndexEntry? old))
        {
            Remove(old);
            replaced = old;
        }

        entry.Removed = false;
        entry.Stamp = stamp ?? ++_clock;
        _entries.Add(entry.Key, entry);
        entry.Segment.LiveBytes += entry.RecordBytes;
        LiveBytes += entry.RecordBytes;
        if (HasParent(entry))
        {
            _children[entry.Parent] = _children.GetValueOrDefault(entry.Parent) + 1;
        }

        if (!_children.ContainsKey(entry.Key))
        {
            _leaves.Enqueue(entry, entry.Stamp);
        }

        return replaced;
    }

    /// <summary>Removes <paramref name="entry"/> if it is still the key's entry; its parent may become a leaf.</summary>
    public bool Remove(IndexEntry entry)
    {
        if (entry.Removed || !_entries.TryGetValue(entry.Key, out IndexEntry? current) || !ReferenceEquals(current, entry))
        {
            return false;
        }

        _entries.Remove(entry.Key);
        entry.Removed = true;
        entry.Segment.LiveBytes -= entry.RecordBytes;
        LiveBytes -= entry.RecordBytes;
        if (HasParent(entry))
        {
            int left = _children[entry.Parent] - 1;
            if (left > 0)
            {
                _children[entry.Parent] = left;
            }
            else
            {
                _children.Remove(entry.Parent);
                if (_entries.TryGetValue(entry.Parent, out IndexEntry? parent))
                {
                    _leaves.Enqueue(parent, parent.Stamp);
                }
            }
        }

        return true;
    }

    /// <summary>Marks a use (a read): the entry moves to the recent end of the order.</summary>
    public void Touch(IndexEntry entry)
    {
        if (entry.Removed)
        {
            return;
        }

        entry.Stamp = ++_clock;
        if (!_children.ContainsKey(entry.Key))
        {
            _leaves.Enqueue(entry, entry.Stamp);
            CompactLeavesIfStale();
        }
    }

    /// <summary>The least recently used leaf, or false when the index is empty.</summary>
    public bool TryPeekVictim(out IndexEntry victim)
    {
        while (_leaves.TryPeek(out victim!, out long stamp))
        {
            if (!victim.Removed && victim.Stamp == stamp && !_children.ContainsKey(victim.Key))
            {
                return true;
            }

            _leaves.Dequeue();
        }

        // Entries whose parent link forms a cycle (impossible with hashed keys) would be no leaf; take any entry then.
        foreach (IndexEntry entry in _entries.Values)
        {
            victim = entry;
            return true;
        }

        victim = null!;
        return false;
    }

    public void Clear()
    {
        foreach (IndexEntry entry in _entries.Values)
        {
            entry.Removed = true;
        }

        _entries.Clear();
        _children.Clear();
        _leaves.Clear();
        LiveBytes = 0;
    }

    private static bool HasParent(IndexEntry entry) => !entry.Parent.IsNone && entry.Parent != entry.Key;

    private void CompactLeavesIfStale()
    {
        // Touches push without removing: rebuild when stale items outnumber live ones, so the heap stays O(entries).
        if (_leaves.Count <= (2 * _entries.Count) + 1024)
        {
            return;
        }

        _leaves.Clear();
        foreach (IndexEntry entry in _entries.Values)
        {
            if (!_children.ContainsKey(entry.Key))
            {
                _leaves.Enqueue(entry, entry.Stamp);
            }
        }
    }
}
