using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text.RegularExpressions;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using Connector.Storage.Disk;
using Microsoft.Extensions.Logging.Abstractions;

namespace Connector.Benchmarks.Disk;

/// <summary>
/// The disk tier against <c>dd</c> on the same filesystem in the same run: sequential write and read throughput of 2 MiB and
/// 16 MiB chunks (O_DIRECT on both sides), and the time to reopen a tier of 100,000 chunks (from index files, and with the
/// newest segment scanned as after a crash). Run as <c>Connector.Benchmarks disk [--quick] [--json]</c>; the
/// directory is one under the system temp directory, deleted afterwards.
/// </summary>
public static partial class DiskTierBenchmark
{
    /// <summary>Measures; every throughput is in MiB/s of chunk payload, every time in milliseconds.</summary>
    public static IReadOnlyDictionary<string, double> Measure(string? directory = null, bool quick = false, bool dropCaches = false)
    {
        string root = directory ?? Path.Combine(Path.GetTempPath(), $"kvsidecar-disk-bench-{Environment.ProcessId}");
        Directory.CreateDirectory(root);
        var figures = new Dictionary<string, double>();
        try
        {
            foreach (int chunkMiB in (int[])[2, 16])
            {
                long totalBytes = (quick ? 256L : 512L) << 20;
                Throughput(root, chunkMiB << 20, (int)(totalBytes / (chunkMiB << 20)), quick ? 3 : 5, dropCaches, figures);
            }

            Recovery(root, quick ? 20_000 : 100_000, dropCaches, figures);
        }
        finally
        {
            if (directory is null)
            {
                Directory.Delete(root, recursive: true);
            }
        }

        return figures;
    }

    /// <summary>
    /// Rounds of dd write, tier write, dd read, tier read, back to back on the same filesystem; the figures are medians over
    /// the rounds, and each ratio is the median of the per-round ratios (this device's speed swings from round to round).
    /// </summary>
    private static void Throughput(string root, int chunkBytes, int count, int rounds, bool dropCaches, Dictionary<string, double> figures)
    {
        // Enough chunks to fill the default 256 MiB write queue once, so its buffers exist before the timed writes.
        int warmUp = (int)((256L << 20) / chunkBytes) + 8;
        string size = $"{chunkBytes >> 20}MiB";
        string ddFile = Path.Combine(root, "ddtest");
        string tierDir = Path.Combine(root, $"tier-{size}");
        var ddWrite = new List<double>();
        var ddRead = new List<double>();
        var tierWrite = new List<double>();
        var tierRead = new List<double>();
        var tierRead4 = new List<double>();
        var cpu = new Dictionary<string, List<double>> { ["dd_write"] = [], ["dd_read"] = [], ["disk_tier_write"] = [], ["disk_tier_read"] = [] };
        double gib = (double)count * chunkBytes / (1 << 30);
        bool direct = false;
        for (int round = 0; round < rounds; round++)
        {
            ddWrite.Add(Dd($"if=/dev/zero of={ddFile} bs={chunkBytes} count={count} oflag=direct", out TimeSpan ddCpu));
            cpu["dd_write"].Add(ddCpu.TotalMilliseconds / gib);
            if (Directory.Exists(tierDir))
            {
                Directory.Delete(tierDir, recursive: true);
            }

            using DiskTier tier = OpenTier(tierDir, Math.Max(4L << 30, 2L * (count + warmUp) * chunkBytes));
            direct = tier.DirectIo;
            byte[] payload = RandomNumberGenerator.GetBytes(chunkBytes);

            // Warm-up, not timed: the write queue's aligned buffers are allocated and first touched (page faults) once;
            // a running sidecar has them already.
            WriteAll(tier, Keys(warmUp, chunkBytes, (byte)(100 + round)), payload);

            TierKey[] keys = Keys(count, chunkBytes, (byte)round);
            TimeSpan cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
            long t0 = Stopwatch.GetTimestamp();
            WriteAll(tier, keys, payload);
            tierWrite.Add(MiBps((long)count * chunkBytes, Stopwatch.GetElapsedTime(t0)));
            cpu["disk_tier_write"].Add((Process.GetCurrentProcess().TotalProcessorTime - cpu0).TotalMilliseconds / gib);

            DropCaches(dropCaches);
            ddRead.Add(Dd($"if={ddFile} of=/dev/null bs={chunkBytes} iflag=direct", out ddCpu));
            cpu["dd_read"].Add(ddCpu.TotalMilliseconds / gib);
            File.Delete(ddFile);
            DropCaches(dropCaches);
            cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
            tierRead.Add(ReadAll(tier, keys, chunkBytes, readers: 1));
            cpu["disk_tier_read"].Add((Process.GetCurrentProcess().TotalProcessorTime - cpu0).TotalMilliseconds / gib);
            tierRead4.Add(ReadAll(tier, keys, chunkBytes, readers: 4));
        }

        Directory.Delete(tierDir, recursive: true);
        figures[$"dd_write_{size}_MiBps"] = Median(ddWrite);
        figures[$"disk_tier_write_{size}_MiBps"] = Median(tierWrite);
        figures[$"write_{size}_over_dd"] = Median([.. tierWrite.Select((t, i) => t / ddWrite[i])]);
        figures[$"dd_read_{size}_MiBps"] = Median(ddRead);
        figures[$"disk_tier_read_{size}_MiBps"] = Median(tierRead);
        figures[$"read_{size}_over_dd"] = Median([.. tierRead.Select((t, i) => t / ddRead[i])]);
        figures[$"disk_tier_read_{size}_4_readers_MiBps"] = Median(tierRead4);
        foreach (var (what, values) in cpu)
        {
            // Where the time goes, steadier than throughput on a shared device: CPU of dd, or of this whole process.
            figures[$"{what}_{size}_cpu_ms_per_GiB"] = Median(values);
        }

        figures["direct_io"] = direct ? 1 : 0;
    }

    private static double Median(List<double> values)
    {
        values.Sort();
        return values.Count % 2 == 1 ? values[values.Count / 2] : (values[(values.Count / 2) - 1] + values[values.Count / 2]) / 2;
    }

    /// <summary>Reads every chunk into aligned native memory (as into L1 slabs), <paramref name="readers"/> at a time; MiB/s.</summary>
    private static double ReadAll(DiskTier tier, TierKey[] keys, int chunkBytes, int readers)
    {
        var slabs = new nint[readers];
        for (int r = 0; r < readers; r++)
        {
            slabs[r] = AllocateSlab(chunkBytes);
        }

        try
        {
            long t0 = Stopwatch.GetTimestamp();
            Task[] tasks = [.. Enumerable.Range(0, readers).Select(r => Task.Run(async () =>
            {
                Memory<byte> slab = new NativeMemoryManager(slabs[r], chunkBytes).Memory;
                for (int i = r; i < keys.Length; i += readers)
                {
                    TierReadStatus status = await tier.ReadAsync(keys[i], slab, CancellationToken.None);
                    if (status != TierReadStatus.Hit)
                    {
                        throw new InvalidOperationException($"chunk {i}: {status}");
                    }
                }
            }))];
            Task.WaitAll(tasks);
            return MiBps((long)keys.Length * chunkBytes, Stopwatch.GetElapsedTime(t0));
        }
        finally
        {
            foreach (nint slab in slabs)
            {
                FreeSlab(slab);
            }
        }
    }

    private static unsafe nint AllocateSlab(int bytes) => (nint)NativeMemory.AlignedAlloc((nuint)bytes, 4096);

    private static unsafe void FreeSlab(nint slab) => NativeMemory.AlignedFree((void*)slab);

    private static void Recovery(string root, int chunks, bool dropCaches, Dictionary<string, double> figures)
    {
        // 1,000-chunk prompts of 64-byte chunks: one 4 KiB record each, the most records per byte the format allows.
        string dir = Path.Combine(root, "recovery");
        using (DiskTier tier = OpenTier(dir, 4L << 30))
        {
            WriteAll(tier, Keys(chunks, 64, 9, chainLength: 1_000), new byte[64]);
        }

        figures[$"recovery_{chunks / 1000}k_chunks_index_files_ms"] = Reopen(dir, chunks, dropCaches);
        File.Delete(Directory.GetFiles(dir, "seg-*.idx").Max()!); // as after a crash: the newest segment is unsealed
        figures[$"recovery_{chunks / 1000}k_chunks_newest_segment_scanned_ms"] = Reopen(dir, chunks, dropCaches);
        Directory.Delete(dir, recursive: true);
    }

    private static double Reopen(string dir, int expected, bool dropCaches)
    {
        DropCaches(dropCaches);
        long t0 = Stopwatch.GetTimestamp();
        using DiskTier tier = OpenTier(dir, 4L << 30);
        double ms = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        long recovered = tier.RecoveredChunks;
        if (recovered != expected)
        {
            throw new InvalidOperationException($"recovered {recovered} of {expected} chunks");
        }

        return ms;
    }

    /// <summary>A disk tier in <paramref name="dir"/> that writes every chunk at first sight, with the default segment and queue sizes.</summary>
    private static DiskTier OpenTier(string dir, long capacityBytes)
    {
        var tier = new DiskTier(new DiskTierOptions { Path = dir, CapacityBytes = capacityBytes, AdmitAfterSightings = 1 }, NullLogger.Instance);
        if (!tier.IsAvailable)
        {
            tier.Dispose();
            throw new InvalidOperationException($"the disk tier cannot use {dir}: {tier.UnavailableReason}");
        }

        return tier;
    }

    /// <summary>Offers every chunk (waiting out a full queue) and returns once all are written.</summary>
    private static void WriteAll(DiskTier tier, TierKey[] keys, byte[] payload)
    {
        long before = tier.GetStats().Writes;
        // Sleeping, not spinning, on a full queue: the queue holds 256 MiB, far more than a millisecond of writing, and the
        // CPU figures should be the tier's, not a spin loop's.
        foreach (TierKey key in keys)
        {
            while (tier.Offer(key, payload) == TierWriteStatus.QueueFull)
            {
                Thread.Sleep(1);
            }
        }

        // QueueDepth counts a write until it is on disk (or dropped).
        while (tier.GetStats().QueueDepth > 0)
        {
            Thread.Sleep(1);
        }

        long written = tier.GetStats().Writes - before;
        if (written != keys.Length)
        {
            throw new InvalidOperationException($"wrote {written} of {keys.Length} chunks");
        }
    }

    private static TierKey[] Keys(int count, long length, byte salt, int chainLength = 64)
    {
        var keys = new TierKey[count];
        Span<byte> seed = stackalloc byte[9];
        for (int i = 0; i < count; i++)
        {
            BitConverter.TryWriteBytes(seed, i);
            seed[8] = salt;
            var key = new ChunkKey(SHA256.HashData(seed));
            keys[i] = new TierKey(key, i % chainLength == 0 ? ChunkKey.None : keys[i - 1].Key, 1, length);
        }

        return keys;
    }

    /// <summary>Runs dd (under bash's <c>time</c>) and returns its throughput in MiB/s, from the byte count and seconds it reports, and its CPU time.</summary>
    private static double Dd(string arguments, out TimeSpan cpu)
    {
        var start = new ProcessStartInfo("bash", ["-c", $"TIMEFORMAT='cpu %U %S'; time dd {arguments}"]) { RedirectStandardError = true, RedirectStandardOutput = true };
        start.Environment["LC_ALL"] = "C"; // the report's number format
        using var dd = Process.Start(start)!;
        string report = dd.StandardError.ReadToEnd();
        dd.WaitForExit();
        Match m = DdReport().Match(report);
        Match c = CpuReport().Match(report);
        if (dd.ExitCode != 0 || !m.Success || !c.Success)
        {
            throw new InvalidOperationException($"dd {arguments} failed: {report}");
        }

        cpu = TimeSpan.FromSeconds(double.Parse(c.Groups[1].Value, CultureInfo.InvariantCulture) + double.Parse(c.Groups[2].Value, CultureInfo.InvariantCulture));
        double bytes = double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture);
        double seconds = double.Parse(m.Groups[2].Value, CultureInfo.InvariantCulture);
        return bytes / seconds / (1 << 20);
    }

    private static void DropCaches(bool drop)
    {
        if (drop)
        {
            try
            {
                File.WriteAllText("/proc/sys/vm/drop_caches", "3");
            }
            catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
            {
                // Not root: the figures are warm-cache ones.
            }
        }
    }

    private static double MiBps(long bytes, TimeSpan elapsed) => bytes / elapsed.TotalSeconds / (1 << 20);

    [GeneratedRegex(@"^(\d+) bytes .* copied, ([0-9.e+-]+) s", RegexOptions.Multiline)]
    private static partial Regex DdReport();

    [GeneratedRegex(@"^cpu ([0-9.]+) ([0-9.]+)$", RegexOptions.Multiline)]
    private static partial Regex CpuReport();
}
