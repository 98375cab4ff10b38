using System.Diagnostics;
using System.Runtime.InteropServices;
using Connector.Core.Memory;
using Xunit;

namespace Connector.Core.Tests.Memory;

public sealed unsafe class HostProcessMemoryTests
{
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
    public void Open_OtherUsersProcessWithoutPermission_AccessDenied()
    {
        Assert.SkipWhen(Environment.UserName == "root", "running as root (CAP_SYS_PTRACE): the kernel grants access to every process, so a refusal cannot be provoked here");
        var ex = Assert.Throws<EngineMemoryException>(() => new HostProcessMemoryProvider().Open([Ref(1, 0x10000, 4096)]));
        Assert.Equal(EngineMemoryError.AccessDenied, ex.Code);
        Assert.Contains("PR_SET_PTRACER", ex.Message, StringComparison.Ordinal);
    }
}
