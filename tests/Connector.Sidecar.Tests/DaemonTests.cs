using System.Diagnostics;
using Connector.Client;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Connector.Testing;
using Xunit;

namespace Connector.Sidecar.Tests;

/// <summary>The daemon as an operator sees it: configuration checks, the socket's mode, the unit file, shutdown.</summary>
public sealed class DaemonTests
{
    [Fact]
    public void Start_SocketIsNotWorldWritable()
    {
        using var sidecar = SidecarProcess.Start();
        UnixFileMode mode = File.GetUnixFileMode(sidecar.SocketPath);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite, mode);
    }

    [Theory]
    [InlineData("--socket-mode", "0666", "world-writable")]
    [InlineData("--capacity-bytes", "12", "CapacityBytes")]
    [InlineData("--lease-ttl", "-00:00:05", "LeaseTtl")]
    [InlineData("--max-frame-bytes", "2147483647", "MaxFrameBytes")]
    [InlineData("--Sidecar:HelloTimeout", "00:00:00", "HelloTimeout")]
    [InlineData("--Sidecar:MinChunkBytes", "999999999999", "MinChunkBytes")]
    public void Start_InvalidOption_ExitsWithMessageNamingIt(string flag, string value, string expected)
    {
        string dir = Directory.CreateTempSubdirectory("kvsc-").FullName;
        (int code, string output) = SidecarProcess.RunToExit("--socket", Path.Combine(dir, "s.sock"), flag, value);
        Assert.NotEqual(0, code);
        Assert.Contains(expected, output, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("--help", "Usage: kvsidecar")]
    [InlineData("--version", "kvsidecar ")]
    public void HelpOrVersion_PrintsAndExitsWithoutListening(string flag, string expected)
    {
        string path = Path.Combine(Directory.CreateTempSubdirectory("kvsc-").FullName, "s.sock");
        (int code, string output) = SidecarProcess.RunToExit("--socket", path, flag);
        Assert.Equal(0, code);
        Assert.Contains(expected, output, StringComparison.Ordinal);
        Assert.DoesNotContain("READY", output, StringComparison.Ordinal);
        Assert.False(File.Exists(path), "--help must not start a daemon");
    }

    [Fact]
    public void Start_SocketPathTooLong_ExitsWithMessage()
    {
        (int code, string output) = SidecarProcess.RunToExit("--socket", "/tmp/" + new string('x', 200) + ".sock");
        Assert.NotEqual(0, code);
        Assert.Contains("longer than", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Start_StaleSocketFileOfKilledSidecar_IsReplaced()
    {
        string path = Path.Combine(Directory.CreateTempSubdirectory("kvsc-").FullName, "s.sock");
        using (var first = SidecarProcess.StartAt(path))
        {
            first.Kill();
        }

        Assert.True(File.Exists(path), "a killed sidecar leaves its socket file behind");
        using var second = SidecarProcess.StartAt(path);
        using var c = SidecarClient.Connect(path, "x");
        c.Call<PingMessage>(Opcode.Ping, null);
    }

    [Fact]
    public void Start_SocketInUseByLiveSidecar_RefusesToStart()
    {
        using var first = SidecarProcess.Start();
        (int code, string output) = SidecarProcess.RunToExit("--socket", first.SocketPath);
        Assert.NotEqual(0, code);
        Assert.Contains("already listening", output, StringComparison.Ordinal);
        using var c = SidecarClient.Connect(first.SocketPath, "x");
        c.Call<PingMessage>(Opcode.Ping, null);
    }

    [Fact]
    public void Sigterm_FinishesAndRemovesSocket()
    {
        var sidecar = SidecarProcess.Start();
        string path = sidecar.SocketPath;
        sidecar.Dispose();
        Assert.Equal(0, sidecar.ExitCode);
        Assert.False(File.Exists(path));
    }

    [Fact]
    public void UnitFile_PassesSystemdAnalyzeVerify()
    {
        string tool = "/usr/bin/systemd-analyze";
        Assert.SkipUnless(File.Exists(tool), "systemd-analyze is not installed here");
        string unit = Path.Combine(ProcessPaths.RepoRoot, "src", "Sidecar", "Connector.Sidecar", "packaging", "kvsidecar.service");
        string text = File.ReadAllText(unit);
        Assert.Contains("Type=notify", text, StringComparison.Ordinal);
        Assert.Contains("RuntimeDirectory=kvsidecar", text, StringComparison.Ordinal);
        Assert.Contains("LimitMEMLOCK=infinity", text, StringComparison.Ordinal);

        // verify needs ExecStart to exist: point it at a real executable in a temporary copy.
        string dir = Directory.CreateTempSubdirectory("kvsc-unit-").FullName;
        string copy = Path.Combine(dir, "kvsidecar.service");
        File.WriteAllText(copy, text.Replace("/opt/kvsidecar/kvsidecar", "/bin/true", StringComparison.Ordinal));
        var psi = new ProcessStartInfo(tool) { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add("verify");
        psi.ArgumentList.Add("--man=no");
        psi.ArgumentList.Add(copy);
        using Process p = Process.Start(psi)!;
        string output = p.StandardOutput.ReadToEnd() + p.StandardError.ReadToEnd();
        p.WaitForExit();
        // Containers without a running systemd still parse the unit; only unit problems fail the test.
        string[] problems = output.Split('\n')
            .Where(l => l.Contains("kvsidecar.service", StringComparison.Ordinal))
            .Where(l => !l.Contains("Failed to", StringComparison.Ordinal) || l.Contains("parse", StringComparison.OrdinalIgnoreCase))
            .ToArray();
        Assert.True(problems.Length == 0, "systemd-analyze verify reported:\n" + output);
    }
}
