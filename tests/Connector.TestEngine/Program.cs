using System.Globalization;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text.Json.Nodes;

namespace Connector.TestEngine;

/// <summary>
/// A stand-in for a CPU engine process: owns KV regions in its own memory, grants the sidecar access
/// (prctl PR_SET_PTRACER), prints them as one JSON line, then answers line commands on stdin:
/// <c>fill SEED</c>, <c>zero</c>, <c>hash REGION OFFSET LENGTH</c> (lowercase hex SHA-256),
/// <c>connect SOCKET_PATH</c> (connects to the sidecar and prints the descriptor), <c>exit</c>,
/// <c>open-host-memory PID ADDRESS LENGTH CORE_DLL</c> (see <see cref="OpenHostMemory"/>).
/// </summary>
internal static unsafe partial class Program
{
    private const int PrSetPtracer = 0x59616d61;
    private const ulong PrSetPtracerAny = ulong.MaxValue;

    /// <summary>Sockets connected for the test: kept open here so their descriptors stay valid to take over.</summary>
    private static readonly List<System.Net.Sockets.Socket> Sockets = [];

    public static int Main(string[] args)
    {
        int layers = Arg(args, "--layers", 2);
        int blocks = Arg(args, "--blocks", 16);
        int blockBytes = Arg(args, "--block-bytes", 4096);
        long regionBytes = (long)blocks * blockBytes;
        var regions = new byte*[layers];
        for (int i = 0; i < layers; i++)
        {
            regions[i] = (byte*)NativeMemory.AlignedAlloc((nuint)regionBytes, 4096);
            new Span<byte>(regions[i], checked((int)regionBytes)).Clear();
        }

        // Where Yama restricts ptrace, let any process of this user read us (the test's sidecar).
        // Without Yama, prctl returns EINVAL and nothing is needed.
        _ = prctl(PrSetPtracer, PrSetPtracerAny, 0, 0, 0);

        var entries = new string[layers];
        for (int i = 0; i < layers; i++)
        {
            entries[i] = string.Create(CultureInfo.InvariantCulture, $"{{\"address\":{(ulong)regions[i]},\"length\":{regionBytes}}}");
        }

        string list = string.Join(",", entries);
        Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{{\"pid\":{Environment.ProcessId},\"regions\":[{list}]}}"));
        Console.Out.Flush();

        string? line;
        while ((line = Console.In.ReadLine()) is not null)
        {
            string[] parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            try
            {
                switch (parts.FirstOrDefault())
                {
                    case "fill":
                        int seed = int.Parse(parts[1], CultureInfo.InvariantCulture);
                        for (int r = 0; r < layers; r++)
                        {
                            Fill(new Span<byte>(regions[r], checked((int)regionBytes)), seed, r);
                        }

                        Console.Out.WriteLine("ok");
                        break;
                    case "connect":
                        // Connects to the sidecar from this process, so the sidecar sees this process as the peer;
                        // the test takes the socket over with pidfd_getfd and speaks for this engine.
                        var socket = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
                        socket.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(parts[1]));
                        Sockets.Add(socket);
                        Console.Out.WriteLine(socket.SafeHandle.DangerousGetHandle().ToString(CultureInfo.InvariantCulture));
                        break;
                    case "zero":
                        for (int r = 0; r < layers; r++)
                        {
                            new Span<byte>(regions[r], checked((int)regionBytes)).Clear();
                        }

                        Console.Out.WriteLine("ok");
                        break;
                    case "hash":
                        int region = int.Parse(parts[1], CultureInfo.InvariantCulture);
                        long offset = long.Parse(parts[2], CultureInfo.InvariantCulture);
                        int length = int.Parse(parts[3], CultureInfo.InvariantCulture);
                        if ((uint)region >= (uint)layers || offset < 0 || length < 0 || offset + length > regionBytes)
                        {
                            Console.Out.WriteLine("error out of range");
                            break;
                        }

                        Console.Out.WriteLine(Convert.ToHexStringLower(SHA256.HashData(new ReadOnlySpan<byte>(regions[region] + offset, length))));
                        break;
                    case "open-host-memory":
                        Console.Out.WriteLine(OpenHostMemory(parts));
                        break;
                    case "exit":
                        return 0;
                    default:
                        Console.Out.WriteLine("error unknown command");
                        break;
                }
            }
            catch (Exception ex) when (ex is FormatException or IndexOutOfRangeException or OverflowException)
            {
                Console.Out.WriteLine("error " + ex.Message);
            }

            Console.Out.Flush();
        }

        return 0;
    }

    /// <summary>Byte o of region r becomes a mix of seed, r and o: every block of every region differs.</summary>
    private static void Fill(Span<byte> region, int seed, int r)
    {
        uint x = (uint)((seed * 0x9E3779B1) ^ (r * 0x85EBCA77));
        for (int o = 0; o < region.Length; o += 4)
        {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(region[o..], x + (uint)o);
        }
    }

    private static int Arg(string[] args, string name, int fallback)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? int.Parse(args[i + 1], CultureInfo.InvariantCulture) : fallback;
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial int prctl(int option, ulong arg2, ulong arg3, ulong arg4, ulong arg5);

    /// <summary>
    /// <c>open-host-memory PID ADDRESS LENGTH CORE_DLL</c>: opens LENGTH bytes at ADDRESS of process PID with
    /// Connector.Core's HostProcessMemoryProvider, loaded from CORE_DLL (this program does not reference it),
    /// in this process and so with this process's credentials: run under another uid, it is a sidecar that
    /// lacks permission. Answers <c>opened</c>, or the EngineMemoryException as
    /// <c>{"code":"AccessDenied","message":"..."}</c>.
    /// </summary>
    private static string OpenHostMemory(string[] parts)
    {
        int pid = int.Parse(parts[1], CultureInfo.InvariantCulture);
        ulong address = ulong.Parse(parts[2], CultureInfo.InvariantCulture);
        ulong length = ulong.Parse(parts[3], CultureInfo.InvariantCulture);
        Assembly core = Assembly.LoadFrom(string.Join(' ', parts[4..]));
        Type kind = core.GetType("Connector.Core.Memory.EngineMemoryKind", throwOnError: true)!;
        Type memoryRef = core.GetType("Connector.Core.Memory.EngineMemoryRef", throwOnError: true)!;
        object provider = Activator.CreateInstance(core.GetType("Connector.Core.Memory.HostProcessMemoryProvider", throwOnError: true)!)!;
        var regions = Array.CreateInstance(memoryRef, 1);
        regions.SetValue(Activator.CreateInstance(memoryRef, Enum.Parse(kind, "HostProcess"), pid, address, length, null, null, 0UL), 0);
        try
        {
            using var memory = (IDisposable)provider.GetType().GetMethod("Open")!.Invoke(provider, [regions, null, null])!;
            return "opened";
        }
        catch (TargetInvocationException ex) when (ex.InnerException?.GetType().Name == "EngineMemoryException")
        {
            Exception refusal = ex.InnerException;
            return new JsonObject
            {
                ["code"] = refusal.GetType().GetProperty("Code")!.GetValue(refusal)!.ToString(),
                ["message"] = refusal.Message,
            }.ToJsonString();
        }
    }
}
