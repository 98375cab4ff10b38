using System.Buffers;
using Connector.Core.Keys;

namespace Connector.Core.Storage;

/// <content>Leases: chunks a lookup found stay until the engine loaded them, released them, or the TTL passed.</content>
public sealed partial class HostMemoryTier
{
    /// <summary>Leases the given keys that are stored (absent ones are skipped) for an owner.</summary>
    /// <param name="ownerId">The connection that owns the lease; <see cref="ReleaseOwner"/> ends all of its leases.</param>
    /// <param name="keys">The chunks to lease.</param>
    /// <returns>The lease, or <see cref="LeaseId.None"/> when none of the keys is stored.</returns>
    public LeaseId AcquireLease(long ownerId, ReadOnlySpan<ChunkKey> keys)
    {
        lock (_lock)
        {
            int[] entries = ArrayPool<int>.Shared.Rent(Math.Max(2 * keys.Length, 2));
            int count = 0;
            foreach (ChunkKey key in keys)
            {
                if (_index.TryGetValue(key, out int e) && _entries[e].State == EntryState.Committed)
                {
                    _entries[e].Leases++;
                    entries[2 * count] = e;
                    entries[(2 * count) + 1] = _entries[e].Generation;
                    count++;
                }
            }

            if (count == 0)
            {
                ArrayPool<int>.Shared.Return(entries);
                return LeaseId.None;
            }

            var id = new LeaseId(++_nextLease);
            _leases[id.Value] = new Lease(ownerId, entries, count, _time.GetUtcNow() + _options.LeaseTtl);
            _leasedChunks += count;
            return id;
        }
    }

    /// <summary>Ends a lease.</summary>
    /// <returns>The number of chunks it covered; 0 for an unknown lease.</returns>
    public int ReleaseLease(LeaseId id)
    {
        lock (_lock)
        {
            return _leases.Remove(id.Value, out Lease lease) ? End(lease) : 0;
        }
    }

    /// <summary>Whether a lease is still held.</summary>
    public bool IsLeaseActive(LeaseId id)
    {
        lock (_lock)
        {
            return _leases.ContainsKey(id.Value);
        }
    }

    /// <summary>Ends every lease of an owner (its connection closed).</summary>
    /// <returns>The number of chunks released.</returns>
    public int ReleaseOwner(long ownerId)
    {
        lock (_lock)
        {
            int released = 0;
            foreach (var (id, lease) in _leases)
            {
                if (lease.Owner == ownerId)
                {
                    _leases.Remove(id);
                    released += End(lease);
                }
            }

            return released;
        }
    }

    /// <summary>Ends leases past their TTL.</summary>
    /// <returns>The number of leases ended.</returns>
    public int ExpireLeases()
    {
        lock (_lock)
        {
            return ExpireLeasesLocked();
        }
    }

    private int ExpireLeasesLocked()
    {
        if (_leases.Count == 0)
        {
            return 0;
        }

        DateTimeOffset now = _time.GetUtcNow();
        int expired = 0;
        foreach (var (id, lease) in _leases)
        {
            if (lease.Expires <= now)
            {
                _leases.Remove(id);
                End(lease);
                expired++;
            }
        }

        return expired;
    }

    private int End(Lease lease)
    {
        for (int i = 0; i < lease.Count; i++)
        {
            int e = lease.Entries[2 * i];
            if (_entries[e].Generation == lease.Entries[(2 * i) + 1] && _entries[e].Leases > 0)
            {
                _entries[e].Leases--;
            }
        }

        _leasedChunks -= lease.Count;
        ArrayPool<int>.Shared.Return(lease.Entries);
        return lease.Count;
    }

    private readonly record struct Lease(long Owner, int[] Entries, int Count, DateTimeOffset Expires);
}
