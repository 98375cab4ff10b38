using System.Diagnostics;
using System.Globalization;
using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace Connector.Storage.Disk.Tests;

/// <summary>kill -9 of a process in the middle of writing: every acknowledged chunk survives intact, nothing damaged is served.</summary>
public sealed class DiskTierCrashTests : IDisposable
{
    private const int ChunkBytes = 64 << 10;
    private const int MaxChunks = 20_000;

    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    [Theory]
    [InlineData(50, 1 << 20)] // 1 MiB segments (15 records): the kill lands among seals and index-file writes
    [InlineData(400, 1 << 20)]
    [InlineData(300, 64 << 20)] // one 64 MiB segment: every acknowledged chunk is in the unsealed tail, found by the scan
    public async Task Reopen_WriterKilledMidStream_EveryAcknowledgedChunkIntact(int killAfterAcks, int segmentBytes)
    {
        string directory = _dir.Sub("tier");
        int lastAck = await RunWriterAndKillAsync(directory, killAfterAcks, segmentBytes);
        Assert.True(lastAck + 1 >= killAfterAcks, $"only {lastAck + 1} acknowledgements before the kill");

        TierKey[] keys = TestChunks.Chain(DiskWriterChild.ChainId, MaxChunks, ChunkBytes);
        using var tier = new DiskTier(DiskWriterChild.Options(directory, segmentBytes), NullLogger.Instance);
        Assert.True(tier.IsAvailable, tier.UnavailableReason);
        Assert.True(tier.RecoveredChunks >= lastAck + 1, $"{tier.RecoveredChunks} recovered, {lastAck + 1} acknowledged");
        Assert.True(tier.CountPresentPrefix(keys) >= lastAck + 1);
        for (int i = 0; i <= lastAck; i++)
        {
            (TierReadStatus status, bool exact) = await TestChunks.ReadAsync(tier, keys[i]);
            Assert.True(status == TierReadStatus.Hit && exact, $"acknowledged chunk {i}: {status}");
        }

        // Chunks written after the last acknowledgement we saw may or may not be there; whatever is served must be exact.
        for (int i = lastAck + 1; i < Math.Min(MaxChunks, lastAck + 1 + 2_000); i++)
        {
            (TierReadStatus status, bool exact) = await TestChunks.ReadAsync(tier, keys[i]);
            Assert.True(status != TierReadStatus.Hit || exact, $"chunk {i} served with other bytes");
            Assert.NotEqual(TierReadStatus.Error, status);
        }

        TestContext.Current.TestOutputHelper?.WriteLine(
            $"killed after ACK {lastAck}; recovered {tier.RecoveredChunks} chunks in {tier.RecoveryTime.TotalMilliseconds:0.0} ms, skipped {tier.SkippedRecords}, rebuilt {tier.RebuiltIndexFiles} index files, direct I/O {tier.DirectIo}");
    }

    /// <summary>Starts this test executable as the writer child, reads its acknowledgements, SIGKILLs it; returns the last one.</summary>
    private static async Task<int> RunWriterAndKillAsync(string directory, int killAfterAcks, int segmentBytes)
    {
        string dll = typeof(DiskWriterChild).Assembly.Location;
        var start = new ProcessStartInfo(DotnetHost())
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string arg in (string[])["exec", dll, DiskWriterChild.Flag, directory, ChunkBytes.ToString(CultureInfo.InvariantCulture), MaxChunks.ToString(CultureInfo.InvariantCulture), segmentBytes.ToString(CultureInfo.InvariantCulture)])
        {
            start.ArgumentList.Add(arg);
        }

        using var child = Process.Start(start)!;
        Task<string> stderr = child.StandardError.ReadToEndAsync();
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
        timeout.CancelAfter(TimeSpan.FromSeconds(120));
        int lastAck = -1;
        var transcript = new List<string>();
        try
        {
            while (await child.StandardOutput.ReadLineAsync(timeout.Token) is { } line)
            {
                if (line.StartsWith("ACK ", StringComparison.Ordinal))
                {
                    int ack = int.Parse(line.AsSpan(4), CultureInfo.InvariantCulture);
                    Assert.Equal(lastAck + 1, ack);
                    lastAck = ack;
                    if (lastAck + 1 >= killAfterAcks)
                    {
                        child.Kill(); // SIGKILL on Linux: no finalizers, no Dispose, no seal
                        break;
                    }
                }
                else
                {
                    transcript.Add(line);
                    Assert.False(line.StartsWith("UNAVAILABLE", StringComparison.Ordinal) || line.StartsWith("FAILED", StringComparison.Ordinal), line);
                }
            }
        }
        finally
        {
            if (!child.HasExited)
            {
                child.Kill();
            }

            await child.WaitForExitAsync(CancellationToken.None);
        }

        Assert.True(lastAck + 1 >= killAfterAcks, $"the writer stopped early: {string.Join(" | ", transcript)} {await stderr}");
        return lastAck;
    }

    private static string DotnetHost()
    {
        string? host = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH");
        if (!string.IsNullOrEmpty(host) && File.Exists(host))
        {
            return host;
        }

        string? self = Environment.ProcessPath;
        return self is not null && Path.GetFileNameWithoutExtension(self) == "dotnet" ? self : "dotnet";
    }
}
