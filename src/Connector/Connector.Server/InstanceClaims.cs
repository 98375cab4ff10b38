namespace Connector.Server;

/// <summary>
/// Which user owns each engine instance id: the uid of the first connection that named it in HELLO, for as
/// long as any connection of that instance is open. Another uid naming it is refused, so no user can take
/// over (or zero the lookups of) another user's engine. Connections of the same uid share an instance: its
/// scheduler and workers, which the kernel already lets read each other's memory.
/// </summary>
/// <remarks>Thread-safe.</remarks>
internal sealed class InstanceClaims
{
    private readonly Lock _lock = new();
    private readonly Dictionary<string, (uint Uid, int Connections)> _claims = [];

    /// <summary>Instance ids claimed now.</summary>
    public int Count
    {
        get
        {
            lock (_lock)
            {
                return _claims.Count;
            }
        }
    }

    /// <summary>Joins <paramref name="uid"/> to an instance, claiming it if nobody holds it.</summary>
    /// <param name="instanceId">The instance id from HELLO.</param>
    /// <param name="uid">The connecting process's uid.</param>
    /// <param name="owner">The uid that holds the instance when the claim is refused.</param>
    /// <returns>False when another uid holds the instance.</returns>
    public bool TryJoin(string instanceId, uint uid, out uint owner)
    {
        lock (_lock)
        {
            if (_claims.TryGetValue(instanceId, out var claim))
            {
                owner = claim.Uid;
                if (claim.Uid != uid)
                {
                    return false;
                }

                _claims[instanceId] = (uid, claim.Connections + 1);
                return true;
            }

            owner = uid;
            _claims[instanceId] = (uid, 1);
            return true;
        }
    }

    /// <summary>A connection of the instance closed; the last one frees the id.</summary>
    public void Leave(string instanceId)
    {
        lock (_lock)
        {
            if (_claims.TryGetValue(instanceId, out var claim))
            {
                if (claim.Connections <= 1)
                {
                    _claims.Remove(instanceId);
                }
                else
                {
                    _claims[instanceId] = (claim.Uid, claim.Connections - 1);
                }
            }
        }
    }
}
