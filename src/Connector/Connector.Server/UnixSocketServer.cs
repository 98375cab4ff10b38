using System.Collections.Concurrent;
using System.Net.Sockets;
using Connector.Core.Caching;
using Connector.Core.Memory;
using Connector.Core.Platform;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace Connector.Server;

/// <summary>
/// Listens on the Unix socket, runs one <see cref="SidecarConnection"/> per engine connection, expires
/// leases, and drains in-flight copies on shutdown.
/// </summary>
/// <remarks>
/// The socket is bound in <see cref="StartAsync"/>, so systemd's READY=1 (sent after every hosted
/// service has started) means the socket accepts connections.
/// </remarks>
internal sealed class UnixSocketServer(
    KvCacheService cache,
    CopyThreads copyThreads,
    ServerCounters counters,
    IOptions<SidecarOptions> options,
    TimeProvider time,
    ILoggerFactory loggerFactory) : IHostedService, IAsyncDisposable
{
    private readonly InstanceClaims _claims = new();
    private readonly SidecarOptions _options = options.Value;
    private readonly ILogger _logger = loggerFactory.CreateLogger<UnixSocketServer>();
    private readonly ConcurrentDictionary<long, SidecarConnection> _connections = new();
    private readonly ConcurrentDictionary<long, Thread> _threads = new();
    private readonly CancellationTokenSource _stopping = new();
    private Socket? _listener;
    private Task? _acceptLoop;
    private ITimer? _leaseTimer;
    private string? _socketPath;
    private long _nextSessionId;

    /// <summary>The socket path in use once started.</summary>
    public string? SocketPath => _socketPath;

    public Task StartAsync(CancellationToken cancellationToken)
    {
        Connector.Protocol.ProtocolSerializer.Warm();
        try
        {
            CacheWarmup.Run();
        }
        catch (Exception ex) when (ex is CacheException or EngineMemoryException)
        {
            // Only a warm-up: the first real requests pay the JIT instead.
            SidecarLog.WarmupFailed(_logger, ex);
        }

        string path = _options.ResolveSocketPath();
        string? directory = Path.GetDirectoryName(path);
        if (!string.IsNullOrEmpty(directory) && !Directory.Exists(directory))
        {
            Directory.CreateDirectory(directory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute | UnixFileMode.GroupRead | UnixFileMode.GroupExecute);
        }

        RemoveStaleSocket(path);
        var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            listener.Bind(new UnixDomainSocketEndPoint(path));
            if (!SidecarOptionsValidator.TryParseMode(_options.SocketMode, out int mode))
            {
                throw new InvalidOperationException($"Sidecar:SocketMode '{_options.SocketMode}' is not an octal mode");
            }

            File.SetUnixFileMode(path, (UnixFileMode)mode);
            listener.Listen(512);
        }
        catch
        {
            listener.Dispose();
            throw;
        }

        _listener = listener;
        _socketPath = path;
        _acceptLoop = Task.Run(AcceptLoopAsync, CancellationToken.None);
        _leaseTimer = time.CreateTimer(_ => cache.ExpireLeases(), null, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(1));
        SidecarLog.Listening(_logger, path, _options.SocketMode, _options.CapacityBytes);

        // Test harnesses and the demo wait for this line; systemd waits for READY=1 instead.
        Console.Out.WriteLine($"READY {path}");
        Console.Out.Flush();
        return Task.CompletedTask;
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        await _stopping.CancelAsync();
        _listener?.Dispose();
        if (_acceptLoop is not null)
        {
            await _acceptLoop.ConfigureAwait(false);
        }

        int inFlight = _connections.Values.Sum(c => c.InFlight);
        if (inFlight > 0)
        {
            SidecarLog.Draining(_logger, inFlight);
        }

        foreach (SidecarConnection connection in _connections.Values)
        {
            connection.Stop();
        }

        // Each connection thread drains its in-flight copies (bounded by ShutdownTimeout) and exits.
        DateTimeOffset deadline = time.GetUtcNow() + _options.ShutdownTimeout + TimeSpan.FromSeconds(1);
        foreach (Thread thread in _threads.Values)
        {
            TimeSpan left = deadline - time.GetUtcNow();
            thread.Join(left > TimeSpan.Zero ? left : TimeSpan.Zero);
        }

        if (_socketPath is not null)
        {
            File.Delete(_socketPath);
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_leaseTimer is not null)
        {
            await _leaseTimer.DisposeAsync();
        }

        _listener?.Dispose();
        _stopping.Dispose();
    }

    private async Task AcceptLoopAsync()
    {
        while (!_stopping.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await _listener!.AcceptAsync(_stopping.Token).ConfigureAwait(false);
            }
            catch (Exception ex) when (ex is OperationCanceledException or ObjectDisposedException || _stopping.IsCancellationRequested)
            {
                return;
            }
            catch (SocketException ex)
            {
                SidecarLog.AcceptFailed(_logger, ex);
                continue;
            }

            if (_connections.Count >= _options.MaxConnections)
            {
                SidecarLog.TooManyConnections(_logger, _options.MaxConnections);
                counters.Dropped();
                socket.Dispose();
                continue;
            }

            ProcessIdentity peer;
            try
            {
                // Who connected, as the kernel recorded it at connect(): every request of the connection is bound to it.
                peer = PeerCredentials.Read(socket);
            }
            catch (SocketException ex)
            {
                SidecarLog.AcceptFailed(_logger, ex);
                socket.Dispose();
                continue;
            }

            long sessionId = Interlocked.Increment(ref _nextSessionId);
            var connection = new SidecarConnection(sessionId, socket, peer, cache, _claims, copyThreads, counters, _options, _logger);
            _connections[sessionId] = connection;
            var thread = new Thread(() => RunConnection(connection), 256 * 1024) { IsBackground = true, Name = $"kvsidecar-conn-{sessionId}" };
            _threads[sessionId] = thread;
            thread.Start();
        }
    }

    private void RunConnection(SidecarConnection connection)
    {
        try
        {
            connection.Run();
        }
        finally
        {
            _connections.TryRemove(connection.SessionId, out _);
            _threads.TryRemove(connection.SessionId, out _);
            cache.OnSessionClosed(connection.SessionId);
            connection.Dispose();
            connection.Peer.Dispose();
        }
    }

    private void RemoveStaleSocket(string path)
    {
        if (!File.Exists(path))
        {
            return;
        }

        using (var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            try
            {
                probe.Connect(new UnixDomainSocketEndPoint(path));
                throw new InvalidOperationException($"Another sidecar is already listening on {path}; stop it or set Sidecar:SocketPath to another path.");
            }
            catch (SocketException)
            {
                // Nobody listens: the file is left over from a crash.
            }
        }

        File.Delete(path);
        SidecarLog.StaleSocket(_logger, path);
    }
}
