using System.Net.Sockets;
using System.Runtime.InteropServices;
using Connector.Core.Platform;
using Microsoft.Win32.SafeHandles;

namespace Connector.Server;

/// <summary>Reads who is at the other end of a Unix socket: SO_PEERCRED, and SO_PEERPIDFD where the kernel has it.</summary>
internal static class PeerCredentials
{
    private const int SolSocket = 1;
    private const int SoPeerCred = 17;
    private const int SoPeerPidfd = 77;

    /// <summary>The connecting process as the kernel recorded it at connect(), pinned by a pidfd.</summary>
    /// <exception cref="SocketException">The socket has no peer credentials (not a Unix socket).</exception>
    public static ProcessIdentity Read(Socket socket)
    {
        Span<byte> cred = stackalloc byte[12];
        int n = socket.GetRawSocketOption(SolSocket, SoPeerCred, cred);
        if (n < 12)
        {
            throw new SocketException((int)SocketError.OperationNotSupported);
        }

        int pid = MemoryMarshal.Read<int>(cred);
        uint uid = MemoryMarshal.Read<uint>(cred[4..]);
        uint gid = MemoryMarshal.Read<uint>(cred[8..]);
        return new ProcessIdentity(pid, uid, gid, PeerPidfd(socket) ?? ProcessIdentity.Open(pid));
    }

    /// <summary>SO_PEERPIDFD (Linux 6.5+): a pidfd of the very process that connected, free of any pid-reuse race.</summary>
    private static SafeFileHandle? PeerPidfd(Socket socket)
    {
        Span<byte> fd = stackalloc byte[4];
        try
        {
            return socket.GetRawSocketOption(SolSocket, SoPeerPidfd, fd) == 4 && MemoryMarshal.Read<int>(fd) is int value and >= 0
                ? new SafeFileHandle(value, ownsHandle: true)
                : null;
        }
        catch (SocketException)
        {
            return null;
        }
    }
}
