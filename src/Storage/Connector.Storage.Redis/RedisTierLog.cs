using Microsoft.Extensions.Logging;

namespace Connector.Storage.Redis;

/// <summary>Log messages of the Redis tier. Per-operation failures go through a <see cref="LogGate"/> so a dead server logs a line per interval, not per chunk.</summary>
internal static partial class RedisTierLog
{
    [LoggerMessage(EventId = 1, EventName = "RedisTierStarting", Level = LogLevel.Information, Message = "Redis tier: connecting to {Endpoints} in the background (prefix {KeyPrefix}, TTL {Ttl}, pieces of {PieceBytes} bytes, {Compression}, budget {CapacityBytes} bytes)")]
    public static partial void Starting(ILogger logger, string endpoints, string keyPrefix, TimeSpan ttl, int pieceBytes, RedisCompression compression, long capacityBytes);

    [LoggerMessage(EventId = 2, EventName = "RedisConnected", Level = LogLevel.Information, Message = "Redis tier: connected ({Kind}, {Servers} servers)")]
    public static partial void Connected(ILogger logger, string kind, int servers);

    [LoggerMessage(EventId = 3, EventName = "RedisConnectFailed", Level = LogLevel.Warning, Message = "Redis tier: the first connection failed; chunks miss until it connects (retrying in the background)")]
    public static partial void ConnectFailed(ILogger logger, Exception exception);

    [LoggerMessage(EventId = 13, EventName = "RedisNotConnected", Level = LogLevel.Warning, Message = "Redis tier: not connected yet; chunks miss until it connects (retrying in the background)")]
    public static partial void NotConnected(ILogger logger);

    [LoggerMessage(EventId = 4, EventName = "RedisConnectionLost", Level = LogLevel.Warning, Message = "Redis tier: connection to {EndPoint} lost ({FailureType}); {Suppressed} more since the last line")]
    public static partial void ConnectionLost(ILogger logger, string endPoint, string failureType, long suppressed);

    [LoggerMessage(EventId = 5, EventName = "RedisConnectionRestored", Level = LogLevel.Information, Message = "Redis tier: connection to {EndPoint} restored")]
    public static partial void ConnectionRestored(ILogger logger, string endPoint);

    [LoggerMessage(EventId = 6, EventName = "RedisOperationFailed", Level = LogLevel.Warning, Message = "Redis tier: {Operation} failed ({Reason}); the chunk is a miss; {Suppressed} more failures since the last line")]
    public static partial void OperationFailed(ILogger logger, string operation, string reason, long suppressed);

    [LoggerMessage(EventId = 7, EventName = "RedisCorruptValue", Level = LogLevel.Warning, Message = "Redis tier: the value under {Key} failed verification ({Reason}); dropped; {Suppressed} more since the last line")]
    public static partial void CorruptValue(ILogger logger, string key, string reason, long suppressed);

    [LoggerMessage(EventId = 8, EventName = "RedisBreakerOpened", Level = LogLevel.Warning, Message = "Redis tier: circuit open after {Failures} consecutive failures; reads miss and writes are refused for {OpenDuration}")]
    public static partial void BreakerOpened(ILogger logger, int failures, TimeSpan openDuration);

    [LoggerMessage(EventId = 12, EventName = "RedisBreakerReopened", Level = LogLevel.Debug, Message = "Redis tier: the trial operation failed; circuit open again for {OpenDuration}")]
    public static partial void BreakerReopened(ILogger logger, TimeSpan openDuration);

    [LoggerMessage(EventId = 9, EventName = "RedisBreakerClosed", Level = LogLevel.Information, Message = "Redis tier: circuit closed, Redis answers again")]
    public static partial void BreakerClosed(ILogger logger);

    [LoggerMessage(EventId = 10, EventName = "RedisWriteDropped", Level = LogLevel.Warning, Message = "Redis tier: write queue full ({QueuedBytes} of {QueueBytes} bytes), chunk dropped; {Suppressed} more since the last line")]
    public static partial void WriteDropped(ILogger logger, long queuedBytes, long queueBytes, long suppressed);

    [LoggerMessage(EventId = 11, EventName = "RedisClearFailed", Level = LogLevel.Warning, Message = "Redis tier: CLEAR could not scan {EndPoint}")]
    public static partial void ClearFailed(ILogger logger, Exception exception, string endPoint);
}

/// <summary>Lets one log line of a kind through per interval and counts the ones it holds back.</summary>
/// <remarks>Thread-safe.</remarks>
internal sealed class LogGate(TimeSpan interval, TimeProvider time)
{
    private long _next = long.MinValue;
    private long _suppressed;

    /// <summary>Whether to log now; <paramref name="suppressed"/> is how many lines were held back since the last.</summary>
    public bool TryEnter(out long suppressed)
    {
        long now = time.GetTimestamp();
        long next = Interlocked.Read(ref _next);
        if (now >= next && Interlocked.CompareExchange(ref _next, now + (long)(interval.TotalSeconds * time.TimestampFrequency), next) == next)
        {
            suppressed = Interlocked.Exchange(ref _suppressed, 0);
            return true;
        }

        Interlocked.Increment(ref _suppressed);
        suppressed = 0;
        return false;
    }
}
