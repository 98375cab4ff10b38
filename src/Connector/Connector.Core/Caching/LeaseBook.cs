using System.Security.Cryptography;
using Connector.Core.Keys;
using Connector.Core.Storage;

namespace Connector.Core.Caching;

/// <summary>
/// Files the host tier's leases under (instance, request): a worker's LOAD releases its own rank's share,
/// a RELEASE ends the request's lease, and a closed connection ends everything it leased.
/// </summary>
/// <remarks>
/// A lease record exists only while something is leased: a lookup that leases nothing leaves nothing
/// behind. Lease ids are random 64-bit values and are honoured only for the instance that took them, so
/// one client can neither guess nor end another's lease. Thread-safe.
/// </remarks>
internal sealed class LeaseBook(HostMemoryTier tier, int maxLeasesPerSession)
{
    private readonly Lock _lock = new();
    private readonly Dictionary<(string Instance, string Request), RequestLease> _byRequest = [];
    private readonly Dictionary<ulong, RequestLease> _byId = [];
    private readonly Dictionary<long, int> _perSession = [];

    /// <summary>Request leases held now.</summary>
    public int Count
    {
        get
        {
            lock (_lock)
            {
                return _byRequest.Count;
            }
        }
    }

    /// <summary>Starts the lease of a lookup that hit: ends the request's previous lease and checks the connection's bound.</summary>
    /// <exception cref="CacheException">With <see cref="CacheError.LimitExceeded"/> when the connection holds too many leases.</exception>
    public RequestLease Start(long session, string instance, string request)
    {
        ReleaseRequest(instance, request);
        lock (_lock)
        {
            if (_perSession.GetValueOrDefault(session) >= maxLeasesPerSession)
            {
                throw new CacheException(CacheError.LimitExceeded, $"this connection holds {maxLeasesPerSession} leases (Sidecar:MaxLeasesPerConnection); release or load them first.");
            }
        }

        return new RequestLease(session, instance, request);
    }

    /// <summary>Leases the present <paramref name="keys"/> of one rank into <paramref name="lease"/>.</summary>
    public void Add(RequestLease lease, KvNamespace rank, ReadOnlySpan<ChunkKey> keys)
    {
        LeaseId id = tier.AcquireLease(lease.Session, keys);
        if (id != LeaseId.None)
        {
            lease.Entries.Add((rank, id));
        }
    }

    /// <summary>Files a started lease and names it; a lease that holds nothing is dropped.</summary>
    /// <returns>The id the instance may RELEASE it by, or 0 when nothing was leased.</returns>
    public ulong Publish(RequestLease lease)
    {
        if (lease.Entries.Count == 0)
        {
            return 0;
        }

        List<(KvNamespace, LeaseId)>? displaced = null;
        lock (_lock)
        {
            Span<byte> random = stackalloc byte[8];
            do
            {
                RandomNumberGenerator.Fill(random);
                lease.Id = BitConverter.ToUInt64(random);
            }
            while (lease.Id == 0 || _byId.ContainsKey(lease.Id));

            // A concurrent lookup of the same request may have published meanwhile: the newer one wins.
            if (_byRequest.Remove((lease.Instance, lease.Request), out RequestLease? old))
            {
                Forget(old);
                displaced = old.Entries;
            }

            _byRequest[(lease.Instance, lease.Request)] = lease;
            _byId[lease.Id] = lease;
            _perSession[lease.Session] = _perSession.GetValueOrDefault(lease.Session) + 1;
        }

        if (displaced is not null)
        {
            EndAll(displaced);
        }

        return lease.Id;
    }

    /// <summary>Releases the lease named by <paramref name="id"/> if it belongs to <paramref name="instance"/>.</summary>
    /// <returns>The chunks released, or -1 when the instance holds no such lease.</returns>
    public int ReleaseById(ulong id, string instance)
    {
        RequestLease? lease;
        lock (_lock)
        {
            if (!_byId.TryGetValue(id, out lease) || lease.Instance != instance)
            {
                return -1;
            }

            _byRequest.Remove((lease.Instance, lease.Request));
            Forget(lease);
        }

        return EndAll(lease.Entries);
    }

    /// <summary>Releases one rank's share of a request's lease (that rank loaded its chunks).</summary>
    public int ReleaseRank(string instance, string request, KvNamespace rank)
    {
        List<LeaseId> toRelease = [];
        lock (_lock)
        {
            if (!_byRequest.TryGetValue((instance, request), out RequestLease? lease))
            {
                return 0;
            }

            for (int i = lease.Entries.Count - 1; i >= 0; i--)
            {
                if (lease.Entries[i].Rank.Equals(rank))
                {
                    toRelease.Add(lease.Entries[i].Lease);
                    lease.Entries.RemoveAt(i);
                }
            }

            if (lease.Entries.Count == 0)
            {
                _byRequest.Remove((instance, request));
                Forget(lease);
            }
        }

        return toRelease.Sum(tier.ReleaseLease);
    }

    /// <summary>Releases every rank's share of a request's lease.</summary>
    public int ReleaseRequest(string instance, string request)
    {
        RequestLease? lease;
        lock (_lock)
        {
            if (!_byRequest.Remove((instance, request), out lease))
            {
                return 0;
            }

            Forget(lease);
        }

        return EndAll(lease.Entries);
    }

    /// <summary>Ends every lease a closed connection took.</summary>
    public void ReleaseSession(long session)
    {
        lock (_lock)
        {
            if (_perSession.Remove(session))
            {
                foreach (var (key, lease) in _byRequest)
                {
                    if (lease.Session == session)
                    {
                        _byRequest.Remove(key);
                        _byId.Remove(lease.Id);
                    }
                }
            }
        }

        tier.ReleaseOwner(session);
    }

    /// <summary>Forgets records whose tier leases expired.</summary>
    public void Prune()
    {
        lock (_lock)
        {
            foreach (var (key, lease) in _byRequest)
            {
                lease.Entries.RemoveAll(e => !tier.IsLeaseActive(e.Lease));
                if (lease.Entries.Count == 0)
                {
                    _byRequest.Remove(key);
                    Forget(lease);
                }
            }
        }
    }

    /// <summary>Removes a lease's id and its count against its connection; the caller holds the lock and removed it from the request table.</summary>
    private void Forget(RequestLease lease)
    {
        _byId.Remove(lease.Id);
        if (_perSession.TryGetValue(lease.Session, out int n))
        {
            if (n <= 1)
            {
                _perSession.Remove(lease.Session);
            }
            else
            {
                _perSession[lease.Session] = n - 1;
            }
        }
    }

    private int EndAll(List<(KvNamespace Rank, LeaseId Lease)> entries) => entries.Sum(e => tier.ReleaseLease(e.Lease));

    /// <summary>One request's lease: a tier lease per rank that had hits.</summary>
    internal sealed class RequestLease(long session, string instance, string request)
    {
        public long Session { get; } = session;

        public string Instance { get; } = instance;

        public string Request { get; } = request;

        public ulong Id { get; set; }

        public List<(KvNamespace Rank, LeaseId Lease)> Entries { get; } = new(2);
    }
}
