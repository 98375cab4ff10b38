using System.Runtime.InteropServices;
using Connector.Core.Platform;

namespace Connector.Core.Memory;

/// <summary>Opens host memory of an engine process for process_vm_readv/writev.</summary>
public sealed class HostProcessMemoryProvider : IEngineMemoryProvider
{
    /// <inheritdoc/>
    public EngineMemoryKind Kind => EngineMemoryKind.HostProcess;

    /// <inheritdoc/>
    public IEngineMemory Open(IReadOnlyList<EngineMemoryRef> regions, ProcessIdentity? owner = null, EngineSignals? signals = null)
    {
        ArgumentNullException.ThrowIfNull(regions);
        if (regions.Count == 0)
        {
            throw new EngineMemoryException(EngineMemoryError.OutOfRange, "no regions to open");
        }

        int pid = regions[0].Pid;
        foreach (EngineMemoryRef r in regions)
        {
            if (r.Kind != EngineMemoryKind.HostProcess)
            {
                throw new EngineMemoryException(EngineMemoryError.Unsupported, $"memory kind {r.Kind} is not host memory");
            }

            if (r.Pid != pid || pid <= 0)
            {
                throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"all regions of one registration must belong to one process (got pids {pid} and {r.Pid})");
            }

            if (r.Length == 0 || r.Length > long.MaxValue || r.Address == 0 || r.Address + r.Length < r.Address)
            {
                throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"region at 0x{r.Address:x} of {r.Length} bytes is not a valid address range");
            }
        }

        if (owner is not null && owner.Pid != pid)
        {
            throw new EngineMemoryException(EngineMemoryError.NotOwner, $"the regions belong to process {pid}, not to the registering process {owner.Pid}");
        }

        var memory = new HostProcessMemory(pid, regions.Select(r => (r.Address, (long)r.Length)).ToArray(), owner);
        memory.Probe();
        return memory;
    }
}

/// <summary>
/// An engine process's host memory, copied with process_vm_readv/process_vm_writev: up to 1024 pieces
/// per system call on each side, contiguous pieces merged, no managed allocation per call.
/// </summary>
/// <remarks>
/// With an owner pinned by a pidfd, a write starts only while the owner is alive and a read is kept only if
/// the owner is still alive after it, so a pid reused by another process after the engine exited is never
/// read or written (docs/security.md).
/// </remarks>
internal sealed unsafe partial class HostProcessMemory : IEngineMemory
{
    /// <summary>IOV_MAX on Linux: the most iovecs one process_vm_* call takes on each side.</summary>
    private const int MaxIov = 1024;

    private const int EPERM = 1;
    private const int ESRCH = 3;
    private const int EFAULT = 14;

    private readonly int _pid;
    private readonly (ulong Address, long Length)[] _regions;
    private readonly ProcessIdentity? _owner;

    internal HostProcessMemory(int pid, (ulong Address, long Length)[] regions, ProcessIdentity? owner = null)
    {
        _pid = pid;
        _regions = regions;
        _owner = owner;
    }

    public int RegionCount => _regions.Length;

    public long RegionLength(int region) => _regions[region].Length;

    public bool CopiesOnSubmit => true;

    public void Submit(CopyDirection direction, ReadOnlySpan<CopyOp> ops) => Copy(ops, write: direction == CopyDirection.HostToEngine);

    public ValueTask Completion(CopyDirection direction) => ValueTask.CompletedTask;

    public void Dispose()
    {
        // Nothing is mapped: process_vm_* needs no handle.
    }

    /// <summary>Reads the first and last byte of every region to fail at registration, not at the first copy.</summary>
    internal void Probe()
    {
        byte scratch;
        for (int i = 0; i < _regions.Length; i++)
        {
            foreach (long offset in new[] { 0L, _regions[i].Length - 1 })
            {
                var op = new CopyOp(i, offset, (nint)(&scratch), 1);
                Copy(new ReadOnlySpan<CopyOp>(in op), write: false);
            }
        }
    }

    private void Copy(ReadOnlySpan<CopyOp> ops, bool write)
    {
        Iovec* local = stackalloc Iovec[MaxIov];
        Iovec* remote = stackalloc Iovec[MaxIov];
        int nLocal = 0, nRemote = 0;
        long expected = 0;
        foreach (ref readonly CopyOp op in ops)
        {
            if ((uint)op.Region >= (uint)_regions.Length || op.RegionOffset < 0 || op.Length <= 0 || op.Length > _regions[op.Region].Length - op.RegionOffset)
            {
                throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"copy of {op.Length} bytes at offset {op.RegionOffset} of region {op.Region} is outside the registered memory");
            }

            ulong remoteAddress = _regions[op.Region].Address + (ulong)op.RegionOffset;
            bool mergeLocal = nLocal > 0 && (nint)local[nLocal - 1].Base + (nint)local[nLocal - 1].Length == op.Host;
            bool mergeRemote = nRemote > 0 && (ulong)remote[nRemote - 1].Base + remote[nRemote - 1].Length == remoteAddress;
            if ((!mergeLocal && nLocal == MaxIov) || (!mergeRemote && nRemote == MaxIov))
            {
                Transfer(local, nLocal, remote, nRemote, expected, write);
                nLocal = nRemote = 0;
                expected = 0;
                mergeLocal = mergeRemote = false;
            }

            if (mergeLocal)
            {
                local[nLocal - 1].Length += (nuint)op.Length;
            }
            else
            {
                local[nLocal++] = new Iovec { Base = (void*)op.Host, Length = (nuint)op.Length };
            }

            if (mergeRemote)
            {
                remote[nRemote - 1].Length += (nuint)op.Length;
            }
            else
            {
                remote[nRemote++] = new Iovec { Base = (void*)remoteAddress, Length = (nuint)op.Length };
            }

            expected += op.Length;
        }

        if (nLocal > 0)
        {
            Transfer(local, nLocal, remote, nRemote, expected, write);
        }
    }

    private void Transfer(Iovec* local, int nLocal, Iovec* remote, int nRemote, long expected, bool write)
    {
        if (write)
        {
            EnsureOwnerAlive();
        }

        nint done = write
            ? process_vm_writev(_pid, local, (nuint)nLocal, remote, (nuint)nRemote, 0)
            : process_vm_readv(_pid, local, (nuint)nLocal, remote, (nuint)nRemote, 0);
        if (done == expected)
        {
            if (!write)
            {
                // The pid named the owner for the whole read only if the owner still runs now.
                EnsureOwnerAlive();
            }

            return;
        }

        if (done >= 0)
        {
            throw new EngineMemoryException(EngineMemoryError.Fault, $"process {_pid}: only {done} of {expected} bytes could be {(write ? "written" : "read")}; part of its KV memory is no longer mapped");
        }

        int errno = Marshal.GetLastPInvokeError();
        throw errno switch
        {
            EPERM => new EngineMemoryException(EngineMemoryError.AccessDenied,
                $"the kernel refused access to the memory of process {_pid} (EPERM). Run the sidecar as the engine's user or grant it CAP_SYS_PTRACE; where Yama ptrace_scope is 1 the engine must also call prctl(PR_SET_PTRACER, <sidecar pid>) (the shim does this)."),
            ESRCH => new EngineMemoryException(EngineMemoryError.Fault, $"process {_pid} is gone"),
            EFAULT => new EngineMemoryException(EngineMemoryError.Fault, $"process {_pid}: the registered KV memory is not mapped (freed or never allocated)"),
            _ => new EngineMemoryException(EngineMemoryError.Fault, $"process {_pid}: process_vm_{(write ? "writev" : "readv")} failed with errno {errno}"),
        };
    }

    private void EnsureOwnerAlive()
    {
        if (_owner is not null && !_owner.IsAlive())
        {
            throw new EngineMemoryException(EngineMemoryError.Fault, $"process {_pid}, which registered this memory, has exited");
        }
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct Iovec
    {
        public void* Base;
        public nuint Length;
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial nint process_vm_readv(int pid, Iovec* localIov, nuint liovcnt, Iovec* remoteIov, nuint riovcnt, nuint flags);

    [LibraryImport("libc", SetLastError = true)]
    private static partial nint process_vm_writev(int pid, Iovec* localIov, nuint liovcnt, Iovec* remoteIov, nuint riovcnt, nuint flags);
}
