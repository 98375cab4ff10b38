using Connector.Core.Keys;

namespace Connector.Core.Caching;

/// <summary>The live registrations, by instance and by connection.</summary>
internal sealed class RegistrationTable
{
    private readonly Lock _lock = new();
    private readonly List<EngineRegistration> _all = [];

    // Lookups ask for an instance's ranks on every call; the answer changes only on (un)registration.
    private readonly Dictionary<string, EngineRegistration[]> _ranksByInstance = [];

    public int Count
    {
        get
        {
            lock (_lock)
            {
                return _all.Count;
            }
        }
    }

    public void Add(EngineRegistration registration)
    {
        lock (_lock)
        {
            _all.Add(registration);
            _ranksByInstance.Clear();
        }
    }

    public bool Remove(EngineRegistration registration)
    {
        lock (_lock)
        {
            _ranksByInstance.Clear();
            return _all.Remove(registration);
        }
    }

    public EngineRegistration[] OfSession(long sessionId)
    {
        lock (_lock)
        {
            return _all.Where(r => r.SessionId == sessionId).ToArray();
        }
    }

    /// <summary>One registration per distinct namespace of the instance (the newest wins), ordered by rank.</summary>
    /// <remarks>Ranks that replicate the same KV (MLA) share a namespace and so count once.</remarks>
    public EngineRegistration[] RanksOf(string instanceId)
    {
        lock (_lock)
        {
            if (_ranksByInstance.TryGetValue(instanceId, out EngineRegistration[]? cached))
            {
                return cached;
            }

            var byNamespace = new Dictionary<KvNamespace, EngineRegistration>();
            foreach (EngineRegistration r in _all)
            {
                if (r.InstanceId == instanceId)
                {
                    byNamespace[r.BaseNamespace] = r;
                }
            }

            EngineRegistration[] ranks = byNamespace.Values.OrderBy(r => r.BaseNamespace.TpRank).ToArray();
            if (ranks.Length > 0)
            {
                // Only live instances are remembered: ids nobody registered must not grow the table.
                _ranksByInstance[instanceId] = ranks;
            }
            return ranks;
        }
    }
}
