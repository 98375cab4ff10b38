using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Connector.Core.Platform;

/// <summary>
/// The process at the other end of a connection, as the kernel reported it (SO_PEERCRED), pinned with a
/// pidfd so that "is it still the same process" can be asked without racing pid reuse.
/// </summary>
/// <remarks>
/// Thread-safe. Owns the pidfd; <see cref="Dispose"/> closes it. A process without a pidfd (kernel before 5.3,
/// or a test identity) answers <see cref="IsAlive"/> from /proc, which cannot tell a reused pid apart.
/// </remarks>
public sealed partial class ProcessIdentity : IDisposable
{
    private const short PollIn = 0x001;

    private readonly SafeFileHandle? _pidfd;

    /// <summary>Creates an identity; takes ownership of <paramref name="pidfd"/>.</summary>
    /// <param name="pid">The process id in the sidecar's pid namespace.</param>
    /// <param name="uid">The effective uid of the process when it connected.</param>
    /// <param name="gid">The effective gid of the process when it connected.</param>
    /// <param name="pidfd">A pidfd of the process, or null when none could be opened.</param>
    public ProcessIdentity(int pid, uint uid, uint gid, SafeFileHandle? pidfd)
    {
        Pid = pid;
        Uid = uid;
        Gid = gid;
        _pidfd = pidfd;
    }

    /// <summary>The process id (the thread-group id) in the sidecar's pid namespace.</summary>
    public int Pid { get; }

    /// <summary>The effective uid the process connected with.</summary>
    public uint Uid { get; }

    /// <summary>The effective gid the process connected with.</summary>
    public uint Gid { get; }

    /// <summary>The identity of the sidecar's own process (for in-process tests and tools).</summary>
    public static ProcessIdentity Current() => new(Environment.ProcessId, geteuid(), getegid(), Open(Environment.ProcessId));

    /// <summary>Opens a pidfd of <paramref name="pid"/>, or returns null where the kernel has no pidfd_open.</summary>
    public static SafeFileHandle? Open(int pid)
    {
        int fd = (int)syscall(SysPidfdOpen, pid, 0);
        return fd >= 0 ? new SafeFileHandle(fd, ownsHandle: true) : null;
    }

    /// <summary>Whether the process still runs: a pidfd becomes readable when its process exits.</summary>
    public bool IsAlive()
    {
        if (_pidfd is null || _pidfd.IsInvalid)
        {
            return Directory.Exists($"/proc/{Pid}");
        }

        bool added = false;
        try
        {
            _pidfd.DangerousAddRef(ref added);
            var p = new PollFd { Fd = (int)_pidfd.DangerousGetHandle(), Events = PollIn };
            int n = poll(ref p, 1, 0);
            return n == 0;
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
        finally
        {
            if (added)
            {
                _pidfd.DangerousRelease();
            }
        }
    }

    /// <summary>Whether this process may administer the sidecar: root, or the sidecar's own uid.</summary>
    public bool IsAdministrator => Uid == 0 || Uid == geteuid();

    /// <inheritdoc/>
    public void Dispose() => _pidfd?.Dispose();

    /// <inheritdoc/>
    public override string ToString() => $"pid {Pid} uid {Uid} gid {Gid}";

    private const long SysPidfdOpen = 434;

    [StructLayout(LayoutKind.Sequential)]
    private struct PollFd
    {
        public int Fd;
        public short Events;
        public short Revents;
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial int poll(ref PollFd fds, nuint nfds, int timeout);

    [LibraryImport("libc", SetLastError = true)]
    private static partial long syscall(long number, int pid, uint flags);

    [LibraryImport("libc")]
    private static partial uint geteuid();

    [LibraryImport("libc")]
    private static partial uint getegid();
}
