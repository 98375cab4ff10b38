using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace Connector.Storage.Redis.Tests.Infrastructure;

/// <summary>
/// A real redis-server the test starts itself: a free loopback port, a temporary directory, no persistence
/// (--save "" --appendonly no). It can be killed (SIGKILL), paused (SIGSTOP), resumed and restarted on the same port.
/// </summary>
internal sealed class RedisServerProcess : IDisposable
{
    private readonly string[] _arguments;
    private readonly StringBuilder _output = new();
    private Process? _process;

    private RedisServerProcess(int port, string directory, string[] arguments)
    {
        Port = port;
        Directory = directory;
        _arguments = arguments;
    }

    /// <summary>The redis-server on PATH, or null.</summary>
    public static string? ServerPath { get; } = FindOnPath("redis-server");

    /// <summary>The redis-cli on PATH, or null.</summary>
    public static string? CliPath { get; } = FindOnPath("redis-cli");

    /// <summary>Whether the tests that need a real server can run here.</summary>
    public static bool Available => ServerPath is not null && CliPath is not null;

    /// <summary>Why those tests are skipped when <see cref="Available"/> is false.</summary>
    public const string SkipReason = "redis-server or redis-cli is not on PATH (scripts/setup.sh installs them: apt-get install redis-server redis-tools)";

    public int Port { get; }

    public string Directory { get; }

    public string EndPoint => $"127.0.0.1:{Port}";

    public int Pid => _process?.Id ?? 0;

    public bool IsRunning => _process is { HasExited: false };

    /// <summary>Everything the server printed.</summary>
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

    /// <summary>Starts a server on a free port and waits until it answers PING.</summary>
    /// <param name="clusterBus">Whether port + 10000 (the cluster bus) must be free too.</param>
    /// <param name="extraArguments">More redis-server arguments ("--cluster-enabled", "yes", …).</param>
    public static RedisServerProcess Start(bool clusterBus = false, params string[] extraArguments)
    {
        string directory = System.IO.Directory.CreateTempSubdirectory("kvsc-redis-").FullName;
        for (int attempt = 0; ; attempt++)
        {
            int port = FreePort(clusterBus);
            string[] arguments =
            [
                "--port", port.ToString(System.Globalization.CultureInfo.InvariantCulture),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", directory,
                "--daemonize", "no",
                "--protected-mode", "no",
                "--loglevel", "warning",
                .. extraArguments,
            ];
            var server = new RedisServerProcess(port, directory, arguments);
            try
            {
                server.Launch();
                return server;
            }
            catch (InvalidOperationException) when (attempt < 3)
            {
                // The port was taken between the probe and the bind: try another.
                server.Kill();
            }
        }
    }

    /// <summary>Kills the server (SIGKILL) and waits for it to exit.</summary>
    public void Kill()
    {
        if (_process is { HasExited: false } p)
        {
            p.Kill();
            p.WaitForExit(10_000);
        }
    }

    /// <summary>Freezes the server (SIGSTOP): connections stay open, nothing is answered.</summary>
    public void Pause() => Signal("-STOP");

    /// <summary>Thaws a paused server (SIGCONT).</summary>
    public void Resume() => Signal("-CONT");

    /// <summary>Starts the server again on the same port and directory (empty: nothing was persisted).</summary>
    public void Restart()
    {
        Kill();
        Launch();
    }

    /// <summary>Runs redis-cli against this server and returns its output.</summary>
    public string Cli(params string[] arguments) => RunCli(["-h", "127.0.0.1", "-p", Port.ToString(System.Globalization.CultureInfo.InvariantCulture), .. arguments]);

    public void Dispose()
    {
        Resume();
        Kill();
        _process?.Dispose();
        try
        {
            System.IO.Directory.Delete(Directory, recursive: true);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    /// <summary>Runs redis-cli with <paramref name="arguments"/>; throws when it fails.</summary>
    public static string RunCli(params string[] arguments)
    {
        var start = new ProcessStartInfo(CliPath ?? "redis-cli") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in arguments)
        {
            start.ArgumentList.Add(a);
        }

        using Process p = Process.Start(start) ?? throw new InvalidOperationException("redis-cli did not start");
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(60_000))
        {
            p.Kill();
            throw new TimeoutException($"redis-cli {string.Join(' ', arguments)} did not finish within 60 s");
        }

        if (p.ExitCode != 0)
        {
            throw new InvalidOperationException($"redis-cli {string.Join(' ', arguments)} exited {p.ExitCode}: {stdout.Result}{stderr.Result}");
        }

        return stdout.Result;
    }

    private void Launch()
    {
        // setpriv --pdeathsig KILL execs redis-server (same pid) with a parent-death signal, so a test run that is
        // killed leaves no server behind. The signal follows the thread that forked, hence the one launcher thread.
        string? setpriv = FindOnPath("setpriv");
        var start = new ProcessStartInfo(setpriv ?? ServerPath ?? "redis-server") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        if (setpriv is not null)
        {
            start.ArgumentList.Add("--pdeathsig");
            start.ArgumentList.Add("KILL");
            start.ArgumentList.Add("--");
            start.ArgumentList.Add(ServerPath ?? "redis-server");
        }

        foreach (string a in _arguments)
        {
            start.ArgumentList.Add(a);
        }

        Process p = Launcher.Start(start);
        p.OutputDataReceived += (_, e) => Append(e.Data);
        p.ErrorDataReceived += (_, e) => Append(e.Data);
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        _process?.Dispose();
        _process = p;
        var deadline = Stopwatch.StartNew();
        while (!Ping())
        {
            if (p.HasExited || deadline.Elapsed > TimeSpan.FromSeconds(20))
            {
                throw new InvalidOperationException($"redis-server on port {Port} did not answer PING:\n{Output}");
            }

            Thread.Sleep(10);
        }
    }

    private bool Ping()
    {
        try
        {
            using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            socket.ReceiveTimeout = 1000;
            socket.Connect(IPAddress.Loopback, Port);
            socket.Send("PING\r\n"u8);
            Span<byte> reply = stackalloc byte[7];
            int n = socket.Receive(reply);
            return n >= 5 && reply[..5].SequenceEqual("+PONG"u8);
        }
        catch (SocketException)
        {
            return false;
        }
    }

    private void Signal(string signal)
    {
        if (_process is { HasExited: false } p)
        {
            using Process kill = Process.Start("kill", [signal, p.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
            kill.WaitForExit();
        }
    }

    private void Append(string? line)
    {
        if (line is null)
        {
            return;
        }

        lock (_output)
        {
            _output.AppendLine(line);
        }
    }

    /// <summary>Starts every server from one thread that lives as long as the test process (see <see cref="Launch"/>).</summary>
    private static class Launcher
    {
        private static readonly System.Collections.Concurrent.BlockingCollection<(ProcessStartInfo Start, TaskCompletionSource<Process> Started)> Requests = [];
        private static readonly Thread Thread = StartThread();

        public static Process Start(ProcessStartInfo start)
        {
            _ = Thread;
            var started = new TaskCompletionSource<Process>(TaskCreationOptions.RunContinuationsAsynchronously);
            Requests.Add((start, started));
            return started.Task.GetAwaiter().GetResult();
        }

        private static Thread StartThread()
        {
            var thread = new Thread(() =>
            {
                foreach ((ProcessStartInfo start, TaskCompletionSource<Process> started) in Requests.GetConsumingEnumerable())
                {
                    try
                    {
                        started.SetResult(Process.Start(start) ?? throw new InvalidOperationException($"{start.FileName} did not start"));
                    }
                    catch (Exception ex) when (ex is InvalidOperationException or System.ComponentModel.Win32Exception)
                    {
                        started.SetException(ex);
                    }
                }
            })
            { IsBackground = true, Name = "redis-server launcher" };
            thread.Start();
            return thread;
        }
    }

    private static int FreePort(bool clusterBus)
    {
        for (int attempt = 0; attempt < 100; attempt++)
        {
            using var listener = new TcpListener(IPAddress.Loopback, 0);
            listener.Start();
            int port = ((IPEndPoint)listener.LocalEndpoint).Port;
            listener.Stop();
            if (!clusterBus)
            {
                return port;
            }

            if (port + 10000 > 65535)
            {
                continue;
            }

            try
            {
                using var bus = new TcpListener(IPAddress.Loopback, port + 10000);
                bus.Start();
                bus.Stop();
                return port;
            }
            catch (SocketException)
            {
            }
        }

        throw new InvalidOperationException("no free port pair for a cluster node");
    }

    private static string? FindOnPath(string name)
    {
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            string candidate = Path.Combine(dir, name);
            if (File.Exists(candidate))
            {
                return candidate;
            }
        }

        return null;
    }
}
