namespace Connector.Sidecar.Server;

/// <summary>Counters of the socket layer, reported by STATS next to the cache's own.</summary>
internal sealed class ServerCounters
{
    private long _protocolErrors;
    private long _connections;

    /// <summary>Frames answered with an error or streams closed as unparsable.</summary>
    public long ProtocolErrors => Interlocked.Read(ref _protocolErrors);

    /// <summary>Connections open now.</summary>
    public long Connections => Interlocked.Read(ref _connections);

    public void ProtocolError() => Interlocked.Increment(ref _protocolErrors);

    public void Opened() => Interlocked.Increment(ref _connections);

    public void Closed() => Interlocked.Decrement(ref _connections);
}
