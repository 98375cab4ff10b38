using Xunit;
using System.Diagnostics;
using System.Globalization;
using Connector.Core.Platform;
using Connector.Testing;

namespace Connector.Cuda.Tests;

/// <summary>A stand-in GPU engine (tests/cuda_double/exporter.py) that owns "device" memory of the driver double.</summary>
internal sealed class Exporter : IDisposable
{
    private readonly Process _process;

    public Exporter(string library)
    {
        string script = Path.Combine(ProcessPaths.RepoRoot, "tests", "cuda_double", "exporter.py");
        var psi = new ProcessStartInfo("/usr/bin/python3", [script, library]) { RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true };
        _process = Process.Start(psi)!;
        string ready = ReadLine();
        Assert.StartsWith("ready ", ready);
        Pid = int.Parse(ready[6..], CultureInfo.InvariantCulture);
    }

    public int Pid { get; }

    /// <summary>The exporter as the kernel would report it on a connection (pid pinned by a pidfd).</summary>
    public ProcessIdentity Identity() => new(Pid, 0, 0, ProcessIdentity.Open(Pid));

    public (ulong Pointer, byte[] Handle) Alloc(long bytes)
    {
        string[] parts = Ask($"alloc {bytes}").Split(' ');
        return (ulong.Parse(parts[0], CultureInfo.InvariantCulture), Convert.FromHexString(parts[1]));
    }

    public void Fill(ulong pointer, long offset, long length, int seed) => Assert.Equal("ok", Ask($"fill {pointer} {offset} {length} {seed}"));

    public string Hash(ulong pointer, long offset, long length) => Ask($"hash {pointer} {offset} {length}");

    public void Free(ulong pointer) => Assert.Equal("ok", Ask($"free {pointer}"));

    public byte[] CreateEvent() => Convert.FromHexString(Ask("event"));

    /// <summary>Queues a write that runs after <paramref name="delayUs"/> on the exporter's stream, then records its event.</summary>
    public void WriteAfter(int delayUs, ulong pointer, long offset, long length, int seed) => Assert.Equal("ok", Ask($"write_after {delayUs} {pointer} {offset} {length} {seed}"));

    public void Sync() => Assert.Equal("ok", Ask("sync"));

    public void Kill()
    {
        _process.Kill();
        _process.WaitForExit();
        RemoveSharedMemory();
    }

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            _process.Kill();
            _process.WaitForExit();
        }

        RemoveSharedMemory();
        _process.Dispose();
    }

    /// <summary>A killed process cannot unlink its "device memory" (POSIX shared memory of the double): do it for it.</summary>
    private void RemoveSharedMemory()
    {
        foreach (string pattern in new[] { $"fakecuda-{Pid}-*", $"fakecuda-ev-{Pid}-*" })
        {
            foreach (string file in Directory.EnumerateFiles("/dev/shm", pattern))
            {
                File.Delete(file);
            }
        }
    }

    private string Ask(string command)
    {
        _process.StandardInput.WriteLine(command);
        _process.StandardInput.Flush();
        string answer = ReadLine();
        Assert.False(answer.StartsWith("err", StringComparison.Ordinal), $"exporter: {command}: {answer}");
        return answer;
    }

    private string ReadLine()
    {
        Task<string?> line = _process.StandardOutput.ReadLineAsync();
        if (!line.Wait(TimeSpan.FromSeconds(20)) || line.Result is null)
        {
            throw new InvalidOperationException($"the exporter did not answer: {_process.StandardError.ReadToEnd()}");
        }

        return line.Result;
    }
}
