using Connector.Core.Platform;

namespace Connector.Core.Caching;

/// <summary>
/// When a copy must stop: the engine's absolute deadline (CLOCK_MONOTONIC nanoseconds) and the
/// cancellation of the connection that asked for it. Checked between batches of copy operations.
/// </summary>
/// <param name="DeadlineNs">The absolute CLOCK_MONOTONIC time after which nothing may be copied or committed.</param>
/// <param name="Cancellation">Cancelled when the requesting connection closes.</param>
public readonly record struct CopyDeadline(long DeadlineNs, CancellationToken Cancellation)
{
    /// <summary>No deadline and no cancellation (tests and tools).</summary>
    public static CopyDeadline None => new(long.MaxValue, CancellationToken.None);

    /// <summary>A deadline <paramref name="timeout"/> from now.</summary>
    public static CopyDeadline After(TimeSpan timeout, CancellationToken cancellation = default) =>
        new(MonotonicClock.NowNs + (long)Math.Min(timeout.TotalNanoseconds, long.MaxValue / 2), cancellation);

    /// <summary>Whether a batch that takes about <paramref name="marginNs"/> may still start now.</summary>
    public bool AllowsStart(long marginNs) => !Cancellation.IsCancellationRequested && MonotonicClock.NowNs + marginNs < DeadlineNs;

    /// <summary>Whether the deadline has passed or the requester is gone.</summary>
    public bool IsOver => Cancellation.IsCancellationRequested || MonotonicClock.NowNs >= DeadlineNs;
}
