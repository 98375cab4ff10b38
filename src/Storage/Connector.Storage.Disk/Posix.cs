using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Connector.Storage.Disk;

/// <summary>The few libc calls the disk tier needs that .NET does not expose: open with O_DIRECT, vectored positional writes, flock, fdatasync.</summary>
/// <remarks>Every call returns -1 and sets errno on failure (read with <see cref="Marshal.GetLastPInvokeError"/>).</remarks>
internal static unsafe partial class Posix
{
    public const int ORdOnly = 0;
    public const int ORdWr = 2;
    public const int OCreat = 0x40;
    public const int OTrunc = 0x200;
    public const int OCloExec = 0x80000;

    public const int EIntr = 4;
    public const int EIo = 5;
    public const int EAgain = 11;
    public const int EAcces = 13;
    public const int ENotDir = 20;
    public const int EInval = 22;
    public const int ENoSpc = 28;
    public const int ERoFs = 30;
    public const int EDQuot = 122;

    public const int LockExclusive = 2;
    public const int LockNonBlocking = 4;

    /// <summary>The most iovecs one <see cref="PWriteV"/> takes (IOV_MAX on Linux).</summary>
    public const int MaxIoVecs = 1024;

    /// <summary>O_DIRECT: 040000 on x86-64, 0200000 on ARM (where 040000 is O_DIRECTORY).</summary>
    public static readonly int ODirect = RuntimeInformation.ProcessArchitecture is Architecture.Arm64 or Architecture.Arm ? 0x10000 : 0x4000;

    [StructLayout(LayoutKind.Sequential)]
    public struct IoVec
    {
        public void* Base;
        public nuint Length;
    }

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Open(string path, int flags, int mode);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "pwritev", SetLastError = true)]
    public static partial nint PWriteV(SafeFileHandle fd, IoVec* iov, int count, long offset);

    [LibraryImport("libc", EntryPoint = "pread", SetLastError = true)]
    public static partial nint PRead(SafeFileHandle fd, byte* buffer, nuint count, long offset);

    [LibraryImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    public static partial int FDataSync(SafeFileHandle fd);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    public static partial int FSync(int fd);

    [LibraryImport("libc", EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int FTruncate(SafeFileHandle fd, long length);

    [LibraryImport("libc", EntryPoint = "flock", SetLastError = true)]
    public static partial int FLock(SafeFileHandle fd, int operation);

    [LibraryImport("libc", EntryPoint = "statvfs", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int StatVfs(string path, byte* buffer);

    /// <summary>Bytes an unprivileged writer may still put on the filesystem holding <paramref name="path"/> (statvfs f_bavail × f_frsize).</summary>
    public static bool TryGetAvailableBytes(string path, out long available)
    {
        // struct statvfs on LP64 glibc: f_bsize, f_frsize, f_blocks, f_bfree, f_bavail, ... each 8 bytes; 112 bytes in all.
        byte* buffer = stackalloc byte[256];
        if (StatVfs(path, buffer) != 0)
        {
            available = 0;
            return false;
        }

        ulong fragmentSize = *(ulong*)(buffer + 8);
        ulong availableBlocks = *(ulong*)(buffer + 32);
        available = (long)Math.Min(fragmentSize * availableBlocks, long.MaxValue);
        return true;
    }

    /// <summary>The text of an errno ("No space left on device").</summary>
    public static string Describe(int errno) => Marshal.GetPInvokeErrorMessage(errno);

    /// <summary>Whether <paramref name="errno"/> means the filesystem has no room (ENOSPC, EDQUOT).</summary>
    public static bool IsNoSpace(int errno) => errno is ENoSpc or EDQuot;

    /// <summary>Opens <paramref name="path"/> and wraps the descriptor; returns null and the errno on failure.</summary>
    public static SafeFileHandle? TryOpen(string path, int flags, out int errno)
    {
        int fd;
        do
        {
            fd = Open(path, flags | OCloExec, 0x1A4 /* 0644 */);
            errno = fd < 0 ? Marshal.GetLastPInvokeError() : 0;
        }
        while (fd < 0 && errno == EIntr);

        return fd < 0 ? null : new SafeFileHandle(fd, ownsHandle: true);
    }

    /// <summary>Flushes a directory's entries (a rename or unlink in it) to the device; best effort.</summary>
    public static void SyncDirectory(string path)
    {
        int fd = Open(path, ORdOnly | OCloExec, 0);
        if (fd >= 0)
        {
            _ = FSync(fd);
            _ = Close(fd);
        }
    }
}
