using Connector.Protocol.Framing;

namespace Connector.Server;

/// <summary>Counters of the socket layer, reported by STATS next to the cache's own.</summary>
internal sealed class ServerCounters
{
    private long _protocolErrors;
    private long _connections;
    private long _permissionDenied;
    private long _limitsExceeded;
    private long _droppedConnections;

    /// <summary>Frames answered with an error or streams closed as unparsable.</summary>
    public long ProtocolErrors => Interlocked.Read(ref _protocolErrors);

    /// <summary>Connections open now.</summary>
    public long Connections => Interlocked.Read(ref _connections);

    /// <summary>Requests refused with <see cref="ErrorCode.PermissionDenied"/>.</summary>
    public long PermissionDenied => Interlocked.Read(ref _permissionDenied);

    /// <summary>Requests refused with <see cref="ErrorCode.LimitExceeded"/>.</summary>
    public long LimitsExceeded => Interlocked.Read(ref _limitsExceeded);

    /// <summary>Connections the sidecar closed or refused: no HELLO in time, a client that stopped reading, a failed connection, over MaxConnections.</summary>
    public long DroppedConnections => Interlocked.Read(ref _droppedConnections);

    /// <summary>Counts an error reply under its code.</summary>
    public void ProtocolError(ErrorCode code)
    {
        Interlocked.Increment(ref _protocolErrors);
        if (code == ErrorCode.PermissionDenied)
        {
            Interlocked.Increment(ref _permissionDenied);
        }
        else if (code == ErrorCode.LimitExceeded)
        {
            Interlocked.Increment(ref _limitsExceeded);
        }
    }

    public void Dropped() => Interlocked.Increment(ref _droppedConnections);

    public void Opened() => Interlocked.Increment(ref _connections);

    public void Closed() => Interlocked.Decrement(ref _connections);
}
