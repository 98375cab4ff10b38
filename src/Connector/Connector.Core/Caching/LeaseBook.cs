using Connector.Core.Keys;
using Connector.Core.Storage;

namespace Connector.Core.Caching;

/// <summary>
/// Files the host tier's leases under (instance, request, rank namespace) so that a worker's LOAD
/// releases its own rank's share, a RELEASE ends the request's lease, and a closed connection ends
/// everything it leased.
/// </summary>
internal sealed class LeaseBook(HostMemoryTier tier)
{
    private readonly Lock _lock = new();
    private readonly Dictionary<(string Instance, string Request), List<Entry>> _byRequest = [];
    private readonly Dictionary<ulong, (string Instance, string Request)> _byId = [];
    private ulong _nextId;

    /// <summary>Ends the previous lease of a request before a new lookup leases again, and names the new one.</summary>
    /// <returns>The id the client may RELEASE the request's lease by.</returns>
    public ulong Replace(string instance, string request)
    {
        ReleaseRequest(instance, request);
        lock (_lock)
        {
            ulong id = ++_nextId;
            _byId[id] = (instance, request);
            return id;
        }
    }

    /// <summary>Releases the lease named by an id from <see cref="Replace"/>.</summary>
    public int ReleaseById(ulong id)
    {
        (string Instance, string Request) key;
        lock (_lock)
        {
            if (!_byId.Remove(id, out key))
            {
                return -1;
            }
        }

        return ReleaseRequest(key.Instance, key.Request);
    }

    public bool Add(long sessionId, string instance, string request, KvNamespace rank, ReadOnlySpan<ChunkKey> keys)
    {
        LeaseId id = tier.AcquireLease(sessionId, keys);
        if (id == LeaseId.None)
        {
            return false;
        }

        lock (_lock)
        {
            if (!_byRequest.TryGetValue((instance, request), out List<Entry>? entries))
            {
                entries = new List<Entry>(2);
                _byRequest[(instance, request)] = entries;
            }

            entries.Add(new Entry(sessionId, rank, id));
        }

        return true;
    }

    public int ReleaseRank(string instance, string request, KvNamespace rank)
    {
        List<LeaseId> toRelease = [];
        lock (_lock)
        {
            if (!_byRequest.TryGetValue((instance, request), out List<Entry>? entries))
            {
                return 0;
            }

            for (int i = entries.Count - 1; i >= 0; i--)
            {
                if (entries[i].Rank.Equals(rank))
                {
                    toRelease.Add(entries[i].Lease);
                    entries.RemoveAt(i);
                }
            }

            if (entries.Count == 0)
            {
                _byRequest.Remove((instance, request));
                RemoveIdsOf(instance, request);
            }
        }

        return toRelease.Sum(tier.ReleaseLease);
    }

    public int ReleaseRequest(string instance, string request)
    {
        List<Entry>? entries;
        lock (_lock)
        {
            RemoveIdsOf(instance, request);
            if (!_byRequest.Remove((instance, request), out entries))
            {
                return 0;
            }
        }

        return entries.Sum(e => tier.ReleaseLease(e.Lease));
    }

    public void ReleaseSession(long sessionId)
    {
        lock (_lock)
        {
            foreach (var pair in _byRequest.ToArray())
            {
                pair.Value.RemoveAll(e => e.Session == sessionId);
                if (pair.Value.Count == 0)
                {
                    _byRequest.Remove(pair.Key);
                }
            }
        }

        tier.ReleaseOwner(sessionId);
    }

    /// <summary>Forgets book entries whose leases the tier has expired.</summary>
    public void Prune()
    {
        lock (_lock)
        {
            foreach (var pair in _byRequest.ToArray())
            {
                pair.Value.RemoveAll(e => !tier.IsLeaseActive(e.Lease));
                if (pair.Value.Count == 0)
                {
                    _byRequest.Remove(pair.Key);
                }
            }
        }
    }

    private void RemoveIdsOf(string instance, string request)
    {
        foreach (var pair in _byId)
        {
            if (pair.Value.Instance == instance && pair.Value.Request == request)
            {
                _byId.Remove(pair.Key);
                return;
            }
        }
    }

    private readonly record struct Entry(long Session, KvNamespace Rank, LeaseId Lease);
}
