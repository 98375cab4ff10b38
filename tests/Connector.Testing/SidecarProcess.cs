using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Connector.Testing;

/// <summary>A real kvsidecar process on a private socket, stopped (SIGTERM) on dispose.</summary>
public sealed class SidecarProcess : IDisposable
{
    private readonly Process _process;
    private readonly System.Text.StringBuilder _output = new();
    private readonly string _directory;

    private SidecarProcess(Process process, string directory, string socketPath)
    {
        _process = process;
        _directory = directory;
        SocketPath = socketPath;
    }

    public string SocketPath { get; }

    public int Pid => _process.Id;

    public bool HasExited => ExitCode is not null || _process.HasExited;

    /// <summary>The exit code, once the process was stopped by <see cref="Dispose"/>.</summary>
    public int? ExitCode { get; private set; }

    /// <summary>Everything the sidecar wrote so far (stdout and stderr).</summary>
    public string Output
    {
        get
        {
            lock (_output)
            {
                return _output.ToString();
            }
        }
    }

    /// <summary>Starts a sidecar and waits for its READY line.</summary>
    public static SidecarProcess Start(long capacityBytes = 256L << 20, params string[] extraArgs) => StartAt(null, capacityBytes, extraArgs);

    /// <summary>Starts a sidecar on a given socket path (null: a fresh temporary one) and waits for its READY line.</summary>
    public static SidecarProcess StartAt(string? socketPath, long capacityBytes = 256L << 20, params string[] extraArgs)
    {
        string dir = Directory.CreateTempSubdirectory("kvsc-").FullName;
        string socket = socketPath ?? Path.Combine(dir, "s.sock");
        Process p = Run(capacityBytes, socket, extraArgs);
        var sidecar = new SidecarProcess(p, dir, socket);
        var ready = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is null)
            {
                ready.TrySetException(new InvalidOperationException("sidecar exited before READY:\n" + sidecar.Output));
                return;
            }

            sidecar.Append(e.Data);
            if (e.Data.StartsWith("READY ", StringComparison.Ordinal))
            {
                ready.TrySetResult();
            }
        };
        p.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null)
            {
                sidecar.Append(e.Data);
            }
        };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        if (!ready.Task.Wait(TimeSpan.FromSeconds(30)))
        {
            sidecar.Dispose();
            throw new TimeoutException("sidecar did not print READY within 30 s:\n" + sidecar.Output);
        }

        return sidecar;
    }

    /// <summary>Runs the sidecar with the given arguments to completion (for start-up validation tests).</summary>
    public static (int ExitCode, string Output) RunToExit(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(ProcessPaths.SidecarDll);
        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }

        using Process p = Process.Start(psi)!;
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(30)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException("the sidecar did not exit");
        }

        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    /// <summary>Kills the process at once (SIGKILL), as a crash would.</summary>
    public void Kill() => _process.Kill(entireProcessTree: true);

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            // SIGTERM: the host drains and exits.
            _ = NativeMethods.Kill(_process.Id, NativeMethods.SigTerm);
        }

        if (!_process.WaitForExit(TimeSpan.FromSeconds(20)))
        {
            _process.Kill(entireProcessTree: true);
            _process.WaitForExit();
        }

        ExitCode ??= _process.ExitCode;
        _process.Dispose();
        try
        {
            Directory.Delete(_directory, recursive: true);
        }
        catch (IOException)
        {
            // Best effort.
        }
    }

    private static Process Run(long capacityBytes, string socket, string[] extraArgs)
    {
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        psi.ArgumentList.Add(ProcessPaths.SidecarDll);
        psi.ArgumentList.Add("--socket");
        psi.ArgumentList.Add(socket);
        psi.ArgumentList.Add("--capacity-bytes");
        psi.ArgumentList.Add(capacityBytes.ToString(System.Globalization.CultureInfo.InvariantCulture));
        psi.ArgumentList.Add("--extent-bytes");
        psi.ArgumentList.Add(Math.Min(capacityBytes, 64L << 20).ToString(System.Globalization.CultureInfo.InvariantCulture));
        foreach (string a in extraArgs)
        {
            psi.ArgumentList.Add(a);
        }

        return Process.Start(psi) ?? throw new InvalidOperationException("could not start dotnet");
    }

    private void Append(string line)
    {
        lock (_output)
        {
            _output.AppendLine(line);
        }
    }
}

internal static partial class NativeMethods
{
    public const int SigTerm = 15;

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    public static partial int Kill(int pid, int signal);
}
