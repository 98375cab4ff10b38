using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using Connector.Core.Memory;
using Xunit;

namespace Connector.Core.Tests.Memory;

public sealed unsafe class HostProcessMemoryTests
{
    // Bits of CapEff in /proc/PID/status.
    private const int CapSetgid = 6;
    private const int CapSetuid = 7;
    private const int CapSysPtrace = 19;

    private static EngineMemoryRef Ref(int pid, nint address, long length) =>
        new(EngineMemoryKind.HostProcess, pid, (ulong)address, (ulong)length, null, null, 0);

    [Fact]
    public void ReadWrite_ManyPiecesBeyondIovMax_RoundTrip()
    {
        const int Pieces = 3000;
        byte* engine = (byte*)NativeMemory.Alloc(Pieces * 64);
        byte* host = (byte*)NativeMemory.AllocZeroed(Pieces * 64);
        try
        {
            new Random(1).NextBytes(new Span<byte>(engine, Pieces * 64));
            using IEngineMemory memory = new HostProcessMemoryProvider().Open([Ref(Environment.ProcessId, (nint)engine, Pieces * 64)]);

            // Every other piece, reversed: nothing merges, so several system calls are needed.
            var ops = Enumerable.Range(0, Pieces / 2).Select(i => new CopyOp(0, (Pieces - 2 - (2 * i)) * 64L, (nint)(host + (i * 64)), 48)).ToArray();
            memory.Read(ops);
            for (int i = 0; i < ops.Length; i++)
            {
                Assert.True(new Span<byte>(engine + ops[i].RegionOffset, 48).SequenceEqual(new Span<byte>(host + (i * 64), 48)));
            }

            new Span<byte>(engine, Pieces * 64).Clear();
            memory.Write(ops);
            for (int i = 0; i < ops.Length; i++)
            {
                Assert.True(new Span<byte>(engine + ops[i].RegionOffset, 48).SequenceEqual(new Span<byte>(host + (i * 64), 48)));
            }
        }
        finally
        {
            NativeMemory.Free(engine);
            NativeMemory.Free(host);
        }
    }

    [Theory]
    [InlineData(1, 0, 8)]
    [InlineData(0, -1, 8)]
    [InlineData(0, 4090, 8)]
    [InlineData(0, 0, 0)]
    [InlineData(0, 0, long.MaxValue)]
    public void Read_OpOutsideRegion_OutOfRangeBeforeAnySyscall(int region, long offset, long length)
    {
        byte* engine = (byte*)NativeMemory.Alloc(4096);
        byte* host = (byte*)NativeMemory.Alloc(4096);
        try
        {
            using IEngineMemory memory = new HostProcessMemoryProvider().Open([Ref(Environment.ProcessId, (nint)engine, 4096)]);
            var ex = Assert.Throws<EngineMemoryException>(() => memory.Read([new CopyOp(region, offset, (nint)host, length)]));
            Assert.Equal(EngineMemoryError.OutOfRange, ex.Code);
        }
        finally
        {
            NativeMemory.Free(engine);
            NativeMemory.Free(host);
        }
    }

    [Fact]
    public void Open_ProcessGone_Fault()
    {
        using Process p = Process.Start(new ProcessStartInfo("/bin/true") { UseShellExecute = false })!;
        p.WaitForExit();
        int deadPid = p.Id;
        var ex = Assert.Throws<EngineMemoryException>(() => new HostProcessMemoryProvider().Open([Ref(deadPid, 0x10000, 4096)]));
        Assert.Equal(EngineMemoryError.Fault, ex.Code);
    }

    [Fact]
    public void Open_UnmappedAddress_FaultSaysNotMapped()
    {
        var ex = Assert.Throws<EngineMemoryException>(() => new HostProcessMemoryProvider().Open([Ref(Environment.ProcessId, 0x1000, 4096)]));
        Assert.Equal(EngineMemoryError.Fault, ex.Code);
        Assert.Contains("not mapped", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Open_RegionsOfTwoProcessesOrWrappingRange_Rejected()
    {
        var provider = new HostProcessMemoryProvider();
        Assert.Equal(EngineMemoryError.OutOfRange, Assert.Throws<EngineMemoryException>(() => provider.Open([Ref(10, 0x1000, 1), Ref(11, 0x1000, 1)])).Code);
        Assert.Equal(EngineMemoryError.OutOfRange, Assert.Throws<EngineMemoryException>(() => provider.Open([new EngineMemoryRef(EngineMemoryKind.HostProcess, 10, ulong.MaxValue - 10, 100, null, null, 0)])).Code);
        Assert.Equal(EngineMemoryError.Unsupported, Assert.Throws<EngineMemoryException>(() => provider.Open([new EngineMemoryRef(EngineMemoryKind.CudaIpc, 10, 0, 100, new byte[64], "GPU-0", 0)])).Code);
    }

    [Fact]
    public void Open_ReaderUnderAnotherUidWithoutPtraceCapability_AccessDeniedNamingTheFix()
    {
        if (StatusIds("self", "Uid")[1] != 0)
        {
            // Not root: nothing can be started under another uid, but this process is itself a reader without
            // permission for another user's process (pid 1 on most machines).
            int[]? init = TryStatusIds("1", "Uid");
            Assert.SkipWhen(init is null || init[0] == StatusIds("self", "Uid")[1] || HasCapability(CapSysPtrace), "not root, so no reader can be started under another uid, and pid 1 is not another user's process this one may not read");
            var ex = Assert.Throws<EngineMemoryException>(() => new HostProcessMemoryProvider().Open([Ref(1, 0x10000, 4096)]));
            AssertAccessDenied(ex.Code.ToString(), ex.Message, 1);
            return;
        }

        // Root has CAP_SYS_PTRACE: the reader must be another process, started as nobody (uid 65534) without
        // capabilities, opening this (root's) process's memory with HostProcessMemory.
        string[]? asNobody = Which("setpriv") is { } setpriv ? [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
            : Which("runuser") is { } runuser ? [runuser, "-u", "nobody", "--"]
            : null;
        Assert.SkipWhen(asNobody is null, "running as root and neither setpriv nor runuser exists: no reader under another uid can be started");
        Assert.SkipWhen(!HasCapability(CapSetuid) || !HasCapability(CapSetgid), "root without CAP_SETUID and CAP_SETGID cannot change uid");

        string dir = ReadableCopy(TestEngineDll(), typeof(HostProcessMemoryProvider).Assembly.Location);
        string coreDll = Path.Combine(dir, Path.GetFileName(typeof(HostProcessMemoryProvider).Assembly.Location));
        byte* target = (byte*)NativeMemory.AllocZeroed(4096);
        try
        {
            var psi = new ProcessStartInfo(asNobody![0])
            {
                RedirectStandardInput = true,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
                WorkingDirectory = dir,
            };
            foreach (string a in asNobody[1..].Concat([Which("dotnet") ?? "dotnet", Path.Combine(dir, "Connector.TestEngine.dll"), "--layers", "1", "--blocks", "1"]))
            {
                psi.ArgumentList.Add(a);
            }

            psi.Environment["HOME"] = dir;
            psi.Environment["DOTNET_EnableDiagnostics"] = "0";
            using Process reader = Process.Start(psi)!;
            using var watchdog = new CancellationTokenSource(TimeSpan.FromSeconds(60));
            using CancellationTokenRegistration kill = watchdog.Token.Register(() => Kill(reader));
            try
            {
                using JsonDocument engine = JsonDocument.Parse(Answer(reader));
                int readerPid = engine.RootElement.GetProperty("pid").GetInt32();
                JsonElement own = engine.RootElement.GetProperty("regions")[0];
                Assert.NotEqual(0, StatusIds(readerPid.ToString(CultureInfo.InvariantCulture), "Uid")[1]);
                Assert.Equal(0UL, ulong.Parse(StatusField(readerPid.ToString(CultureInfo.InvariantCulture), "CapEff"), NumberStyles.HexNumber, CultureInfo.InvariantCulture));

                // The reader works (it may open its own memory)...
                Assert.Equal("opened", Ask(reader, $"open-host-memory {readerPid} {own.GetProperty("address").GetUInt64()} {own.GetProperty("length").GetUInt64()} {coreDll}"));

                // ...but the kernel refuses it root's memory: EPERM from process_vm_readv.
                using JsonDocument refusal = JsonDocument.Parse(Ask(reader, $"open-host-memory {Environment.ProcessId} {(ulong)target} 4096 {coreDll}"));
                AssertAccessDenied(refusal.RootElement.GetProperty("code").GetString(), refusal.RootElement.GetProperty("message").GetString()!, Environment.ProcessId);
            }
            finally
            {
                try
                {
                    reader.StandardInput.WriteLine("exit");
                    reader.StandardInput.Flush();
                }
                catch (IOException)
                {
                    // Already gone.
                }

                if (!reader.WaitForExit(TimeSpan.FromSeconds(10)))
                {
                    Kill(reader);
                }
            }
        }
        finally
        {
            NativeMemory.Free(target);
            Directory.Delete(dir, recursive: true);
        }
    }

    private static void AssertAccessDenied(string? code, string message, int pid)
    {
        Assert.Equal(nameof(EngineMemoryError.AccessDenied), code);
        Assert.Contains($"process {pid}", message, StringComparison.Ordinal);
        Assert.Contains("EPERM", message, StringComparison.Ordinal);
        Assert.Contains("CAP_SYS_PTRACE", message, StringComparison.Ordinal);
        Assert.Contains("PR_SET_PTRACER", message, StringComparison.Ordinal);
    }

    private static string StatusField(string pid, string name) =>
        File.ReadLines($"/proc/{pid}/status").First(l => l.StartsWith(name + ":", StringComparison.Ordinal))[(name.Length + 1)..].Trim();

    /// <summary>Real, effective, saved and filesystem ids ("Uid" or "Gid") of a process.</summary>
    private static int[] StatusIds(string pid, string name) =>
        StatusField(pid, name).Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Select(v => int.Parse(v, CultureInfo.InvariantCulture)).ToArray();

    private static int[]? TryStatusIds(string pid, string name)
    {
        try
        {
            return StatusIds(pid, name);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or InvalidOperationException)
        {
            return null;
        }
    }

    private static bool HasCapability(int capability) =>
        ((ulong.Parse(StatusField("self", "CapEff"), NumberStyles.HexNumber, CultureInfo.InvariantCulture) >> capability) & 1) != 0;

    private static string? Which(string program) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Select(d => Path.Combine(d, program))
            .FirstOrDefault(File.Exists);

    /// <summary>The built test engine, whose <c>open-host-memory</c> command runs HostProcessMemory in its own process.</summary>
    private static string TestEngineDll()
    {
#if DEBUG
        const string Configuration = "Debug";
#else
        const string Configuration = "Release";
#endif
        for (DirectoryInfo? d = new(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            if (File.Exists(Path.Combine(d.FullName, "Connector.sln")))
            {
                string dll = Path.Combine(d.FullName, "tests", "Connector.TestEngine", "bin", Configuration, "net10.0", "Connector.TestEngine.dll");
                return File.Exists(dll) ? dll : throw new FileNotFoundException($"{dll} is missing: build the solution first (dotnet build Connector.sln -c {Configuration}).", dll);
            }
        }

        throw new DirectoryNotFoundException("Connector.sln not found above " + AppContext.BaseDirectory);
    }

    /// <summary>
    /// The test engine and Connector.Core copied into a new directory every user may read, so that the reader
    /// under uid 65534 can load them wherever the checkout is (e.g. under /root).
    /// </summary>
    private static string ReadableCopy(string testEngineDll, string coreDll)
    {
        DirectoryInfo dir = Directory.CreateTempSubdirectory("kvsidecar-eperm-");
        File.SetUnixFileMode(dir.FullName, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute | UnixFileMode.GroupRead | UnixFileMode.GroupExecute | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
        string engineDir = Path.GetDirectoryName(testEngineDll)!;
        string name = Path.GetFileNameWithoutExtension(testEngineDll);
        foreach (string file in new[] { name + ".dll", name + ".runtimeconfig.json", name + ".deps.json" }.Select(f => Path.Combine(engineDir, f)).Append(coreDll))
        {
            string copy = Path.Combine(dir.FullName, Path.GetFileName(file));
            File.Copy(file, copy);
            File.SetUnixFileMode(copy, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        }

        return dir.FullName;
    }

    private static string Ask(Process reader, string command)
    {
        reader.StandardInput.WriteLine(command);
        reader.StandardInput.Flush();
        return Answer(reader);
    }

    private static string Answer(Process reader) =>
        reader.StandardOutput.ReadLine() ?? throw new InvalidOperationException("the reader under uid 65534 exited (or hung and was killed): " + reader.StandardError.ReadToEnd());

    private static void Kill(Process process)
    {
        try
        {
            process.Kill(entireProcessTree: true);
        }
        catch (InvalidOperationException)
        {
            // Already exited.
        }
    }
}
