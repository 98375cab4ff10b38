namespace Connector.Benchmarks.Socket;

/// <summary>Latency percentiles of a sample, in microseconds.</summary>
internal static class Percentiles
{
    public static double Of(double[] sortedMicros, double p) =>
        sortedMicros.Length == 0 ? double.NaN : sortedMicros[Math.Min(sortedMicros.Length - 1, (int)(p / 100.0 * sortedMicros.Length))];

    public static double[] Sorted(long[] ticks)
    {
        double[] us = ticks.Select(t => t * 1_000_000.0 / System.Diagnostics.Stopwatch.Frequency).ToArray();
        Array.Sort(us);
        return us;
    }
}
