using Microsoft.Extensions.Logging;

namespace Connector.Server;

/// <summary>Log messages of the socket server and its connections.</summary>
internal static partial class SidecarLog
{
    [LoggerMessage(EventId = 1, EventName = "Listening", Level = LogLevel.Information, Message = "kvsidecar listening on {SocketPath} (mode {Mode}), L1 capacity {CapacityBytes} bytes")]
    public static partial void Listening(ILogger logger, string socketPath, string mode, long capacityBytes);

    [LoggerMessage(EventId = 2, EventName = "ConnectionOpened", Level = LogLevel.Debug, Message = "Connection {SessionId} opened")]
    public static partial void ConnectionOpened(ILogger logger, long sessionId);

    [LoggerMessage(EventId = 3, EventName = "ConnectionClosed", Level = LogLevel.Information, Message = "Connection {SessionId} ({Role} of {InstanceId}, rank {Rank}) closed")]
    public static partial void ConnectionClosed(ILogger logger, long sessionId, string role, string instanceId, int rank);

    [LoggerMessage(EventId = 4, EventName = "ProtocolError", Level = LogLevel.Warning, Message = "Connection {SessionId}: {Code} on request {RequestId}: {Detail}")]
    public static partial void ProtocolError(ILogger logger, long sessionId, string code, ulong requestId, string detail);

    [LoggerMessage(EventId = 5, EventName = "StreamUnusable", Level = LogLevel.Warning, Message = "Connection {SessionId}: closing, the byte stream cannot be parsed ({Code})")]
    public static partial void StreamUnusable(ILogger logger, long sessionId, string code);

    [LoggerMessage(EventId = 6, EventName = "HandlerFailed", Level = LogLevel.Error, Message = "Connection {SessionId}: request {RequestId} ({Opcode}) failed")]
    public static partial void HandlerFailed(ILogger logger, Exception exception, long sessionId, ulong requestId, string opcode);

    [LoggerMessage(EventId = 7, EventName = "Registered", Level = LogLevel.Information, Message = "Connection {SessionId}: {InstanceId} rank {Rank} registered {Layers} layers of {ModelId}, chunk {ChunkBytes} bytes, layout {Fingerprint} (process {Pid}, uid {Uid})")]
    public static partial void Registered(ILogger logger, long sessionId, string instanceId, int rank, int layers, string modelId, long chunkBytes, string fingerprint, int pid, uint uid);

    [LoggerMessage(EventId = 8, EventName = "TooManyConnections", Level = LogLevel.Warning, Message = "Refused a connection: {Max} connections already open")]
    public static partial void TooManyConnections(ILogger logger, int max);

    [LoggerMessage(EventId = 9, EventName = "Draining", Level = LogLevel.Information, Message = "Stopping: waiting for {InFlight} in-flight copies")]
    public static partial void Draining(ILogger logger, int inFlight);

    [LoggerMessage(EventId = 10, EventName = "StaleSocket", Level = LogLevel.Information, Message = "Removed a stale socket file at {SocketPath}")]
    public static partial void StaleSocket(ILogger logger, string socketPath);

    [LoggerMessage(EventId = 11, EventName = "AcceptFailed", Level = LogLevel.Error, Message = "Accepting a connection failed")]
    public static partial void AcceptFailed(ILogger logger, Exception exception);

    [LoggerMessage(EventId = 12, EventName = "ConnectionDropped", Level = LogLevel.Warning, Message = "Connection {SessionId} ({Peer}): dropped, {Reason}")]
    public static partial void ConnectionDropped(ILogger logger, long sessionId, string peer, string reason);

    [LoggerMessage(EventId = 14, EventName = "WarmupFailed", Level = LogLevel.Warning, Message = "The start-up warm-up of the copy path failed; the first requests compile it instead")]
    public static partial void WarmupFailed(ILogger logger, Exception exception);

    [LoggerMessage(EventId = 13, EventName = "ConnectionFailed", Level = LogLevel.Error, Message = "Connection {SessionId} ({Peer}) failed and was closed; the sidecar serves on")]
    public static partial void ConnectionFailed(ILogger logger, Exception exception, long sessionId, string peer);

    [LoggerMessage(EventId = 20, EventName = "GpuDataPlane", Level = LogLevel.Information, Message = "GPU data plane: {Description}")]
    public static partial void GpuDataPlane(ILogger logger, string description);

    [LoggerMessage(EventId = 21, EventName = "GpuWarning", Level = LogLevel.Warning, Message = "GPU data plane: {Detail}")]
    public static partial void GpuWarning(ILogger logger, string detail);
}
