using System.Globalization;
using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging.Abstractions;

namespace Connector.Storage.Disk.Tests;

/// <summary>
/// The writer process of the crash test (<c>--disk-writer DIR CHUNK_BYTES COUNT SEGMENT_BYTES</c>): offers one long chain of
/// chunks, at most <see cref="Window"/> ahead of the last acknowledged one, and prints <c>ACK i</c> once chunk i is
/// acknowledged (visible to CountPresentPrefix, so counted in Writes). The test kills it with SIGKILL mid-stream and checks
/// that every acknowledged chunk survived.
/// </summary>
internal static class DiskWriterChild
{
    public const string Flag = "--disk-writer";

    /// <summary>The chain the child writes (the test rebuilds the same keys and bytes).</summary>
    public const int ChainId = 4242;

    /// <summary>Chunks in flight past the last acknowledgement: writes keep going while the acknowledgements stay close behind.</summary>
    public const int Window = 8;

    public static DiskTierOptions Options(string directory, long segmentBytes) => new()
    {
        Path = directory,
        SegmentBytes = segmentBytes,
        CapacityBytes = 4L << 30,
        WriteQueueBytes = 4 << 20,
        AdmitAfterSightings = 1,
    };

    public static int Run(string[] args)
    {
        string directory = args[1];
        int chunkBytes = int.Parse(args[2], CultureInfo.InvariantCulture);
        int count = int.Parse(args[3], CultureInfo.InvariantCulture);
        long segmentBytes = long.Parse(args[4], CultureInfo.InvariantCulture);
        using var tier = new DiskTier(Options(directory, segmentBytes), NullLogger.Instance);
        if (!tier.IsAvailable)
        {
            Console.WriteLine($"UNAVAILABLE {tier.UnavailableReason}");
            return 3;
        }

        Console.WriteLine($"READY direct={tier.DirectIo}");
        TierKey[] keys = TestChunks.Chain(ChainId, count, chunkBytes);
        byte[] data = new byte[chunkBytes];
        int acknowledged = 0;
        void Report()
        {
            while (acknowledged < count && tier.CountPresentPrefix(keys.AsSpan(acknowledged, 1)) == 1)
            {
                Console.WriteLine($"ACK {acknowledged}");
                acknowledged++;
            }
        }

        for (int i = 0; i < count; i++)
        {
            while (i - acknowledged >= Window)
            {
                Report();
                Thread.Yield();
            }

            TestChunks.Fill(keys[i].Key, data);
            while (true)
            {
                TierWriteStatus status = tier.Offer(keys[i], data);
                if (status is TierWriteStatus.Accepted or TierWriteStatus.AlreadyPresent)
                {
                    break;
                }

                if (status != TierWriteStatus.QueueFull)
                {
                    Console.WriteLine($"FAILED {status}");
                    return 4;
                }

                Report();
                Thread.Sleep(1);
            }

            Report();
        }

        tier.FlushAsync().GetAwaiter().GetResult();
        Report();
        Console.WriteLine("DONE");
        return 0;
    }
}
