using System.Runtime.InteropServices;

namespace Connector.Core.Platform;

/// <summary>
/// CLOCK_MONOTONIC in nanoseconds: the clock every process on the machine shares (Python's
/// <c>time.monotonic_ns()</c>), so an engine can send an absolute deadline the sidecar understands.
/// </summary>
public static partial class MonotonicClock
{
    private const int ClockMonotonic = 1;

    /// <summary>Now, in nanoseconds of CLOCK_MONOTONIC.</summary>
    public static long NowNs
    {
        get
        {
            Timespec ts;
            _ = clock_gettime(ClockMonotonic, out ts);
            return (ts.Seconds * 1_000_000_000L) + ts.Nanoseconds;
        }
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct Timespec
    {
        public long Seconds;
        public long Nanoseconds;
    }

    [LibraryImport("libc")]
    private static partial int clock_gettime(int clock, out Timespec ts);
}
