using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text.Json;
using Connector.Client;

namespace Connector.Testing;

/// <summary>A second process that owns a KV pool in its own memory, as a CPU engine would (Connector.TestEngine).</summary>
public sealed partial class TestEngineProcess : IDisposable
{
    private readonly Process _process;

    private TestEngineProcess(Process process, int pid, (ulong Address, ulong Length)[] regions)
    {
        _process = process;
        Pid = pid;
        Regions = regions;
    }

    public int Pid { get; }

    public (ulong Address, ulong Length)[] Regions { get; }

    public static TestEngineProcess Start(int layers, int blocks, int blockBytes)
    {
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        psi.ArgumentList.Add(ProcessPaths.TestEngineDll);
        foreach (string a in new[] { "--layers", layers.ToString(CultureInfo.InvariantCulture), "--blocks", blocks.ToString(CultureInfo.InvariantCulture), "--block-bytes", blockBytes.ToString(CultureInfo.InvariantCulture) })
        {
            psi.ArgumentList.Add(a);
        }

        Process p = Process.Start(psi) ?? throw new InvalidOperationException("could not start the test engine");
        string line = p.StandardOutput.ReadLine() ?? throw new InvalidOperationException("test engine exited: " + p.StandardError.ReadToEnd());
        using JsonDocument doc = JsonDocument.Parse(line);
        int pid = doc.RootElement.GetProperty("pid").GetInt32();
        var regions = doc.RootElement.GetProperty("regions").EnumerateArray()
            .Select(r => (r.GetProperty("address").GetUInt64(), r.GetProperty("length").GetUInt64()))
            .ToArray();
        return new TestEngineProcess(p, pid, regions);
    }

    /// <summary>Sends one command line and returns its one-line answer.</summary>
    public string Command(string command)
    {
        _process.StandardInput.WriteLine(command);
        _process.StandardInput.Flush();
        string answer = _process.StandardOutput.ReadLine() ?? throw new InvalidOperationException("test engine exited");
        return answer.StartsWith("error", StringComparison.Ordinal) ? throw new InvalidOperationException(answer) : answer;
    }

    /// <summary>
    /// A client of the sidecar whose connection the engine process made: the sidecar binds it to the engine
    /// (its pid and uid), so it may register the engine's memory. The test speaks on it through a copy of the
    /// engine's socket descriptor (pidfd_getfd).
    /// </summary>
    public SidecarClient Connect(string socketPath, string instanceId, string role = "worker", int rank = 0, bool multiplexed = true) =>
        SidecarClient.Adopt(TakeSocket(socketPath), instanceId, role, rank, multiplexed);

    /// <summary>A socket the engine process connected to <paramref name="socketPath"/>, duplicated into this process.</summary>
    public Socket TakeSocket(string socketPath)
    {
        int remoteFd = int.Parse(Command($"connect {socketPath}"), CultureInfo.InvariantCulture);
        int pidfd = (int)syscall(SysPidfdOpen, Pid, 0, 0);
        if (pidfd < 0)
        {
            throw new InvalidOperationException($"pidfd_open({Pid}) failed: errno {Marshal.GetLastPInvokeError()}");
        }

        try
        {
            int fd = (int)syscall(SysPidfdGetfd, pidfd, remoteFd, 0);
            return fd < 0
                ? throw new InvalidOperationException($"pidfd_getfd failed: errno {Marshal.GetLastPInvokeError()}")
                : new Socket(new SafeSocketHandle(fd, ownsHandle: true));
        }
        finally
        {
            _ = close(pidfd);
        }
    }

    /// <summary>SHA-256 (hex) of bytes of one region, computed inside the engine process.</summary>
    public string Hash(int region, long offset, long length) =>
        Command(string.Create(CultureInfo.InvariantCulture, $"hash {region} {offset} {length}"));

    /// <summary>Kills the engine and waits until it is gone.</summary>
    public void Kill()
    {
        _process.Kill(entireProcessTree: true);
        _process.WaitForExit(TimeSpan.FromSeconds(10));
    }

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            try
            {
                _process.StandardInput.WriteLine("exit");
                _process.StandardInput.Flush();
            }
            catch (IOException)
            {
                // Already exiting.
            }

            if (!_process.WaitForExit(TimeSpan.FromSeconds(5)))
            {
                _process.Kill(entireProcessTree: true);
            }
        }

        _process.Dispose();
    }

    private const long SysPidfdOpen = 434;
    private const long SysPidfdGetfd = 438;

    [LibraryImport("libc", SetLastError = true)]
    private static partial long syscall(long number, int a, int b, int c);

    [LibraryImport("libc")]
    private static partial int close(int fd);
}
